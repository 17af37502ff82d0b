//! `pyherd completions SHELL`: a completion script of every subcommand and flag.

use std::io::Write;

use anyhow::Context;
use clap::Args;
use clap_complete::Shell;

/// `pyherd completions`.
#[derive(Args)]
pub(crate) struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell
    shell: Shell,
}

/// Writes the script for `cli` to stdout.
pub(crate) fn run(args: &CompletionsArgs, mut cli: clap::Command) -> anyhow::Result<u8> {
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut cli, "pyherd", &mut script);
    std::io::stdout()
        .write_all(&script)
        .context("cannot write to stdout")?;
    Ok(0)
}
