//! `pyherd serve`: the HTTP API over a pool, with graceful shutdown on SIGTERM/SIGINT
//! and a zero-downtime reload of the handler code on SIGHUP. A non-loopback address
//! without a token (or `--insecure`) is refused with exit code 2.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use pyherd::PoolBuilder;
use tokio::signal::unix::{SignalKind, signal};

use crate::http;
use crate::server_settings::ServerArgs;
use crate::settings::{PoolArgs, bind_address};

/// How long the answers still being written when the pool has stopped have to reach
/// their clients: a client that stopped reading must not keep the process up.
const ANSWERS_FLUSH: Duration = Duration::from_secs(2);

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:7878]
    #[arg(long, env = "PYHERD_BIND")]
    pub(crate) bind: Option<String>,
    #[command(flatten)]
    pub(crate) server: ServerArgs,
    #[command(flatten)]
    pub(crate) pool: PoolArgs,
}

pub(crate) async fn run(args: ServeArgs) -> anyhow::Result<u8> {
    let settings = args.pool.resolve()?;
    let addr = bind_address(args.bind.as_deref(), settings.bind.as_deref())?;
    let server = match args.server.resolve(&settings.server, addr) {
        Ok(server) => server,
        Err(refusal) => {
            eprintln!("pyherd: {refusal:#}");
            return Ok(2);
        }
    };
    if server.token.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "--insecure: serving without a token beyond loopback");
    }
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut hangup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    let workers = settings.pool.workers;
    if let Some(python) = &settings.venv_python {
        tracing::info!(python = %python.display(), "using the environment of pyherd setup");
    }
    let pool = tokio::select! {
        pool = PoolBuilder::from_config(settings.pool).build() => pool?,
        _ = terminate.recv() => return Ok(0),
        _ = interrupt.recv() => return Ok(0),
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener
        .local_addr()
        .context("cannot read the bound address")?;
    tracing::info!(%local, workers, "serving");
    crate::print_line(format_args!(
        "pyherd: listening on http://{local} with {workers} workers"
    ))?;

    let stop = tokio_util::sync::CancellationToken::new();
    let mut server = tokio::spawn(http::serve(
        listener,
        pool.clone(),
        server.token,
        server.limits,
        stop.clone().cancelled_owned(),
    ));
    loop {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: draining"),
            _ = interrupt.recv() => tracing::info!("SIGINT: draining"),
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading the handler code");
                reload(pool.clone());
                continue;
            }
        }
        break;
    }
    // Stop taking connections and calls at once; calls in flight finish within the grace,
    // unless a second signal says not to wait.
    stop.cancel();
    tokio::select! {
        () = pool.shutdown() => {}
        _ = terminate.recv() => pool.shutdown_with(Duration::ZERO).await,
        _ = interrupt.recv() => pool.shutdown_with(Duration::ZERO).await,
    }
    tokio::select! {
        served = &mut server => served.context("the HTTP server task failed")?,
        () = tokio::time::sleep(ANSWERS_FLUSH) => {
            tracing::warn!(
                flush_ms = ANSWERS_FLUSH.as_millis() as u64,
                "connections still writing answers to clients that do not read them: closed"
            );
        }
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    tracing::info!("stopped");
    Ok(0)
}

/// Reloads the pool in the background (the pool logs each step and the outcome; a
/// failed reload leaves the old workers serving). A reload asked for while one runs
/// waits for it.
fn reload(pool: pyherd::Pool) {
    tokio::spawn(async move {
        // The pool logs the outcome: `reload done`, or `reload failed` with the error.
        let _ = pool.reload().await;
    });
}
