//! Latency statistics; the namespace and process helpers the benchmarks
//! share with the tests live in weft-testbed.

use std::time::{Duration, Instant};

pub use weft_testbed::process::*;

/// [`wait_until`] for async code: sleeps on the runtime, not the thread,
/// so the tasks being waited on keep running.
pub async fn wait_until_async(
    what: &str,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let start = Instant::now();
    while !done() {
        anyhow::ensure!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// p50/p90/p99/max of a sample, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Latency {
    pub fn of(samples: &[f64]) -> Self {
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let at = |q: f64| {
            if s.is_empty() {
                return f64::NAN;
            }
            let i = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
            s[i]
        };
        Self {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: s.last().copied().unwrap_or(f64::NAN),
        }
    }
}
