//! weft-plumbing: what every Weft daemon does the same way, written once.
//!
//! [`LogFormat`] and [`init_tracing`] (RUST_LOG-style filters, text for
//! people, JSON for pipelines, always stderr); [`shutdown_signal`]
//! (SIGTERM or SIGINT); [`ConfigErrors`] and [`Collect`] (validate every
//! flag and report every mistake at once); [`Backoff`] (reconnects);
//! [`read_file`] (PEM and other files, naming the path on failure);
//! [`raise_fd_limit`] (one descriptor per client connection).

use std::{fmt, path::Path, time::Duration};

use thiserror::Error;

/// Log output format, as every binary's `--log-format` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber: `filter` in RUST_LOG syntax, on stderr.
pub fn init_tracing(format: LogFormat, filter: &str) -> Result<(), String> {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
    // Colour only for a person at a terminal, never into log files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| e.to_string())
}

/// Whether `filter` is a valid RUST_LOG-style filter, for config checks.
pub fn check_log_filter(filter: &str) -> Result<(), String> {
    tracing_subscriber::EnvFilter::try_new(filter)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Every problem found in a binary's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problems):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Collects validation failures so all are reported together.
#[derive(Debug, Default)]
pub struct Collect(pub Vec<String>);

impl Collect {
    /// The value, or `None` with the error recorded.
    pub fn take<T>(&mut self, result: Result<T, String>) -> Option<T> {
        result.map_err(|e| self.0.push(e)).ok()
    }

    pub fn push(&mut self, error: String) {
        self.0.push(error);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_errors(self) -> ConfigErrors {
        ConfigErrors(self.0)
    }
}

/// Exponential backoff for reconnects: by default 250 ms doubling up to
/// 10 s.
#[derive(Debug)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(250), Duration::from_secs(10))
    }
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            next: first,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// A file that could not be read, with its path.
#[derive(Debug, Error)]
#[error("reading {path}: {source}")]
pub struct FileError {
    pub path: String,
    #[source]
    pub source: std::io::Error,
}

/// Reads a whole text file (a PEM certificate or key, say).
pub fn read_file(path: &Path) -> Result<String, FileError> {
    std::fs::read_to_string(path).map_err(|source| FileError {
        path: path.display().to_string(),
        source,
    })
}

/// Raises the soft limit on open files to the hard limit and returns it. A server holds a socket per agent, and service managers
/// commonly start daemons with a soft limit of 1024, far below a large
/// cluster's node count.
pub fn raise_fd_limit() -> Result<u64, nix::Error> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_ten_seconds_and_resets() {
        let mut b = Backoff::default();
        let delays: Vec<u128> = (0..8).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [250, 500, 1000, 2000, 4000, 8000, 10000, 10000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(250));
    }

    #[test]
    fn every_config_error_is_listed() {
        let mut c = Collect::default();
        assert_eq!(c.take::<u8>(Ok(1)), Some(1));
        assert_eq!(c.take::<u8>(Err("--a: bad".into())), None);
        c.push("--b: worse".into());
        let text = c.into_errors().to_string();
        assert!(
            text.starts_with("invalid configuration (2 problems)"),
            "{text}"
        );
        assert!(text.contains("  - --a: bad\n  - --b: worse"));
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let err = read_file(Path::new("/nonexistent/weft.pem")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/weft.pem"));
    }
}
