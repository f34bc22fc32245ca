//! What every stage binary shares: the common flags and the error/exit convention (the whole
//! context chain on one line behind the program name, exit code 1).

use crate::config::Config;
use crate::pipeline::Ctx;
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
    /// Only take a cache hit: when the stage's key is not in the store, compute nothing and exit
    /// with status 3 (the cluster runner asks this before it submits a job).
    #[arg(long)]
    pub only_cached: bool,
    /// Where the policy's passes run (`cpu`, `cuda:N`), instead of the configuration's `device`.
    #[arg(long)]
    pub device: Option<crate::config::DeviceSpec>,
    /// Precision of sampling and scoring (`f32`, `bf16`), instead of the configuration's `dtype`.
    #[arg(long)]
    pub dtype: Option<crate::config::Precision>,
}

impl Common {
    pub fn ctx(&self) -> Result<Ctx> {
        let mut config = Config::load(&self.config)?;
        if let Some(device) = self.device {
            config.device = device;
        }
        if let Some(dtype) = self.dtype {
            config.dtype = dtype;
        }
        let mut ctx = Ctx::new(self.artifacts.clone(), &self.run, config)?;
        ctx.only_cached = self.only_cached;
        Ok(ctx)
    }
}

/// The exit status of a stage asked `--only-cached` whose key is not in the store.
pub const NOT_CACHED_STATUS: i32 = 3;

/// Runs a binary's body; on error prints `name: error: context: cause` and exits 1.
pub fn run_main(name: &str, body: impl FnOnce() -> Result<()>) {
    crate::keep_freed_memory();
    if let Err(e) = body() {
        // A closed pipe (e.g. `| head`) is not a failure.
        if e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)) {
            std::process::exit(0);
        }
        eprintln!("{name}: error: {e:#}");
        std::process::exit(if e.downcast_ref::<crate::pipeline::NotCached>().is_some() { NOT_CACHED_STATUS } else { 1 });
    }
}
