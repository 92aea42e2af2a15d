//! The `warren` binary: load configuration, start the broker, wait for a signal;
//! or, with a subcommand (`warren list-queues`, ...), talk to a running broker's
//! admin API like rabbitmqctl.

mod ctl;

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
    /// Admin API base URL for subcommands (default: http://localhost:<admin_port>,
    /// or https://localhost:<management.ssl.port> when plain HTTP is off).
    #[arg(long, global = true)]
    url: Option<String>,
    /// CA certificates (PEM) to trust for an https:// admin URL.
    #[arg(long, global = true)]
    cacert: Option<PathBuf>,
    /// User for subcommands.
    #[arg(short = 'u', long = "user", global = true, default_value = "guest")]
    api_user: String,
    /// Password for subcommands.
    #[arg(long = "password", global = true, default_value = "guest")]
    api_password: String,
    #[command(subcommand)]
    command: Option<ctl::Command>,
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
    if let Some(cmd) = cli.command {
        let default_url = match (config.admin_tcp_port(), config.admin_ssl_port()) {
            (None, Some(port)) => format!("https://localhost:{port}"),
            (Some(port), _) => format!("http://localhost:{port}"),
            (None, None) => format!("http://localhost:{}", config.admin_port),
        };
        let target = ctl::Target {
            url: cli.url.unwrap_or(default_url),
            user: cli.api_user,
            password: cli.api_password,
            cacert: cli.cacert,
        };
        return match ctl::run(&target, cmd) {
            Ok(out) => {
                print!("{out}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("warren: {e}");
                std::process::ExitCode::from(1)
            }
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log)),
        )
        .init();
    raise_fd_limit();
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
        let mut signals = Signals::register();
        let broker = match warren::start(config).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                return std::process::ExitCode::from(1);
            }
        };
        tracing::info!(
            addr = %broker.amqp_addr(),
            amqps = ?broker.amqps_addr(),
            admin = ?broker.admin_addr(),
            admin_https = ?broker.admin_tls_addr(),
            "warren started"
        );
        signals.wait(&broker).await;
        tracing::info!("shutting down");
        broker.server.shutdown();
        broker.shovels.stop_all();
        if let Some(cluster) = &broker.cluster {
            cluster.shutdown().await;
        }
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

/// The signals the broker answers. Registered before the broker starts, so
/// that a SIGTERM or ctrl-c that comes while it starts (its listeners already
/// open) waits for it and shuts it down cleanly, flushing the store, instead
/// of killing the process with writes still buffered.
struct Signals {
    /// SIGTERM, SIGINT, SIGHUP; `None` where they cannot be registered
    /// (then only ctrl-c is waited for).
    #[cfg(unix)]
    unix: Option<[tokio::signal::unix::Signal; 3]>,
}

impl Signals {
    fn register() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let unix = match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
                signal(SignalKind::hangup()),
            ) {
                (Ok(term), Ok(int), Ok(hup)) => Some([term, int, hup]),
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                    tracing::warn!(error = %e, "cannot register signal handlers; only ctrl-c stops the broker");
                    None
                }
            };
            Signals { unix }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    /// Until ctrl-c or SIGTERM; SIGHUP meanwhile reloads the TLS certificates.
    async fn wait(&mut self, broker: &warren::Warren) {
        #[cfg(unix)]
        if let Some([term, int, hup]) = &mut self.unix {
            loop {
                tokio::select! {
                    _ = term.recv() => return,
                    _ = int.recv() => return,
                    _ = hup.recv() => {
                        tracing::info!("SIGHUP: reloading TLS certificates");
                        // Failures are logged; the old certificates stay in use.
                        let _ = broker.reload_tls();
                    }
                }
            }
        }
        let _ = broker;
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Raise the open-files limit to its hard maximum: every AMQP connection is a file
/// descriptor. Logs the result, or why it could not.
fn raise_fd_limit() {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            tracing::warn!("cannot read the open-files limit; connections are limited by it");
            return;
        }
        if lim.rlim_cur >= lim.rlim_max {
            tracing::info!(limit = lim.rlim_cur, "open-files limit");
            return;
        }
        let before = lim.rlim_cur;
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
            tracing::info!(from = before, to = lim.rlim_max, "open-files limit raised");
        } else {
            tracing::warn!(
                limit = before,
                hard = lim.rlim_max,
                "cannot raise the open-files limit; at most about that many connections"
            );
        }
    }
}
