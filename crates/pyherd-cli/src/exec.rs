//! `pyherd exec`: one call; the result JSON on stdout, or the error JSON on stderr.

use clap::Args;
use pyherd::{CallOptions, Error, ErrorKind, PoolBuilder};
use serde_json::value::RawValue;

use crate::settings::PoolArgs;

#[derive(Args)]
pub(crate) struct ExecArgs {
    #[command(flatten)]
    pool: PoolArgs,
    /// Run the call in this session (created for the call)
    #[arg(long)]
    session: Option<String>,
    /// The call may run more than once: retry it on a retryable failure
    #[arg(long)]
    idempotent: bool,
    /// The handler to call
    command: String,
    /// Its arguments as JSON [default: {}]
    args: Option<String>,
}

pub(crate) async fn run(args: ExecArgs) -> anyhow::Result<u8> {
    // One call needs one worker unless asked otherwise.
    let settings = args.pool.resolve_with_workers(1)?;
    let mut options = CallOptions::new();
    if let Some(session) = args.session {
        options = options.session_id(session);
    }
    if args.idempotent {
        options = options.idempotent(true);
    }
    let outcome = call(settings.pool, &args.command, args.args.as_deref(), &options).await;
    match outcome {
        Ok(result) => {
            crate::print_line(result.get())?;
            Ok(0)
        }
        Err(error) => {
            eprintln!(
                "{}",
                serde_json::json!({"ok": false, "error": error.to_json()})
            );
            Ok(crate::exit_code(error.category()))
        }
    }
}

async fn call(
    config: pyherd::PoolConfig,
    command: &str,
    args: Option<&str>,
    options: &CallOptions,
) -> Result<Box<RawValue>, Error> {
    let args = RawValue::from_string(args.unwrap_or("{}").to_owned()).map_err(|e| {
        Error::new(
            ErrorKind::MalformedRequest,
            format!("ARGS_JSON is not valid JSON: {e}"),
        )
    })?;
    let pool = PoolBuilder::from_config(config).build().await?;
    let outcome = pool.execute_raw(command, args, options).await;
    pool.shutdown().await;
    Ok(outcome?.raw().to_owned())
}
