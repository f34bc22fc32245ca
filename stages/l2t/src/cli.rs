//! What every stage binary shares: the common flags and the error/exit convention (the whole
//! context chain on one line behind the program name, exit code 1).

use crate::config::Config;
use crate::stages::Ctx;
use anyhow::Result;
use std::path::PathBuf;

/// Flags every stage takes.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// The artifact store.
    #[arg(long, default_value = "artifacts")]
    pub artifacts: PathBuf,
    /// Run name: refs live under <artifacts>/runs/<run>/.
    #[arg(long, default_value = "default")]
    pub run: String,
    /// Pipeline configuration.
    #[arg(long, default_value = "pipeline.toml")]
    pub config: PathBuf,
}

impl Common {
    pub fn ctx(&self) -> Result<Ctx> {
        Ctx::new(self.artifacts.clone(), &self.run, Config::load(&self.config)?)
    }
}

/// Runs a binary's body; on error prints `name: error: context: cause` and exits 1.
pub fn run_main(name: &str, body: impl FnOnce() -> Result<()>) {
    crate::keep_freed_memory();
    if let Err(e) = body() {
        // A closed pipe (e.g. `| head`) is not a failure.
        if e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)) {
            std::process::exit(0);
        }
        eprintln!("{name}: error: {e:#}");
        std::process::exit(1);
    }
}
