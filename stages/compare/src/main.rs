//! `compare`: the baselines experiment. From one base policy, runs each credit method (`l2t`,
//! `outcome`, `length-penalty`, `mrt`) for the same iterations and seeds, evaluates each on the
//! held-out split every few iterations, and writes a report (Markdown table and PNG plots) whose
//! numbers all come from the runs' `eval_summary` artifacts. Every stage run is cached, so a
//! second invocation with nothing changed only re-reads the artifacts and redraws the report.
use anyhow::{bail, Context, Result};
use clap::Parser;
use l2t::config::Config;
use l2t::stages::{self, eval_slot, run_eval, Ctx, EvalPolicy, EvalPrompts};
use l2t::table::eval_summary::{self, EvalSummaryRow};
use plotters::prelude::*;
use std::collections::BTreeMap;
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
    /// The configuration every method shares (each run overrides `credit.method` and `rl_seed`).
    #[arg(long, default_value = "compare.toml")]
    config: PathBuf,
    /// Iterations per method and seed.
    #[arg(long, default_value_t = 10)]
    iters: u32,
    /// `rl_seed`s (comma-separated): the data and the base policy are shared, the iterations' draws differ.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    seeds: Vec<u64>,
    /// Credit methods (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "l2t,outcome,length-penalty,mrt")]
    methods: Vec<String>,
    /// Evaluate every this many iterations (and after the last).
    #[arg(long, default_value_t = 5)]
    eval_every: u32,
}

/// One evaluation of one run.
struct Point {
    method: String,
    seed: u64,
    /// Iterations done (0 = the base policy).
    after: u32,
    eval: EvalSummaryRow,
}

fn main() {
    l2t::cli::run_main("compare", || {
        let args = Args::parse();
        if args.iters == 0 || args.eval_every == 0 || args.seeds.is_empty() || args.methods.is_empty() {
            bail!("--iters, --eval-every, --seeds and --methods must not be empty or zero");
        }
        let base = Config::load(&args.config)?;
        for m in &args.methods {
            l2t::train::credit::Method::parse(m).context("--methods")?;
        }
        let spec = serde_json::json!({
            "config": base, "iters": args.iters, "seeds": args.seeds, "methods": args.methods, "eval_every": args.eval_every,
        });
        let id = blake3::hash(spec.to_string().as_bytes()).to_hex()[..12].to_string();
        let started = Instant::now();
        let split = EvalPrompts::Split("eval".into());
        let mut points = Vec::new();
        let mut stage_seconds: BTreeMap<String, f64> = BTreeMap::new();
        for &seed in &args.seeds {
            for method in &args.methods {
                let mut cfg = base.clone();
                cfg.credit.method = method.clone();
                cfg.rl_seed = seed;
                let run = format!("compare-{id}-{method}-s{seed}");
                let ctx = Ctx::new(args.artifacts.clone(), &run, cfg)?;
                let log = |s: stages::Summary| {
                    println!("{run}: {s}");
                    s
                };
                log(stages::run_prepare(&ctx)?);
                log(stages::run_bootstrap(&ctx)?);
                for s in run_eval(&ctx, EvalPolicy::Base, &split)? {
                    log(s);
                }
                points.push(Point { method: method.clone(), seed, after: 0, eval: read_eval(&ctx, EvalPolicy::Base)? });
                for it in 0..args.iters {
                    log(stages::run_sample(&ctx, it)?);
                    log(stages::run_segment(&ctx, it, 0)?);
                    log(stages::run_fisher_reward(&ctx, it)?);
                    log(stages::run_credit_assign(&ctx, it, 0)?);
                    log(stages::run_grpo_update(&ctx, it)?);
                    if (it + 1) % args.eval_every == 0 || it + 1 == args.iters {
                        for s in run_eval(&ctx, EvalPolicy::Iteration(it), &split)? {
                            log(s);
                        }
                        points.push(Point { method: method.clone(), seed, after: it + 1, eval: read_eval(&ctx, EvalPolicy::Iteration(it))? });
                    }
                }
                collect_stage_seconds(&args.artifacts.join("runs").join(&run), &mut stage_seconds)?;
            }
        }
        let dir = args.artifacts.join("reports").join(format!("compare-{id}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        let mut report = report_markdown(&args, &id, &points, stage_seconds.values().sum());
        if args.methods.iter().any(|m| m == "l2t") {
            report.push_str(&reward_terms_markdown(&args, &id, &base)?);
        }
        std::fs::write(dir.join("report.md"), &report).with_context(|| format!("{}: cannot write", dir.display()))?;
        plot_against_iteration(&dir.join("accuracy_vs_iteration.png"), &args, &points, "pass@1 on the eval split", |e| e.summary.pass_at_1)?;
        plot_against_iteration(&dir.join("tokens_vs_iteration.png"), &args, &points, "mean response tokens", |e| e.summary.mean_tokens)?;
        plot_budgets(&dir.join("accuracy_vs_budget.png"), &args, &points)?;
        println!("{report}");
        println!("compare: report in {} ({:.1}s)", dir.display(), started.elapsed().as_secs_f64());
        Ok(())
    })
}

fn read_eval(ctx: &Ctx, policy: EvalPolicy) -> Result<EvalSummaryRow> {
    let art = ctx.store.open_ref(&ctx.run, &eval_slot("eval", policy))?;
    eval_summary::read(&art.file(eval_summary::FILE)?)
}

/// Wall time of every stage run of the experiment under `dir`, by key: runs shared between methods
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

/// Mean and population std of the values.
fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len().max(1) as f64;
    let mean = values.iter().sum::<f64>() / n;
    (mean, (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt())
}

/// The final evaluations of one method, one per seed.
fn finals<'a>(points: &'a [Point], method: &str, iters: u32) -> Vec<&'a EvalSummaryRow> {
    points.iter().filter(|p| p.method == method && p.after == iters).map(|p| &p.eval).collect()
}

fn report_markdown(args: &Args, id: &str, points: &[Point], compute_seconds: f64) -> String {
    let base = &points[0].eval;
    let mut md = String::new();
    let _ = writeln!(md, "# L2T against its baselines (compare-{id})\n");
    let _ = writeln!(
        md,
        "Config `{}`; {} iterations per method from one base policy; rl_seeds {:?}; evaluation on the \
         eval split every {} iterations ({} prompts x {} samples, pass@{} unbiased). Compute time of \
         the experiment's stage runs (from their manifests; the base policy's bootstrap not \
         included): {:.1} min.\n",
        args.config.display(),
        args.iters,
        args.seeds,
        args.eval_every,
        base.summary.prompts,
        base.summary.k,
        base.summary.k,
        compute_seconds / 60.0
    );
    let _ = writeln!(md, "| method | pass@1 | pass@{} | mean tokens | tokens vs base | format-valid |", base.summary.k);
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    let fmt = |v: (f64, f64), pct: bool| {
        if pct {
            format!("{:.1}% +- {:.1}", 100.0 * v.0, 100.0 * v.1)
        } else {
            format!("{:.1} +- {:.1}", v.0, v.1)
        }
    };
    let _ = writeln!(
        md,
        "| base policy | {:.1}% | {:.1}% | {:.1} | 1.00 | {:.1}% |",
        100.0 * base.summary.pass_at_1,
        100.0 * base.summary.pass_at_k,
        base.summary.mean_tokens,
        100.0 * base.summary.format_valid_rate
    );
    let mut by_method: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    for method in &args.methods {
        let f = finals(points, method, args.iters);
        let stat = |g: fn(&EvalSummaryRow) -> f64| mean_std(&f.iter().map(|e| g(e)).collect::<Vec<_>>());
        let (p1, tokens) = (stat(|e| e.summary.pass_at_1), stat(|e| e.summary.mean_tokens));
        by_method.insert(method, (p1.0, tokens.0));
        let _ = writeln!(
            md,
            "| {method} | {} | {} | {} | {:.2} | {} |",
            fmt(p1, true),
            fmt(stat(|e| e.summary.pass_at_k), true),
            fmt(tokens, false),
            stat(|e| e.token_efficiency).0,
            fmt(stat(|e| e.summary.format_valid_rate), true)
        );
    }
    let _ = writeln!(md, "\n(+- is the spread over seeds: the population std; 0 with one seed.)\n");
    if let (Some(&(l2t_acc, l2t_tok)), Some(&(grpo_acc, grpo_tok))) = (by_method.get("l2t"), by_method.get("outcome")) {
        let within = l2t_acc >= grpo_acc - 0.01;
        let shorter = l2t_tok <= 0.7 * grpo_tok;
        let _ = writeln!(
            md,
            "**Outcome.** L2T {} accuracy within 1 point of outcome GRPO ({:.1}% vs {:.1}%) and {} at most 0.7x its \
             mean response tokens ({:.1} vs {:.1}, {:.2}x): the paper's claim {} on this run.",
            if within { "reached" } else { "did not reach" },
            100.0 * l2t_acc,
            100.0 * grpo_acc,
            if shorter { "used" } else { "did not use" },
            l2t_tok,
            grpo_tok,
            l2t_tok / grpo_tok.max(1e-9),
            if within && shorter { "holds" } else { "does not hold" }
        );
        for other in ["length-penalty", "mrt"] {
            if let Some(&(acc, tok)) = by_method.get(other) {
                let _ = writeln!(
                    md,
                    "Against `{other}`: accuracy {:+.1} points, tokens {:.2}x.",
                    100.0 * (l2t_acc - acc),
                    l2t_tok / tok.max(1e-9)
                );
            }
        }
    }
    let _ = writeln!(md, "\n## Accuracy at token budgets (final policies, mean over seeds)\n");
    let budgets = &base.budgets;
    let _ = writeln!(md, "| method | {} |", budgets.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(" | "));
    let _ = writeln!(md, "|---|{}", "---|".repeat(budgets.len()));
    let row = |name: &str, evals: &[&EvalSummaryRow]| {
        let cells: Vec<String> = (0..budgets.len())
            .map(|b| format!("{:.1}%", 100.0 * mean_std(&evals.iter().map(|e| e.summary.accuracy_at_budget[b]).collect::<Vec<_>>()).0))
            .collect();
        format!("| {name} | {} |", cells.join(" | "))
    };
    let _ = writeln!(md, "{}", row("base policy", &[base]));
    for method in &args.methods {
        let _ = writeln!(md, "{}", row(method, &finals(points, method, args.iters)));
    }
    let _ = writeln!(md, "\n## Every evaluation\n");
    let _ = writeln!(md, "| method | rl_seed | iterations | pass@1 | mean tokens | format-valid |");
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for p in points.iter().filter(|p| p.after > 0) {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.1}% | {:.1} | {:.1}% |",
            p.method,
            p.seed,
            p.after,
            100.0 * p.eval.summary.pass_at_1,
            p.eval.summary.mean_tokens,
            100.0 * p.eval.summary.format_valid_rate
        );
    }
    let _ = writeln!(
        md,
        "\nEvery number above is in the runs' `eval_summary` tables: `make audit RUN='compare-{id}-*' \
         SQL=\"SELECT run, iteration, pass_at_1, mean_tokens FROM eval_summary ORDER BY ALL\"`."
    );
    md
}

/// The L2T reward's parts per iteration, averaged over seeds: where the signal comes from, and
/// how often the token advantage takes the sign opposite to the rollout's (l2t-spec 7 divides by
/// `|rbar|`).
fn reward_terms_markdown(args: &Args, id: &str, base: &Config) -> Result<String> {
    use l2t::store::iter_slot;
    use l2t::table::{advantages, episode_rewards, episodes};
    let c = &base.credit;
    let mut rows: BTreeMap<u32, Vec<[f64; 7]>> = BTreeMap::new();
    for &seed in &args.seeds {
        let run = format!("compare-{id}-l2t-s{seed}");
        let store = l2t::store::Store::new(args.artifacts.clone());
        for it in 0..args.iters {
            let open = |stage: &str| store.open_ref(&run, &iter_slot(it, stage));
            let eps = episodes::read(&open("segment")?.file(episodes::FILE)?)?;
            let rw = episode_rewards::read(&open("fisher-reward")?.file(episode_rewards::FILE)?)?;
            let adv = advantages::read(&open("credit-assign")?.file(advantages::FILE)?)?;
            let n = eps.len().max(1) as f64;
            let outcome_term = eps.iter().map(|e| f64::from(e.r_out) / f64::from(e.k.max(1))).sum::<f64>() / n;
            let gain_term = rw.iter().map(|r| c.alpha * r.d_i).sum::<f64>() / n;
            let penalty_term = rw.iter().map(|r| -c.alpha * c.beta * r.c_scaled).sum::<f64>() / n;
            let rollouts = adv.len().max(1) as f64;
            let negative_rbar = adv.iter().filter(|a| a.rbar < 0.0).count() as f64 / rollouts;
            let below = adv.iter().filter(|a| a.a_i < 0.0).count().max(1) as f64;
            let flipped = adv.iter().filter(|a| a.a_i < 0.0 && a.a_t.iter().map(|&x| f64::from(x)).sum::<f64>() > 0.0).count() as f64 / below;
            let tokens: usize = adv.iter().map(|a| a.a_t.len()).sum();
            let clip = adv.iter().map(|a| f64::from(a.n_clipped)).sum::<f64>() / tokens.max(1) as f64;
            let correct = eps.iter().filter(|e| e.episode_idx == 0 && e.r_out >= 1.0).count() as f64 / rollouts;
            rows.entry(it).or_default().push([outcome_term, gain_term, penalty_term, negative_rbar, flipped, clip, correct]);
        }
    }
    let mut md = String::from(
        "\n## The L2T reward over iterations (l2t runs, mean over seeds)\n\n\
         Per episode: the outcome term `r_out / K`, the information-gain term `alpha dI` and the penalty term \
         `-alpha beta C` (C batch-median scaled); per rollout: the share with `rbar < 0`, the share of \
         below-average rollouts (`A_i < 0`) whose token advantages sum to a positive number (the sign flip of \
         `r_t / |rbar|`), the share of token ratios clipped at `c`, and training accuracy.\n\n\
         | iteration | r_out / K | alpha dI | -alpha beta C | rbar < 0 | A_i < 0 but sum A_t > 0 | clipped | training accuracy |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for (it, seeds) in &rows {
        let mean = |i: usize| seeds.iter().map(|r| r[i]).sum::<f64>() / seeds.len() as f64;
        let _ = writeln!(
            md,
            "| {it} | {:+.3} | {:+.3} | {:+.3} | {:.0}% | {:.0}% | {:.1}% | {:.1}% |",
            mean(0),
            mean(1),
            mean(2),
            100.0 * mean(3),
            100.0 * mean(4),
            100.0 * mean(5),
            100.0 * mean(6)
        );
    }
    Ok(md)
}

const COLORS: [RGBColor; 6] = [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40), RGBColor(148, 103, 189), RGBColor(140, 86, 75)];

fn register_font() -> Result<()> {
    static FONT: &[u8] = include_bytes!("../../../data/fonts/DejaVuSansMono.ttf");
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).map_err(|_| anyhow::anyhow!("the embedded font is not a valid TTF"))
}

fn plot_error<E: std::fmt::Debug>(path: &Path) -> impl Fn(E) -> anyhow::Error + '_ {
    move |e| anyhow::anyhow!("{}: cannot draw: {e:?}", path.display())
}

/// A line chart: one named, coloured series per line, with points marked and a legend.
fn draw_lines(
    path: &Path,
    caption: &str,
    axes: (&str, &str),
    (x, y): (std::ops::Range<f64>, std::ops::Range<f64>),
    lines: &[(String, RGBColor, Vec<(f64, f64)>)],
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

/// One line per method: the seed mean of `value` against iterations done.
fn plot_against_iteration(path: &Path, args: &Args, points: &[Point], what: &str, value: fn(&EvalSummaryRow) -> f64) -> Result<()> {
    let lines: Vec<(String, RGBColor, Vec<(f64, f64)>)> = args
        .methods
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mut by_x: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
            for p in points.iter().filter(|p| &p.method == m) {
                by_x.entry(p.after).or_default().push(value(&p.eval));
            }
            (m.clone(), COLORS[i % COLORS.len()], by_x.into_iter().map(|(x, v)| (f64::from(x), mean_std(&v).0)).collect())
        })
        .collect();
    let ys = lines.iter().flat_map(|(_, _, l)| l.iter().map(|p| p.1));
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let pad = ((hi - lo) * 0.1).max(1e-3);
    let ranges = (0f64..f64::from(args.iters), (lo - pad)..(hi + pad));
    draw_lines(path, &format!("{what} against iterations"), ("iterations", what), ranges, &lines, SeriesLabelPosition::UpperRight)
}

/// Accuracy against the token budget for the base policy and each method's final policies.
fn plot_budgets(path: &Path, args: &Args, points: &[Point]) -> Result<()> {
    let base = &points[0].eval;
    let budgets: Vec<f64> = base.budgets.iter().map(|&b| f64::from(b)).collect();
    let curve = |evals: &[&EvalSummaryRow]| -> Vec<(f64, f64)> {
        budgets
            .iter()
            .enumerate()
            .map(|(b, &x)| (x, mean_std(&evals.iter().map(|e| e.summary.accuracy_at_budget[b]).collect::<Vec<_>>()).0))
            .collect()
    };
    let mut lines = vec![("base policy".to_string(), BLACK, curve(&[base]))];
    lines.extend(args.methods.iter().enumerate().map(|(i, m)| (m.clone(), COLORS[i % COLORS.len()], curve(&finals(points, m, args.iters)))));
    let max_x = budgets.iter().copied().fold(1.0, f64::max);
    let ranges = (0f64..max_x * 1.05, 0f64..1f64);
    draw_lines(path, "accuracy at a token budget (truncate, force the answer)", ("token budget", "accuracy"), ranges, &lines, SeriesLabelPosition::UpperLeft)
}
