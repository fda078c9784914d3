-- Hardening (issue 12): invariants that the database, not the server, keeps.

-- The layout the database was built with. The first server to start records
-- its --cluster-cidr/--node-prefix-len; a replica started with another one
-- refuses to serve instead of handing out overlapping blocks.
CREATE TABLE cluster_layout (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    cluster_cidr    cidr NOT NULL,
    node_prefix_len integer NOT NULL CHECK (node_prefix_len BETWEEN 1 AND 128),
    recorded_at     timestamptz NOT NULL DEFAULT now()
);

-- One node per tunnel endpoint: a second node claiming another's VTEP MAC
-- or underlay address would redirect that node's traffic.
ALTER TABLE nodes ADD CONSTRAINT nodes_vtep_mac_key UNIQUE (vtep_mac);
ALTER TABLE nodes ADD CONSTRAINT nodes_underlay_ip_key UNIQUE (underlay_ip);
-- No two blocks overlap, whatever layout wrote them.
ALTER TABLE nodes ADD CONSTRAINT nodes_block_no_overlap
    EXCLUDE USING gist (block inet_ops WITH &&);

-- An allocation is one host address, never a prefix.
ALTER TABLE allocations ADD CONSTRAINT allocations_host_address
    CHECK (masklen(address) = CASE family(address) WHEN 4 THEN 32 ELSE 128 END);

-- Blocks of deleted nodes, held back from other nodes until `until`: the
-- deleted node's agent may still run pods with those addresses. The same
-- node name registering again gets its block back.
CREATE TABLE retired_blocks (
    block_index integer PRIMARY KEY,
    block       cidr NOT NULL,
    node_name   text NOT NULL,
    retired_at  timestamptz NOT NULL DEFAULT now(),
    until       timestamptz NOT NULL
);
CREATE INDEX retired_blocks_node_idx ON retired_blocks (node_name);

-- The serving role (docs/security.md): a login role that is a member of
-- weft_server reads and writes Weft's tables but may only read and append
-- to the audit log. The migrating role owns every table, so the serving
-- role cannot drop the append-only trigger or the table. Operators create
-- weft_server beforehand when the migrating role lacks CREATEROLE.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'weft_server') THEN
        CREATE ROLE weft_server NOLOGIN;
    END IF;
END
$$;
GRANT SELECT, INSERT, UPDATE, DELETE
    ON nodes, allocations, topology_revision, topology_events, retired_blocks TO weft_server;
GRANT SELECT, INSERT ON cluster_layout TO weft_server;
GRANT SELECT, INSERT ON audit_log TO weft_server;
GRANT USAGE ON SEQUENCE audit_log_id_seq TO weft_server;
GRANT SELECT ON _sqlx_migrations TO weft_server;
