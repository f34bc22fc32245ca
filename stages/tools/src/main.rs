//! `l2t`: run-level helpers the Makefile calls (the stages themselves are separate binaries).
use clap::{Parser, Subcommand};
use l2t::store::Store;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "l2t", version, about = "Run-level helpers: next iteration, DuckDB views, garbage collection")]
struct Args {
    /// The artifact store.
    #[arg(long, default_value = "artifacts", global = true)]
    artifacts: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the iteration `make iterate` runs next.
    NextIter {
        #[arg(long, default_value = "default")]
        run: String,
    },
    /// Print the SQL that creates the DuckDB views over a run (`*` for all runs).
    Views {
        #[arg(long, default_value = "default")]
        run: String,
    },
    /// Delete store entries no run's refs point at.
    Gc,
}

fn main() {
    l2t::cli::run_main("l2t", || {
        let args = Args::parse();
        let store = Store::new(args.artifacts);
        match args.command {
            Command::NextIter { run } => println!("{}", l2t::audit::next_iteration(&store, &run)),
            Command::Views { run } => println!("{}", l2t::audit::views_sql(&store, &run)),
            Command::Gc => {
                let (removed, bytes) = store.gc()?;
                println!("gc: removed {removed} unreferenced store entries, freed {:.1} MiB", bytes as f64 / (1 << 20) as f64);
            }
        }
        Ok(())
    })
}
