//! The `warren` binary: load configuration, start the broker, wait for a signal.

use clap::Parser;
use std::path::PathBuf;
use warren::Config;

#[derive(Debug, Parser)]
#[command(
    name = "warren",
    version,
    about = "A RabbitMQ-compatible AMQP 0-9-1 broker"
)]
struct Cli {
    /// TOML configuration file (keys as in warren.example.toml).
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warren: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log)),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warren: cannot start the runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let broker = match warren::start(config).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                return std::process::ExitCode::from(1);
            }
        };
        tracing::info!(addr = %broker.amqp_addr(), "warren started");
        wait_for_signal().await;
        tracing::info!("shutting down");
        broker.server.shutdown();
        let core = std::sync::Arc::clone(&broker.server.broker);
        core.close_all_connections("broker shutdown");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        if let Some(store) = &core.store {
            if let Err(e) = store.flush_blocking() {
                tracing::error!(error = %e, "final flush of the message store failed");
            }
        }
        std::process::ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
