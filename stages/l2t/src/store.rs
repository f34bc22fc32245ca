//! The content-addressed artifact store (design.md, "The artifact store").
//!
//! ```text
//! artifacts/store/<key>/            one finished stage run: its files + manifest.json
//! artifacts/store/tmp/              runs in progress (a killed run leaves only this behind)
//! artifacts/store/locks/<key>/      who computes a key now, so that no other process does too
//! artifacts/runs/<run>/<slot>/      refs: hard links to a store entry's files
//! ```
//!
//! A stage run's key is blake3 over (stage, version, canonical params, content hashes of its inputs).
//! Outputs are hashed while they are written ([`HashingWriter`]), published by one `rename`, and
//! verified against the manifest whenever they are read back ([`Artifact::file`]).

use crate::stage::Stage;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

mod direct;
mod lock;
use direct::{DirectReader, DirectWriter};
pub use lock::{KeyLock, LockTiming};

/// Folders of `store/` that are not entries: runs in progress, and the locks of keys being computed.
const TMP_DIR: &str = "tmp";
const LOCKS_DIR: &str = "locks";

/// Written into every manifest and Parquet footer instead of a crate version, so that a
/// dependency bump does not change the bytes of an artifact.
pub const CREATED_BY: &str = "l2t";

/// Folder of a run's evaluation refs: `evals/<split>/<policy>`.
pub const EVALS_DIR: &str = "evals/";

/// Folder of the refs of sharded stage runs: `shards/<slot>/<i>of<N>` (they feed only their merge).
pub const SHARDS_DIR: &str = "shards/";

/// Name of the marker file that says a ref's inputs changed since it was made.
pub const STALE_MARKER: &str = "STALE";

/// Name of the marker file `verify --repair` leaves in a ref whose files are damaged: the next
/// `make iterate` reruns that iteration ([`crate::audit::next_iteration`]) and the stage, whose
/// store entry is gone, recomputes it and replaces the ref.
pub const DAMAGED_MARKER: &str = "DAMAGED";

/// What [`Store::verify`] found and, with repair, did.
#[derive(Debug, Default)]
pub struct Verification {
    /// Store entries and refs checked.
    pub entries: usize,
    pub refs: usize,
    /// One line per damaged entry, damaged ref, or ref whose store entry is missing or damaged.
    pub problems: Vec<String>,
    /// One line per repair done.
    pub repairs: Vec<String>,
}

/// One output file of a stage run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutputFile {
    pub file: String,
    pub blake3: String,
    pub bytes: u64,
    /// Row count for tables; absent for other files.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rows: Option<u64>,
}

/// An input of a stage run, as hashed into its key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InputRef {
    /// Role of the input ("policy", "rollouts", ...).
    pub name: String,
    /// The key of the stage run that produced it.
    pub key: String,
    /// Content hash of each file of that run that this stage reads.
    pub files: BTreeMap<String, String>,
}

/// Everything known about one stage run, stored as `manifest.json` beside its outputs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub stage: String,
    pub version: u32,
    pub key: String,
    pub params: serde_json::Value,
    pub inputs: Vec<InputRef>,
    pub outputs: Vec<OutputFile>,
    pub seed: u64,
    pub device: String,
    pub dtype: String,
    pub wall_time_s: f64,
    /// Stage-specific figures (losses, accuracies, throughput).
    pub metrics: serde_json::Value,
    pub created_by: String,
}

impl Manifest {
    /// A manifest for a CPU, f32 run (`device` and `dtype` are set otherwise for another backend);
    /// outputs are filled in at publish time.
    pub fn new(stage: &str, version: u32, key: &str, params: serde_json::Value, inputs: Vec<InputRef>, seed: u64) -> Self {
        Self {
            stage: stage.into(),
            version,
            key: key.into(),
            params,
            inputs,
            outputs: Vec::new(),
            seed,
            device: "cpu".into(),
            dtype: "f32".into(),
            wall_time_s: 0.0,
            metrics: serde_json::json!({}),
            created_by: CREATED_BY.into(),
        }
    }

    pub fn output(&self, file: &str) -> Result<&OutputFile> {
        self.outputs
            .iter()
            .find(|o| o.file == file)
            .ok_or_else(|| anyhow!("stage {} (key {}) has no output file {file:?}", self.stage, short(&self.key)))
    }

    /// This run as an input of a later stage, naming only the files it reads.
    pub fn as_input(&self, name: &str, files: &[&str]) -> Result<InputRef> {
        let mut hashes = BTreeMap::new();
        for f in files {
            hashes.insert(f.to_string(), self.output(f)?.blake3.clone());
        }
        Ok(InputRef { name: name.into(), key: self.key.clone(), files: hashes })
    }
}

/// First 12 hex digits of a key, for messages.
pub fn short(key: &str) -> &str {
    &key[..key.len().min(12)]
}

/// Where a stage computes and in which precision: part of every key and manifest, since another
/// device or dtype gives other bytes and must never be a cache hit for this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// `cpu`, `cuda:N`, `metal:N`.
    pub device: String,
    /// `f32`, `bf16`, ...
    pub dtype: String,
}

impl Backend {
    /// The backend of a candle device at a dtype.
    pub fn of(device: &candle_core::Device, dtype: candle_core::DType) -> Self {
        let device = match device.location() {
            candle_core::DeviceLocation::Cpu => "cpu".to_string(),
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        };
        Self { device, dtype: dtype.as_str().to_string() }
    }

    /// The CPU in f32, the reference every key was first defined on.
    pub fn cpu_f32() -> Self {
        Self { device: "cpu".into(), dtype: "f32".into() }
    }
}

/// The key of a stage run: blake3 over its canonical definition. Inputs count by the content of
/// the files read, not by the key of the run that made them, so a rerun upstream that writes the
/// same bytes leaves every key downstream unchanged (early cutoff). The backend enters the key
/// only when it is not the CPU in f32, so the keys of CPU runs stay those of earlier versions.
pub fn stage_key(stage: &str, version: u32, params: &serde_json::Value, inputs: &[InputRef], backend: &Backend) -> String {
    let contents: Vec<serde_json::Value> = inputs.iter().map(|i| serde_json::json!({ "name": i.name, "files": i.files })).collect();
    // serde_json's default map is ordered, so this text is canonical.
    let mut canonical = serde_json::json!({ "stage": stage, "version": version, "params": params, "inputs": contents });
    if *backend != Backend::cpu_f32() {
        canonical["backend"] = serde_json::json!({ "device": backend.device, "dtype": backend.dtype });
    }
    blake3::hash(canonical.to_string().as_bytes()).to_hex().to_string()
}

/// Writes from this size on are hashed in parallel (blake3's advice: below ~128 KiB the split
/// costs more than it gains).
const PARALLEL_HASH_BYTES: usize = 1 << 17;

/// Feeds `bytes` to `hasher`: large pieces (a tensor of a checkpoint) on every core.
fn hash_more(hasher: &mut blake3::Hasher, bytes: &[u8]) {
    if bytes.len() >= PARALLEL_HASH_BYTES {
        hasher.update_rayon(bytes);
    } else {
        hasher.update(bytes);
    }
}

/// How an output's bytes reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caching {
    /// Through the page cache: outputs the next stages read (a policy's weights, the tables).
    Cached,
    /// Around it ([`direct`]): a large output read back once, by [`Artifact::read_uncached`].
    Uncached,
}

/// A `Write` that passes bytes to a file and to a blake3 hasher, so an output is hashed while it is
/// written and never read back for it.
pub struct HashingWriter {
    sink: Sink,
    hasher: blake3::Hasher,
    bytes: u64,
}

enum Sink {
    Cached(File),
    Uncached(DirectWriter),
}

impl HashingWriter {
    pub fn create(path: &Path, caching: Caching) -> Result<Self> {
        let cannot = || format!("{}: cannot create", path.display());
        let sink = match caching {
            Caching::Cached => Sink::Cached(File::create(path).with_context(cannot)?),
            Caching::Uncached => Sink::Uncached(DirectWriter::create(path).with_context(cannot)?),
        };
        Ok(Self { sink, hasher: blake3::Hasher::new(), bytes: 0 })
    }

    /// The hash, the byte count and the file, still to be synced to disk.
    pub fn finish(self) -> io::Result<(String, u64, File)> {
        let file = match self.sink {
            Sink::Cached(file) => file,
            Sink::Uncached(writer) => writer.finish()?,
        };
        Ok((self.hasher.finalize().to_hex().to_string(), self.bytes, file))
    }
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = match &mut self.sink {
            Sink::Cached(file) => file.write(buf)?,
            Sink::Uncached(writer) => {
                writer.write_all(buf)?;
                buf.len()
            }
        };
        hash_more(&mut self.hasher, &buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.sink {
            Sink::Cached(file) => file.flush(),
            // Its blocks are written whole; the last one by `finish`.
            Sink::Uncached(_) => Ok(()),
        }
    }
}

/// blake3 of a file's contents, over a memory map and every core (blake3 reads small files
/// instead of mapping them).
pub fn hash_file(path: &Path) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap_rayon(path).with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// The store rooted at an `artifacts/` folder.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    lock_timing: LockTiming,
}

/// A key's run, found finished or ours to compute.
pub enum Claim {
    Done(Artifact),
    /// Compute and publish it; dropping the lock after publication lets the waiters take the hit.
    Mine(KeyLock),
}

/// Whether a stage run was computed or found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
}

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into(), lock_timing: LockTiming::default() }
    }

    pub fn with_lock_timing(self, lock_timing: LockTiming) -> Self {
        Self { lock_timing, ..self }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn entry_dir(&self, key: &str) -> PathBuf {
        self.root.join("store").join(key)
    }

    /// The finished run with this key, if its outputs are intact. A damaged entry is reported and
    /// removed so that the caller recomputes it.
    pub fn lookup(&self, key: &str) -> Result<Option<Artifact>> {
        let dir = self.entry_dir(key);
        if !dir.join("manifest.json").exists() {
            return Ok(None);
        }
        let artifact = Artifact::open(&dir)?;
        for out in &artifact.manifest.outputs {
            if let Err(e) = artifact.file(&out.file) {
                eprintln!("warning: {e:#}; recomputing");
                fs::remove_dir_all(&dir).with_context(|| format!("{}: cannot remove", dir.display()))?;
                return Ok(None);
            }
        }
        touch(&dir.join("manifest.json"))?; // a hit is as fresh as a publication for gc's grace
        Ok(Some(artifact))
    }

    /// The finished run with this key, or the right to compute it. While another process (of this
    /// host or of another sharing the store) computes the key, waits for it, saying so on stderr
    /// as `what`, and then takes its result; takes over when that process is gone ([`lock`]).
    pub fn claim(&self, key: &str, what: &str) -> Result<Claim> {
        let locks = self.root.join("store").join(LOCKS_DIR);
        let mut watch = lock::Watch::default();
        let (mut waited_for, mut last_notice) = (None::<lock::Owner>, std::time::Instant::now());
        let started = std::time::Instant::now();
        loop {
            if let Some(artifact) = self.lookup(key)? {
                if let Some(owner) = &waited_for {
                    eprintln!("{what}: key {} was computed by {owner}; using it", short(key));
                }
                return Ok(Claim::Done(artifact));
            }
            if let Some(held) = lock::try_acquire(&locks, key, self.lock_timing)? {
                // The owner we waited for may have published between our lookup and our lock.
                return Ok(match self.lookup(key)? {
                    Some(artifact) => Claim::Done(artifact),
                    None => Claim::Mine(held),
                });
            }
            match watch.look(&locks, key, self.lock_timing)? {
                lock::Seen::Free => continue,
                lock::Seen::TakenOver { owner, reason } => {
                    let who = owner.map_or("a process".to_string(), |o| o.to_string());
                    eprintln!("{what}: key {} was being computed by {who}, but {reason}; computing it here", short(key));
                    continue;
                }
                lock::Seen::Held(owner) => {
                    if let Some(owner) = owner.filter(|o| waited_for.as_ref() != Some(o)) {
                        eprintln!("{what}: key {} is being computed by {owner}; waiting for it", short(key));
                        (waited_for, last_notice) = (Some(owner), std::time::Instant::now());
                    } else if last_notice.elapsed() >= std::time::Duration::from_secs(60) {
                        eprintln!("{what}: still waiting for key {} ({:.0}s)", short(key), started.elapsed().as_secs_f64());
                        last_notice = std::time::Instant::now();
                    }
                }
            }
            std::thread::sleep(self.lock_timing.poll);
        }
    }

    /// The finished run with this key, unverified: each file is checked when it is read
    /// ([`Artifact::file`]), so a caller that needs one file of a large run hashes only that one.
    pub fn entry(&self, key: &str) -> Result<Option<Artifact>> {
        let dir = self.entry_dir(key);
        if !dir.join("manifest.json").exists() {
            return Ok(None);
        }
        Artifact::open(&dir).map(Some)
    }

    /// Adds another store's finished run to this store (hard links where the filesystem allows,
    /// copies otherwise), so that a scratch store can reuse an expensive artifact.
    pub fn import(&self, artifact: &Artifact) -> Result<Artifact> {
        let mut staging = self.begin(&artifact.manifest.key)?;
        for out in &artifact.manifest.outputs {
            let (from, to) = (artifact.file(&out.file)?, staging.path(&out.file));
            if fs::hard_link(&from, &to).is_err() {
                fs::copy(&from, &to).with_context(|| format!("{}: cannot copy", from.display()))?;
            }
            staging.outputs.push(out.clone());
        }
        staging.publish(artifact.manifest.clone())
    }

    /// Starts writing the outputs of a run in a private temporary folder.
    pub fn begin(&self, key: &str) -> Result<Staging> {
        let tmp_root = self.root.join("store").join(TMP_DIR);
        fs::create_dir_all(&tmp_root).with_context(|| format!("{}: cannot create", tmp_root.display()))?;
        // The name says who owns the run, so that gc leaves it alone while its owner lives.
        let dir = tmp_root.join(format!("{key}.{}@{}", std::process::id(), host_name()));
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        Ok(Staging { dir, final_dir: self.entry_dir(key), outputs: Vec::new(), syncs: Vec::new() })
    }

    fn slot_dir(&self, run: &str, slot: &str) -> PathBuf {
        self.root.join("runs").join(run).join(slot)
    }

    /// Opens the artifact a run's ref points at, e.g. `slot = "iter-0000/sample"`.
    pub fn open_ref(&self, run: &str, slot: &str) -> Result<Artifact> {
        let dir = self.slot_dir(run, slot);
        if !dir.join("manifest.json").exists() {
            bail!("{}: no such artifact (run the stages before it first, e.g. `make iterate RUN={run}`)", dir.display());
        }
        let artifact = Artifact::open(&dir)?;
        if dir.join(STALE_MARKER).exists() {
            eprintln!("warning: {} is stale (an input changed since it was made)", dir.display());
        }
        Ok(artifact)
    }

    /// Points a run's ref at a store entry: a folder of hard links to its files, replaced only
    /// when it points elsewhere, so that an unchanged output leaves the ref (and its mtime) alone.
    /// Returns whether the ref changed; when it did, refs downstream of it are marked stale.
    pub fn publish_ref(&self, run: &str, slot: &str, artifact: &Artifact) -> Result<bool> {
        let dir = self.slot_dir(run, slot);
        let target_manifest = artifact.dir.join("manifest.json");
        if let (Ok(a), Ok(b)) = (fs::metadata(dir.join("manifest.json")), fs::metadata(&target_manifest)) {
            if a.ino() == b.ino() && a.dev() == b.dev() && !dir.join(STALE_MARKER).exists() && !dir.join(DAMAGED_MARKER).exists() {
                return Ok(false);
            }
        }
        let parent = dir.parent().expect("a slot has a parent folder");
        let name = dir.file_name().expect("a slot has a name").to_string_lossy().to_string();
        fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
        let tmp = parent.join(format!(".{name}.new-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir(&tmp)?;
        for entry in fs::read_dir(&artifact.dir)? {
            let entry = entry?;
            fs::hard_link(entry.path(), tmp.join(entry.file_name()))
                .with_context(|| format!("{}: cannot link into {}", entry.path().display(), tmp.display()))?;
        }
        let changed_key = match Artifact::open(&dir) {
            Ok(old) => old.manifest.key != artifact.manifest.key,
            Err(_) => true,
        };
        // Swap the new folder in. Another process may be publishing the same ref at once (two
        // `make iterate` of one run): whoever renames last wins, and both point at the same key.
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        let mut attempts = 0;
        loop {
            remove_if_present(&old)?;
            match fs::rename(&dir, &old) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("{}: cannot move aside", dir.display()))
                }
                _ => {}
            }
            match fs::rename(&tmp, &dir) {
                Ok(()) => break,
                Err(_) if dir.exists() && attempts < 100 => attempts += 1, // the other process's folder landed in between
                Err(e) => return Err(e).with_context(|| format!("{}: cannot publish the ref", dir.display())),
            }
        }
        remove_if_present(&old)?;
        if changed_key {
            self.mark_downstream_stale(run, slot)?;
        }
        Ok(changed_key)
    }

    /// Marks every ref that consumes `slot` (directly or not) stale: later stages of the same
    /// iteration and every stage of later iterations.
    fn mark_downstream_stale(&self, run: &str, slot: &str) -> Result<()> {
        if slot.starts_with(EVALS_DIR) || slot.starts_with(SHARDS_DIR) {
            return Ok(()); // evaluations feed no stage; a shard feeds only its merge, keyed by its hash
        }
        let (iteration, stage) = parse_slot(slot);
        let run_dir = self.root.join("runs").join(run);
        let Ok(entries) = fs::read_dir(&run_dir) else { return Ok(()) };
        let mut stale = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let Some(n) = name.strip_prefix("iter-").and_then(|n| n.parse::<u32>().ok()) else { continue };
            for (pos, s) in Stage::ITERATION.iter().enumerate() {
                let downstream = match (iteration, stage) {
                    // A run-level input (prepare, bootstrap) feeds every iteration.
                    (None, _) => true,
                    (Some(i), st) => n > i || (n == i && Stage::ITERATION.iter().position(|x| x.name() == st).is_some_and(|p| pos > p)),
                };
                if downstream {
                    stale.push(entry.path().join(s.name()));
                }
            }
        }
        for dir in stale {
            if dir.join("manifest.json").exists() {
                fs::write(dir.join(STALE_MARKER), format!("input {slot} changed\n"))?;
            }
        }
        Ok(())
    }

    /// Deletes store entries that no ref of any run points at, and leftovers of killed runs; safe
    /// while stages run. It keeps the temporary folder of every run whose owner lives (a process
    /// of this host, or, for another host's run on a shared filesystem, one written to within
    /// `grace`), and every entry published or found by a cache hit within `grace` (a stage
    /// points its ref at it right after).
    pub fn gc(&self, grace: std::time::Duration) -> Result<GcReport> {
        let mut live = std::collections::BTreeSet::new();
        let runs = self.root.join("runs");
        if runs.exists() {
            collect_ref_keys(&runs, &mut live)?;
        }
        let mut report = GcReport::default();
        let fresh = |path: &Path| fs::metadata(path).and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().map_or(true, |age| age < grace));
        let store = self.root.join("store");
        let Ok(entries) = fs::read_dir(&store) else { return Ok(report) };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name == TMP_DIR || name == LOCKS_DIR || live.contains(&name) {
                continue;
            }
            if fresh(&entry.path().join("manifest.json")) {
                report.kept_fresh += 1;
                continue;
            }
            report.freed += dir_size(&entry.path());
            remove_if_present(&entry.path())?;
            report.removed += 1;
        }
        report.removed_locks = lock::collect_dead(&store.join(LOCKS_DIR))?;
        let Ok(runs_in_progress) = fs::read_dir(store.join(TMP_DIR)) else { return Ok(report) };
        let this_host = host_name();
        for entry in runs_in_progress.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let owner_lives =
                match name.split_once('@').and_then(|(rest, host)| Some((rest.rsplit_once('.')?.1.parse::<u32>().ok()?, host))) {
                    Some((pid, host)) if host == this_host => Path::new("/proc").join(pid.to_string()).exists(),
                    Some(_) => fresh(&entry.path()),
                    None => false, // not a run's folder: a leftover
                };
            if owner_lives {
                report.kept_running += 1;
            } else {
                report.freed += dir_size(&entry.path());
                remove_if_present(&entry.path())?;
                report.removed_leftovers += 1;
            }
        }
        Ok(report)
    }
}

impl Store {
    /// Checks every store entry's files against its manifest, and every ref's files and the
    /// entry it names. With `repair`: damaged entries are removed; a ref whose own files are
    /// intact restores its missing entry; a damaged ref gets [`DAMAGED_MARKER`], so that the
    /// next `make iterate` recomputes exactly what was lost.
    pub fn verify(&self, repair: bool) -> Result<Verification> {
        let mut v = Verification::default();
        let store = self.root.join("store");
        let mut keys: Vec<String> = match fs::read_dir(&store) {
            Ok(entries) => entries
                .flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n != TMP_DIR && n != LOCKS_DIR)
                .collect(),
            Err(_) => Vec::new(),
        };
        keys.sort();
        let mut damaged = std::collections::BTreeSet::new();
        for key in keys {
            v.entries += 1;
            let dir = store.join(&key);
            if let Err(e) = check_artifact(&dir, Some(&key)) {
                v.problems.push(format!("damaged store entry {}: {e:#}", short(&key)));
                if repair {
                    fs::remove_dir_all(&dir).with_context(|| format!("{}: cannot remove", dir.display()))?;
                    v.repairs.push(format!("removed store entry {}", short(&key)));
                }
                damaged.insert(key);
            }
        }
        let mut refs = Vec::new();
        let runs = self.root.join("runs");
        if runs.exists() {
            collect_ref_dirs(&runs, &mut refs)?;
        }
        refs.sort();
        for dir in refs {
            v.refs += 1;
            let shown = dir.strip_prefix(&self.root).unwrap_or(&dir).display().to_string();
            if let Err(e) = check_artifact(&dir, None) {
                v.problems.push(format!("damaged ref {shown}: {e:#}"));
                if repair {
                    fs::write(dir.join(DAMAGED_MARKER), format!("{e:#}\n")).with_context(|| format!("{shown}: cannot mark damaged"))?;
                    v.repairs.push(format!("marked ref {shown} damaged (the next `make iterate` recomputes it)"));
                }
                continue;
            }
            let artifact = Artifact::open(&dir)?;
            let key = &artifact.manifest.key;
            let missing = !self.entry_dir(key).join("manifest.json").exists();
            if missing || damaged.contains(key) {
                let why = if missing && !damaged.contains(key) { "is missing" } else { "is damaged" };
                v.problems.push(format!("ref {shown}: its store entry {} {why}", short(key)));
                if repair {
                    self.import(&artifact)?;
                    damaged.remove(key);
                    v.repairs.push(format!("restored store entry {} from the intact ref {shown}", short(key)));
                }
            }
        }
        Ok(v)
    }
}

/// Checks a finished run's files against its manifest (and, for a store entry, that the manifest
/// is the one of the key the entry is named after).
fn check_artifact(dir: &Path, key: Option<&str>) -> Result<()> {
    let artifact = Artifact::open(dir)?;
    if let Some(key) = key.filter(|k| *k != artifact.manifest.key) {
        bail!("{}: the manifest is of key {}, not {}", dir.display(), short(&artifact.manifest.key), short(key));
    }
    for out in &artifact.manifest.outputs {
        artifact.file(&out.file)?;
    }
    Ok(())
}

/// The folders under `dir` that hold a manifest: a run's refs (not the hidden folders of a ref
/// being replaced).
fn collect_ref_dirs(dir: &Path, refs: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        if path.is_dir() && !entry.file_name().to_string_lossy().starts_with('.') {
            if path.join("manifest.json").exists() {
                refs.push(path.clone());
            }
            collect_ref_dirs(&path, refs)?;
        }
    }
    Ok(())
}

/// What [`Store::gc`] did and left alone.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Unreferenced entries removed, and leftovers of runs whose owner is gone.
    pub removed: usize,
    pub removed_leftovers: usize,
    /// Locks whose owner (a process of this host) is gone.
    pub removed_locks: usize,
    pub freed: u64,
    /// Runs in progress, and unreferenced entries published or used within the grace period.
    pub kept_running: usize,
    pub kept_fresh: usize,
}

/// This machine's name (the owner of its runs in progress on a shared store).
fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "localhost".into())
}

/// Sets a file's modification time to now.
fn touch(path: &Path) -> Result<()> {
    File::options()
        .append(true)
        .open(path)
        .and_then(|f| f.set_modified(std::time::SystemTime::now()))
        .with_context(|| format!("{}: cannot touch", path.display()))
}

/// Removes a folder, unless another process (a second gc, a publishing stage) already did.
fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e).with_context(|| format!("{}: cannot remove", path.display())),
        _ => Ok(()),
    }
}

/// The keys the refs under `dir` name. A ref is swapped by renames (`.{slot}.new-*` in, the old
/// folder out as `.{slot}.old-*`), so a folder listed here may be gone when it is read: it is
/// skipped, and the entry its replacement names was published just before it, within gc's grace.
fn collect_ref_keys(dir: &Path, live: &mut std::collections::BTreeSet<String>) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        entries => entries.with_context(|| format!("{}: cannot read", dir.display()))?,
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_ref_keys(&path, live)?;
        } else if entry.file_name() == "manifest.json" {
            let bytes = match fs::read(&path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                bytes => bytes.with_context(|| format!("{}: cannot read", path.display()))?,
            };
            let m: Manifest = serde_json::from_slice(&bytes).with_context(|| format!("{}: not a manifest", path.display()))?;
            live.insert(m.key);
        }
    }
    Ok(())
}

fn dir_size(path: &Path) -> u64 {
    fs::read_dir(path)
        .map(|es| {
            es.flatten().map(|e| if e.path().is_dir() { dir_size(&e.path()) } else { e.metadata().map(|m| m.len()).unwrap_or(0) }).sum()
        })
        .unwrap_or(0)
}

/// `iter-0003/sample` -> (Some(3), "sample"); `bootstrap` -> (None, "bootstrap").
fn parse_slot(slot: &str) -> (Option<u32>, &str) {
    match slot.split_once('/') {
        Some((iter, stage)) => (iter.strip_prefix("iter-").and_then(|n| n.parse().ok()), stage),
        None => (None, slot),
    }
}

/// Outputs of a run being written; nothing is visible in the store until [`Staging::publish`].
pub struct Staging {
    dir: PathBuf,
    final_dir: PathBuf,
    outputs: Vec<OutputFile>,
    /// Each recorded output's fsync, running while the stage writes the next one (the disk
    /// writes a GB checkpoint while the moments after it are still being made); all are joined
    /// before the manifest is written.
    syncs: Vec<(String, std::thread::JoinHandle<io::Result<()>>)>,
}

impl Staging {
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// A hashing writer for a new output file; hand it back to [`Staging::record`] when done.
    pub fn create(&self, file: &str, caching: Caching) -> Result<HashingWriter> {
        HashingWriter::create(&self.dir.join(file), caching)
    }

    /// Writes a small output in one go.
    pub fn write_file(&mut self, file: &str, bytes: &[u8]) -> Result<()> {
        let mut w = self.create(file, Caching::Cached)?;
        w.write_all(bytes).with_context(|| format!("{file}: cannot write"))?;
        self.record(file, w, None)
    }

    /// Records a finished output and starts syncing it to disk.
    pub fn record(&mut self, file: &str, writer: HashingWriter, rows: Option<u64>) -> Result<()> {
        let (blake3, bytes, handle) = writer.finish().with_context(|| format!("{file}: cannot write"))?;
        let sync = std::thread::Builder::new()
            .name(format!("sync {file}"))
            .spawn(move || handle.sync_all())
            .with_context(|| format!("{file}: cannot start its sync"))?;
        self.syncs.push((file.to_string(), sync));
        self.outputs.push(OutputFile { file: file.into(), blake3, bytes, rows });
        Ok(())
    }

    /// Waits until every recorded output is on disk.
    fn wait_for_syncs(&mut self) -> Result<()> {
        for (file, sync) in self.syncs.drain(..) {
            match sync.join() {
                Ok(result) => result.with_context(|| format!("{file}: cannot flush to disk"))?,
                Err(_) => bail!("{file}: its sync panicked"),
            }
        }
        Ok(())
    }

    /// Writes the manifest (once every output is on disk) and moves the folder into the store in
    /// one rename.
    pub fn publish(mut self, mut manifest: Manifest) -> Result<Artifact> {
        self.wait_for_syncs()?;
        manifest.outputs = std::mem::take(&mut self.outputs);
        manifest.outputs.sort_by(|a, b| a.file.cmp(&b.file));
        let mut f = File::create(self.dir.join("manifest.json"))?;
        f.write_all(serde_json::to_string_pretty(&manifest)?.as_bytes())?;
        f.sync_all()?;
        if self.final_dir.exists() {
            // Another process published the same key first; its bytes are the same.
            fs::remove_dir_all(&self.dir)?;
        } else {
            fs::rename(&self.dir, &self.final_dir)
                .with_context(|| format!("cannot publish {} as {}", self.dir.display(), self.final_dir.display()))?;
            if let Some(parent) = self.final_dir.parent() {
                File::open(parent)?.sync_all()?;
            }
        }
        Artifact::open(&self.final_dir)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // An abandoned run (an error midway) leaves nothing behind, and no sync still running.
        let _ = self.wait_for_syncs();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A finished stage run (in the store or through a ref).
#[derive(Debug, Clone)]
pub struct Artifact {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Artifact {
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("manifest.json");
        let bytes = fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        let manifest = serde_json::from_slice(&bytes).with_context(|| format!("{}: not a valid manifest", path.display()))?;
        Ok(Self { dir: dir.to_path_buf(), manifest })
    }

    /// The path of an output file, after checking its content against the manifest's hash.
    pub fn file(&self, name: &str) -> Result<PathBuf> {
        let expected = self.manifest.output(name)?;
        let path = self.dir.join(name);
        self.check(&path, &hash_file(&path)?, &expected.blake3)?;
        Ok(path)
    }

    /// An output file read around the page cache (written [`Caching::Uncached`]) and hashed as it
    /// is read, in one pass: [`VerifiedRead::finish`] checks it against the manifest.
    pub fn read_uncached(&self, name: &str) -> Result<VerifiedRead<'_>> {
        let expected = self.manifest.output(name)?;
        let path = self.dir.join(name);
        let reader = DirectReader::open(&path).with_context(|| format!("{}: cannot open", path.display()))?;
        Ok(VerifiedRead { artifact: self, reader, path, expected: &expected.blake3 })
    }

    fn check(&self, path: &Path, got: &str, expected: &str) -> Result<()> {
        if got != expected {
            bail!(
                "{}: corrupt artifact: content hash {} does not match the manifest's {} (delete the store entry {} and rerun the stage)",
                path.display(),
                short(got),
                short(expected),
                short(&self.manifest.key)
            );
        }
        Ok(())
    }
}

/// An artifact's output being read by [`Artifact::read_uncached`]; what it gave is only to be
/// trusted once [`VerifiedRead::finish`] has passed.
pub struct VerifiedRead<'a> {
    artifact: &'a Artifact,
    reader: DirectReader,
    path: PathBuf,
    expected: &'a str,
}

impl VerifiedRead<'_> {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's length in bytes.
    pub fn len(&self) -> u64 {
        self.reader.len()
    }

    pub fn is_empty(&self) -> bool {
        self.reader.is_empty()
    }

    /// Reads whatever is left and checks the whole file against the manifest's hash.
    pub fn finish(self) -> Result<()> {
        let got = self.reader.finish().with_context(|| format!("{}: cannot read", self.path.display()))?;
        self.artifact.check(&self.path, &got, self.expected)
    }
}

impl io::Read for VerifiedRead<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.reader.read(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(stage: &str, key: &str) -> Manifest {
        Manifest::new(stage, 1, key, serde_json::json!({}), vec![], 0)
    }

    fn put(store: &Store, key: &str, body: &[u8]) -> Artifact {
        put_as(store, key, body, Caching::Cached)
    }

    fn put_as(store: &Store, key: &str, body: &[u8], caching: Caching) -> Artifact {
        let mut staging = store.begin(key).unwrap();
        let mut w = staging.create("a.bin", caching).unwrap();
        w.write_all(body).unwrap();
        staging.record("a.bin", w, None).unwrap();
        staging.publish(manifest("sample", key)).unwrap()
    }

    #[test]
    fn key_depends_on_every_part() {
        let p = serde_json::json!({"a": 1});
        let cpu = Backend::cpu_f32();
        let k = stage_key("s", 1, &p, &[], &cpu);
        // A CPU f32 key is the one defined before backends entered it (caches stay valid) ...
        let before = serde_json::json!({ "stage": "s", "version": 1, "params": p, "inputs": [] });
        assert_eq!(k, blake3::hash(before.to_string().as_bytes()).to_hex().to_string());
        assert_eq!(Backend::of(&candle_core::Device::Cpu, candle_core::DType::F32), cpu);
        // ... and another device or dtype never shares it.
        let cuda = Backend { device: "cuda:0".into(), dtype: "f32".into() };
        let bf16 = Backend { device: "cpu".into(), dtype: "bf16".into() };
        assert_ne!(k, stage_key("s", 1, &p, &[], &cuda));
        assert_ne!(k, stage_key("s", 1, &p, &[], &bf16));
        assert_ne!(stage_key("s", 1, &p, &[], &cuda), stage_key("s", 1, &p, &[], &Backend { device: "cuda:1".into(), ..cuda.clone() }));
        assert_ne!(k, stage_key("t", 1, &p, &[], &cpu));
        assert_ne!(k, stage_key("s", 2, &p, &[], &cpu));
        assert_ne!(k, stage_key("s", 1, &serde_json::json!({"a": 2}), &[], &cpu));
        let input = InputRef { name: "x".into(), key: "k".into(), files: [("f".to_string(), "h".to_string())].into() };
        let with_input = stage_key("s", 1, &p, std::slice::from_ref(&input), &cpu);
        assert_ne!(k, with_input);
        assert_eq!(k, stage_key("s", 1, &serde_json::json!({"a": 1}), &[], &cpu));
        // The same bytes from another producer run give the same key (early cutoff); other bytes do not.
        assert_eq!(with_input, stage_key("s", 1, &p, &[InputRef { key: "other".into(), ..input.clone() }], &cpu));
        let changed = InputRef { files: [("f".to_string(), "h2".to_string())].into(), ..input };
        assert_ne!(with_input, stage_key("s", 1, &p, &[changed], &cpu));
    }

    /// A ref folder that vanishes under gc's walk (swapped by another process) is skipped.
    #[test]
    fn ref_keys_skip_a_folder_gone_mid_walk() {
        let dir = tempfile::tempdir().unwrap();
        let mut live = std::collections::BTreeSet::new();
        collect_ref_keys(&dir.path().join("gone"), &mut live).unwrap();
        assert!(live.is_empty());
        let file = dir.path().join("not-a-folder");
        fs::write(&file, b"x").unwrap();
        assert!(collect_ref_keys(&file, &mut live).is_err(), "other errors still fail");
    }

    #[test]
    fn hashing_writer_matches_hash_of_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        // A small write, then one large enough to be hashed in parallel.
        let large: Vec<u8> = (0..3 * PARALLEL_HASH_BYTES).map(|i| (i * 7 % 251) as u8).collect();
        for caching in [Caching::Cached, Caching::Uncached] {
            let mut w = HashingWriter::create(&path, caching).unwrap();
            w.write_all(b"hello world").unwrap();
            w.write_all(&large).unwrap();
            let (h, n, file) = w.finish().unwrap();
            file.sync_all().unwrap();
            assert_eq!(n as usize, 11 + large.len());
            assert_eq!(h, hash_file(&path).unwrap());
            assert_eq!(h, blake3::hash(&[b"hello world".as_slice(), &large].concat()).to_hex().to_string());
        }
    }

    #[test]
    fn publish_lookup_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        assert!(store.lookup("k1").unwrap().is_none());
        let art = put(&store, "k1", b"payload");
        assert!(store.lookup("k1").unwrap().is_some());
        assert!(!dir.path().join("store/tmp/k1").exists());
        // Flip one byte: reading refuses it and names the file; lookup drops the entry.
        let path = art.dir.join("a.bin");
        let mut bytes = fs::read(&path).unwrap();
        bytes[0] ^= 1;
        fs::write(&path, bytes).unwrap();
        let err = art.file("a.bin").unwrap_err().to_string();
        assert!(err.contains("a.bin") && err.contains("corrupt"), "{err}");
        assert!(store.lookup("k1").unwrap().is_none());
    }

    /// An uncached output reads back whole and verified, and a flipped byte fails its check.
    #[test]
    fn uncached_outputs_read_back_verified() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let body: Vec<u8> = (0..5_000_000u32).map(|i| (i % 253) as u8).collect();
        let art = put_as(&store, "k1", &body, Caching::Uncached);
        assert_eq!(art.file("a.bin").unwrap(), art.dir.join("a.bin"));
        let mut read = art.read_uncached("a.bin").unwrap();
        assert_eq!(read.len(), body.len() as u64);
        let mut back = Vec::new();
        read.read_to_end(&mut back).unwrap();
        assert!(back == body);
        read.finish().unwrap();
        // A reader that stops early still hashes the rest.
        let mut head = vec![0u8; 10];
        let mut read = art.read_uncached("a.bin").unwrap();
        read.read_exact(&mut head).unwrap();
        read.finish().unwrap();
        let path = art.dir.join("a.bin");
        let mut bytes = fs::read(&path).unwrap();
        bytes[4_000_000] ^= 1;
        fs::write(&path, bytes).unwrap();
        let err = art.read_uncached("a.bin").unwrap().finish().unwrap_err().to_string();
        assert!(err.contains("a.bin") && err.contains("corrupt"), "{err}");
    }

    #[test]
    fn abandoned_staging_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        {
            let staging = store.begin("k2").unwrap();
            fs::write(staging.path("x"), b"partial").unwrap();
        }
        assert_eq!(fs::read_dir(dir.path().join("store/tmp")).unwrap().count(), 0);
        assert!(store.lookup("k2").unwrap().is_none());
    }

    #[test]
    fn refs_change_only_when_the_target_does_and_mark_downstream_stale() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let a = put(&store, "ka", b"a");
        let b = put(&store, "kb", b"b");
        assert!(store.publish_ref("r", "iter-0000/sample", &a).unwrap());
        assert!(!store.publish_ref("r", "iter-0000/sample", &a).unwrap());
        assert!(store.publish_ref("r", "iter-0000/segment", &b).unwrap());
        assert!(!dir.path().join("runs/r/iter-0000/segment/STALE").exists());
        assert!(store.publish_ref("r", "iter-0000/sample", &b).unwrap());
        assert!(dir.path().join("runs/r/iter-0000/segment/STALE").exists());
        assert_eq!(store.open_ref("r", "iter-0000/sample").unwrap().manifest.key, "kb");
        // Republishing the stale stage clears the marker.
        store.publish_ref("r", "iter-0000/segment", &b).unwrap();
        assert!(!dir.path().join("runs/r/iter-0000/segment/STALE").exists());
    }

    #[test]
    fn gc_keeps_what_refs_reach() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let a = put(&store, "ka", b"a");
        put(&store, "kb", b"b");
        store.publish_ref("r", "bootstrap", &a).unwrap();
        // Within the grace period the unreferenced entry stays; after it, it goes.
        let report = store.gc(std::time::Duration::from_secs(600)).unwrap();
        assert_eq!((report.removed, report.kept_fresh), (0, 1));
        let report = store.gc(std::time::Duration::ZERO).unwrap();
        assert_eq!((report.removed, report.kept_fresh), (1, 0));
        assert!(store.lookup("ka").unwrap().is_some());
        assert!(store.lookup("kb").unwrap().is_none());
    }

    #[test]
    fn gc_keeps_a_live_run_in_progress_and_removes_a_dead_ones_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let staging = store.begin("kc").unwrap();
        let tmp = dir.path().join("store/tmp");
        // A killed run's folder (no such process), and another host's run, left alone only while
        // it was written to within the grace period.
        fs::create_dir_all(tmp.join(format!("kd.{}@{}", u32::MAX, host_name()))).unwrap();
        fs::create_dir_all(tmp.join("ke.12@another-host")).unwrap();
        let report = store.gc(std::time::Duration::from_secs(600)).unwrap();
        assert_eq!((report.kept_running, report.removed_leftovers), (2, 1));
        assert!(staging.dir.exists() && tmp.join("ke.12@another-host").exists());
        let report = store.gc(std::time::Duration::ZERO).unwrap();
        assert_eq!((report.kept_running, report.removed_leftovers), (1, 1));
        assert!(staging.dir.exists(), "gc removed a live run's folder");
    }
}
