-- Refused calls (mutual TLS: a node acting for another, a node certificate
-- on an admin RPC) are audited too, with the method in `detail`.
ALTER TABLE audit_log ADD COLUMN detail text;
ALTER TABLE audit_log DROP CONSTRAINT audit_log_action_check;
ALTER TABLE audit_log ADD CONSTRAINT audit_log_action_check CHECK (action IN
    ('allocate', 'release', 'gc', 'node_register', 'node_update', 'node_delete', 'denied'));
