//! The `quadrige-proxy` command line: run the proxy, or check a configuration.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
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
    ///
    /// With --gunicorn-unit or --gunicorn-timeout, also print each route's timeout
    /// chain (browser → proxy timers → Gunicorn's worker timeout) and warn, with the
    /// line to change, where Gunicorn would kill the worker before the proxy's timer.
    Check(CheckArgs),
    /// Translate an Apache setup into a commented quadrige-proxy configuration (stdout).
    ///
    /// Give the vhost files (sites-available/geonature.conf, certbot's
    /// geonature-le-ssl.conf, ...): the files they Include/IncludeOptional are read too.
    /// What has no equivalent is listed at the top of the output, never dropped.
    ImportApache(ImportArgs),
    /// Print a shell completion script.
    #[command(hide = true)]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (quadrige-proxy.1 and one per command) into a folder.
    #[command(hide = true)]
    Manpages {
        /// Where to write them.
        dir: PathBuf,
    },
}

#[derive(Args)]
struct CheckArgs {
    /// Gunicorn's systemd unit (e.g. /etc/systemd/system/geonature.service): its
    /// ExecStart --timeout and --bind, Environment= lines, drop-ins and EnvironmentFile
    /// (GeoNature's BASE_DIR/environ with GUNICORN_TIMEOUT=...).
    #[arg(long, value_name = "UNIT_FILE")]
    gunicorn_unit: Option<PathBuf>,
    /// Gunicorn's --timeout in seconds (0: none); wins over the unit's.
    #[arg(long, value_name = "SECONDS")]
    gunicorn_timeout: Option<u64>,
    /// How long clients wait for an answer, in seconds, as the chain's first link
    /// (GeoNature's frontend sets no limit).
    #[arg(long, value_name = "SECONDS")]
    browser_timeout: Option<u64>,
}

#[derive(Args)]
struct ImportArgs {
    /// Apache configuration files, read in this order as one configuration.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
    /// Read absolute Include paths under this folder, for a copy of a server's files
    /// (the output keeps the server's own paths).
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Apache's ServerRoot, where relative Include paths start.
    #[arg(long, value_name = "DIR", default_value = "/etc/apache2")]
    server_root: String,
    /// Define NAME for ${NAME} and <IfDefine>, like `apache2 -D`.
    #[arg(long = "define", short = 'D', value_name = "NAME=VALUE")]
    defines: Vec<String>,
    /// Do not add the Quadrige and export routes when GeoNature's API is forwarded.
    #[arg(long)]
    no_geonature_routes: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check(args)) => {
            check(&cli.config)?;
            timeout_budget(&cli.config, &args)
        }
        Some(Command::ImportApache(args)) => import_apache(&args),
        Some(Command::Completions { shell }) => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "quadrige-proxy",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Some(Command::Manpages { dir }) => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &dir)
                .with_context(|| format!("cannot write the man pages into {}", dir.display()))
        }
        None => run(&cli.config),
    }
}

/// `check --gunicorn-unit/--gunicorn-timeout`: the timeout chain of every route.
fn timeout_budget(path: &Path, args: &CheckArgs) -> anyhow::Result<()> {
    use quadrige_proxy::budget;
    if args.gunicorn_unit.is_none() && args.gunicorn_timeout.is_none() {
        return Ok(());
    }
    let config = Config::load(path)?;
    let mut gunicorn = match &args.gunicorn_unit {
        Some(unit) => budget::read_unit(unit)?,
        None => budget::Gunicorn::from_timeout(0),
    };
    if let Some(secs) = args.gunicorn_timeout {
        let flag = budget::Gunicorn::from_timeout(secs);
        gunicorn.timeout = flag.timeout;
        gunicorn.source = flag.source;
    }
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines = budget::TimerLines::scan(&text);
    let browser = args.browser_timeout.map(std::time::Duration::from_secs);
    let (header, budgets) = budget::budget(&config, &gunicorn, browser, &lines);
    println!();
    print!("{}", budget::render(&header, &budgets));
    Ok(())
}

fn import_apache(args: &ImportArgs) -> anyhow::Result<()> {
    use quadrige_proxy::apache_import::{import, Options};
    let mut defines = Vec::new();
    for define in &args.defines {
        let (name, value) = define.split_once('=').unwrap_or((define.as_str(), ""));
        defines.push((name.to_string(), value.to_string()));
    }
    let options = Options {
        root: args.root.clone(),
        server_root: args.server_root.clone(),
        defines,
        geonature_routes: !args.no_geonature_routes,
    };
    let imported = import(&args.files, &options);
    print!("{}", imported.toml);
    match imported.untranslated() {
        0 => eprintln!("import-apache: every directive was translated or is listed as ignored at the top"),
        n => eprintln!("import-apache: {n} item(s) could not be translated: they are listed at the top of the output"),
    }
    Ok(())
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
            "upstream {}: {}{}{}",
            upstream.name,
            upstream.describe_servers(),
            upstream
                .max_connections
                .map(|n| format!(
                    " (max_connections {n}, queue {} for {:?})",
                    upstream.max_queue, upstream.queue_timeout
                ))
                .unwrap_or_default(),
            if upstream.preserve_host {
                " (preserve_host)"
            } else {
                ""
            }
        );
    }
    println!("\nroutes, in match order (first match wins):");
    print!("{}", RouteTable::new(&config).render(&config.upstreams));
    for warning in config.warnings() {
        println!("warning: {warning}");
    }
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
    // The control thread: signals, reloads, health checks. Clients are served by the
    // worker threads the server starts (`[server] workers`).
    let runtime = tokio::runtime::Builder::new_current_thread()
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
