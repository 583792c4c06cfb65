"""Row filters: only boolean expressions over the table's own columns reach CREATE PUBLICATION."""

from __future__ import annotations

import pytest

from agent.errors import ConfigError
from connectors.postgres.filters import check_row_filter

COLUMNS = ("id", "status", "amount", "region", "name", "active", "created_at", "deleted_at")


@pytest.mark.parametrize(
    ("expr", "normalised"),
    [
        ("status = 'open'", "status = 'open'"),
        ("status <> 'void' AND amount > 0", "status <> 'void' AND amount > 0"),
        ("amount >= 10.5 OR amount < -1", "amount >= 10.5 OR amount < -1"),
        ("NOT active", "NOT active"),
        ("active", "active"),
        ("deleted_at IS NULL", "deleted_at IS NULL"),
        ("deleted_at IS NOT NULL", "deleted_at IS NOT NULL"),
        ("active IS TRUE", "active IS TRUE"),
        ("active IS NOT FALSE", "active IS NOT FALSE"),
        ("region IN ('EU', 'US')", "region IN ('EU', 'US')"),
        ("id IN (1, 2, -3)", "id IN (1, 2, -3)"),
        ("amount BETWEEN 1 AND 100", "amount BETWEEN 1 AND 100"),
        ("amount NOT BETWEEN 1 AND 100", "amount NOT BETWEEN 1 AND 100"),
        ("name LIKE 'A%'", "name LIKE 'A%'"),
        ("name ILIKE '%gmbh'", "name ILIKE '%gmbh'"),
        ("lower(region) = 'eu'", "lower(region) = 'eu'"),
        ("length(name) > 3", "length(name) > 3"),
        ("coalesce(region, 'none') <> 'none'", "COALESCE(region, 'none') <> 'none'"),
        ("created_at >= '2024-01-01'::date", "created_at >= CAST('2024-01-01' AS date)"),
        ("amount::numeric(12,2) > 0", "CAST(amount AS numeric(12, 2)) > 0"),
        ("region IS DISTINCT FROM 'EU'", "region IS DISTINCT FROM 'EU'"),
        ("(status = 'a' OR status = 'b') AND active", "(status = 'a' OR status = 'b') AND active"),
        ("amount * 2 > 10", "amount * 2 > 10"),
        ("  status   =   'x'  ", "status = 'x'"),
        ("abs(amount) < 5 AND upper(name) LIKE 'X%'", "abs(amount) < 5 AND upper(name) LIKE 'X%'"),
    ],
)
def test_check_row_filter_returns_normalised_text_when_expression_is_allowed(
    expr: str, normalised: str
) -> None:
    assert check_row_filter(expr, COLUMNS, key="tables.orders.row_filter") == normalised


@pytest.mark.parametrize(
    ("expr", "reason_part"),
    [
        ("1=1; DROP TABLE x", "several statements"),
        ("true; DELETE FROM orders", "several statements"),
        ("id IN (SELECT id FROM secrets)", "subquer"),
        ("EXISTS (SELECT 1)", "not allowed"),
        ("id = (SELECT max(id) FROM orders)", "subquer"),
        ("pg_sleep(10) IS NULL", "pg_sleep"),
        ("random() > 0.5", "random"),
        ("now() > created_at", "now"),
        ("count(*) > 1", "count"),
        ("lower(DISTINCT name) = 'x'", "aggregate"),
        ("id = 1 -- AND true", "comments"),
        ("id = 1 /* ) OR (true */", "comments"),
        ("xmin = '1'", "system column"),
        ("ctid = '(0,1)'", "system column"),
        ("orders.id = 1", "unqualified"),
        ("other_col = 1", "unknown column 'other_col'"),
        ("id = $1", "parameter"),
        ("id = 1 ORDER BY 1", "no further SQL clauses"),
        ("true UNION SELECT 1", "plain boolean expression"),
        ("id = 1 GROUP BY 1", "no further SQL clauses"),
        ("id = 1) OR (1 = 1", "not valid SQL"),
        ("'yes'", "not true/false"),
        ("amount + 1", "does not give a condition"),
        ("id OPERATOR(pg_catalog.=) 1", "schema-qualified"),
        ("name::regclass IS NOT NULL", "cast to regclass"),
        ("id IN (id, 2)", "only constants"),
        ("public.lower(name) = 'x'", "public.lower"),
        ("generate_series(1, 2) = 1", "generate_series"),
        ("name SIMILAR TO 'a'", "not allowed"),
        ("", "non-empty"),
        ("x" * 2001, "longer than"),
    ],
)
def test_check_row_filter_raises_config_error_when_expression_is_refused(expr: str, reason_part: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_row_filter(expr, COLUMNS, key="tables.orders.row_filter")
    (issue,) = info.value.errors
    assert issue.key == "tables.orders.row_filter"
    assert issue.file == ""
    assert reason_part in issue.reason


def test_check_row_filter_accepts_any_column_when_columns_unknown() -> None:
    assert check_row_filter("whatever = 1", None, key="k") == "whatever = 1"


def test_check_row_filter_still_refuses_system_columns_when_columns_unknown() -> None:
    with pytest.raises(ConfigError):
        check_row_filter("xmax = '0'", None, key="k")


def test_referenced_columns_lists_every_column_when_filter_is_accepted() -> None:
    from connectors.postgres.filters import referenced_columns

    used = referenced_columns("lower(region) = 'eu' AND amount BETWEEN 1 AND 9 AND deleted_at IS NULL")
    assert used == {"region", "amount", "deleted_at"}
