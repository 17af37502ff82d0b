//! `pyherd serve`: the HTTP API over a pool, with graceful shutdown on SIGTERM/SIGINT.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use pyherd::PoolBuilder;
use tokio::signal::unix::{SignalKind, signal};

use crate::http;
use crate::settings::{PoolArgs, bind_address};

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:7878]
    #[arg(long, env = "PYHERD_BIND")]
    pub(crate) bind: Option<String>,
    #[command(flatten)]
    pub(crate) pool: PoolArgs,
}

pub(crate) async fn run(args: ServeArgs) -> anyhow::Result<u8> {
    let settings = args.pool.resolve()?;
    let addr = bind_address(args.bind.as_deref(), settings.bind.as_deref())?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
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
    println!("pyherd: listening on http://{local} with {workers} workers");
    std::io::stdout()
        .flush()
        .context("cannot write to stdout")?;

    let stop = tokio_util::sync::CancellationToken::new();
    let server = axum::serve(listener, http::router(pool.clone()))
        .with_graceful_shutdown(stop.clone().cancelled_owned());
    let server = tokio::spawn(async move { server.await });
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: draining"),
        _ = interrupt.recv() => tracing::info!("SIGINT: draining"),
    }
    // Stop taking connections and calls at once; calls in flight finish within the grace,
    // unless a second signal says not to wait.
    stop.cancel();
    tokio::select! {
        () = pool.shutdown() => {}
        _ = terminate.recv() => pool.shutdown_with(Duration::ZERO).await,
        _ = interrupt.recv() => pool.shutdown_with(Duration::ZERO).await,
    }
    server
        .await
        .context("the HTTP server task failed")?
        .context("the HTTP server failed")?;
    tracing::info!("stopped");
    Ok(0)
}
