//! The weft-agent binary: parses flags and runs the agent (see the library).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    weft_agent::run(weft_agent::config::Cli::parse()).await
}
