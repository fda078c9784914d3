-- Per-node address reserves (issue 14, docs/design.md "Per-node reserves").
-- The server reserves addresses of a node's block for that node; the node
-- binds them to attachments on its own and reports each bind and release.

-- A node row's epoch changes whenever the row is created (a new node, or a
-- deleted node registering again). Reserve, Report and Sync carry the
-- epoch the agent registered under; a stale one is refused, so an agent of
-- a deleted node cannot write into the node's next life.
CREATE SEQUENCE node_epoch_seq;
ALTER TABLE nodes ADD COLUMN epoch bigint NOT NULL DEFAULT nextval('node_epoch_seq');
-- Highest report sequence number applied for this epoch: reports are
-- idempotent (a resent event is skipped) and a gap (a commit lost in a
-- failover) is seen.
ALTER TABLE nodes ADD COLUMN report_seq bigint NOT NULL DEFAULT 0;

-- An allocation is `reserved` for its node (no attachment yet) or `bound`
-- to an attachment. `at` is when the node bound it (node clock),
-- `recorded_at` when PostgreSQL heard of it, `offline` whether the node
-- bound it while weft-server was out of reach.
ALTER TABLE allocations ADD COLUMN state text NOT NULL DEFAULT 'bound'
    CHECK (state IN ('reserved', 'bound'));
ALTER TABLE allocations ALTER COLUMN container_id DROP NOT NULL;
ALTER TABLE allocations ALTER COLUMN ifname DROP NOT NULL;
ALTER TABLE allocations ADD CONSTRAINT allocations_bound_has_attachment
    CHECK ((state = 'bound') = (container_id IS NOT NULL AND ifname IS NOT NULL));
ALTER TABLE allocations ADD COLUMN at timestamptz;
UPDATE allocations SET at = allocated_at;
ALTER TABLE allocations ALTER COLUMN at SET NOT NULL;
ALTER TABLE allocations ALTER COLUMN at SET DEFAULT now();
ALTER TABLE allocations ADD COLUMN recorded_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE allocations ADD COLUMN offline boolean NOT NULL DEFAULT false;
CREATE INDEX allocations_node_state_idx ON allocations (node_name, state);

-- The audit trail says when a bind or release happened on the node (`at`)
-- and when it was recorded; rows written before this migration have no
-- `recorded_at` (it equals `at` for them).
ALTER TABLE audit_log ADD COLUMN recorded_at timestamptz;
ALTER TABLE audit_log ALTER COLUMN recorded_at SET DEFAULT clock_timestamp();
ALTER TABLE audit_log ADD COLUMN offline boolean NOT NULL DEFAULT false;
ALTER TABLE audit_log DROP CONSTRAINT audit_log_action_check;
ALTER TABLE audit_log ADD CONSTRAINT audit_log_action_check CHECK (action IN
    ('allocate', 'release', 'gc', 'node_register', 'node_update', 'node_delete', 'denied',
     'reserve', 'unreserve', 'bind'));

GRANT USAGE ON SEQUENCE node_epoch_seq TO weft_server;
