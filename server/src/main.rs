//! The weft-server binary: parses flags and runs the server (see the library).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    weft_server::run(weft_server::config::Cli::parse_args()).await
}
