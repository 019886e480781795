//! The one seam where the node touches the disk.
//!
//! The journal, snapshots and recovery do all file I/O through [`Storage`],
//! so that the same code runs on the real file system ([`FsStorage`]) and on
//! `SimStorage` (feature `testkit`), an in-memory file system that tells written bytes from
//! durable ones, can lose everything not yet synced (a power cut), and can
//! fail a chosen write or sync with an I/O error.
//!
//! The trait is small on purpose: create, append, zero-fill ahead, sync,
//! read, rename, remove, truncate, list and sync a directory. Nothing else is needed, and
//! every extra method would be one more thing the simulator must model.

use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::Path;

/// A file opened for appending.
///
/// The append position starts at the end of the file and only moves with
/// [`AppendFile::append`]. [`AppendFile::zero_fill_to`] may make the file
/// longer than that position: later appends then overwrite the zeros.
pub trait AppendFile: Send {
    /// Writes `buf` at the append position and moves it past `buf`.
    fn append(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Extends the file with zeros to `len` bytes if it is shorter, without
    /// moving the append position. Durable at the next sync.
    fn zero_fill_to(&mut self, len: u64) -> io::Result<()>;
    /// Makes every written byte durable (`fdatasync`).
    fn sync(&mut self) -> io::Result<()>;
}

/// File-system operations the node needs.
pub trait Storage: Send + Sync + 'static {
    /// Creates `path` empty (replacing any file there) and opens it to append.
    fn create(&self, path: &Path) -> io::Result<Box<dyn AppendFile>>;
    /// Opens an existing file to append to it.
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn AppendFile>>;
    /// Reads a whole file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Reads a whole file into `buf`, replacing its contents and reusing
    /// its allocation (recovery reads segment after segment into one buffer).
    fn read_into(&self, path: &Path, buf: &mut Vec<u8>) -> io::Result<()> {
        *buf = self.read(path)?;
        Ok(())
    }
    /// Names of the files directly in `dir` (not paths), in no order.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Atomically replaces `to` with `from`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Cuts a file to `len` bytes and makes the new length durable.
    fn truncate(&self, path: &Path, len: u64) -> io::Result<()>;
    /// Makes the directory's entries (creations, renames, removals) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct FsStorage;

struct FsFile {
    file: std::fs::File,
    /// The append position.
    pos: u64,
    /// The file's length.
    len: u64,
}

/// Zeros written per call by [`AppendFile::zero_fill_to`].
const ZERO_CHUNK_BYTES: usize = 64 * 1024;

impl AppendFile for FsFile {
    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, self.pos)?;
        self.pos += buf.len() as u64;
        self.len = self.len.max(self.pos);
        Ok(())
    }
    fn zero_fill_to(&mut self, len: u64) -> io::Result<()> {
        // Written, not `fallocate`d: blocks allocated as unwritten extents
        // would still change metadata (their conversion) at every sync that
        // covers a first write into them, which is what this avoids.
        let zeros = [0u8; ZERO_CHUNK_BYTES];
        while self.len < len {
            let n = (len - self.len).min(ZERO_CHUNK_BYTES as u64) as usize;
            self.file.write_all_at(&zeros[..n], self.len)?;
            self.len += n as u64;
        }
        Ok(())
    }
    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

impl Storage for FsStorage {
    fn create(&self, path: &Path) -> io::Result<Box<dyn AppendFile>> {
        use std::os::unix::fs::OpenOptionsExt as _;
        // The node's counters and keys are its owner's alone.
        let f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(path)?;
        Ok(Box::new(FsFile {
            file: f,
            pos: 0,
            len: 0,
        }))
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn AppendFile>> {
        // Not O_APPEND: positional writes on an O_APPEND file go to the end
        // whatever the offset, and zero fill ahead would break appends.
        let file = std::fs::OpenOptions::new().write(true).open(path)?;
        let len = file.metadata()?.len();
        Ok(Box::new(FsFile {
            file,
            pos: len,
            len,
        }))
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }
    fn read_into(&self, path: &Path, buf: &mut Vec<u8>) -> io::Result<()> {
        use std::io::Read;
        buf.clear();
        std::fs::File::open(path)?.read_to_end(buf)?;
        Ok(())
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(names)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        let f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.set_len(len)?;
        f.sync_all()
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        create_private_dir_all(dir)
    }
}

/// Mode of every file the node creates: read and written by its owner
/// only.
pub const FILE_MODE: u32 = 0o600;
/// Mode of every directory the node creates.
pub const DIR_MODE: u32 = 0o700;

/// `create_dir_all` with [`DIR_MODE`] for each directory it creates (an
/// existing one keeps its mode).
pub fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
}

#[cfg(any(test, feature = "testkit"))]
mod sim;
#[cfg(any(test, feature = "testkit"))]
pub use sim::{SimOp, SimStorage};
