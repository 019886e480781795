//! A simulated file system for crash tests: writes live in memory, a sync
//! makes them durable, and [`SimStorage::crash`] keeps only what was synced
//! (and only names whose directory was synced). Faults are injected per
//! operation with [`SimOp`]. Behind the `testkit` feature.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{AppendFile, Storage};

/// Which operation a [`SimStorage`] fault targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimOp {
    /// `AppendFile::append`.
    Write,
    /// `AppendFile::sync` and `Storage::sync_dir` (every sync point).
    Sync,
}

#[derive(Debug, Clone, Default)]
struct Inode {
    /// Bytes as a reader sees them now.
    data: Vec<u8>,
    /// Bytes that survive a power cut: the data as of the last sync.
    durable: Vec<u8>,
}

#[derive(Debug, Default)]
struct SimState {
    inodes: Vec<Inode>,
    /// Directory entries as seen now.
    names: BTreeMap<PathBuf, usize>,
    /// Directory entries that survive a power cut (as of the last sync_dir).
    durable_names: BTreeMap<PathBuf, usize>,
    dirs: Vec<PathBuf>,
    writes: u64,
    syncs: u64,
    /// Fail the write or sync with this ordinal (1-based) and every later one.
    fail: Option<(SimOp, u64)>,
}

/// An in-memory file system that models what a power cut keeps.
///
/// File contents become durable only at `AppendFile::sync` (or `truncate`);
/// directory entries (creations, renames, removals) only at `sync_dir` of
/// their directory. [`SimStorage::crash`] returns the file system a reboot
/// would find. Faults make the Nth write or sync and all later ones fail with
/// `EIO`, as a dying disk would; the state a crash keeps is then the state
/// before the failed operation.
#[derive(Clone, Default)]
pub struct SimStorage {
    state: Arc<Mutex<SimState>>,
}

struct SimFile {
    state: Arc<Mutex<SimState>>,
    inode: usize,
    /// The append position.
    pos: usize,
}

/// The bytes of `now` that differ from `durable`, as a range: from the first
/// difference to the last one, or to the end of `now` if it is longer
/// (appended bytes). Empty at `now.len()` when nothing changed.
fn changed_range(durable: &[u8], now: &[u8]) -> std::ops::Range<usize> {
    let common = durable.len().min(now.len());
    let Some(from) = (0..common)
        .find(|&i| durable[i] != now[i])
        .or((now.len() > common).then_some(common))
    else {
        return now.len()..now.len();
    };
    let to = if now.len() > durable.len() {
        now.len()
    } else {
        (from..common)
            .rev()
            .find(|&i| durable[i] != now[i])
            .map_or(from, |i| i + 1)
    };
    from..to
}

fn sim_eio(what: &str) -> io::Error {
    io::Error::other(format!("simulated I/O error on {what}"))
}

impl SimState {
    fn check(&mut self, op: SimOp) -> io::Result<()> {
        let n = match op {
            SimOp::Write => {
                self.writes += 1;
                self.writes
            }
            SimOp::Sync => {
                self.syncs += 1;
                self.syncs
            }
        };
        match self.fail {
            Some((fop, at)) if fop == op && n >= at => Err(sim_eio(match op {
                SimOp::Write => "write",
                SimOp::Sync => "sync",
            })),
            _ => Ok(()),
        }
    }

    fn inode_of(&self, path: &Path) -> io::Result<usize> {
        self.names
            .get(path)
            .copied()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, path.display().to_string()))
    }
}

impl AppendFile for SimFile {
    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut s = self.state.lock();
        s.check(SimOp::Write)?;
        let data = &mut s.inodes[self.inode].data;
        let end = self.pos + buf.len();
        if data.len() < end {
            data.resize(end, 0);
        }
        data[self.pos..end].copy_from_slice(buf);
        self.pos = end;
        Ok(())
    }
    fn zero_fill_to(&mut self, len: u64) -> io::Result<()> {
        let mut s = self.state.lock();
        s.check(SimOp::Write)?;
        let data = &mut s.inodes[self.inode].data;
        if data.len() < len as usize {
            data.resize(len as usize, 0);
        }
        Ok(())
    }
    fn sync(&mut self) -> io::Result<()> {
        let mut s = self.state.lock();
        s.check(SimOp::Sync)?;
        let inode = &mut s.inodes[self.inode];
        inode.durable = inode.data.clone();
        Ok(())
    }
}

impl SimStorage {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes write or sync number `at` (counting from 1 since creation) and
    /// every later one fail with an I/O error.
    pub fn fail_from(&self, op: SimOp, at: u64) {
        self.state.lock().fail = Some((op, at));
    }

    /// Writes and syncs performed so far.
    pub fn op_counts(&self) -> (u64, u64) {
        let s = self.state.lock();
        (s.writes, s.syncs)
    }

    /// The file system a reboot after a power cut now would find: only
    /// durable directory entries, each with only its durable bytes.
    /// `keep_unsynced` may keep a prefix of the unsynced change of chosen
    /// files (path, extra bytes), to model a write torn at any byte: the
    /// change runs from the first byte that differs from the durable
    /// contents to the last one (appended bytes, or records written over
    /// zeros filled ahead).
    pub fn crash(&self, keep_unsynced: &[(PathBuf, usize)]) -> SimStorage {
        let s = self.state.lock();
        let mut fresh = SimState {
            dirs: s.dirs.clone(),
            ..SimState::default()
        };
        for (path, &ino) in &s.durable_names {
            let inode = &s.inodes[ino];
            let mut data = inode.durable.clone();
            if let Some((_, extra)) = keep_unsynced.iter().find(|(p, _)| p == path) {
                let changed = changed_range(&inode.durable, &inode.data);
                let (from, end) = (changed.start, (changed.start + extra).min(changed.end));
                if data.len() < end {
                    data.resize(end, 0);
                }
                data[from..end].copy_from_slice(&inode.data[from..end]);
            }
            fresh.inodes.push(Inode {
                durable: data.clone(),
                data,
            });
            let id = fresh.inodes.len() - 1;
            fresh.names.insert(path.clone(), id);
            fresh.durable_names.insert(path.clone(), id);
        }
        SimStorage {
            state: Arc::new(Mutex::new(fresh)),
        }
    }

    /// The file system a restart after the process died (not the machine)
    /// would find: everything written is still readable (the page cache
    /// keeps it) and what is durable is unchanged; injected faults are
    /// gone.
    pub fn process_crash(&self) -> SimStorage {
        let s = self.state.lock();
        SimStorage {
            state: Arc::new(Mutex::new(SimState {
                inodes: s.inodes.clone(),
                names: s.names.clone(),
                durable_names: s.durable_names.clone(),
                dirs: s.dirs.clone(),
                ..SimState::default()
            })),
        }
    }

    /// Length of the unsynced change of the file at `path`: from the first
    /// byte that differs from its durable contents to the last (0 if none
    /// or absent). [`SimStorage::crash`] can keep a prefix of it.
    pub fn unsynced_len(&self, path: &Path) -> usize {
        let s = self.state.lock();
        s.names.get(path).map_or(0, |&i| {
            let inode = &s.inodes[i];
            changed_range(&inode.durable, &inode.data).len()
        })
    }

    /// Current contents of a file, for tests that corrupt or inspect it.
    pub fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        let s = self.state.lock();
        s.names.get(path).map(|&i| s.inodes[i].data.clone())
    }

    /// Replaces a file's contents, durably (a test tampering with the disk).
    pub fn set_contents(&self, path: &Path, data: Vec<u8>) {
        let mut s = self.state.lock();
        let i = s.inode_of(path).expect("set_contents of a missing file");
        s.inodes[i] = Inode {
            durable: data.clone(),
            data,
        };
    }

    /// Paths of every file that exists now.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.state.lock().names.keys().cloned().collect()
    }
}

impl Storage for SimStorage {
    fn create(&self, path: &Path) -> io::Result<Box<dyn AppendFile>> {
        let mut s = self.state.lock();
        s.inodes.push(Inode::default());
        let inode = s.inodes.len() - 1;
        s.names.insert(path.to_path_buf(), inode);
        Ok(Box::new(SimFile {
            state: self.state.clone(),
            inode,
            pos: 0,
        }))
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn AppendFile>> {
        let s = self.state.lock();
        let inode = s.inode_of(path)?;
        Ok(Box::new(SimFile {
            state: self.state.clone(),
            inode,
            pos: s.inodes[inode].data.len(),
        }))
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let s = self.state.lock();
        Ok(s.inodes[s.inode_of(path)?].data.clone())
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let s = self.state.lock();
        if !s.dirs.iter().any(|d| d == dir) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                dir.display().to_string(),
            ));
        }
        Ok(s.names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.state.lock();
        let inode = s.inode_of(from)?;
        s.names.remove(from);
        s.names.insert(to.to_path_buf(), inode);
        Ok(())
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut s = self.state.lock();
        s.inode_of(path)?;
        s.names.remove(path);
        Ok(())
    }
    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        let mut s = self.state.lock();
        s.check(SimOp::Sync)?;
        let i = s.inode_of(path)?;
        let inode = &mut s.inodes[i];
        inode.data.truncate(len as usize);
        inode.durable = inode.data.clone();
        Ok(())
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.state.lock();
        s.check(SimOp::Sync)?;
        let current: Vec<(PathBuf, usize)> = s
            .names
            .iter()
            .filter(|(p, _)| p.parent() == Some(dir))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        s.durable_names.retain(|p, _| p.parent() != Some(dir));
        s.durable_names.extend(current);
        Ok(())
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.state.lock();
        let mut d = Some(dir);
        while let Some(p) = d {
            if !p.as_os_str().is_empty() && !s.dirs.iter().any(|x| x == p) {
                s.dirs.push(p.to_path_buf());
            }
            d = p.parent();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A power cut keeps only synced bytes and dir-synced names.
    #[test]
    fn crash_keeps_only_durable_state() {
        let fs = SimStorage::new();
        let dir = Path::new("/d");
        fs.create_dir_all(dir).unwrap();
        let a = dir.join("a");
        let mut f = fs.create(&a).unwrap();
        f.append(b"hello").unwrap();
        f.sync().unwrap();
        f.append(b" world").unwrap();
        // Name not yet durable: the file vanishes.
        assert!(fs.crash(&[]).read(&a).is_err());
        fs.sync_dir(dir).unwrap();
        assert_eq!(fs.crash(&[]).read(&a).unwrap(), b"hello");
        assert_eq!(fs.crash(&[(a.clone(), 3)]).read(&a).unwrap(), b"hello wo");
        // A rename not dir-synced reverts.
        fs.rename(&a, &dir.join("b")).unwrap();
        let after = fs.crash(&[]);
        assert!(after.read(&a).is_ok() && after.read(&dir.join("b")).is_err());
    }

    // Zeros filled ahead are written like any byte: durable at a sync.
    // Appends then overwrite them, and a power cut keeps a prefix of that
    // overwrite (a torn write), never bytes beyond what was written.
    #[test]
    fn appends_over_zeros_filled_ahead_tear_like_appends() {
        let fs = SimStorage::new();
        let dir = Path::new("/d");
        fs.create_dir_all(dir).unwrap();
        let a = dir.join("a");
        let mut f = fs.create(&a).unwrap();
        f.append(b"head").unwrap();
        f.zero_fill_to(16).unwrap();
        f.sync().unwrap();
        fs.sync_dir(dir).unwrap();
        assert_eq!(
            fs.crash(&[]).read(&a).unwrap(),
            b"head\0\0\0\0\0\0\0\0\0\0\0\0"
        );
        f.append(b"abcd").unwrap();
        assert_eq!(
            fs.unsynced_len(&a),
            4,
            "the change is the four bytes over zeros"
        );
        assert_eq!(
            fs.crash(&[(a.clone(), 2)]).read(&a).unwrap(),
            b"headab\0\0\0\0\0\0\0\0\0\0"
        );
        // Past the filled length the file grows, as an append would.
        f.append(&[7u8; 14]).unwrap();
        assert_eq!(fs.read(&a).unwrap().len(), 22);
        f.sync().unwrap();
        assert_eq!(fs.unsynced_len(&a), 0);
        assert_eq!(fs.crash(&[]).read(&a).unwrap().len(), 22);
    }

    // Injected faults are sticky: the Nth operation and every later one fail.
    #[test]
    fn faults_are_sticky() {
        let fs = SimStorage::new();
        fs.create_dir_all(Path::new("/d")).unwrap();
        let mut f = fs.create(Path::new("/d/a")).unwrap();
        fs.fail_from(SimOp::Sync, 2);
        f.sync().unwrap();
        assert!(f.sync().is_err());
        assert!(f.sync().is_err());
        f.append(b"x").unwrap();
    }
}
