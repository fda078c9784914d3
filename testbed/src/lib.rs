//! weft-testbed: what Weft's privileged tests and benchmarks build on.
//!
//! [`process`]: namespaces, a fabric bridge, child processes and commands
//! that clean up after themselves, and CNI plugin invocation as a runtime
//! does it (errors returned). [`cluster`]: a whole Weft cluster in
//! namespaces (fabric, control namespace with weft-server, node namespaces
//! with weft-agent, a database of its own) for the agent's integration
//! tests (errors fail the test). Nothing here is shipped.

pub mod cluster;
pub mod process;
