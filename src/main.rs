//! The `meshid` binary: parse the command line, set up logging, run one role until SIGTERM.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
#[cfg(feature = "server")]
use meshid::config::ServerArgs;
#[cfg(feature = "server")]
use meshid::quickstart::QuickstartArgs;
#[cfg(feature = "server")]
use meshid::telemetry::LogFormat;
use meshid::telemetry::init_logging;

/// meshid: an mTLS certificate authority for service meshes.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[cfg(feature = "server")]
    /// Serve Istio's CA API (CreateCertificate) with TokenReview authentication.
    Server(Box<ServerArgs>),
    /// Get an SVID from an Istio-compatible CA and serve it to Envoy over SDS, rotating it.
    Agent(Box<meshid::agent::AgentConfig>),
    #[cfg(feature = "server")]
    /// Run a local CA and one real certificate round trip, then print the certificate.
    Quickstart(QuickstartArgs),
}

/// Completes on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown signal received; draining");
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: anyhow::Result<()> = match cli.command {
        #[cfg(feature = "server")]
        Command::Server(args) => run_server(*args).await,
        Command::Agent(cfg) => {
            let _log = init_logging(cfg.log_format, "info");
            meshid::agent::run_agent(*cfg, shutdown_signal())
                .await
                .map_err(Into::into)
        }
        #[cfg(feature = "server")]
        Command::Quickstart(args) => {
            let _log = init_logging(LogFormat::Text, "error");
            match meshid::quickstart::run(args).await {
                Ok(summary) => {
                    print!("{summary}");
                    Ok(())
                }
                Err(e) => Err(e.into()),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshid: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(feature = "server")]
async fn run_server(args: ServerArgs) -> anyhow::Result<()> {
    let cfg = args.resolve()?;
    let _log = init_logging(cfg.log_format, "info");
    let handle = meshid::app::start_server(cfg, shutdown_signal()).await?;
    handle.wait().await?;
    Ok(())
}
