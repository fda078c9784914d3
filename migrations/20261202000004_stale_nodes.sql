-- Issue 16: the stale-node policy deletes a node that stopped heartbeating
-- (weft-server --stale-node-after) and audits it as `node_stale`, with how
-- long it was silent in `detail`.
ALTER TABLE audit_log DROP CONSTRAINT audit_log_action_check;
ALTER TABLE audit_log ADD CONSTRAINT audit_log_action_check CHECK (action IN
    ('allocate', 'release', 'gc', 'node_register', 'node_update', 'node_delete', 'denied',
     'reserve', 'unreserve', 'bind', 'node_stale'));
