//! The `latchkey` binary: parse the command line, call the library.

use std::process::ExitCode;

use clap::Parser;
use latchkey::{
    config::{Cli, Command},
    server, telemetry,
};
use tokio::net::TcpListener;
use tracing::error;

#[tokio::main]
async fn main() -> ExitCode {
    telemetry::init_logs();
    let result = match Cli::parse().command {
        Command::Serve(config) => serve(config).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: latchkey::config::Config) -> anyhow::Result<()> {
    config.validate()?;
    let listener = TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.server.listen))?;
    server::run(config, listener, shutdown_signal()).await
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    if let Err(error) = server::termination_signal().await {
        error!(%error, "cannot install signal handlers; stop latchkey with SIGKILL");
        std::future::pending::<()>().await;
    }
}
