//! `compare`: the baselines experiment. From one base policy, runs each arm (a credit method,
//! possibly with knobs changed: `l2t+credit.beta=0`) for the same iterations and `rl_seed`s,
//! evaluates the final policies (and, with `--eval-every`, intermediate ones) on one split, and
//! writes a report (Markdown and PNG plots) whose numbers all come from the runs' artifacts. Arms
//! are paired: every run of a seed starts from the same base policy and the same iteration-0
//! rollouts, and every evaluation draws the same random numbers. Every stage run is cached, so a
//! second invocation with nothing changed only re-reads the artifacts and redraws the report.
use anyhow::{bail, Context, Result};
use clap::Parser;
use l2t::config::{Config, Method, Rule};
use l2t::eval::stats::{paired_difference, ratio_interval, t_interval, Interval};
use l2t::pipeline::{self, eval_slot, run_eval, Ctx, EvalPolicy, EvalPrompts};
use l2t::reward::segment::{episode_solved, segment, span_bytes};
use l2t::stage::Stage;
use l2t::store::Store;
use l2t::table::eval_samples::{self, EvalSampleRow};
use l2t::table::eval_summary::{self, EvalSummaryRow};
use l2t::table::{advantages, episode_rewards, episodes, prompts, rollouts};
use l2t::task::{episode_kind, EpisodeKind};
use plotters::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Runs l2t and the baselines from one base policy and writes the comparison report to
/// `<artifacts>/reports/compare-<hash>/` (report.md, accuracy_vs_iteration.png,
/// tokens_vs_iteration.png, accuracy_vs_budget.png).
#[derive(Parser)]
#[command(name = "compare", version)]
struct Args {
    /// The artifact store.
    #[arg(long, default_value = "artifacts")]
    artifacts: PathBuf,
    /// The configuration every arm shares (each run overrides `credit.method`, `rl_seed` and the
    /// arm's knobs).
    #[arg(long, default_value = "profiles/decompose.toml")]
    config: PathBuf,
    /// Iterations per arm and seed.
    #[arg(long, default_value_t = 10)]
    iters: u32,
    /// `rl_seed`s (comma-separated): the data and the base policy are shared, the iterations' draws differ.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    seeds: Vec<u64>,
    /// Arms (comma-separated): a credit method, then `+knob=value` changes (`l2t+credit.beta=0`).
    #[arg(long, alias = "methods", value_delimiter = ',', default_value = "l2t,outcome,length-penalty,mrt")]
    arms: Vec<String>,
    /// Arms with knob changes (the ablations) run only the first this many seeds (0 = all).
    #[arg(long, default_value_t = 0)]
    ablation_seeds: usize,
    /// Also evaluate every this many iterations (0 = the final policies only).
    #[arg(long, default_value_t = 5)]
    eval_every: u32,
    /// The split the policies are evaluated on: `eval` (validation) or `test` (the pre-registered
    /// comparison; no knob may be chosen on it).
    #[arg(long, default_value = "eval")]
    split: String,
}

/// One arm of the experiment: a credit method and knob changes.
#[derive(Debug, Clone)]
struct Arm {
    name: String,
    method: Method,
    overrides: Vec<(String, String)>,
}

impl Arm {
    /// `method[+key=value...]`.
    fn parse(text: &str) -> Result<Self> {
        let mut parts = text.split('+');
        let method: Method = parts.next().unwrap_or_default().parse().with_context(|| format!("arm {text:?}"))?;
        let overrides = parts
            .map(|p| {
                p.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .with_context(|| format!("arm {text:?}: {p:?} is not key=value"))
            })
            .collect::<Result<_>>()?;
        Ok(Self { name: text.to_string(), method, overrides })
    }

    fn is_ablation(&self) -> bool {
        !self.overrides.is_empty()
    }

    /// The arm's part of a run name: letters, digits and '-'.
    fn slug(&self) -> String {
        self.name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect()
    }

    fn config(&self, base: &Config, seed: u64) -> Result<Config> {
        let mut cfg = base.clone();
        cfg.credit.method = self.method;
        for (k, v) in &self.overrides {
            cfg = cfg.with_override(k, v).with_context(|| format!("arm {}", self.name))?;
        }
        cfg.rl_seed = seed;
        Ok(cfg)
    }
}

/// One evaluation of one run.
struct Point {
    arm: String,
    seed: u64,
    /// Iterations done (0 = the base policy).
    after: u32,
    eval: EvalSummaryRow,
    samples: Vec<EvalSampleRow>,
}

/// Training figures of one iteration of one run, from its tables.
#[derive(Debug, Clone, Copy, Default)]
struct IterFigures {
    accuracy: f64,
    tokens: f64,
    /// The L2T reward's terms per episode: `r_out / K`, `alpha dI`, `-alpha beta C~`.
    outcome_term: f64,
    gain_term: f64,
    penalty_term: f64,
    /// Per rollout with a signal: the guard binds, the credit is inverted; per token: clipped.
    guard: f64,
    inverted: f64,
    clipped: f64,
}

fn main() {
    l2t::cli::run_main("compare", || {
        let args = Args::parse();
        if args.iters == 0 || args.seeds.is_empty() || args.arms.is_empty() {
            bail!("--iters, --seeds and --arms must not be empty or zero");
        }
        let base = Config::load(&args.config)?;
        let arms: Vec<Arm> = args.arms.iter().map(|a| Arm::parse(a)).collect::<Result<_>>()?;
        for arm in &arms {
            arm.config(&base, 0)?;
        }
        let spec = serde_json::json!({
            "config": base, "iters": args.iters, "seeds": args.seeds, "arms": args.arms,
            "ablation_seeds": args.ablation_seeds, "eval_every": args.eval_every, "split": args.split,
        });
        let id = blake3::hash(spec.to_string().as_bytes()).to_hex()[..12].to_string();
        let started = Instant::now();
        let split = EvalPrompts::Split(args.split.clone());
        let mut points = Vec::new();
        let mut curves: BTreeMap<(String, u64), Vec<IterFigures>> = BTreeMap::new();
        let mut stage_seconds: BTreeMap<String, f64> = BTreeMap::new();
        for arm in &arms {
            for &seed in seeds_of(&args, arm) {
                let run = run_name(&id, arm, seed);
                let cfg = arm.config(&base, seed)?;
                let ctx = Ctx::new(args.artifacts.clone(), &run, cfg.clone())?;
                let log = |s: pipeline::Summary| println!("{run}: {s}");
                log(pipeline::run_prepare(&ctx)?);
                log(pipeline::run_bootstrap(&ctx)?);
                let mut evaluate = |policy: EvalPolicy, after: u32| -> Result<()> {
                    run_eval(&ctx, policy, &split)?.into_iter().for_each(log);
                    let (eval, samples) = read_eval(&ctx, &args.split, policy)?;
                    points.push(Point { arm: arm.name.clone(), seed, after, eval, samples });
                    Ok(())
                };
                evaluate(EvalPolicy::Base, 0)?;
                let mut figures = Vec::new();
                for it in 0..args.iters {
                    for stage in Stage::ITERATION {
                        log(pipeline::run_iteration_stage(&ctx, stage, it)?);
                    }
                    figures.push(iteration_figures(&ctx.store, &run, it, &cfg)?);
                    if it + 1 == args.iters || (args.eval_every > 0 && (it + 1) % args.eval_every == 0) {
                        evaluate(EvalPolicy::Iteration(it), it + 1)?;
                    }
                }
                curves.insert((arm.name.clone(), seed), figures);
                collect_stage_seconds(&args.artifacts.join("runs").join(&run), &mut stage_seconds)?;
            }
        }
        let store = Store::new(args.artifacts.clone());
        let first_run = run_name(&id, &arms[0], args.seeds[0]);
        let prompt_rows = prompts::read(&store.open_ref(&first_run, Stage::Prepare.name())?.file(split_file(&args.split)?)?)?;
        let tiers: HashMap<String, u32> = prompt_rows.iter().map(|p| (p.prompt_id.clone(), p.n_hard)).collect();

        let dir = args.artifacts.join("reports").join(format!("compare-{id}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        let report = Report { args: &args, arms: &arms, id: &id, points: &points, curves: &curves, tiers: &tiers };
        let md = report.markdown(stage_seconds.values().sum(), started.elapsed().as_secs_f64());
        std::fs::write(dir.join("report.md"), &md).with_context(|| format!("{}: cannot write", dir.display()))?;
        report.plot_curves(&dir.join("accuracy_vs_iteration.png"), "training accuracy", |f| f.accuracy)?;
        report.plot_curves(&dir.join("tokens_vs_iteration.png"), "mean response tokens (training rollouts)", |f| f.tokens)?;
        report.plot_budgets(&dir.join("accuracy_vs_budget.png"))?;
        println!("{md}");
        println!("compare: report in {} ({:.1}s)", dir.display(), started.elapsed().as_secs_f64());
        Ok(())
    })
}

/// The seeds an arm runs: ablations may run fewer (`--ablation-seeds`).
fn seeds_of<'a>(args: &'a Args, arm: &Arm) -> &'a [u64] {
    if arm.is_ablation() && args.ablation_seeds > 0 {
        &args.seeds[..args.ablation_seeds.min(args.seeds.len())]
    } else {
        &args.seeds
    }
}

fn run_name(id: &str, arm: &Arm, seed: u64) -> String {
    format!("compare-{id}-{}-s{seed}", arm.slug())
}

fn split_file(split: &str) -> Result<&'static str> {
    match split {
        "eval" => Ok(prompts::EVAL_FILE),
        "test" => Ok(prompts::TEST_FILE),
        "train" => Ok(prompts::TRAIN_FILE),
        other => bail!("--split {other:?}: expected eval or test"),
    }
}

fn read_eval(ctx: &Ctx, split: &str, policy: EvalPolicy) -> Result<(EvalSummaryRow, Vec<EvalSampleRow>)> {
    let art = ctx.store.open_ref(&ctx.run, &eval_slot(split, policy))?;
    Ok((eval_summary::read(&art.file(eval_summary::FILE)?)?, eval_samples::read(&art.file(eval_samples::FILE)?)?))
}

/// Training accuracy and tokens of an iteration's rollouts, and the L2T reward's parts.
fn iteration_figures(store: &Store, run: &str, it: u32, cfg: &Config) -> Result<IterFigures> {
    let open = |stage: Stage| store.open_ref(run, &stage.at(it));
    let roll = rollouts::read(&open(Stage::Sample)?.file(rollouts::FILE)?)?;
    let eps = episodes::read(&open(Stage::Segment)?.file(episodes::FILE)?)?;
    let rw = episode_rewards::read(&open(Stage::FisherReward)?.file(episode_rewards::FILE)?)?;
    let adv = advantages::read(&open(Stage::CreditAssign)?.file(advantages::FILE)?)?;
    let (n_eps, n_roll) = (eps.len().max(1) as f64, roll.len().max(1) as f64);
    let c = &cfg.credit;
    let firsts: Vec<&episodes::EpisodeRow> = eps.iter().filter(|e| e.episode_idx == 0).collect();
    let correct = firsts.iter().zip(&roll).filter(|(e, r)| episode_solved(e, r.finish_reason)).count();
    let signal: Vec<&advantages::AdvantageRow> = adv.iter().filter(|a| !a.excluded && !a.zero_std).collect();
    let n_signal = signal.len().max(1) as f64;
    let tokens: usize = adv.iter().map(|a| a.a_t.len()).sum();
    let a_t = |a: &advantages::AdvantageRow| a.a_t.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
    Ok(IterFigures {
        accuracy: correct as f64 / n_roll,
        tokens: roll.iter().map(|r| r.token_ids.len() as f64).sum::<f64>() / n_roll,
        outcome_term: eps.iter().map(|e| f64::from(e.r_out) / f64::from(e.k.max(1))).sum::<f64>() / n_eps,
        gain_term: rw.iter().map(|r| c.alpha * r.d_i).sum::<f64>() / n_eps,
        penalty_term: rw.iter().map(|r| -c.alpha * c.beta * r.c_scaled).sum::<f64>() / n_eps,
        guard: signal.iter().filter(|a| a.guard_binds).count() as f64 / n_signal,
        inverted: signal.iter().filter(|a| l2t::train::credit::is_inverted(a.a_i, &a_t(a))).count() as f64 / n_signal,
        clipped: adv.iter().map(|a| f64::from(a.n_clipped)).sum::<f64>() / tokens.max(1) as f64,
    })
}

/// Wall time of every stage run of the experiment under `dir`, by key: runs shared between arms
/// (iteration 0's sampling, the base policy's evaluation) count once, and `prepare` and `bootstrap`
/// (made before the experiment, shared with `make iterate`) not at all. Read from the manifests,
/// so the figure is the experiment's compute time however often the report is redrawn.
fn collect_stage_seconds(dir: &Path, seconds: &mut BTreeMap<String, f64>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("{}: cannot read", dir.display()))?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_stage_seconds(&path, seconds)?;
        } else if entry.file_name() == "manifest.json" {
            let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?).with_context(|| format!("{}", path.display()))?;
            if !matches!(m["stage"].as_str(), Some("prepare" | "bootstrap")) {
                seconds.insert(m["key"].as_str().unwrap_or_default().to_string(), m["wall_time_s"].as_f64().unwrap_or(0.0));
            }
        }
    }
    Ok(())
}

/// Episodes of each kind in one sample's response (tags rule).
fn episode_counts(text: &str) -> BTreeMap<EpisodeKind, usize> {
    let ends: Vec<usize> = (1..=text.len()).collect();
    let mut counts = BTreeMap::new();
    for span in segment(Rule::Tags, text, &ends).spans {
        let (from, to) = span_bytes(&ends, span);
        *counts.entry(episode_kind(&text[from..to])).or_default() += 1;
    }
    counts
}

/// A rate with its interval, in percent (the interval cut to [0, 100]).
fn pct(i: &Interval) -> String {
    let i = i.within(0.0, 1.0);
    if i.n < 2 {
        return format!("{:.1}%", 100.0 * i.mean);
    }
    format!("{:.1}% [{:.1}, {:.1}]", 100.0 * i.mean, 100.0 * i.lo, 100.0 * i.hi)
}

fn num(i: &Interval) -> String {
    if i.n < 2 {
        return format!("{:.1}", i.mean);
    }
    format!("{:.1} [{:.1}, {:.1}]", i.mean, i.lo, i.hi)
}

/// What the report is drawn from.
struct Report<'a> {
    args: &'a Args,
    arms: &'a [Arm],
    id: &'a str,
    points: &'a [Point],
    curves: &'a BTreeMap<(String, u64), Vec<IterFigures>>,
    /// Hard steps (the testbed's tier) of each prompt of the split.
    tiers: &'a HashMap<String, u32>,
}

impl Report<'_> {
    fn base(&self) -> &Point {
        &self.points[0]
    }

    /// The final evaluations of one arm, in seed order.
    fn finals(&self, arm: &str) -> Vec<&Point> {
        self.points.iter().filter(|p| p.arm == arm && p.after == self.args.iters).collect()
    }

    /// The final evaluations of `arm` on the seeds `other` ran too, in seed order.
    fn paired(&self, arm: &str, other: &str) -> (Vec<&Point>, Vec<&Point>) {
        let b = self.finals(other);
        let a: Vec<&Point> = self.finals(arm).into_iter().filter(|p| b.iter().any(|q| q.seed == p.seed)).collect();
        let b = b.into_iter().filter(|q| a.iter().any(|p| p.seed == q.seed)).collect();
        (a, b)
    }

    fn markdown(&self, compute_seconds: f64, wall_seconds: f64) -> String {
        let (args, base) = (self.args, &self.base().eval);
        let mut md = String::new();
        let _ = writeln!(md, "# L2T against its baselines (compare-{})\n", self.id);
        let _ = writeln!(
            md,
            "Config `{}`; {} iterations per arm from one base policy; rl_seeds {:?}{}; every policy evaluated on \
             the **{}** split ({} prompts x {} samples, pass@{} unbiased). Compute time of the experiment's \
             stage runs (from their manifests; the base policy's bootstrap not included): {:.1} min; this \
             invocation's wall time: {:.1} min.\n",
            args.config.display(),
            args.iters,
            args.seeds,
            if args.ablation_seeds > 0 { format!(" (ablations: the first {})", args.ablation_seeds) } else { String::new() },
            args.split,
            base.summary.prompts,
            base.summary.k,
            base.summary.k,
            compute_seconds / 60.0,
            wall_seconds / 60.0
        );
        let _ = writeln!(md, "| arm | seeds | pass@1 | pass@{} | mean tokens | tokens vs base | format-valid |", base.summary.k);
        let _ = writeln!(md, "|---|---|---|---|---|---|---|");
        let _ = writeln!(
            md,
            "| base policy | - | {:.1}% | {:.1}% | {:.1} | 1.00 | {:.1}% |",
            100.0 * base.summary.pass_at_1,
            100.0 * base.summary.pass_at_k,
            base.summary.mean_tokens,
            100.0 * base.summary.format_valid_rate
        );
        for arm in self.arms {
            let f = self.finals(&arm.name);
            let stat = |g: fn(&EvalSummaryRow) -> f64| t_interval(&f.iter().map(|p| g(&p.eval)).collect::<Vec<_>>());
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {:.2} | {:.1}% |",
                arm.name,
                f.len(),
                pct(&stat(|e| e.summary.pass_at_1)),
                pct(&stat(|e| e.summary.pass_at_k)),
                num(&stat(|e| e.summary.mean_tokens)),
                stat(|e| e.token_efficiency).mean,
                100.0 * stat(|e| e.summary.format_valid_rate).mean
            );
        }
        let _ = writeln!(md, "\n(Brackets: 95% confidence intervals over seeds, Student t.)\n");
        self.criterion(&mut md);
        self.tiers_markdown(&mut md);
        self.episodes_markdown(&mut md);
        self.curves_markdown(&mut md);
        self.reward_terms_markdown(&mut md);
        self.budgets_markdown(&mut md);
        let _ = writeln!(
            md,
            "\nEvery number above is in the runs' tables: `make audit RUN='compare-{}-*' \
             SQL=\"SELECT run, iteration, pass_at_1, mean_tokens FROM eval_summary ORDER BY ALL\"`.",
            self.id
        );
        md
    }

    /// The pre-registered criterion: L2T passes if the lower 95% bound of the paired pass@1
    /// difference L2T - GRPO is at least -2 points and the upper 95% bound of the token ratio
    /// L2T / GRPO is at most 0.7.
    fn criterion(&self, md: &mut String) {
        let have = |a: &str| self.arms.iter().any(|x| x.name == a);
        if !have("l2t") || !have("outcome") {
            return;
        }
        let _ = writeln!(md, "## The pre-registered criterion\n");
        let _ = writeln!(
            md,
            "L2T passes if the lower 95% bound of the paired pass@1 difference (L2T - GRPO) is at least -2 points \
             and the upper 95% bound of the token ratio L2T / GRPO is at most 0.7 (paired by rl_seed; the ratio's \
             interval is a t-interval of the log ratios).\n"
        );
        let _ = writeln!(md, "| arm vs outcome GRPO | seeds | pass@1 difference (points) | token ratio |");
        let _ = writeln!(md, "|---|---|---|---|");
        let mut verdict = None;
        for arm in self.arms.iter().filter(|a| a.name != "outcome") {
            let (a, b) = self.paired(&arm.name, "outcome");
            let get = |ps: &[&Point], g: fn(&EvalSummaryRow) -> f64| ps.iter().map(|p| g(&p.eval)).collect::<Vec<_>>();
            let diff = paired_difference(&get(&a, |e| e.summary.pass_at_1), &get(&b, |e| e.summary.pass_at_1));
            let ratio = ratio_interval(&get(&a, |e| e.summary.mean_tokens), &get(&b, |e| e.summary.mean_tokens));
            let _ = writeln!(
                md,
                "| {} | {} | {:+.1} [{:+.1}, {:+.1}] | {:.2} [{:.2}, {:.2}] |",
                arm.name,
                diff.n,
                100.0 * diff.mean,
                100.0 * diff.lo,
                100.0 * diff.hi,
                ratio.mean,
                ratio.lo,
                ratio.hi
            );
            if arm.name == "l2t" {
                verdict = Some((diff, ratio));
            }
        }
        if let Some((diff, ratio)) = verdict {
            let accuracy_ok = diff.lo >= -0.02;
            let tokens_ok = ratio.hi <= 0.7;
            let _ = writeln!(
                md,
                "\n**Outcome: L2T {}.** Accuracy: the lower bound of the pass@1 difference is {:+.1} points ({} -2); \
                 tokens: the upper bound of the ratio is {:.2} ({} 0.7).\n",
                if accuracy_ok && tokens_ok { "passes" } else { "fails" },
                100.0 * diff.lo,
                if accuracy_ok { ">=" } else { "<" },
                ratio.hi,
                if tokens_ok { "<=" } else { ">" }
            );
        }
    }

    /// Accuracy and tokens by tier (hard steps), mean over seeds.
    fn tiers_markdown(&self, md: &mut String) {
        let mut tiers: Vec<u32> = self.tiers.values().copied().collect();
        tiers.sort_unstable();
        tiers.dedup();
        if tiers.len() < 2 {
            return;
        }
        let _ = writeln!(md, "## By difficulty tier (hard steps; final policies, mean over seeds)\n");
        let header: Vec<String> = tiers.iter().map(|t| format!("tier {t}: pass@1 / tokens")).collect();
        let _ = writeln!(md, "| arm | {} |", header.join(" | "));
        let _ = writeln!(md, "|---|{}", "---|".repeat(tiers.len()));
        let row = |name: &str, points: &[&Point]| {
            let cells: Vec<String> = tiers
                .iter()
                .map(|&t| {
                    let per_seed: Vec<(f64, f64)> = points
                        .iter()
                        .map(|p| {
                            let s: Vec<&EvalSampleRow> = p.samples.iter().filter(|s| self.tiers.get(&s.prompt_id) == Some(&t)).collect();
                            let n = s.len().max(1) as f64;
                            (s.iter().filter(|s| s.correct).count() as f64 / n, s.iter().map(|s| f64::from(s.n_tokens)).sum::<f64>() / n)
                        })
                        .collect();
                    let m = per_seed.len().max(1) as f64;
                    format!(
                        "{:.1}% / {:.1}",
                        100.0 * per_seed.iter().map(|x| x.0).sum::<f64>() / m,
                        per_seed.iter().map(|x| x.1).sum::<f64>() / m
                    )
                })
                .collect();
            format!("| {name} | {} |", cells.join(" | "))
        };
        let _ = writeln!(md, "{}", row("base policy", &[self.base()]));
        for arm in self.arms {
            let _ = writeln!(md, "{}", row(&arm.name, &self.finals(&arm.name)));
        }
        let _ = writeln!(md);
    }

    /// Episodes per response by kind, overall and useful splits per tier (final policies).
    fn episodes_markdown(&self, md: &mut String) {
        let kinds = [EpisodeKind::Step, EpisodeKind::UsefulSplit, EpisodeKind::FillerSplit, EpisodeKind::Check, EpisodeKind::Other];
        let _ = writeln!(md, "## Episodes per response (final policies, mean over seeds)\n");
        let _ = writeln!(md, "| arm | {} | useful splits per hard step |", kinds.map(|k| k.as_str()).join(" | "));
        let _ = writeln!(md, "|---|{}---|", "---|".repeat(kinds.len()));
        let row = |name: &str, points: &[&Point]| {
            let mut totals: BTreeMap<EpisodeKind, usize> = BTreeMap::new();
            let (mut samples, mut hard) = (0usize, 0u64);
            for p in points {
                for s in &p.samples {
                    samples += 1;
                    hard += u64::from(self.tiers.get(&s.prompt_id).copied().unwrap_or(0));
                    for (k, n) in episode_counts(&s.text) {
                        *totals.entry(k).or_default() += n;
                    }
                }
            }
            let per = |k: EpisodeKind| totals.get(&k).copied().unwrap_or(0) as f64 / samples.max(1) as f64;
            let useful_per_hard = totals.get(&EpisodeKind::UsefulSplit).copied().unwrap_or(0) as f64 / hard.max(1) as f64;
            format!("| {name} | {} | {useful_per_hard:.2} |", kinds.map(|k| format!("{:.2}", per(k))).join(" | "))
        };
        let _ = writeln!(md, "{}", row("base policy", &[self.base()]));
        for arm in self.arms {
            let _ = writeln!(md, "{}", row(&arm.name, &self.finals(&arm.name)));
        }
        let _ = writeln!(
            md,
            "\n(`useful-split`: a decomposition before a hard step; `filler-split`: one before an easy step; `check`: a \
             restated or inverted step. An efficient policy has one useful split per hard step and no filler.)\n"
        );
    }

    /// Training accuracy and tokens every few iterations, mean over seeds.
    fn curves_markdown(&self, md: &mut String) {
        let _ = writeln!(md, "## Learning curves (training rollouts, mean over seeds)\n");
        let _ = writeln!(md, "| arm | {} |", (0..self.args.iters).map(|i| format!("it {i}")).collect::<Vec<_>>().join(" | "));
        let _ = writeln!(md, "|---|{}", "---|".repeat(self.args.iters as usize));
        for arm in self.arms {
            let cells: Vec<String> = (0..self.args.iters as usize)
                .map(|i| {
                    let v: Vec<IterFigures> = self.curves.iter().filter(|((a, _), _)| a == &arm.name).map(|(_, f)| f[i]).collect();
                    let m = v.len().max(1) as f64;
                    format!(
                        "{:.0}% / {:.0}",
                        100.0 * v.iter().map(|f| f.accuracy).sum::<f64>() / m,
                        v.iter().map(|f| f.tokens).sum::<f64>() / m
                    )
                })
                .collect();
            let _ = writeln!(md, "| {} | {} |", arm.name, cells.join(" | "));
        }
        let evals: Vec<&Point> = self.points.iter().filter(|p| p.after > 0 && p.after < self.args.iters).collect();
        if !evals.is_empty() {
            let _ = writeln!(md, "\nIntermediate evaluations on the {} split:\n", self.args.split);
            let _ = writeln!(md, "| arm | rl_seed | iterations | pass@1 | mean tokens |");
            let _ = writeln!(md, "|---|---|---|---|---|");
            for p in evals {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {:.1}% | {:.1} |",
                    p.arm,
                    p.seed,
                    p.after,
                    100.0 * p.eval.summary.pass_at_1,
                    p.eval.summary.mean_tokens
                );
            }
        }
        let _ = writeln!(md);
    }

    /// The L2T reward's parts per iteration for each l2t arm (mean over seeds): where the signal
    /// comes from, how often the regularised guard binds, and how often credit is inverted.
    fn reward_terms_markdown(&self, md: &mut String) {
        for arm in self.arms.iter().filter(|a| a.method == Method::L2t) {
            let _ = writeln!(
                md,
                "## The reward's terms, arm `{}` (per episode; shares of rollouts with a signal)\n\n\
                 | iteration | r_out / K | alpha dI | -alpha beta C~ | guard binds | inverted | clipped tokens | training accuracy |\n\
                 |---|---|---|---|---|---|---|---|",
                arm.name
            );
            for i in 0..self.args.iters as usize {
                let v: Vec<IterFigures> = self.curves.iter().filter(|((a, _), _)| a == &arm.name).map(|(_, f)| f[i]).collect();
                let m = |g: fn(&IterFigures) -> f64| v.iter().map(g).sum::<f64>() / v.len().max(1) as f64;
                let _ = writeln!(
                    md,
                    "| {i} | {:+.3} | {:+.3} | {:+.3} | {:.0}% | {:.1}% | {:.2}% | {:.1}% |",
                    m(|f| f.outcome_term),
                    m(|f| f.gain_term),
                    m(|f| f.penalty_term),
                    100.0 * m(|f| f.guard),
                    100.0 * m(|f| f.inverted),
                    100.0 * m(|f| f.clipped),
                    100.0 * m(|f| f.accuracy)
                );
            }
            let _ = writeln!(md);
        }
    }

    fn budgets_markdown(&self, md: &mut String) {
        let budgets = &self.base().eval.budgets;
        let _ = writeln!(md, "## Accuracy at token budgets (final policies, mean over seeds)\n");
        let _ = writeln!(md, "| arm | {} |", budgets.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(" | "));
        let _ = writeln!(md, "|---|{}", "---|".repeat(budgets.len()));
        let _ = writeln!(
            md,
            "| base policy | {} |",
            self.budget_curve(&[self.base()]).iter().map(|(_, a)| format!("{:.1}%", 100.0 * a)).collect::<Vec<_>>().join(" | ")
        );
        for arm in self.arms {
            let curve = self.budget_curve(&self.finals(&arm.name));
            let _ = writeln!(
                md,
                "| {} | {} |",
                arm.name,
                curve.iter().map(|(_, a)| format!("{:.1}%", 100.0 * a)).collect::<Vec<_>>().join(" | ")
            );
        }
    }

    /// (budget, accuracy) averaged over the evaluations.
    fn budget_curve(&self, points: &[&Point]) -> Vec<(f64, f64)> {
        let budgets = &self.base().eval.budgets;
        budgets
            .iter()
            .enumerate()
            .map(|(b, &x)| {
                (f64::from(x), points.iter().map(|p| p.eval.summary.accuracy_at_budget[b]).sum::<f64>() / points.len().max(1) as f64)
            })
            .collect()
    }

    /// One line per arm: the seed mean of a training figure against iterations.
    fn plot_curves(&self, path: &Path, what: &str, value: fn(&IterFigures) -> f64) -> Result<()> {
        let lines: Vec<Line> = self
            .arms
            .iter()
            .enumerate()
            .map(|(i, arm)| {
                let runs: Vec<&Vec<IterFigures>> = self.curves.iter().filter(|((a, _), _)| a == &arm.name).map(|(_, f)| f).collect();
                let line = (0..self.args.iters as usize)
                    .map(|it| (it as f64, runs.iter().map(|f| value(&f[it])).sum::<f64>() / runs.len().max(1) as f64))
                    .collect();
                (arm.name.clone(), COLORS[i % COLORS.len()], line)
            })
            .collect();
        let ys = lines.iter().flat_map(|(_, _, l)| l.iter().map(|p| p.1));
        let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| (lo.min(y), hi.max(y)));
        let pad = ((hi - lo) * 0.1).max(1e-3);
        let ranges = (0f64..f64::from(self.args.iters.max(2) - 1), (lo - pad)..(hi + pad));
        draw_lines(path, &format!("{what} against iterations"), ("iteration", what), ranges, &lines, SeriesLabelPosition::UpperRight)
    }

    /// Accuracy against the token budget for the base policy and each arm's final policies.
    fn plot_budgets(&self, path: &Path) -> Result<()> {
        let mut lines = vec![("base policy".to_string(), BLACK, self.budget_curve(&[self.base()]))];
        lines.extend(
            self.arms.iter().enumerate().map(|(i, a)| (a.name.clone(), COLORS[i % COLORS.len()], self.budget_curve(&self.finals(&a.name)))),
        );
        let max_x = self.base().eval.budgets.iter().map(|&b| f64::from(b)).fold(1.0, f64::max);
        let ranges = (0f64..max_x * 1.05, 0f64..1f64);
        draw_lines(
            path,
            "accuracy at a token budget (truncate, force the answer)",
            ("token budget", "accuracy"),
            ranges,
            &lines,
            SeriesLabelPosition::UpperLeft,
        )
    }
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn register_font() -> Result<()> {
    static FONT: &[u8] = include_bytes!("../../../data/fonts/DejaVuSansMono.ttf");
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow::anyhow!("the embedded font is not a valid TTF"))
}

fn plot_error<E: std::fmt::Debug>(path: &Path) -> impl Fn(E) -> anyhow::Error + '_ {
    move |e| anyhow::anyhow!("{}: cannot draw: {e:?}", path.display())
}

/// A plotted line: its label, colour and points.
type Line = (String, RGBColor, Vec<(f64, f64)>);

/// A line chart: one named, coloured series per line, with points marked and a legend.
fn draw_lines(
    path: &Path,
    caption: &str,
    axes: (&str, &str),
    (x, y): (std::ops::Range<f64>, std::ops::Range<f64>),
    lines: &[Line],
    legend: SeriesLabelPosition,
) -> Result<()> {
    register_font()?;
    let err = plot_error(path);
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x, y)
        .map_err(&err)?;
    chart.configure_mesh().x_desc(axes.0).y_desc(axes.1).draw().map_err(&err)?;
    for (name, color, line) in lines {
        let color = *color;
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
            .map_err(&err)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(line.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(&err)?;
    }
    chart.configure_series_labels().position(legend).background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(&err)?;
    root.present().map_err(&err)?;
    Ok(())
}
