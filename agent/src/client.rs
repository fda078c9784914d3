//! The connection to weft-server: one lazily connected channel over every
//! replica, with mutual TLS, HTTP/2 PINGs and TCP keepalive, so a replica
//! that dies or vanishes without a FIN is a reconnect, not an outage.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::Context as _;
use tonic::transport::{Channel, Endpoint};

use crate::config::Config;

/// One endpoint per server replica: each listed URL, and each address of a
/// name that resolves to several. The channel sends each call to a replica
/// that is up, so one replica dying is a reconnect, not an outage.
pub async fn server_channel(config: &Config) -> anyhow::Result<Channel> {
    let endpoint = |uri: tonic::transport::Uri| {
        Endpoint::from(uri)
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            // A server that vanishes without closing the connection (node
            // crash, partition) is noticed within seconds.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .tcp_keepalive(Some(Duration::from_secs(10)))
    };
    let tls = match &config.tls {
        Some(files) => {
            let read = |p: &std::path::Path| {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
            };
            {
                let tls = tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(read(&files.ca)?))
                    .identity(tonic::transport::Identity::from_pem(
                        read(&files.cert)?,
                        read(&files.key)?,
                    ));
                Some(match &files.server_name {
                    Some(name) => tls.domain_name(name.clone()),
                    None => tls,
                })
            }
        }
        None => None,
    };
    let endpoint = |uri: tonic::transport::Uri| -> anyhow::Result<Endpoint> {
        let e = endpoint(uri);
        Ok(match &tls {
            Some(tls) => e.tls_config(tls.clone())?,
            None => e,
        })
    };
    let mut endpoints = Vec::new();
    for uri in &config.servers {
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(7400);
        let addrs: Vec<std::net::SocketAddr> = if host.parse::<std::net::IpAddr>().is_ok() {
            Vec::new()
        } else {
            tokio::net::lookup_host((host, port))
                .await
                .map(Iterator::collect)
                .unwrap_or_default()
        };
        if addrs.len() > 1 {
            for addr in addrs {
                let scheme = uri.scheme_str().unwrap_or("http");
                endpoints.push(endpoint(format!("{scheme}://{addr}").parse()?)?);
            }
        } else {
            endpoints.push(endpoint(uri.clone())?);
        }
    }
    match endpoints.len() {
        1 => Ok(endpoints.remove(0).connect_lazy()),
        _ => Ok(Channel::balance_list(endpoints.into_iter())),
    }
}

pub async fn resolve_server(config: &Config) -> anyhow::Result<Ipv4Addr> {
    let uri = config.servers.first().context("no --server")?;
    let host = uri.host().context("--server has no host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(ip);
    }
    let port = uri.port_u16().unwrap_or(7400);
    tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("resolving {host}"))?
        .find_map(|a| match a.ip() {
            std::net::IpAddr::V4(v4) => Some(v4),
            std::net::IpAddr::V6(_) => None,
        })
        .with_context(|| format!("{host} has no IPv4 address"))
}
