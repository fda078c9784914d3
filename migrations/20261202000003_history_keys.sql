-- History by pod and by node (the operator's "what happened to this pod",
-- and a node's refused calls) walk an index each, as by address and by
-- container.
CREATE INDEX audit_log_pod_idx ON audit_log (pod_namespace, pod_name, id);
CREATE INDEX audit_log_node_idx ON audit_log (node_name, id);
