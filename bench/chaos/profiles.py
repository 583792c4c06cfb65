"""The chaos run's knobs: profiles, the seeded fault timeline and the agent's config."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from bench.chaos.faults import STORM_KINDS

DB = "chaos"
FAULT_KINDS = frozenset({"kill", "storm", "pg", "disk"})
Range = tuple[float, float]


@dataclass(frozen=True, slots=True)
class Profile:
    """Durations, rates and fault frequencies of one run."""

    name: str
    chaos_seconds: float
    steps_per_second: float
    max_records: int
    kill_after: Range
    early_kill_share: float
    storm_seconds: Range
    calm_seconds: Range
    pg_restart_every: Range
    disk_full_every: Range
    disk_full_seconds: Range
    drain_timeout: float
    idle_seconds: float
    tmpfs_mb: int
    min_kills: int


PROFILES = {
    "short": Profile(
        name="short",
        chaos_seconds=60,
        steps_per_second=6.0,
        max_records=60,
        kill_after=(1.5, 6.0),
        early_kill_share=0.1,
        storm_seconds=(3, 7),
        calm_seconds=(1.5, 3.5),
        pg_restart_every=(18, 26),
        disk_full_every=(20, 30),
        disk_full_seconds=(3, 6),
        drain_timeout=90,
        idle_seconds=5,
        tmpfs_mb=32,
        min_kills=5,
    ),
    "long": Profile(
        name="long",
        chaos_seconds=600,
        steps_per_second=4.0,
        max_records=300,
        kill_after=(2.0, 10.0),
        early_kill_share=0.1,
        storm_seconds=(25, 100),
        calm_seconds=(5, 20),
        pg_restart_every=(60, 110),
        disk_full_every=(70, 130),
        disk_full_seconds=(8, 25),
        drain_timeout=300,
        idle_seconds=5,
        tmpfs_mb=64,
        min_kills=50,
    ),
}


def config_text(work: Path, port: int, sf_url: str, state_path: Path) -> str:
    """The chaos config: the ownership rules of the e2e sync tests, short intervals, revert policy."""
    return f"""
[agent]
state_path = "{state_path}"
resolve_interval = 0.5
retry_base_seconds = 0.2
retry_cap_seconds = 5.0
max_attempts = 500

[systems.erp]
type = "postgres"
host = "127.0.0.1"
port = {port}
dbname = "{DB}"
user = "postgres"
slot = "{DB}"
publication = "{DB}"
origin = "{DB}"
poll_interval = 0.5
connect_timeout = 3

[systems.crm]
type = "salesforce"
instance_url = "{sf_url}"
client_id = {{env = "SF_CLIENT_ID"}}
client_secret = {{env = "SF_CLIENT_SECRET"}}
lookback_seconds = 5
poll_interval = 0.5
timeout_seconds = 10

[entities.customer]
on_non_owner_edit = "revert"
on_conflict = "latest"

[entities.customer.systems.erp]
object = "erp.customers"
key = "id"
external_id = "crm_id"
match_on = "customer_no"
updated_at = "updated_at"

[entities.customer.systems.crm]
object = "Account"
key = "Id"
external_id = "ERP_Id__c"
match_on = "customer_no"

[entities.customer.fields]
name = {{owner = "crm", erp = "name", crm = "Name"}}
customer_no = {{owner = "erp", erp = "customer_no", crm = "AccountNumber"}}
phone = {{owner = "shared", erp = "phone", crm = "Phone"}}
credit_limit = {{owner = "erp", type = "decimal", erp = "credit_limit", crm = "Credit_Limit__c"}}

[entities.customer.fields.status]
owner = "erp"
erp = "status"
crm = "Status__c"
values = {{crm = {{active = "Active", hold = "On Hold", archived = "Inactive"}}}}
"""


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """The seeded timeline of storms, PostgreSQL restarts and disk-full windows (seconds from start)."""

    storms: tuple[tuple[float, str, float, float], ...]
    pg_restarts: tuple[float, ...]
    disk_full: tuple[tuple[float, float], ...]


def plan_faults(profile: Profile, rng: random.Random) -> FaultPlan:
    """Draw the fault timeline of a run from ``rng``."""
    end = profile.chaos_seconds
    storms, kinds = [], list[str]()
    t = rng.uniform(*profile.calm_seconds) / 2
    while t < end - 1:
        if not kinds:
            kinds = list(STORM_KINDS)
            rng.shuffle(kinds)
        length = min(rng.uniform(*profile.storm_seconds), end - t)
        rate = 1.0 if rng.random() < 0.4 else rng.uniform(0.3, 0.8)
        storms.append((round(t, 2), kinds.pop(), round(rate, 2), round(length, 2)))
        t += length + rng.uniform(*profile.calm_seconds)
    restarts, t = [], rng.uniform(*profile.pg_restart_every) / 2
    while t < end - 3:
        restarts.append(round(t, 2))
        t += rng.uniform(*profile.pg_restart_every)
    disks, t = [], rng.uniform(*profile.disk_full_every) / 2
    while t < end - 2:
        length = min(rng.uniform(*profile.disk_full_seconds), end - t - 1)
        disks.append((round(t, 2), round(length, 2)))
        t += length + rng.uniform(*profile.disk_full_every)
    return FaultPlan(tuple(storms), tuple(restarts), tuple(disks))
