//! The cluster runner (`make iterate RUNNER=slurm`): an iteration's DAG as Slurm jobs. Slurm does
//! the queueing, the dependencies (`--dependency=afterok`) and any retries; this module only plans
//! the jobs, submits them with `sbatch`, and waits.
//!
//! - Stages run here first with `--only-cached` while everything before them is in the store: a
//!   stage whose key is already there is not submitted at all (nor is a shard of one).
//! - `sample` and `fisher-reward` run as job arrays of `shards` tasks (`--shard i/N`), then a merge
//!   job (`--merge N`) that publishes the usual artifact; the other stages as one job each.
//! - Every job depends on the one before it; `--kill-on-invalid-dep=yes` cancels what depends on
//!   a failed job, so a failure never leaves jobs pending forever.
//!
//! The store must be on a filesystem every node sees, at the same path.

use crate::audit::next_iteration;
use crate::config::{DeviceSpec, SlurmConfig};
use crate::pipeline::Shard;
use crate::stage::Stage;
use crate::store::Store;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// What to run, and where.
pub struct Runner<'a> {
    /// Folder of the stage binaries.
    pub bin: PathBuf,
    pub artifacts: PathBuf,
    pub run: String,
    pub config_path: PathBuf,
    pub slurm: &'a SlurmConfig,
    pub iters: u32,
    pub shards: u32,
    /// Wait for the jobs (else print their ids and return).
    pub wait: bool,
    /// Passed to every stage as `--device` (else the configuration's `device`).
    pub device: Option<DeviceSpec>,
}

/// One stage of the plan: a run-level stage, or an iteration's.
#[derive(Debug, Clone)]
struct Step {
    stage: Stage,
    iteration: Option<u32>,
}

impl Step {
    fn label(&self) -> String {
        match self.iteration {
            Some(n) => self.stage.at(n).replace('/', "-"),
            None => self.stage.name().to_string(),
        }
    }
}

/// A submitted job.
#[derive(Debug, Clone)]
struct Job {
    id: String,
    label: String,
    /// Its log (`%a` stands for an array task).
    log: PathBuf,
}

impl Runner<'_> {
    /// Submits the next `iters` iterations (and what they need before them) and, unless told not
    /// to, waits for them.
    pub fn iterate(&self) -> Result<()> {
        if self.shards == 0 {
            bail!("shards must be at least 1");
        }
        let store = Store::new(&self.artifacts);
        let first = next_iteration(&store, &self.run);
        let mut plan: Vec<Step> = Stage::RUN.into_iter().map(|stage| Step { stage, iteration: None }).collect();
        for n in first..first + self.iters {
            plan.extend(Stage::ITERATION.into_iter().map(|stage| Step { stage, iteration: Some(n) }));
        }
        let logs = self.artifacts.join("slurm").join(&self.run);
        std::fs::create_dir_all(&logs).with_context(|| format!("{}: cannot create", logs.display()))?;
        let mut jobs: Vec<Job> = Vec::new();
        for step in &plan {
            let after = jobs.last().map(|j| j.id.clone());
            // While nothing is submitted, every input of this step is in the store: ask the store.
            if after.is_none() && self.cached(step, None)? {
                continue;
            }
            let shards = if step.stage.shards_by_prompt_group() { self.shards } else { 1 };
            if shards == 1 {
                jobs.push(self.submit(step, &[], None, after.as_deref(), &logs)?);
                continue;
            }
            let mut missing = Vec::new();
            for index in 0..shards {
                let shard = Shard { index, count: shards };
                if after.is_some() || !self.cached(step, Some(shard))? {
                    missing.push(index);
                }
            }
            let mut after = after;
            if !missing.is_empty() {
                let array = self.submit(step, &missing, None, after.as_deref(), &logs)?;
                after = Some(array.id.clone());
                jobs.push(array);
            }
            jobs.push(self.submit(step, &[], Some(shards), after.as_deref(), &logs)?);
        }
        let last = first + self.iters;
        if jobs.is_empty() {
            println!("slurm: nothing to submit: iterations {first}..{last} of run {} are in the store", self.run);
            return Ok(());
        }
        for job in &jobs {
            println!("slurm: submitted {} as job {} (log {})", job.label, job.id, job.log.display());
        }
        if !self.wait {
            return Ok(());
        }
        self.wait_for(&jobs)?;
        for n in first..last {
            if !store.root().join("runs").join(&self.run).join(Stage::GrpoUpdate.at(n)).join("manifest.json").exists() {
                bail!("the jobs ended but iteration {n}'s update is not published (see the logs in {})", logs.display());
            }
        }
        println!("slurm: iterations {first}..{last} of run {} done ({} jobs)", self.run, jobs.len());
        Ok(())
    }

    /// The stage's command line (a shard's index is the array task's).
    fn command(&self, step: &Step, part: Option<&str>) -> Vec<String> {
        let mut cmd = vec![
            self.bin.join(step.stage.name()).display().to_string(),
            "--artifacts".into(),
            self.artifacts.display().to_string(),
            "--run".into(),
            self.run.clone(),
            "--config".into(),
            self.config_path.display().to_string(),
        ];
        if let Some(n) = step.iteration {
            cmd.extend(["--iter".into(), n.to_string()]);
        }
        if let Some(device) = self.device {
            cmd.extend(["--device".into(), device.to_string()]);
        }
        if let Some(part) = part {
            cmd.extend(part.split(' ').map(String::from));
        }
        cmd
    }

    /// Whether the step (or one shard of it) is in the store; a hit points the run's ref at it.
    fn cached(&self, step: &Step, shard: Option<Shard>) -> Result<bool> {
        let part = shard.map(|s| format!("--shard {s}"));
        let cmd = self.command(step, part.as_deref());
        let out = Command::new(&cmd[0]).args(&cmd[1..]).arg("--only-cached").output().with_context(|| format!("cannot run {}", cmd[0]))?;
        // Not in the store (status 3), or an input missing or a bad config: the job will say which.
        if out.status.success() {
            print!("{}", String::from_utf8_lossy(&out.stdout));
        }
        Ok(out.status.success())
    }

    /// `sbatch`s the step: an array over `tasks` shards when given, the merge of `merge` shards, or
    /// the whole stage.
    fn submit(&self, step: &Step, tasks: &[u32], merge: Option<u32>, after: Option<&str>, logs: &Path) -> Result<Job> {
        let (label, part) = match (tasks, merge) {
            ([], Some(n)) => (format!("{}-merge", step.label()), Some(format!("--merge {n}"))),
            ([], None) => (step.label(), None),
            (_, _) => (format!("{}-shards", step.label()), Some(format!("--shard $SLURM_ARRAY_TASK_ID/{}", self.shards))),
        };
        let log = logs.join(if tasks.is_empty() { format!("{label}-%j.out") } else { format!("{label}-%A_%a.out") });
        let mut args = vec![
            "--parsable".to_string(),
            format!("--job-name=l2t-{}-{label}", self.run),
            format!("--output={}", log.display()),
            format!("--chdir={}", std::env::current_dir()?.display()),
            "--kill-on-invalid-dep=yes".into(),
        ];
        if let Some(id) = after {
            args.push(format!("--dependency=afterok:{id}"));
        }
        if !tasks.is_empty() {
            args.push(format!("--array={}", tasks.iter().map(u32::to_string).collect::<Vec<_>>().join(",")));
        }
        let s = self.slurm;
        for (flag, value) in [("--partition", &s.partition), ("--time", &s.time), ("--mem", &s.mem)] {
            if !value.is_empty() {
                args.push(format!("{flag}={value}"));
            }
        }
        if s.cpus_per_task > 0 {
            args.push(format!("--cpus-per-task={}", s.cpus_per_task));
        }
        if s.gpus_per_task > 0 {
            args.push(format!("--gpus-per-task={}", s.gpus_per_task));
        }
        args.extend(s.extra.iter().cloned());
        // The job's shell expands only the array task's index; every other word is quoted.
        let words: Vec<String> = self.command(step, None).iter().map(|w| shell_quote(w)).collect();
        let mut script = format!("exec {}", words.join(" "));
        if let Some(part) = part {
            script = format!("{script} {part}");
        }
        if s.cpus_per_task > 0 {
            script = format!("export RAYON_NUM_THREADS={}; {script}", s.cpus_per_task);
        }
        args.push(format!("--wrap={script}"));
        let out = Command::new("sbatch").args(&args).output().context("cannot run sbatch (is Slurm installed and on PATH?)")?;
        if !out.status.success() {
            bail!("sbatch refused {label}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let id = stdout.trim().split(';').next().unwrap_or_default().to_string();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
            bail!("sbatch printed no job id for {label}: {stdout:?}");
        }
        Ok(Job { id, label, log })
    }

    /// Waits until every job completed; on a failed one, prints its log's last lines, cancels the
    /// rest and fails.
    fn wait_for(&self, jobs: &[Job]) -> Result<()> {
        let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        let mut shown: BTreeMap<String, String> = BTreeMap::new();
        loop {
            let out = Command::new("squeue")
                .args(["-h", "-t", "all", "-o", "%i|%T", "-j", &ids.join(",")])
                .output()
                .context("cannot run squeue")?;
            if !out.status.success() {
                bail!("squeue failed: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            // `<id>` or `<id>_<task>` (or `<id>_[0-3]` while pending), and its state.
            let mut states: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let Some((job, state)) = line.trim().split_once('|') else { continue };
                let (id, task) = job.split_once('_').unwrap_or((job, ""));
                states.entry(id.to_string()).or_default().push((task.to_string(), state.to_string()));
            }
            let mut running = false;
            for job in jobs {
                let Some(tasks) = states.get(&job.id) else { continue }; // gone from the queue: finished long ago
                for (task, state) in tasks {
                    let name = if task.is_empty() {
                        format!("{} (job {})", job.label, job.id)
                    } else {
                        format!("{} (job {}_{task})", job.label, job.id)
                    };
                    if shown.get(&name) != Some(state) {
                        println!("slurm: {name} {state}");
                        shown.insert(name.clone(), state.clone());
                    }
                    match state.as_str() {
                        "COMPLETED" => {}
                        "PENDING" | "RUNNING" | "CONFIGURING" | "COMPLETING" | "SUSPENDED" | "REQUEUED" | "RESIZING" | "STAGE_OUT"
                        | "SIGNALING" => running = true,
                        failed => {
                            let _ = Command::new("scancel").args(&ids).status();
                            let log = PathBuf::from(
                                job.log.display().to_string().replace("%j", &job.id).replace("%A", &job.id).replace("%a", task),
                            );
                            let tail = std::fs::read_to_string(&log)
                                .map(|t| t.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n"))
                                .unwrap_or_else(|e| format!("({}: {e})", log.display()));
                            bail!("{name} ended {failed}; the rest of the jobs are cancelled. The end of {}:\n{tail}", log.display());
                        }
                    }
                }
            }
            if !running {
                return Ok(());
            }
            std::thread::sleep(Duration::from_secs_f64(self.slurm.poll_s.max(0.1)));
        }
    }
}

/// A word for `sh`, single-quoted unless it is plain.
fn shell_quote(word: &str) -> String {
    if !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:@%+,".contains(c)) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_are_quoted_when_needed() {
        assert_eq!(shell_quote("/opt/l2t/target/release/sample"), "/opt/l2t/target/release/sample");
        assert_eq!(shell_quote("my run"), "'my run'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
    }
}
