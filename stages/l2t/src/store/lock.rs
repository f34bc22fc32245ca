//! One computation per key among the processes that share a store, on one host or on several
//! over a network filesystem (the cluster runner's case).
//!
//! A key's lock is the folder `store/locks/<key>`. A process takes it by renaming a private folder
//! that already holds its identity (`owner`) onto that name: rename(2) of a folder onto an existing
//! non-empty one fails, and on NFS the server decides, so exactly one process wins even across
//! hosts. No `flock`/`fcntl`: over NFS those go through the lock manager, which is often disabled
//! on clusters and whose locks outlive or vanish with a client in ways a user cannot see.
//!
//! The owner rewrites `beat` (a counter) every `heartbeat`. A waiter takes the lock over when the
//! owner is a process of the waiter's own host that no longer runs (checked at once, pid and start
//! time), or when `beat` has not changed for `stale_after` by the waiter's own clock, so that no
//! two hosts' clocks are ever compared. A killed owner or waiter therefore never blocks later
//! runs: at worst for `stale_after` when the owner was on another host.
//!
//! Correctness never rests on the lock: publishing a key twice is harmless (same bytes; the first
//! publication wins), so a lock taken over wrongly (an owner frozen longer than `stale_after`, a
//! filesystem that caches `beat` past it) costs a duplicate computation, never a wrong artifact.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often an owner proves it lives, and how long a waiter trusts silence.
#[derive(Debug, Clone, Copy)]
pub struct LockTiming {
    pub heartbeat: Duration,
    pub stale_after: Duration,
    pub poll: Duration,
}

impl Default for LockTiming {
    fn default() -> Self {
        // stale_after is many heartbeats, so that a loaded NFS server's delays do not break a live lock.
        Self { heartbeat: Duration::from_secs(2), stale_after: Duration::from_secs(60), poll: Duration::from_millis(200) }
    }
}

/// Who holds a lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: u32,
    pub host: String,
    /// The process's start time (clock ticks since boot, `/proc/<pid>/stat`), so that a reused
    /// pid is not taken for the owner.
    pub started: u64,
    /// Unique per acquisition.
    pub nonce: String,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} on {}", self.pid, self.host)
    }
}

impl Owner {
    fn this_process() -> Self {
        static ACQUISITIONS: AtomicU64 = AtomicU64::new(0);
        let pid = std::process::id();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let n = ACQUISITIONS.fetch_add(1, Ordering::Relaxed);
        let host = super::host_name();
        Self { pid, started: start_time(pid).unwrap_or(0), nonce: format!("{pid}-{host}-{nanos}-{n}"), host }
    }

    /// Known dead: a process of this host that no longer runs (or another one now has its pid).
    /// An owner on another host is never known dead; its silence decides.
    fn is_dead_here(&self) -> bool {
        self.host == super::host_name() && start_time(self.pid) != Some(self.started)
    }
}

/// A process's start time, `None` when no such process runs.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22; the command name (field 2) is in parentheses and may hold spaces.
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// A held lock: beats until dropped, then removes itself.
pub struct KeyLock {
    dir: PathBuf,
    owner: Owner,
    stop: Arc<AtomicBool>,
    beat: Option<std::thread::JoinHandle<()>>,
}

impl Drop for KeyLock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(beat) = self.beat.take() {
            let _ = beat.join();
        }
        // Release only our own lock (a waiter may have taken it over if we were frozen).
        if read_owner(&self.dir).ok().flatten().as_ref() == Some(&self.owner) {
            let _ = remove_lock_folder(&self.dir, &self.owner.nonce);
        }
    }
}

/// Takes the lock of `key` if nobody holds it.
pub fn try_acquire(locks: &Path, key: &str, timing: LockTiming) -> Result<Option<KeyLock>> {
    fs::create_dir_all(locks).with_context(|| format!("{}: cannot create", locks.display()))?;
    let owner = Owner::this_process();
    let private = locks.join(format!(".{key}.new-{}", owner.nonce));
    fs::create_dir(&private).with_context(|| format!("{}: cannot create", private.display()))?;
    let written = fs::write(private.join("owner"), serde_json::to_vec(&owner)?).and_then(|()| fs::write(private.join("beat"), "0"));
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&private);
        return Err(e).with_context(|| format!("{}: cannot write", private.display()));
    }
    let dir = locks.join(key);
    if let Err(e) = fs::rename(&private, &dir) {
        let _ = fs::remove_dir_all(&private);
        if dir.exists() {
            return Ok(None);
        }
        return Err(e).with_context(|| format!("cannot take the lock {}", dir.display()));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let beat = {
        let (stop, beat_file) = (stop.clone(), dir.join("beat"));
        std::thread::spawn(move || {
            let mut count = 0u64;
            let mut last = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50).min(timing.heartbeat));
                if last.elapsed() >= timing.heartbeat {
                    count += 1;
                    // A failed beat (lock taken over, folder gone) only lets waiters take over sooner.
                    let _ = fs::write(&beat_file, count.to_string());
                    last = Instant::now();
                }
            }
        })
    };
    Ok(Some(KeyLock { dir, owner, stop, beat: Some(beat) }))
}

fn read_owner(dir: &Path) -> io::Result<Option<Owner>> {
    match fs::read(dir.join("owner")) {
        Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Moves a lock folder aside under a private name (atomic), then deletes it.
fn remove_lock_folder(dir: &Path, nonce: &str) -> io::Result<()> {
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let aside = dir.with_file_name(format!(".{name}.gone-{nonce}"));
    fs::rename(dir, &aside)?;
    fs::remove_dir_all(&aside)
}

/// What a waiter has seen of a lock, to tell a silent owner from a live one.
#[derive(Default)]
pub struct Watch {
    seen: Option<(Option<Owner>, String)>,
    since: Option<Instant>,
}

/// What a waiter should do next.
pub enum Seen {
    /// The lock is gone: try to take it.
    Free,
    /// Held by a live (or not yet silent) owner; `None` while it is being written.
    Held(Option<Owner>),
    /// Its owner is gone (the reason says how we know); the lock was removed: try to take it.
    TakenOver { owner: Option<Owner>, reason: String },
}

impl Watch {
    /// Looks at the lock of `key` once and, when its owner is gone, removes it.
    pub fn look(&mut self, locks: &Path, key: &str, timing: LockTiming) -> Result<Seen> {
        let dir = locks.join(key);
        let owner = match read_owner(&dir) {
            Ok(owner) => owner,
            Err(e) => return Err(e).with_context(|| format!("{}: cannot read", dir.display())),
        };
        let beat = match fs::read_to_string(dir.join("beat")) {
            Ok(beat) => beat,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !dir.exists() => return Ok(Seen::Free),
            Err(_) => String::new(),
        };
        let state = (owner.clone(), beat);
        if self.seen.as_ref() != Some(&state) {
            self.seen = Some(state);
            self.since = Some(Instant::now());
        }
        let silent_for = self.since.map_or(Duration::ZERO, |t| t.elapsed());
        let reason = match owner.as_ref().filter(|o| o.is_dead_here()) {
            Some(dead) => format!("its process {} is gone", dead.pid),
            None if silent_for >= timing.stale_after => format!("no heartbeat for {:.0}s", silent_for.as_secs_f64()),
            None => return Ok(Seen::Held(owner)),
        };
        // Take the folder aside, then make sure it is the one judged dead (not a new owner's).
        let nonce = Owner::this_process().nonce;
        let name = format!(".{key}.dead-{nonce}");
        let aside = locks.join(&name);
        match fs::rename(&dir, &aside) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Seen::Free), // another waiter was first
            Err(e) => return Err(e).with_context(|| format!("cannot remove the dead lock {}", dir.display())),
        }
        if read_owner(&aside).ok().flatten() != owner {
            // A new owner took the lock meanwhile: give it back; if that fails, both compute.
            let _ = fs::rename(&aside, &dir);
            let _ = fs::remove_dir_all(&aside);
            *self = Watch::default();
            return Ok(Seen::Held(None));
        }
        let _ = fs::remove_dir_all(&aside);
        *self = Watch::default();
        Ok(Seen::TakenOver { owner, reason })
    }
}

/// Removes the locks whose owner is known dead (processes of this host) and the private folders
/// a killed process left while taking or releasing one. Returns how many were removed.
pub fn collect_dead(locks: &Path) -> Result<usize> {
    let Ok(entries) = fs::read_dir(locks) else { return Ok(0) };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let dead = if name.starts_with('.') {
            // `.{key}.{new,gone,dead}-{pid}-{host}-...`: done with unless its maker still runs here.
            private_folder_maker(&name).is_some_and(|(pid, host_and_rest)| {
                host_and_rest.starts_with(&format!("{}-", super::host_name())) && start_time(pid).is_none()
            })
        } else {
            read_owner(&entry.path()).ok().flatten().is_some_and(|o| o.is_dead_here())
        };
        if dead && fs::remove_dir_all(entry.path()).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

/// The pid in a private folder's name, and what follows it (`{host}-...`).
fn private_folder_maker(name: &str) -> Option<(u32, &str)> {
    let rest = [".new-", ".gone-", ".dead-"].iter().find_map(|tag| name.split_once(tag).map(|(_, rest)| rest))?;
    let (pid, after) = rest.split_once('-')?;
    Some((pid.parse().ok()?, after))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> LockTiming {
        LockTiming { heartbeat: Duration::from_millis(20), stale_after: Duration::from_millis(300), poll: Duration::from_millis(10) }
    }

    #[test]
    fn one_holder_at_a_time_and_release_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let first = try_acquire(dir.path(), "k", quick()).unwrap().expect("a free lock is taken");
        assert!(try_acquire(dir.path(), "k", quick()).unwrap().is_none(), "a held lock is not taken twice");
        assert!(try_acquire(dir.path(), "other", quick()).unwrap().is_some(), "locks are per key");
        drop(first);
        assert!(!dir.path().join("k").exists(), "the lock is removed on release");
        assert!(try_acquire(dir.path(), "k", quick()).unwrap().is_some());
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(leftovers.is_empty(), "nothing is left behind: {leftovers:?}");
    }

    #[test]
    fn a_live_owner_is_waited_for_and_never_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let _held = try_acquire(dir.path(), "k", quick()).unwrap().unwrap();
        let mut watch = Watch::default();
        let until = Instant::now() + quick().stale_after * 3;
        while Instant::now() < until {
            match watch.look(dir.path(), "k", quick()).unwrap() {
                Seen::Held(Some(owner)) => assert_eq!(owner.pid, std::process::id()),
                _ => panic!("a beating owner's lock was given up"),
            }
            std::thread::sleep(quick().poll);
        }
    }

    /// Writes a lock as a process would have that is now gone.
    fn plant(dir: &Path, key: &str, owner: &Owner) {
        let lock = dir.join(key);
        fs::create_dir_all(&lock).unwrap();
        fs::write(lock.join("owner"), serde_json::to_vec(owner).unwrap()).unwrap();
        fs::write(lock.join("beat"), "7").unwrap();
    }

    #[test]
    fn a_dead_owner_on_this_host_is_taken_over_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut dead = Owner::this_process();
        dead.started += 1; // this pid, but another process's start: the owner is gone
        plant(dir.path(), "k", &dead);
        match Watch::default().look(dir.path(), "k", quick()).unwrap() {
            Seen::TakenOver { owner, reason } => {
                assert_eq!(owner, Some(dead));
                assert!(reason.contains("is gone"), "{reason}");
            }
            _ => panic!("a dead owner's lock was kept"),
        }
        assert!(try_acquire(dir.path(), "k", quick()).unwrap().is_some());
    }

    #[test]
    fn a_silent_owner_on_another_host_is_taken_over_after_stale_after() {
        let dir = tempfile::tempdir().unwrap();
        let mut remote = Owner::this_process();
        remote.host = "another-node".into();
        plant(dir.path(), "k", &remote);
        let mut watch = Watch::default();
        let started = Instant::now();
        let taken = loop {
            match watch.look(dir.path(), "k", quick()).unwrap() {
                Seen::Held(_) => {
                    // A beat resets the silence; after it, silence is counted again.
                    if started.elapsed() < quick().stale_after / 2 {
                        fs::write(dir.path().join("k/beat"), started.elapsed().as_nanos().to_string()).unwrap();
                    }
                    std::thread::sleep(quick().poll)
                }
                Seen::TakenOver { reason, .. } => break (started.elapsed(), reason),
                Seen::Free => panic!("the lock vanished"),
            }
        };
        assert!(taken.0 >= quick().stale_after + quick().stale_after / 2 - quick().poll * 2, "taken over after {:?}", taken.0);
        assert!(taken.1.contains("no heartbeat"), "{}", taken.1);
    }

    #[test]
    fn collect_dead_removes_only_dead_owners_locks() {
        let dir = tempfile::tempdir().unwrap();
        let _live = try_acquire(dir.path(), "live", quick()).unwrap().unwrap();
        let mut dead = Owner::this_process();
        dead.started += 1;
        plant(dir.path(), "dead", &dead);
        let mut remote = Owner::this_process();
        remote.host = "another-node".into();
        plant(dir.path(), "remote", &remote);
        let host = super::super::host_name();
        let killed_while_taking = format!(".k.new-999999999-{host}-1-0"); // beyond any pid_max
        let remote_taking = ".k.new-999999999-another-node-1-0";
        for name in [killed_while_taking.as_str(), remote_taking] {
            fs::create_dir(dir.path().join(name)).unwrap();
        }
        assert_eq!(collect_dead(dir.path()).unwrap(), 2);
        for (name, kept) in
            [("live", true), ("remote", true), ("dead", false), (killed_while_taking.as_str(), false), (remote_taking, true)]
        {
            assert_eq!(dir.path().join(name).exists(), kept, "{name}");
        }
    }
}
