-- syncagent: the ERP-side, least-privilege PostgreSQL role. A psql script; run it as a
-- superuser, in the ERP database, once per database (it is idempotent: run it again after
-- a mapping change):
--
--   psql -X -v ON_ERROR_STOP=1 -d erp \
--        -v role=syncagent -v schema=erp \
--        -v read_tables='{erp.customers,erp.contracts,erp.projects}' \
--        -v write_tables='{erp.customers,erp.contracts}' \
--        -v init_origin=off \
--        -f packaging/postgres-setup.sql
--
-- Variables (psql -v NAME=VALUE):
--   role          the agent's login role (default syncagent: systems.<erp>.user)
--   schema        where table names without a schema are looked up (default erp)
--   read_tables   required: every table the config maps for this system, as a PostgreSQL
--                 array literal. The agent captures them through the slot and reads them
--                 for checks and resyncs, so it gets SELECT on these and nothing else.
--   write_tables  the mapped tables the agent writes (a field the ERP does not own, or a
--                 workflow creating projects): INSERT, UPDATE, DELETE, and USAGE on the
--                 sequences feeding their serial or identity columns. Default: none.
--   init_origin   on: let the role create its replication origin, so `syncagent init` can
--                 run as the role. Default off: create the origin as an admin (below).
--
-- What the role gets, and why:
--   LOGIN REPLICATION        REPLICATION lets it create a logical slot, peek it
--                            (pg_logical_slot_peek_binary_changes) and advance it
--                            (pg_replication_slot_advance). It is not a superuser.
--   EXECUTE on pg_replication_origin_session_setup(text) and _session_reset()
--                            its ERP writes run in a session tagged with the origin, so
--                            capture can tell them apart and drop the echoes. These
--                            functions are superuser-only until granted.
--   pg_replication_origin_create(text), only with init_origin=on; measured on PG 15: this
--                            GRANT is enough for a non-superuser to create the origin.
--   CONNECT on this database, USAGE on the tables' schemas, the table grants above.
--   Nothing else: no CREATE on any schema, no other table.
--
-- Passwords are not set here (they would land in shell history and server logs). Set one
-- interactively, SCRAM-hashed on the client, and store the same text as the agent's
-- credential:   psql -d erp -c '\password syncagent'
--               install -m 0600 /dev/stdin /etc/syncagent/credentials/erp_password
-- and allow the role in pg_hba.conf (hostssl erp syncagent <agent-ip>/32 scram-sha-256).
--
-- The publication belongs to the table owner. CREATE PUBLICATION ... FOR TABLE and ALTER
-- PUBLICATION ... SET TABLE need ownership of every listed table (or a superuser), so the
-- agent's role cannot make or change it, by design. Print what `syncagent init` would run:
--
--   syncagent -c /etc/syncagent/config.toml init --dry-run
--
-- which looks like this (names and row filters come from the config):
--
--   CREATE PUBLICATION "syncagent" FOR TABLE "erp"."contracts", "erp"."customers" WHERE (status <> 'archived');
--   COMMENT ON PUBLICATION "syncagent" IS 'syncagent spec ...';
--   SELECT pg_create_logical_replication_slot('syncagent', 'pgoutput');
--   SELECT pg_replication_origin_create('syncagent');
--
-- The table owner (or a superuser) runs the PUBLICATION and COMMENT lines exactly as
-- printed: the comment records which tables and filters the publication was made for, and
-- `syncagent init` compares it. A superuser runs the origin line unless init_origin=on.
-- Then `syncagent init`, as the agent's role, finds the publication in place and creates
-- the slot (REPLICATION is enough for that). After a mapping change, repeat: dry-run, the
-- owner runs the printed ALTER PUBLICATION and COMMENT, then init.
--
-- REPLICA IDENTITY: a published table's UPDATEs and DELETEs must identify the row.
--   DEFAULT (the primary key) is right for most tables. A table without a primary key gets
--   its UPDATEs and DELETEs refused by PostgreSQL once it is published: give it one, or
--   ALTER TABLE erp.t REPLICA IDENTITY FULL. A publication row filter (PG 15+) on a
--   table that publishes UPDATE/DELETE may only use replica-identity columns: a filter on
--   a non-key column (status <> 'archived') needs REPLICA IDENTITY FULL on that table.
--   FULL writes the whole old row to the WAL on every UPDATE and DELETE: more WAL, so use
--   it only where a filter needs it. `syncagent check` names each table that needs it.
--   These ALTER TABLE statements are the table owner's too.

\set ON_ERROR_STOP on
\if :{?role}
\else
  \set role syncagent
\endif
\if :{?schema}
\else
  \set schema erp
\endif
\if :{?write_tables}
\else
  \set write_tables '{}'
\endif
\if :{?init_origin}
\else
  \set init_origin off
\endif
\if :{?read_tables}
\else
  DO $$ BEGIN RAISE EXCEPTION 'postgres-setup.sql: set read_tables, e.g. -v read_tables={erp.customers,erp.contracts}'; END $$;
\endif

SELECT rolsuper AS is_superuser FROM pg_roles WHERE rolname = current_user \gset
\if :is_superuser
\else
  DO $$ BEGIN RAISE EXCEPTION 'postgres-setup.sql: run this as a superuser: only a superuser may grant REPLICATION and EXECUTE on the origin functions'; END $$;
\endif

BEGIN;
SET LOCAL search_path TO :"schema";

-- Every listed table must exist (the regclass cast fails otherwise), and the tables
-- written must be among those read: the sink reads what it writes (UPDATE ... WHERE,
-- RETURNING), and capture needs SELECT for checks and resyncs.
SELECT count(*) AS not_read FROM unnest(:'write_tables'::regclass[]) w
 WHERE w <> ALL (:'read_tables'::regclass[]) \gset
SELECT (:not_read > 0) AS bad_write_tables \gset
\if :bad_write_tables
  DO $$ BEGIN RAISE EXCEPTION 'postgres-setup.sql: every table in write_tables must also be in read_tables'; END $$;
\endif

SELECT NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role') AS create_role \gset
\if :create_role
  CREATE ROLE :"role" LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS;
\else
  ALTER ROLE :"role" LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS;
\endif
COMMENT ON ROLE :"role" IS 'syncagent: captures the mapped tables through a logical slot and writes the fields the CRM owns';

SELECT format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), :'role') \gexec

SELECT DISTINCT format('GRANT USAGE ON SCHEMA %I TO %I', n.nspname, :'role')
  FROM unnest(:'read_tables'::regclass[]) t
  JOIN pg_class c ON c.oid = t
  JOIN pg_namespace n ON n.oid = c.relnamespace \gexec

SELECT format('GRANT SELECT ON TABLE %s TO %I', t, :'role')
  FROM unnest(:'read_tables'::regclass[]) t \gexec

SELECT format('GRANT INSERT, UPDATE, DELETE ON TABLE %s TO %I', t, :'role')
  FROM unnest(:'write_tables'::regclass[]) t \gexec

-- Sequences behind serial ('a') and identity ('i') columns of the tables written.
SELECT format('GRANT USAGE ON SEQUENCE %s TO %I', d.objid::regclass, :'role')
  FROM pg_depend d
  JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
 WHERE d.classid = 'pg_class'::regclass
   AND d.refclassid = 'pg_class'::regclass
   AND d.deptype IN ('a', 'i')
   AND d.refobjid = ANY (:'write_tables'::regclass[]) \gexec

GRANT EXECUTE ON FUNCTION pg_catalog.pg_replication_origin_session_setup(text) TO :"role";
GRANT EXECUTE ON FUNCTION pg_catalog.pg_replication_origin_session_reset() TO :"role";
\if :init_origin
  GRANT EXECUTE ON FUNCTION pg_catalog.pg_replication_origin_create(text) TO :"role";
\else
  REVOKE EXECUTE ON FUNCTION pg_catalog.pg_replication_origin_create(text) FROM :"role";
\endif

COMMIT;

-- On PostgreSQL 14 and older every role may create tables in schema public. Close that
-- for everyone (check that no other application relies on it first):
--   REVOKE CREATE ON SCHEMA public FROM PUBLIC;

\echo
\echo 'Role' :"role" 'is ready. Next, as the table owner: run the PUBLICATION lines printed by'
\echo '  syncagent init --dry-run'
\echo 'then `syncagent init` as the agent. Set the password with: \\password' :"role"
