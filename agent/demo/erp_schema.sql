-- A small professional-services ERP, as a legacy on-prem system might hold it.
CREATE SCHEMA IF NOT EXISTS erp;

CREATE TABLE erp.legal_entities (
    code        text PRIMARY KEY,
    name        text NOT NULL,
    currencies  text[] NOT NULL DEFAULT '{EUR}'
);

CREATE TABLE erp.tax_codes (
    code        text PRIMARY KEY,
    rate        numeric(6,4) NOT NULL,
    legal_entity text NOT NULL REFERENCES erp.legal_entities(code)
);

CREATE TABLE erp.service_lines (
    code        text PRIMARY KEY,
    name        text NOT NULL,
    project_template text NOT NULL
);

CREATE TABLE erp.customers (
    id           bigserial PRIMARY KEY,
    customer_no  text UNIQUE,
    name         text NOT NULL,
    status       text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'hold', 'archived')),
    phone        text,
    credit_limit numeric(14,2),
    tax_code     text,
    legal_entity text,
    crm_id       text UNIQUE,
    notes        text,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE erp.contracts (
    id              bigserial PRIMARY KEY,
    contract_no     text UNIQUE,
    customer_id     bigint REFERENCES erp.customers(id),
    title           text NOT NULL,
    value           numeric(14,2) NOT NULL DEFAULT 0,
    currency        text NOT NULL DEFAULT 'EUR',
    billing_type    text NOT NULL DEFAULT 'fixed_fee',
    legal_entity    text,
    tax_code        text,
    signed_on       date,
    version         integer NOT NULL DEFAULT 1,
    delivery_status text NOT NULL DEFAULT 'not_started',
    crm_id          text UNIQUE,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE erp.contract_revisions (
    id            bigserial PRIMARY KEY,
    contract_id   bigint NOT NULL REFERENCES erp.contracts(id),
    version       integer NOT NULL,
    old_value     numeric(14,2),
    new_value     numeric(14,2),
    billing_schedule jsonb,
    approved_by   text,
    approved_at   timestamptz,
    trace_id      text,
    change_order_ref text UNIQUE,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE erp.projects (
    id               bigserial PRIMARY KEY,
    project_code     text UNIQUE NOT NULL,
    contract_id      bigint REFERENCES erp.contracts(id),
    customer_id      bigint REFERENCES erp.customers(id),
    service_line     text,
    status           text NOT NULL DEFAULT 'setup',
    percent_complete numeric(5,2) NOT NULL DEFAULT 0,
    crm_id           text UNIQUE,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE erp.milestones (
    id           bigserial PRIMARY KEY,
    project_id   bigint NOT NULL REFERENCES erp.projects(id),
    name         text NOT NULL,
    amount       numeric(14,2) NOT NULL DEFAULT 0,
    status       text NOT NULL DEFAULT 'open',
    completed_at timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE erp.invoices (
    id          bigserial PRIMARY KEY,
    invoice_no  text UNIQUE NOT NULL,
    contract_id bigint REFERENCES erp.contracts(id),
    amount      numeric(14,2) NOT NULL,
    status      text NOT NULL DEFAULT 'draft',
    posted_at   timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE erp.payments (
    id          bigserial PRIMARY KEY,
    invoice_id  bigint NOT NULL REFERENCES erp.invoices(id),
    amount      numeric(14,2) NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE erp.time_entries (
    id          bigserial PRIMARY KEY,
    project_id  bigint NOT NULL REFERENCES erp.projects(id),
    person      text NOT NULL,
    hours       numeric(6,2) NOT NULL,
    rate        numeric(10,2) NOT NULL,
    approved    boolean NOT NULL DEFAULT false,
    worked_on   date NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Keep updated_at honest for every table the agent resyncs "since TIME".
CREATE OR REPLACE FUNCTION erp.touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.updated_at := now(); RETURN NEW; END $$;
DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['customers','contracts','projects','milestones','invoices','payments','time_entries'] LOOP
    EXECUTE format('CREATE TRIGGER touch BEFORE UPDATE ON erp.%I FOR EACH ROW EXECUTE FUNCTION erp.touch()', t);
  END LOOP;
END $$;

-- A text copy of each legal entity's currencies ('GBP,EUR'), kept by a trigger, for
-- integrations that map text columns rather than arrays.
ALTER TABLE erp.legal_entities ADD COLUMN currency_codes text;
CREATE FUNCTION erp.legal_entity_currency_codes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.currency_codes := array_to_string(NEW.currencies, ','); RETURN NEW; END $$;
CREATE TRIGGER currency_codes BEFORE INSERT OR UPDATE ON erp.legal_entities
  FOR EACH ROW EXECUTE FUNCTION erp.legal_entity_currency_codes();

INSERT INTO erp.legal_entities VALUES ('ACME-DE', 'Acme Consulting GmbH', '{EUR}'), ('ACME-UK', 'Acme Consulting Ltd', '{GBP,EUR}');
INSERT INTO erp.tax_codes VALUES ('DE-VAT19', 0.19, 'ACME-DE'), ('UK-VAT20', 0.20, 'ACME-UK');
INSERT INTO erp.service_lines VALUES ('ADVISORY', 'Advisory', 'TPL-ADV'), ('IMPL', 'Implementation', 'TPL-IMPL');
