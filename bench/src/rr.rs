//! Request/response latency over TCP, netperf TCP_RR's shape: one
//! connection, one byte each way per transaction, Nagle off, the next
//! request only after the answer. `weft-bench tcp-rr` runs one end inside
//! a namespace; [`measure`] runs both ends and returns the latencies.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::{
    cluster::Env,
    harness::{Latency, Proc},
};

const PORT: u16 = 5301;

/// Answers every byte of one connection, until the client closes it.
pub fn serve(listen: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    let (mut conn, _) = listener.accept()?;
    conn.set_nodelay(true)?;
    let mut byte = [0u8; 1];
    loop {
        match conn.read(&mut byte)? {
            0 => return Ok(()),
            _ => conn.write_all(&byte)?,
        }
    }
}

/// Runs transactions for `secs` and prints their latencies (ms) as JSON.
pub fn client(connect: &str, secs: f64) -> anyhow::Result<()> {
    // The server may not listen yet.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut conn = loop {
        match TcpStream::connect(connect) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e).with_context(|| format!("connecting to {connect}")),
        }
    };
    conn.set_nodelay(true)?;
    let mut byte = [0u8; 1];
    // A short warm-up: the first transactions pay for ARP and cold caches.
    for _ in 0..100 {
        conn.write_all(&byte)?;
        conn.read_exact(&mut byte)?;
    }
    let run = Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut samples = Vec::with_capacity(200_000);
    while start.elapsed() < run {
        let t = Instant::now();
        conn.write_all(&byte)?;
        conn.read_exact(&mut byte)?;
        samples.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let l = Latency::of(&samples);
    let out = json!({
        "transactions": samples.len(),
        "seconds": start.elapsed().as_secs_f64(),
        "p50": l.p50, "p90": l.p90, "p99": l.p99, "max": l.max,
    });
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{out}")?;
    Ok(())
}

/// Transactions from namespace `from` to `to_ip` (server in `to`).
pub fn measure(env: &Env, from: &str, to: &str, to_ip: &str, secs: u64) -> anyhow::Result<Latency> {
    let bench = env.bin.join("weft-bench");
    let addr = format!("{to_ip}:{PORT}");
    let server = Proc::spawn(
        Command::new("ip")
            .args(["netns", "exec", to])
            .arg(&bench)
            .args(["tcp-rr", "--listen", &addr]),
        &env.dir.join(format!("tcp-rr-{to}.log")),
    )?;
    let out = Command::new("ip")
        .args(["netns", "exec", from])
        .arg(&bench)
        .args(["tcp-rr", "--connect", &addr, "--secs", &secs.to_string()])
        .output()?;
    drop(server);
    anyhow::ensure!(
        out.status.success(),
        "tcp-rr to {addr}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).context("tcp-rr output")?;
    let q = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Ok(Latency {
        p50: q("p50"),
        p90: q("p90"),
        p99: q("p99"),
        max: q("max"),
    })
}
