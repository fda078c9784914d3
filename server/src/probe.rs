//! `weft-server probe`: one grpc.health.v1 check, for an exec probe.

use std::time::Duration;

use anyhow::Context as _;

use crate::config;

/// One grpc.health.v1 check against a running server.
pub(crate) async fn probe(args: &config::ProbeArgs) -> anyhow::Result<()> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let scheme = if args.tls_ca.is_some() {
        "https"
    } else {
        "http"
    };
    let mut endpoint =
        tonic::transport::Endpoint::from_shared(format!("{scheme}://{}", args.addr))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(3));
    if let Some(ca) = &args.tls_ca {
        let ca =
            std::fs::read_to_string(ca).with_context(|| format!("reading {}", ca.display()))?;
        endpoint = endpoint.tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                .domain_name(args.tls_server_name.clone()),
        )?;
    }
    // The usual mistake is the scheme: a TLS server probed in plaintext
    // (or the reverse) fails with a protocol error that does not say so.
    let hint = if args.tls_ca.is_some() {
        "; if the server runs with --insecure-plaintext, leave out --tls-ca"
    } else {
        "; if the server runs with mutual TLS, pass --tls-ca (its CA) and --tls-server-name"
    };
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {}{hint}", args.addr))?;
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .with_context(|| format!("checking the health of {}{hint}", args.addr))?
        .into_inner()
        .status;
    anyhow::ensure!(
        status == ServingStatus::Serving as i32,
        "not serving (status {status})"
    );
    Ok(())
}
