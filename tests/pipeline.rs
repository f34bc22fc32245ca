//! End-to-end tests: drive the built stage binaries and the Makefile against a temporary store,
//! with a micro configuration so that each test takes seconds. `make test` builds the binaries
//! first.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A model and task small enough to bootstrap in a couple of seconds.
const MICRO: &str = r#"
seed = 3
[task]
n_train = 200
n_eval = 16
steps = 2
[model]
vocab_size = 320
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 1
num_attention_heads = 2
num_key_value_heads = 1
max_position_embeddings = 256
[bootstrap]
steps = 3
batch_size = 4
eval_prompts = 4
eval_max_new_tokens = 16
[sample]
prompts_per_iter = 3
group_size = 2
max_new_tokens = 24
"#;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bin(name: &str) -> PathBuf {
    let path = repo().join("target/release").join(name);
    assert!(path.exists(), "{} is missing: run `make build` (or `make test`) first", path.display());
    path
}

/// A scratch store and config.
struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new(extra: &str) -> Self {
        let env = Self { dir: tempfile::tempdir().unwrap() };
        env.set_config(extra);
        env
    }

    fn artifacts(&self) -> PathBuf {
        self.dir.path().join("artifacts")
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("pipeline.toml")
    }

    /// Rewrites the config: the micro settings with `extra` (TOML, dotted keys allowed:
    /// `sample.temperature = 0.5`) merged over them.
    fn set_config(&self, extra: &str) {
        let mut base: toml::Table = MICRO.parse().unwrap();
        merge(&mut base, extra.parse().unwrap());
        fs::write(self.config(), toml::to_string(&base).unwrap()).unwrap();
    }

    fn command(&self, stage: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin(stage));
        cmd.arg("--artifacts").arg(self.artifacts()).arg("--run").arg("t").arg("--config").arg(self.config());
        cmd.args(args);
        cmd
    }

    fn run(&self, stage: &str, args: &[&str]) -> Output {
        self.command(stage, args).output().unwrap()
    }

    /// Runs a stage that must succeed; returns its stdout.
    fn ok(&self, stage: &str, args: &[&str]) -> String {
        let out = self.run(stage, args);
        assert!(
            out.status.success(),
            "{stage} {args:?} failed:\n--- stdout\n{}\n--- stderr\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Runs a stage that must fail cleanly (exit 1, no panic); returns its stderr.
    fn fails(&self, stage: &str, args: &[&str]) -> String {
        let out = self.run(stage, args);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(1), "{stage} {args:?} should fail with exit 1; stderr:\n{stderr}");
        assert!(!stderr.contains("panicked"), "{stage} panicked:\n{stderr}");
        assert!(stderr.starts_with(&format!("{stage}: error: ")), "one-line error expected:\n{stderr}");
        stderr
    }

    /// prepare, bootstrap, sample and segment of iteration 0; one stdout line each.
    fn chain(&self) -> Vec<String> {
        let mut lines = vec![self.ok("prepare", &[]), self.ok("bootstrap", &[])];
        lines.push(self.ok("sample", &["--iter", "0"]));
        lines.push(self.ok("segment", &["--iter", "0"]));
        lines
    }

    fn slot(&self, slot: &str) -> PathBuf {
        self.artifacts().join("runs/t").join(slot)
    }

    fn manifest(&self, slot: &str) -> serde_json::Value {
        serde_json::from_slice(&fs::read(self.slot(slot).join("manifest.json")).unwrap()).unwrap()
    }

    fn make(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("make");
        cmd.current_dir(repo()).arg("--no-print-directory").arg("-s");
        cmd.arg(format!("ARTIFACTS={}", self.artifacts().display()));
        cmd.arg(format!("CONFIG={}", self.config().display()));
        cmd.arg("RUN=t");
        cmd.args(args);
        cmd.output().unwrap()
    }

    fn make_ok(&self, args: &[&str]) -> String {
        let out = self.make(args);
        assert!(
            out.status.success(),
            "make {args:?} failed:\n--- stdout\n{}\n--- stderr\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

const SLOTS: &[&str] = &["prepare", "bootstrap", "iter-0000/sample", "iter-0000/segment"];

#[test]
fn same_inputs_and_seed_give_byte_identical_artifacts() {
    let (a, b) = (Env::new(""), Env::new(""));
    a.chain();
    b.chain();
    for slot in SLOTS {
        let (ma, mb) = (a.manifest(slot), b.manifest(slot));
        assert_eq!(ma["key"], mb["key"], "{slot}: keys differ");
        assert_eq!(ma["outputs"], mb["outputs"], "{slot}: output hashes differ");
        for out in ma["outputs"].as_array().unwrap() {
            let file = out["file"].as_str().unwrap();
            assert_eq!(fs::read(a.slot(slot).join(file)).unwrap(), fs::read(b.slot(slot).join(file)).unwrap(), "{slot}/{file}");
        }
    }
    // Another seed changes the rollouts.
    let c = Env::new("seed = 4");
    c.chain();
    assert_ne!(a.manifest("iter-0000/sample")["outputs"], c.manifest("iter-0000/sample")["outputs"]);
}

#[test]
fn second_make_iterate_is_all_cache_hits() {
    let env = Env::new("");
    let first = env.make_ok(&["iterate"]);
    assert_eq!(first.lines().filter(|l| l.contains(": computed key")).count(), 4, "{first}");
    let started = Instant::now();
    let second = env.make_ok(&["iterate"]);
    let stage_lines: Vec<&str> = second.lines().filter(|l| l.contains(" key ")).collect();
    assert_eq!(stage_lines.len(), 4, "{second}");
    assert!(stage_lines.iter().all(|l| l.contains("cache hit") && !l.contains("ref updated")), "{second}");
    eprintln!("second make iterate: {:.2}s", started.elapsed().as_secs_f64());
    // The plan is visible without running anything.
    let plan = env.make_ok(&["-n", "iterate"]);
    assert!(plan.contains("sample") && plan.contains("--iter 0"), "{plan}");
}

#[test]
fn killed_stage_publishes_nothing_and_the_rerun_completes() {
    // Enough sampling work that the stage is still running when it is killed.
    let env = Env::new("sample.prompts_per_iter = 200\nsample.group_size = 8\nsample.max_new_tokens = 96");
    env.ok("prepare", &[]);
    env.ok("bootstrap", &[]);
    let tmp = env.artifacts().join("store/tmp");
    let entries_before = fs::read_dir(env.artifacts().join("store")).unwrap().count();
    let mut child = env.command("sample", &["--iter", "0"]).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while fs::read_dir(&tmp).map_or(true, |mut d| d.next().is_none()) {
        assert!(Instant::now() < deadline, "sample never started writing");
        assert!(child.try_wait().unwrap().is_none(), "sample finished before it could be killed");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(200));
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success(), "sample finished before it could be killed");
    assert!(!env.slot("iter-0000/sample").exists(), "a killed stage published a ref");
    let entries_after = fs::read_dir(env.artifacts().join("store")).unwrap().count();
    assert_eq!(entries_before, entries_after, "a killed stage published a store entry");
    // The rerun completes and is then a cache hit.
    assert!(env.ok("sample", &["--iter", "0"]).contains("computed"));
    assert!(env.ok("sample", &["--iter", "0"]).contains("cache hit"));
    env.make_ok(&["gc"]);
    assert!(!tmp.exists(), "gc leaves the killed run's leftovers");
}

#[test]
fn corrupted_artifact_is_refused_naming_the_file() {
    let env = Env::new("");
    env.chain();
    let path = env.slot("iter-0000/sample/rollouts.parquet");
    let mut bytes = fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(&path, &bytes).unwrap();
    // A changed segment knob makes segment read the rollouts again.
    env.set_config("segment.rule = \"chunks:4\"");
    let err = env.fails("segment", &["--iter", "0"]);
    assert!(err.contains("rollouts.parquet") && err.contains("corrupt"), "{err}");
    // Re-running sample notices the damage, recomputes, and segment then succeeds.
    env.ok("sample", &["--iter", "0"]);
    env.ok("segment", &["--iter", "0"]);
}

#[test]
fn bad_input_exits_nonzero_with_one_clear_message() {
    let env = Env::new("");
    // Nothing prepared yet: the missing input is named.
    let err = env.fails("bootstrap", &[]);
    assert!(err.contains("prepare") && err.contains("no such artifact"), "{err}");

    fs::write(env.config(), format!("{MICRO}\n[segment]\nrulez = \"tags\"\n")).unwrap();
    let err = env.fails("prepare", &[]);
    assert!(err.contains("rulez") && err.contains("pipeline.toml"), "{err}");

    fs::write(env.config(), "[sample\nseed = 1").unwrap();
    let err = env.fails("prepare", &[]);
    assert!(err.contains("pipeline.toml"), "{err}");

    env.set_config("");
    env.ok("prepare", &[]);
    env.ok("bootstrap", &[]);
    // Prompt + max_new_tokens beyond the 256-token context.
    env.set_config("sample.max_new_tokens = 240");
    let err = env.fails("sample", &["--iter", "0"]);
    assert!(err.contains("prompt arith-train-") && err.contains("context"), "{err}");

    // No policy update exists yet, so iteration 1 has no policy.
    env.set_config("");
    let err = env.fails("sample", &["--iter", "1"]);
    assert!(err.contains("iter-0000/grpo-update"), "{err}");

    // A truncated table is refused (by its hash, before Parquet ever sees it).
    env.ok("sample", &["--iter", "0"]);
    let path = env.slot("iter-0000/sample/rollouts.parquet");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    env.set_config("segment.rule = \"paragraphs\"");
    let err = env.fails("segment", &["--iter", "0"]);
    assert!(err.contains("rollouts.parquet"), "{err}");
}

#[test]
fn make_stage_reruns_one_stage_and_marks_downstream_stale() {
    let env = Env::new("");
    env.make_ok(&["iterate"]);
    let same = env.make_ok(&["stage", "STAGE=sample", "ITER=0"]);
    assert!(same.contains("sample: cache hit"), "{same}");
    env.set_config("sample.temperature = 0.7");
    let changed = env.make_ok(&["stage", "STAGE=sample", "ITER=0"]);
    assert!(changed.contains("sample: computed") && changed.contains("ref updated"), "{changed}");
    assert!(env.slot("iter-0000/segment/STALE").exists());
    let seg = env.make_ok(&["stage", "STAGE=segment", "ITER=0"]);
    assert!(seg.contains("segment: computed"), "{seg}");
    assert!(!env.slot("iter-0000/segment/STALE").exists());
    // A knob of segment alone reruns segment and leaves sample a cache hit.
    env.set_config("sample.temperature = 0.7\nsegment.rule = \"chunks:8\"");
    let out = env.make_ok(&["iterate"]);
    assert!(out.contains("sample: cache hit") && out.contains("segment: computed"), "{out}");
    let bad = env.make(&["stage", "STAGE=nope"]);
    assert!(!bad.status.success());
}

#[test]
fn audit_sees_one_rollout_row_per_prompt_and_sample() {
    let env = Env::new("");
    env.make_ok(&["iterate"]);
    let sql = "SELECT 'rows=' || count(*) || ' distinct=' || count(DISTINCT (prompt_id, sample_idx)) || ' runs=' || count(DISTINCT run) AS r FROM rollouts WHERE iteration = 0";
    let out = env.make_ok(&["audit", &format!("SQL={sql}")]);
    assert!(out.contains("rows=6 distinct=6 runs=1"), "{out}");
    // Every view joins by ids and carries run and iteration.
    let sql = "SELECT 'joined=' || count(*) FROM episodes e JOIN rollouts r USING (run, iteration, prompt_id, sample_idx) JOIN prompts p USING (run, iteration, prompt_id) WHERE e.episode_idx = 0";
    let out = env.make_ok(&["audit", &format!("SQL={sql}")]);
    assert!(out.contains("joined=6"), "{out}");
    // Episode spans partition every response.
    let sql = "SELECT 'bad=' || count(*) FROM (SELECT run, iteration, prompt_id, sample_idx, sum(token_end - token_start) AS covered, \
               min(token_start) AS first, count(*) AS k, max(k) AS k_col FROM episodes GROUP BY ALL) e \
               JOIN rollouts r USING (run, iteration, prompt_id, sample_idx) WHERE covered != n_tokens OR first != 0 OR k != k_col";
    let out = env.make_ok(&["audit", &format!("SQL={sql}")]);
    assert!(out.contains("bad=0"), "{out}");
    let sql = "SELECT 'stages=' || string_agg(stage, ',' ORDER BY stage) FROM manifests";
    let out = env.make_ok(&["audit", &format!("SQL={sql}")]);
    assert!(out.contains("stages=bootstrap,prepare,sample,segment"), "{out}");
}

#[test]
fn help_works_for_every_binary() {
    for name in ["prepare", "bootstrap", "sample", "segment", "bench", "l2t"] {
        let out = Command::new(bin(name)).arg("--help").output().unwrap();
        assert!(out.status.success(), "{name} --help");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage"), "{name} --help");
    }
    assert!(Path::new(&repo().join("pipeline.toml")).exists());
}
