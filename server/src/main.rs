use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    weft_server::run(weft_server::config::Cli::parse()).await
}
