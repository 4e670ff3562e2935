//! The `quadrige-proxy` command line: run the proxy, or check a configuration.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use quadrige_proxy::route::RouteTable;
use quadrige_proxy::server::ReloadRequest;
use quadrige_proxy::{Config, Server};
use tracing_subscriber::EnvFilter;

/// A streaming reverse proxy with per-route timeouts for GeoNature.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// The TOML configuration file.
    #[arg(
        long,
        short,
        global = true,
        default_value = "/etc/quadrige-proxy/proxy.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration and print the resolved route table.
    Check,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check) => check(&cli.config),
        None => run(&cli.config),
    }
}

fn check(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    println!("{}: OK", path.display());
    let listen: Vec<String> = config.server.listen.iter().map(|a| a.to_string()).collect();
    println!("listen: {}", listen.join(", "));
    if let Some(tls) = &config.server.tls {
        let listen: Vec<String> = tls.listen.iter().map(|a| a.to_string()).collect();
        println!(
            "tls: {} (certificate {}, key {}{}{})",
            listen.join(", "),
            tls.certificate.display(),
            tls.key.display(),
            if tls.redirect_http {
                ", plain HTTP redirected"
            } else {
                ""
            },
            tls.hsts
                .as_deref()
                .map(|h| format!(", HSTS {h}"))
                .unwrap_or_default()
        );
    }
    for upstream in &config.upstreams {
        println!(
            "upstream {}: {}{}",
            upstream.name,
            upstream.address,
            if upstream.preserve_host {
                " (preserve_host)"
            } else {
                ""
            }
        );
    }
    println!("\nroutes, in match order (first match wins):");
    print!("{}", RouteTable::new(&config).render(&config.upstreams));
    Ok(())
}

fn run(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("quadrige_proxy={}", config.log.level)));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let server = Server::bind(&config).await?;
        tracing::info!(config = %path.display(), version = env!("CARGO_PKG_VERSION"), "quadrige-proxy started");
        server.run_with_reloads(shutdown_signal(), reload_requests()?).await;
        tracing::info!("stopped");
        Ok(())
    })
}

/// One message per SIGHUP (systemd's `ExecReload`, logrotate).
fn reload_requests() -> anyhow::Result<tokio::sync::mpsc::Receiver<ReloadRequest>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP received: reloading");
            // A reload already queued covers this one too.
            let _ = sender.try_send(ReloadRequest::logged());
        }
    });
    Ok(receiver)
}

/// Resolves on SIGTERM (systemd stop) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; stop with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
