-- Weft's state. PostgreSQL, not the server, guarantees the invariants:
-- one node per block, one active allocation per address and per
-- (container_id, ifname), an append-only audit trail.

CREATE TABLE nodes (
    name          text PRIMARY KEY CHECK (name <> '' AND length(name) <= 253),
    underlay_ip   inet NOT NULL,
    vtep_mac      macaddr NOT NULL,
    -- Index of the node's block within the cluster CIDR.
    block_index   integer NOT NULL UNIQUE CHECK (block_index >= 0),
    block         cidr NOT NULL UNIQUE,
    -- Round-robin cursor: host offset of the last address handed out.
    last_offset   integer NOT NULL DEFAULT 0,
    registered_at timestamptz NOT NULL DEFAULT now(),
    last_seen     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE allocations (
    address       inet PRIMARY KEY,
    node_name     text NOT NULL REFERENCES nodes (name),
    container_id  text NOT NULL CHECK (container_id <> ''),
    ifname        text NOT NULL CHECK (ifname <> '' AND octet_length(ifname) <= 15),
    pod_namespace text NOT NULL DEFAULT '',
    pod_name      text NOT NULL DEFAULT '',
    pod_uid       text NOT NULL DEFAULT '',
    allocated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT allocations_attachment_key UNIQUE (container_id, ifname)
);
CREATE INDEX allocations_node_idx ON allocations (node_name);
CREATE INDEX allocations_pod_idx ON allocations (pod_namespace, pod_name);

CREATE TABLE audit_log (
    id            bigserial PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT clock_timestamp(),
    action        text NOT NULL CHECK (action IN
                    ('allocate', 'release', 'gc', 'node_register', 'node_update', 'node_delete')),
    actor         text NOT NULL,
    node_name     text NOT NULL,
    address       inet,
    container_id  text,
    ifname        text,
    pod_namespace text,
    pod_name      text,
    pod_uid       text
);
CREATE INDEX audit_log_address_idx ON audit_log (address, id);
CREATE INDEX audit_log_container_idx ON audit_log (container_id, id);

CREATE FUNCTION audit_log_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END
$$;
CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_is_append_only();

-- The topology revision. Every topology change takes this row's lock and
-- bumps it, so revisions commit in order and a reader that sees revision N
-- has seen every revision below it.
CREATE TABLE topology_revision (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    revision  bigint NOT NULL
);
INSERT INTO topology_revision (revision) VALUES (0);

-- Recent topology changes, so a reconnecting watcher gets only what it
-- missed. Old rows are pruned; a watcher older than the oldest row gets a
-- snapshot instead.
CREATE TABLE topology_events (
    revision    bigint PRIMARY KEY,
    node_name   text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('upsert', 'delete')),
    underlay_ip inet,
    vtep_mac    macaddr,
    block       cidr,
    at          timestamptz NOT NULL DEFAULT now()
);
