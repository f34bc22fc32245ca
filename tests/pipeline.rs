//! End-to-end tests: drive the built stage binaries and the Makefile against a temporary store,
//! with a micro configuration so that each test takes seconds. `make test` builds the binaries
//! first.

use l2t::stage::Stage;
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
[eval]
k = 2
max_new_tokens = 16
budgets = [4, 8]
answer_tokens = 4
prompts = 5
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
        // Warnings may come first; then one error message, behind the stage's name.
        let first = stderr.lines().find(|l| !l.starts_with("warning: ")).unwrap_or_default();
        assert!(first.starts_with(&format!("{stage}: error: ")), "one error message expected:\n{stderr}");
        assert_eq!(stderr.matches(": error: ").count(), 1, "one error message expected:\n{stderr}");
        stderr
    }

    /// Every stage of iteration `iter` (and prepare and bootstrap); one stdout line each.
    fn chain_iter(&self, iter: u32) -> Vec<String> {
        let mut lines = vec![self.ok("prepare", &[]), self.ok("bootstrap", &[])];
        let iter = iter.to_string();
        for stage in Stage::ITERATION {
            lines.push(self.ok(stage.name(), &["--iter", &iter]));
        }
        lines
    }

    fn chain(&self) -> Vec<String> {
        self.chain_iter(0)
    }

    /// Every stdout line that is a stage summary.
    fn summaries(out: &str) -> Vec<&str> {
        out.lines().filter(|l| l.contains(" key ")).collect()
    }

    fn slot(&self, slot: &str) -> PathBuf {
        self.artifacts().join("runs/t").join(slot)
    }

    fn manifest(&self, slot: &str) -> serde_json::Value {
        serde_json::from_slice(&fs::read(self.slot(slot).join("manifest.json")).unwrap()).unwrap()
    }

    fn make_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("make");
        cmd.current_dir(repo()).arg("--no-print-directory").arg("-s");
        cmd.arg(format!("ARTIFACTS={}", self.artifacts().display()));
        cmd.arg(format!("CONFIG={}", self.config().display()));
        cmd.arg("RUN=t");
        cmd.args(args);
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        cmd
    }

    fn make(&self, args: &[&str]) -> Output {
        self.make_command(args).output().unwrap()
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

const SLOTS: &[&str] = &[
    "prepare",
    "bootstrap",
    "iter-0000/sample",
    "iter-0000/segment",
    "iter-0000/fisher-reward",
    "iter-0000/credit-assign",
    "iter-0000/grpo-update",
];

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
fn make_iterate_runs_the_next_iteration_and_a_finished_one_is_all_cache_hits() {
    let env = Env::new("");
    let first = env.make_ok(&["iterate"]);
    assert_eq!(Env::summaries(&first).iter().filter(|l| l.contains(": computed key")).count(), 7, "{first}");
    assert!(env.slot("iter-0000/grpo-update/model.safetensors").exists());
    // Re-running the finished iteration recomputes nothing and moves no ref.
    let started = Instant::now();
    let again = env.make_ok(&["iteration", "ITER=0"]);
    let lines = Env::summaries(&again);
    assert_eq!(lines.len(), 7, "{again}");
    assert!(lines.iter().all(|l| l.contains("cache hit") && !l.contains("ref updated")), "{again}");
    eprintln!("finished iteration again: {:.2}s", started.elapsed().as_secs_f64());
    // The next `make iterate` is iteration 1, sampled by iteration 0's policy.
    let next = env.make_ok(&["iterate"]);
    assert!(next.contains("-> iter-0001/grpo-update"), "{next}");
    assert_eq!(Env::summaries(&next).iter().filter(|l| l.contains(": computed key")).count(), 5, "{next}");
    // The plan is visible without running anything.
    let plan = env.make_ok(&["-n", "iterate"]);
    assert!(plan.contains("sample") && plan.contains("--iter 2") && plan.contains("grpo-update"), "{plan}");
}

#[test]
fn resuming_gives_the_same_policy_as_running_straight() {
    let (straight, resumed) = (Env::new(""), Env::new(""));
    straight.make_ok(&["iterate", "ITERS=3"]);
    resumed.make_ok(&["iterate", "ITERS=2"]);
    resumed.make_ok(&["iterate", "ITERS=1"]);
    for file in ["model.safetensors", "optimizer.safetensors", "trainer_state.json"] {
        let path = |env: &Env| env.slot("iter-0002/grpo-update").join(file);
        assert_eq!(fs::read(path(&straight)).unwrap(), fs::read(path(&resumed)).unwrap(), "{file}");
    }
    // The data cursor moved by one iteration's prompts each time.
    let state: serde_json::Value =
        serde_json::from_slice(&fs::read(straight.slot("iter-0002/grpo-update/trainer_state.json")).unwrap()).unwrap();
    assert_eq!(state["data_cursor"], 9, "{state}");
    assert_eq!(state["iteration"], 2, "{state}");
    // Each iteration sampled other prompts.
    let ids = |iter: &str| straight.manifest(&format!("{iter}/sample"))["metrics"]["data_cursor"].clone();
    assert_eq!((ids("iter-0000"), ids("iter-0001"), ids("iter-0002")), (0.into(), 3.into(), 6.into()));
}

#[test]
fn an_unchanged_output_stops_the_cascade() {
    let env = Env::new("");
    env.make_ok(&["iterate"]);
    // a_lp only matters to the length-penalty baseline: credit-assign reruns, writes the same
    // bytes, and grpo-update (keyed by content) stays a cache hit.
    env.set_config("credit.a_lp = 0.5");
    let out = env.make_ok(&["iteration", "ITER=0"]);
    assert!(out.contains("credit-assign: computed") && out.contains("grpo-update: cache hit"), "{out}");
}

#[test]
fn each_update_lowers_the_loss_on_its_batch() {
    let env = Env::new("update.loss_after = true");
    env.make_ok(&["iterate", "ITERS=3"]);
    for iter in 0..3 {
        let m = env.manifest(&format!("iter-{iter:04}/grpo-update"))["metrics"].clone();
        let (before, after) = (m["batch_loss_before"].as_f64().unwrap(), m["batch_loss_after"].as_f64().unwrap());
        assert!(after < before, "iteration {iter}: the loss on its batch went from {before} to {after}");
    }
}

/// SmolLM2-135M-Instruct, imported from its GGUF (`make models`), through one whole iteration at
/// micro size: 2 prompts x 2 samples x 32 tokens, prompts through its chat template.
#[test]
fn smollm2_micro_iteration_runs_from_the_gguf() {
    let gguf = repo().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(gguf.exists(), "{} is missing: run `make models` (make test does)", gguf.display());
    let env = Env::new(&format!(
        r#"
task.prompt_style = "question"
prompt.template = "chat"
prompt.system = "You are a careful math tutor."
prompt.instructions = "Solve step by step. Finish with \\boxed{{answer}}."
bootstrap.source = "{}"
bootstrap.eval_prompts = 0
sample.prompts_per_iter = 2
sample.group_size = 2
sample.max_new_tokens = 32
segment.rule = "paragraphs"
reward.batch_rows = 4
update.micro_batch = 2
update.lr = 2e-6
"#,
        gguf.display()
    ));
    env.chain();
    let base = env.manifest("bootstrap");
    assert_eq!(base["metrics"]["model_type"], "llama");
    let config: serde_json::Value =
        serde_json::from_slice(&fs::read(env.slot("iter-0000/grpo-update").join("config.json")).unwrap()).unwrap();
    assert_eq!((config["model_type"].as_str(), config["vocab_size"].as_u64()), (Some("llama"), Some(49152)));
    let tok_cfg: serde_json::Value =
        serde_json::from_slice(&fs::read(env.slot("iter-0000/grpo-update").join("tokenizer_config.json")).unwrap()).unwrap();
    assert!(tok_cfg["chat_template"].as_str().is_some_and(|t| t.contains("<|im_start|>")), "the chat template travels with the policy");
    let sample = env.manifest("iter-0000/sample");
    assert_eq!(sample["metrics"]["rollouts"], 4, "{sample}");
    let hash = |m: &serde_json::Value| {
        m["outputs"].as_array().unwrap().iter().find(|o| o["file"] == "model.safetensors").unwrap()["blake3"].clone()
    };
    assert_ne!(hash(&base), hash(&env.manifest("iter-0000/grpo-update")), "the update changed the weights");
}

#[test]
fn retuning_alpha_or_beta_reruns_only_credit_assign_and_grpo_update() {
    // Iteration 1, where the policy has moved from the base, so C (and with it beta) matters.
    let env = Env::new("");
    env.make_ok(&["iterate", "ITERS=2"]);
    for knob in ["credit.alpha = 0.5", "credit.alpha = 0.5\ncredit.beta = 0.1"] {
        env.set_config(knob);
        let out = env.make_ok(&["iteration", "ITER=1"]);
        for stage in ["prepare", "bootstrap", "sample", "segment", "fisher-reward"] {
            assert!(out.contains(&format!("{stage}: cache hit")), "{knob}: {stage} should be a cache hit:\n{out}");
        }
        for stage in ["credit-assign", "grpo-update"] {
            assert!(out.contains(&format!("{stage}: computed")), "{knob}: {stage} should rerun:\n{out}");
        }
    }
}

#[test]
fn rewards_that_no_longer_match_the_episodes_are_refused_and_nothing_is_published() {
    let env = Env::new("");
    env.chain();
    // New episodes (another rule), but the episode rewards of the old ones are still in place.
    env.set_config("segment.rule = \"chunks:4\"");
    env.ok("segment", &["--iter", "0"]);
    let manifest_before = env.manifest("iter-0000/credit-assign");
    let err = env.fails("credit-assign", &["--iter", "0"]);
    assert!(err.contains("episode_rewards.parquet: row") && (err.contains("missing episode") || err.contains("extra episode")), "{err}");
    assert_eq!(env.manifest("iter-0000/credit-assign"), manifest_before, "a refused stage moved its ref");
    assert!(fs::read_dir(env.artifacts().join("store/tmp")).map_or(true, |mut d| d.next().is_none()), "leftovers in store/tmp");
    // Rerunning the reward stage first mends it.
    env.ok("fisher-reward", &["--iter", "0"]);
    env.ok("credit-assign", &["--iter", "0"]);
}

#[test]
fn a_policy_with_another_tokenizer_is_refused_and_nothing_is_published() {
    let env = Env::new("");
    env.ok("prepare", &[]);
    env.ok("bootstrap", &[]);
    env.ok("sample", &["--iter", "0"]);
    env.ok("segment", &["--iter", "0"]);
    // A new base policy with a larger vocabulary: its tag tokens get other ids.
    env.set_config("model.vocab_size = 360");
    env.ok("bootstrap", &[]);
    let err = env.fails("fisher-reward", &["--iter", "0"]);
    assert!(err.contains("rollouts.parquet") && err.contains("different tokenizer"), "{err}");
    assert!(!env.slot("iter-0000/fisher-reward").exists(), "a refused stage published a ref");
    assert!(fs::read_dir(env.artifacts().join("store/tmp")).map_or(true, |mut d| d.next().is_none()), "leftovers in store/tmp");
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
    // A second process waits for the first; killing it leaves nothing behind.
    let mut waiter = env.command("sample", &["--iter", "0"]).stderr(std::process::Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(waiter.try_wait().unwrap().is_none(), "the second sample did not wait for the first");
    waiter.kill().unwrap();
    let waited = waiter.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&waited.stderr).contains("is being computed by pid"), "{}", String::from_utf8_lossy(&waited.stderr));
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success(), "sample finished before it could be killed");
    assert!(!env.slot("iter-0000/sample").exists(), "a killed stage published a ref");
    let entries_after = fs::read_dir(env.artifacts().join("store")).unwrap().count();
    assert_eq!(entries_before, entries_after, "a killed stage published a store entry");
    // The killed owner's lock does not block the rerun, which takes it over at once.
    let locks = env.artifacts().join("store/locks");
    assert_eq!(
        fs::read_dir(&locks).unwrap().filter(|e| !e.as_ref().unwrap().file_name().to_string_lossy().starts_with('.')).count(),
        1,
        "the killed run's lock"
    );
    let rerun = env.run("sample", &["--iter", "0"]);
    assert!(rerun.status.success() && String::from_utf8_lossy(&rerun.stdout).contains("computed"));
    assert!(String::from_utf8_lossy(&rerun.stderr).contains("is gone; computing it here"), "{}", String::from_utf8_lossy(&rerun.stderr));
    assert_eq!(fs::read_dir(&locks).unwrap().count(), 0, "the lock is released");
    assert!(env.ok("sample", &["--iter", "0"]).contains("cache hit"));
    let gc = env.make_ok(&["gc"]);
    assert!(fs::read_dir(&tmp).unwrap().next().is_none(), "gc leaves the killed run's leftovers: {gc}");
    assert!(gc.contains("1 leftovers of killed runs"), "{gc}");
}

#[test]
fn gc_in_a_loop_during_make_iterate_changes_nothing() {
    let (undisturbed, disturbed) = (Env::new(""), Env::new(""));
    undisturbed.make_ok(&["iterate", "ITERS=3"]);
    let mut iterate = disturbed.make_command(&["iterate", "ITERS=3"]).spawn().unwrap();
    let mut rounds = 0;
    let status = loop {
        let out = Command::new(bin("l2t")).arg("gc").arg("--artifacts").arg(disturbed.artifacts()).output().unwrap();
        assert!(out.status.success(), "gc failed: {}", String::from_utf8_lossy(&out.stderr));
        rounds += 1;
        if let Some(status) = iterate.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "make iterate failed while gc ran");
    assert!(rounds > 10, "gc ran only {rounds} times");
    for file in ["model.safetensors", "optimizer.safetensors", "trainer_state.json"] {
        let path = |env: &Env| env.slot("iter-0002/grpo-update").join(file);
        assert_eq!(fs::read(path(&undisturbed)).unwrap(), fs::read(path(&disturbed)).unwrap(), "{file}");
    }
}

#[test]
fn two_concurrent_make_iterate_compute_each_key_once() {
    let (alone, shared) = (Env::new(""), Env::new(""));
    alone.make_ok(&["iterate", "ITERS=2"]);
    let both =
        [shared.make_command(&["iterate", "ITERS=2"]).spawn().unwrap(), shared.make_command(&["iterate", "ITERS=2"]).spawn().unwrap()];
    let outs: Vec<Output> = both.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    let (mut stdout, mut stderr) = (String::new(), String::new());
    for out in &outs {
        stdout += &String::from_utf8_lossy(&out.stdout);
        stderr += &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "a concurrent make iterate failed:\n{stdout}\n{stderr}");
    }
    // Each stage line names its key; across both processes each key is computed exactly once.
    let mut computed = std::collections::BTreeMap::<String, usize>::new();
    for line in Env::summaries(&stdout) {
        let key = line.split(" key ").nth(1).and_then(|rest| rest.split_whitespace().next()).unwrap().to_string();
        *computed.entry(key).or_default() += usize::from(line.contains(": computed "));
    }
    assert_eq!(computed.len(), 2 + 2 * Stage::ITERATION.len(), "prepare, bootstrap and two iterations:\n{stdout}");
    assert!(computed.values().all(|&n| n == 1), "a key computed twice or never: {computed:?}\n{stdout}");
    assert!(stderr.contains("waiting for it"), "no process waited for the other:\n{stderr}");
    for file in ["model.safetensors", "optimizer.safetensors", "trainer_state.json"] {
        let path = |env: &Env| env.slot("iter-0001/grpo-update").join(file);
        assert_eq!(fs::read(path(&alone)).unwrap(), fs::read(path(&shared)).unwrap(), "{file}");
    }
    assert!(!shared.slot("iter-0002").exists(), "the two processes ran more than two iterations");
    let locks = shared.artifacts().join("store/locks");
    assert_eq!(fs::read_dir(&locks).unwrap().count(), 0, "locks left behind in {}", locks.display());
}

/// The files of a ref, by name.
fn ref_files(env: &Env, slot: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
    let manifest = env.manifest(slot);
    let outputs = manifest["outputs"].as_array().unwrap();
    outputs
        .iter()
        .map(|o| o["file"].as_str().unwrap().to_string())
        .map(|f| (f.clone(), fs::read(env.slot(slot).join(&f)).unwrap()))
        .collect()
}

#[test]
fn sharded_stages_merge_to_the_unsharded_bytes() {
    // Uneven shards (5 groups in 2 and 3 shards) and a reward batch that the shards cut elsewhere.
    let extra = "sample.prompts_per_iter = 5\nreward.batch_rows = 4";
    let (whole, sharded) = (Env::new(extra), Env::new(extra));
    whole.chain_iter(0);
    whole.chain_iter(1);
    sharded.ok("prepare", &[]);
    sharded.ok("bootstrap", &[]);
    for iter in ["0", "1"] {
        for (stage, shards) in [("sample", 2), ("segment", 0), ("fisher-reward", 3), ("credit-assign", 0), ("grpo-update", 0)] {
            if shards == 0 {
                sharded.ok(stage, &["--iter", iter]);
                continue;
            }
            let err = sharded.fails(stage, &["--iter", iter, "--merge", &shards.to_string()]);
            assert!(err.contains("shard 0/") && err.contains("--shard"), "a merge before its shards: {err}");
            for i in 0..shards {
                assert!(sharded.ok(stage, &["--iter", iter, "--shard", &format!("{i}/{shards}")]).contains("computed"));
            }
            let merged = sharded.ok(stage, &["--iter", iter, "--merge", &shards.to_string()]);
            assert!(merged.contains("computed"), "{merged}");
            // The merge is the unsharded run: same key, same bytes.
            let slot = format!("iter-000{iter}/{stage}");
            assert_eq!(whole.manifest(&slot)["key"], sharded.manifest(&slot)["key"], "{slot}");
            assert_eq!(ref_files(&whole, &slot), ref_files(&sharded, &slot), "{slot}: merged bytes differ from the unsharded run's");
            assert!(sharded.ok(stage, &["--iter", iter]).contains("cache hit"));
        }
    }
    // eval: the base and the iteration's policy, each in 2 shards then merged.
    whole.ok("eval", &["--policy", "1"]);
    for i in 0..2 {
        sharded.ok("eval", &["--policy", "1", "--shard", &format!("{i}/2")]);
    }
    assert!(sharded.ok("eval", &["--policy", "1", "--merge", "2"]).contains("pass@1"));
    for slot in ["evals/eval/base", "evals/eval/iter-0001"] {
        assert_eq!(ref_files(&whole, slot), ref_files(&sharded, slot), "{slot}: merged bytes differ from the unsharded run's");
    }
    let g_dot_d: f64 = sharded.manifest("iter-0001/fisher-reward")["metrics"]["d_norm_sq"].as_f64().unwrap();
    assert!(g_dot_d > 0.0, "iteration 1's penalty must use a nonzero direction for the test to mean anything");
    let bad = sharded.run("sample", &["--iter", "0", "--shard", "2/2"]);
    assert_eq!(bad.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("0 <= i < N"), "{}", String::from_utf8_lossy(&bad.stderr));
}

/// Starts the single-node Slurm of tests/slurm (Debian's packages, as root); `None` where it cannot.
fn slurm_cluster() -> Option<()> {
    let start = Command::new(repo().join("tests/slurm/start_cluster.sh")).output().unwrap();
    if start.status.success() {
        return Some(());
    }
    let why = String::from_utf8_lossy(&start.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&start.stdout).lines())
        .last()
        .unwrap_or_default()
        .to_string();
    eprintln!("SKIPPED: the Slurm tests need a cluster and tests/slurm/start_cluster.sh could not start one here: {why}");
    None
}

/// The job ids that `make iterate RUNNER=slurm` printed, by label.
fn submitted(out: &str) -> Vec<(String, String)> {
    out.lines()
        .filter_map(|l| l.strip_prefix("slurm: submitted "))
        .filter_map(|l| {
            l.split_once(" as job ").map(|(label, rest)| (label.to_string(), rest.split_whitespace().next().unwrap().to_string()))
        })
        .collect()
}

#[test]
fn slurm_runner_gives_the_local_policy_and_resubmits_only_what_a_cancelled_job_lost() {
    if slurm_cluster().is_none() {
        return;
    }
    let (local, cluster) = (Env::new(""), Env::new(""));
    local.make_ok(&["iterate", "ITERS=3"]);
    let out = cluster.make_ok(&["iterate", "RUNNER=slurm", "SHARDS=2", "ITERS=2"]);
    assert!(out.contains("iter-0000-sample-shards") && out.contains("iter-0001-fisher-reward-merge") && out.contains("done"), "{out}");
    let policy = |env: &Env, iter: u32| fs::read(env.slot(&format!("iter-000{iter}/grpo-update")).join("model.safetensors")).unwrap();
    assert_eq!(policy(&local, 1), policy(&cluster, 1), "the cluster's policy differs from the local run's");

    // Iteration 2, submitted held; one task of the sample array is cancelled, the rest released.
    cluster.set_config("slurm.extra = [\"--hold\"]");
    let held = cluster.make_ok(&["iterate", "RUNNER=slurm", "SHARDS=2", "NO_WAIT=1"]);
    let jobs = submitted(&held);
    assert_eq!(jobs[0].0, "iter-0002-sample-shards", "prepare to iteration 1 are in the store and not submitted: {held}");
    let run = |cmd: &str, args: &[&str]| assert!(Command::new(cmd).args(args).status().unwrap().success(), "{cmd} {args:?}");
    run("scancel", &[&format!("{}_1", jobs[0].1)]);
    let ids: Vec<&str> = jobs.iter().map(|(_, id)| id.as_str()).collect();
    run("scontrol", &["release", &ids.join(",")]);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let q = Command::new("squeue").args(["-h", "-o", "%i %T", "-j", &ids.join(",")]).output().unwrap();
        let queue = String::from_utf8_lossy(&q.stdout).to_string();
        if !queue.lines().any(|l| l.contains("PENDING") || l.contains("RUNNING") || l.contains("COMPLETING")) {
            break;
        }
        assert!(Instant::now() < deadline, "the jobs never ended:\n{queue}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(cluster.artifacts().join("runs/t/shards/iter-0002/sample/0of2/manifest.json").exists(), "the surviving shard");
    assert!(!cluster.slot("iter-0002/sample").exists(), "a merge ran without all its shards");
    assert!(!cluster.slot("iter-0002/grpo-update").exists());

    // The rerun submits the lost shard alone, then the rest; the policy is the local run's.
    cluster.set_config("");
    let rerun = cluster.make_ok(&["iterate", "RUNNER=slurm", "SHARDS=2"]);
    let shards =
        submitted(&rerun).into_iter().find(|(label, _)| label == "iter-0002-sample-shards").expect("the lost shard is resubmitted");
    assert!(
        rerun.contains(&format!("job {}_1)", shards.1)) && !rerun.contains(&format!("job {}_0)", shards.1)),
        "only shard 1 runs again:\n{rerun}"
    );
    assert_eq!(policy(&local, 2), policy(&cluster, 2), "the cluster's policy differs from the local run's after the resubmission");
    // A failing job: the runner names it, shows its log's end, cancels the rest, and fails.
    cluster.set_config("sample.prompts_per_iter = 100000");
    let failed = cluster.make(&["iterate", "RUNNER=slurm"]);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success(), "a failed job must fail make iterate");
    assert!(
        stderr.contains("iter-0003-sample (job") && stderr.contains("FAILED") && stderr.contains("prompts_per_iter = 100000"),
        "{stderr}"
    );
    eprintln!("slurm: ran on a real single-node cluster: 3 iterations as jobs, a cancelled shard resubmitted alone, policies byte-identical to the local run's");
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
fn make_verify_names_a_flipped_byte_and_repair_then_iterate_recomputes_only_that() {
    let env = Env::new("");
    env.make_ok(&["iterate", "ITERS=2"]);
    let policies =
        |env: &Env| ["iter-0000", "iter-0001"].map(|i| fs::read(env.slot(&format!("{i}/grpo-update/model.safetensors"))).unwrap());
    let before = policies(&env);
    let clean = env.make_ok(&["verify"]);
    assert!(clean.contains(", 0 problems"), "{clean}");
    // One flipped byte in iteration 0's rollouts (the ref and its store entry share the file).
    let path = env.slot("iter-0000/sample/rollouts.parquet");
    let mut bytes = fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(&path, &bytes).unwrap();
    let out = env.make(&["verify"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("runs/t/iter-0000/sample/rollouts.parquet") && stdout.contains("corrupt"), "{stdout}");
    assert!(stdout.contains("damaged store entry") && stdout.contains(", 2 problems"), "{stdout}");
    let repaired = env.make_ok(&["verify", "REPAIR=1"]);
    assert!(repaired.contains("removed store entry") && repaired.contains("marked ref runs/t/iter-0000/sample damaged"), "{repaired}");
    // The next `make iterate` reruns iteration 0: sample recomputes the same bytes, and every
    // other stage is a cache hit.
    let again = env.make_ok(&["iterate"]);
    let computed: Vec<&str> = Env::summaries(&again).into_iter().filter(|l| l.contains(": computed key")).collect();
    assert!(computed.len() == 1 && computed[0].contains("sample: computed") && again.contains("-> iter-0000/grpo-update"), "{again}");
    assert_eq!(policies(&env), before);
    let clean = env.make_ok(&["verify"]);
    assert!(clean.contains(", 0 problems"), "{clean}");
    // A ref whose store entry was deleted by hand restores it.
    let key = env.manifest("iter-0001/segment")["key"].as_str().unwrap().to_string();
    fs::remove_dir_all(env.artifacts().join("store").join(&key)).unwrap();
    assert!(!env.make(&["verify"]).status.success());
    let restored = env.make_ok(&["verify", "REPAIR=1"]);
    assert!(restored.contains("restored store entry"), "{restored}");
    assert!(env.make_ok(&["verify"]).contains(", 0 problems"));
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

    // A GPU asked of a CPU build, in the configuration or on the command line.
    env.set_config("device = \"cuda:0\"");
    let err = env.fails("prepare", &[]);
    assert!(err.contains("cuda:0") && err.contains("no CUDA support"), "{err}");
    env.set_config("");
    let err = env.fails("prepare", &["--device", "cuda:1"]);
    assert!(err.contains("cuda:1") && err.contains("no CUDA support"), "{err}");
    env.set_config("dtype = \"fp8\"");
    let err = env.fails("prepare", &[]);
    assert!(err.contains("fp8") && err.contains("bf16"), "{err}");
    env.set_config("");
    let out = env.run("prepare", &["--device", "tpu"]); // a usage error: clap's exit status 2
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(2) && err.contains("unknown device \"tpu\""), "{err}");

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
    let out = env.make_ok(&["iteration", "ITER=0"]);
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
    // The reward, advantage and update tables join the rollouts by ids.
    let sql =
        "SELECT 'rewards=' || count(*) FROM episode_rewards w JOIN episodes e USING (run, iteration, prompt_id, sample_idx, episode_idx) \
               WHERE abs(w.d_i - (w.j_after - w.j_before)) < 1e-12";
    let out = env.make_ok(&["audit", &format!("SQL={sql}")]);
    let episodes = env.make_ok(&["audit", "SQL=SELECT 'rewards=' || count(*) FROM episodes"]);
    assert_eq!(out.trim(), episodes.trim(), "every episode has its reward row: {out} vs {episodes}");
    let sql = "SELECT 'adv=' || count(*) FROM advantages a JOIN rollouts r USING (run, iteration, prompt_id, sample_idx) WHERE len(a.a_t) = r.n_tokens";
    let out = env.make_ok(&["audit", &format!("SQL={sql}")]);
    assert!(out.contains("adv=6"), "{out}");
    let sql = "SELECT 'steps=' || count(*) || ' grads=' || min(tensors_with_grad) FROM update_metrics WHERE iteration = 0";
    let out = env.make_ok(&["audit", &format!("SQL={sql}")]);
    // Every one of the micro policy's 14 tensors gets a gradient in every step.
    assert!(out.contains("steps=2 grads=14"), "{out}");
    // No L2T rollout's credit is inverted: its mean token advantage has A_i's sign (l2t-spec 7,
    // token_scale = regularised).
    let sql = "SELECT 'inverted=' || count(*) FROM advantages WHERE method = 'l2t' AND NOT excluded AND NOT zero_std \
               AND abs(a_i) > 1e-3 AND a_i * list_avg(a_t) < 0";
    let out = env.make_ok(&["audit", &format!("SQL={sql}")]);
    assert!(out.contains("inverted=0"), "{out}");
    let sql = "SELECT 'stages=' || string_agg(stage, ',' ORDER BY stage) FROM manifests";
    let out = env.make_ok(&["audit", &format!("SQL={sql}")]);
    assert!(out.contains("stages=bootstrap,credit-assign,fisher-reward,grpo-update,prepare,sample,segment"), "{out}");
    // A query as a user pastes it: several lines, single and double quotes, a comment, a semicolon.
    let sql = "-- how many rollouts\nSELECT 'it''s ' || count(*) AS \"say \"\"so\"\"\"\n  FROM rollouts\n WHERE text <> '\"';";
    let out = env.make_ok(&["audit", &format!("SQL={sql}")]);
    assert!(out.contains("it's 6"), "{out}");
}

#[test]
fn eval_reports_every_figure_from_its_own_samples_and_against_the_base() {
    let env = Env::new("");
    env.make_ok(&["iterate"]);
    let out = env.make_ok(&["eval", "POLICY=0"]);
    assert!(out.contains("-> evals/eval/base") && out.contains("-> evals/eval/iter-0000"), "{out}");
    assert!(out.contains("eval: iter-0000: pass@1"), "{out}");
    // The summary's figures are the samples' own: pass@1, tokens, budgets, efficiency.
    let sql = "SELECT 'ok=' || (abs(s.pass_at_1 - x.p1) < 1e-9 AND abs(s.mean_tokens - x.tok) < 1e-9 AND x.n = 10 \
               AND abs(s.accuracy_at_budget[2] - x.b2) < 1e-6 AND abs(s.token_efficiency - s.mean_tokens / b.mean_tokens) < 1e-9) \
               FROM eval_summary s JOIN (SELECT policy, avg(correct::INT) AS p1, avg(n_tokens) AS tok, count(*) AS n, \
               avg(correct_at_budget[2]) AS b2 FROM eval_samples GROUP BY policy) x USING (policy) \
               CROSS JOIN (SELECT mean_tokens FROM eval_summary WHERE policy = 'base') b WHERE s.policy = 'iter-0000'";
    let out = env.make_ok(&["audit", &format!("SQL={sql}")]);
    assert!(out.contains("ok=true"), "{out}");
    // Again: cache hits; and a JSONL prompts file works too.
    let again = env.make_ok(&["eval", "POLICY=0"]);
    assert!(again.matches("eval: cache hit").count() == 2, "{again}");
    let jsonl = env.dir.path().join("mine.jsonl");
    fs::write(&jsonl, "{\"prompt_id\": \"q1\", \"prompt\": \"Problem: start with 3.\\n1: + 2\\nSolution: \", \"gold_answer\": \"5\"}\n")
        .unwrap();
    let out = env.ok("eval", &["--policy", "base", "--prompts", jsonl.to_str().unwrap()]);
    assert!(out.contains("-> evals/mine/base"), "{out}");
    let err = env.fails("eval", &["--policy", "7"]);
    assert!(err.contains("iter-0007/grpo-update"), "{err}");
}

#[test]
fn compare_writes_its_report_and_redraws_it_from_cache() {
    let env = Env::new("task.n_test = 6");
    let run = || {
        let out = Command::new(bin("compare"))
            .arg("--artifacts")
            .arg(env.artifacts())
            .arg("--config")
            .arg(env.config())
            .args(["--iters", "2", "--seeds", "1,2", "--eval-every", "1", "--split", "test", "--ablation-seeds", "1"])
            .args(["--arms", "l2t,outcome,length-penalty,mrt,l2t+credit.token_scale=rollout"])
            .output()
            .unwrap();
        assert!(out.status.success(), "compare failed:\n{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let first = run();
    assert!(first.contains("computed"), "{first}");
    // The ablation ran its one seed only; the others both.
    assert!(first.contains("-l2t_credit_token_scale_rollout-s1: ") && !first.contains("-l2t_credit_token_scale_rollout-s2: "), "{first}");
    assert!(first.contains("-mrt-s2: "), "{first}");
    let reports: Vec<PathBuf> = fs::read_dir(env.artifacts().join("reports")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(reports.len(), 1, "{reports:?}");
    let report = fs::read_to_string(reports[0].join("report.md")).unwrap();
    for needle in [
        "the **test** split (5 prompts",
        "| l2t | 2 |",
        "| outcome | 2 |",
        "| length-penalty | 2 |",
        "| mrt | 2 |",
        "| l2t+credit.token_scale=rollout | 1 |",
        "## The pre-registered criterion",
        "**Outcome: L2T",
        "## Episodes per response",
        "## Learning curves",
        "## The reward's terms, arm `l2t`",
        "## The reward's terms, arm `l2t+credit.token_scale=rollout`",
    ] {
        assert!(report.contains(needle), "{needle} missing from:\n{report}");
    }
    for png in ["accuracy_vs_iteration.png", "tokens_vs_iteration.png", "accuracy_vs_budget.png"] {
        let bytes = fs::read(reports[0].join(png)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 5000, "{png}: {} bytes", bytes.len());
    }
    // Nothing changed: every stage is a cache hit and the report is the same but for its wall time.
    let second = run();
    assert!(!second.contains(": computed"), "{second}");
    let strip = |r: &str| r.lines().filter(|l| !l.contains("wall time")).collect::<Vec<_>>().join("\n");
    assert_eq!(strip(&fs::read_to_string(reports[0].join("report.md")).unwrap()), strip(&report));
    // A bad arm is refused before anything runs.
    let out = Command::new(bin("compare"))
        .arg("--artifacts")
        .arg(env.artifacts())
        .arg("--config")
        .arg(env.config())
        .args(["--arms", "l2t+credit.betta=0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("credit.betta: unknown knob"), "{stderr}");
}

/// The Makefile is the user's DAG: its stage lists and its `iteration` recipe name the registry's
/// stages in the registry's order.
#[test]
fn the_makefile_and_the_stage_registry_agree() {
    let makefile = fs::read_to_string(repo().join("Makefile")).unwrap();
    let list = |var: &str| -> Vec<String> {
        let line = makefile.lines().find(|l| l.starts_with(var) && l.contains(":=")).unwrap_or_else(|| panic!("no {var} in the Makefile"));
        line.split(":=").nth(1).unwrap().split_whitespace().map(str::to_string).collect()
    };
    let names = |stages: &[Stage]| -> Vec<String> { stages.iter().map(|s| s.name().to_string()).collect() };
    assert_eq!(list("RUN_STAGES"), names(&Stage::RUN));
    assert_eq!(list("ITER_STAGES"), names(&Stage::ITERATION));
    let recipe: Vec<String> = makefile
        .split("\niteration:\n")
        .nth(1)
        .expect("an iteration target")
        .lines()
        .take_while(|l| l.starts_with('\t'))
        .map(|l| l.trim_start_matches("\t$(BIN)/").split_whitespace().next().unwrap().to_string())
        .collect();
    assert_eq!(recipe, names(&[Stage::RUN.as_slice(), Stage::ITERATION.as_slice()].concat()));
}

#[test]
fn help_works_for_every_binary() {
    for name in
        ["prepare", "bootstrap", "sample", "segment", "fisher-reward", "credit-assign", "grpo-update", "eval", "compare", "bench", "l2t"]
    {
        let out = Command::new(bin(name)).arg("--help").output().unwrap();
        assert!(out.status.success(), "{name} --help");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage"), "{name} --help");
    }
    assert!(Path::new(&repo().join("pipeline.toml")).exists());
}

/// The prepared GPU check (`gpu/check.sh`, docs/gpu.md) runs end to end on the CPU build as its
/// dry run: every check passes, the CPU's two iterations are byte-identical, the timings land in
/// the ratio table's input and a summary is written.
#[test]
fn device_check_dry_run_passes_on_the_cpu() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new("make")
        .current_dir(repo())
        .args(["--no-print-directory", "-s", "gpu-check-dry"])
        .arg(format!("CHECK_OUT={}", out.path().display()))
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    let log = fs::read_to_string(out.path().join("check.log")).unwrap_or_default();
    assert!(run.status.success(), "make gpu-check-dry failed:\n{}\n{}\n--- check.log\n{log}", text(&run.stdout), text(&run.stderr));
    let results: Vec<serde_json::Value> = fs::read_to_string(out.path().join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let of = |check: &str| -> Vec<&serde_json::Value> { results.iter().filter(|r| r["check"] == check).collect() };
    let fixtures = of("fixture-logits");
    assert_eq!(fixtures.len(), 6, "three families at two dtypes: {fixtures:?}");
    assert!(fixtures.iter().all(|r| r["pass"] == true && r["device"] == "cpu"), "{fixtures:?}");
    let iterations = of("iteration");
    assert_eq!(iterations.len(), 2, "{iterations:?}");
    assert!(iterations.iter().all(|r| r["pass"] == true), "{iterations:?}");
    assert!(iterations.iter().all(|r| r["byte_identical"] == true), "the CPU is deterministic: {iterations:?}");
    // The update's ratio starts from the sampler's log-probs in f32, from its own f32 ones after bf16 sampling.
    let logp_old: Vec<(&serde_json::Value, &serde_json::Value)> =
        of("iteration-stage").iter().filter(|r| r["stage"] == "grpo-update").map(|r| (&r["dtype"], &r["metrics"]["logp_old"])).collect();
    assert_eq!(logp_old.len(), 4, "{logp_old:?}");
    for (dtype, source) in logp_old {
        assert_eq!(source, if dtype == "f32" { "sampler" } else { "recomputed in f32" }, "{dtype}");
    }
    for w in ["generate-b1-fixed", "generate-b16-fixed", "generate-b64-fixed", "score", "train-step"] {
        let name = format!("tiny-qwen2-{w}");
        assert!(results.iter().any(|r| r["workload"] == name.as_str() && r["median_tok_per_s"].as_f64().unwrap_or(0.0) > 0.0), "{name}");
    }
    let failed: Vec<&serde_json::Value> = results.iter().filter(|r| r.get("rc").is_some_and(|rc| rc != 0)).collect();
    assert!(failed.is_empty(), "{failed:?}\n{log}");
    let summary = fs::read_to_string(out.path().join("summary.md")).unwrap();
    assert!(summary.contains("| tiny-qwen2-score | bf16 |"), "{summary}");
}

/// `make iterate DTYPE=bf16` samples and scores in bf16 (on the CPU here: the path a GPU takes),
/// keys and records it, and the update then takes its own f32 log-probs as `logp_old`.
#[test]
fn bf16_sampling_is_keyed_recorded_and_rescored_in_f32() {
    let env = Env::new("");
    env.make_ok(&["iterate", "DTYPE=bf16"]);
    let sample = env.manifest("iter-0000/sample");
    assert_eq!(sample["dtype"], "bf16", "{sample}");
    let update = env.manifest("iter-0000/grpo-update")["metrics"].clone();
    assert_eq!(update["logp_old"], "recomputed in f32", "{update}");
    assert!(update["logp_mismatch_max"].as_f64().is_some_and(|m| m > 0.0 && m < 1.0), "{update}");
    // The f32 run is another key: nothing of the bf16 run is a cache hit for it.
    let out = env.make_ok(&["iteration", "ITER=0"]);
    assert!(out.contains("sample: computed"), "{out}");
    assert_eq!(env.manifest("iter-0000/grpo-update")["metrics"]["logp_old"], "sampler");
}
