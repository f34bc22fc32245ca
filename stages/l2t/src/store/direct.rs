//! Uncached file I/O (Linux `O_DIRECT`) for a large output that is read back once, if at all (a
//! policy's AdamW moments): its bytes go between memory and the disk without passing through the
//! page cache. On the VMs we measure on, putting 1.6 GB into the page cache costs 2.6-3.9 s of
//! kernel time and reading it back cold 3.3 s, against ~1 s each way direct (`dd`, docs/performance.md).
//! Where a file system refuses `O_DIRECT` (tmpfs), the same code runs through the page cache.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// `O_DIRECT`'s rule: buffer addresses, file offsets and lengths are multiples of the device's
/// logical block; 4096 covers every common one.
const ALIGN: usize = 4096;
/// Bytes per uncached write or read.
const CHUNK: usize = 4 << 20;

/// `CHUNK` bytes whose start is aligned to `ALIGN`, carved from a larger buffer. Should the
/// allocator ever give an address that cannot be aligned, the block is merely unaligned: the
/// kernel refuses the direct transfer and the file falls back to the page cache.
struct AlignedBlock {
    raw: Vec<u8>,
    start: usize,
}

impl AlignedBlock {
    fn new() -> Self {
        let raw = vec![0u8; CHUNK + ALIGN];
        let start = Some(raw.as_ptr().align_offset(ALIGN)).filter(|&s| s < ALIGN).unwrap_or(0);
        Self { raw, start }
    }

    /// A block the kernel refuses for direct transfers (off by one byte), to test the fallback.
    #[cfg(test)]
    fn misaligned() -> Self {
        let mut block = Self::new();
        block.start += 1;
        block
    }

    fn bytes(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + CHUNK]
    }
}

/// Opens `path` with `O_DIRECT` where the file system allows it; `true` when it did.
fn open(path: &Path, options: &mut OpenOptions) -> io::Result<(File, bool)> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        if let Ok(file) = options.clone().custom_flags(libc::O_DIRECT).open(path) {
            return Ok((file, true));
        }
    }
    Ok((options.open(path)?, false))
}

/// Reopens a file without `O_DIRECT` at `offset`, after the kernel refused a direct transfer.
fn reopen_cached(path: &Path, options: &OpenOptions, offset: u64) -> io::Result<File> {
    let mut file = options.open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    Ok(file)
}

/// Whether an error is the kernel refusing a direct transfer (alignment, or a file system that
/// took the flag at open but cannot honour it).
fn refused(direct: bool, e: &io::Error) -> bool {
    direct && e.kind() == io::ErrorKind::InvalidInput
}

/// Writes whole aligned blocks to a file opened `O_DIRECT`; the last block is padded to the
/// alignment and the file cut back to its length.
pub struct DirectWriter {
    file: File,
    path: PathBuf,
    direct: bool,
    block: AlignedBlock,
    filled: usize,
    written: u64,
}

impl DirectWriter {
    pub fn create(path: &Path) -> io::Result<Self> {
        let (file, direct) = open(path, OpenOptions::new().write(true).create(true).truncate(true))?;
        Ok(Self { file, path: path.to_path_buf(), direct, block: AlignedBlock::new(), filled: 0, written: 0 })
    }

    pub fn write_all(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n = (CHUNK - self.filled).min(buf.len());
            let at = self.filled;
            self.block.bytes()[at..at + n].copy_from_slice(&buf[..n]);
            self.filled += n;
            buf = &buf[n..];
            if self.filled == CHUNK {
                self.write_block(CHUNK)?;
            }
        }
        Ok(())
    }

    /// Writes the block's first `len` bytes (a multiple of `ALIGN`) at `written`.
    fn write_block(&mut self, len: usize) -> io::Result<()> {
        if let Err(e) = self.file.write_all(&self.block.bytes()[..len]) {
            if !refused(self.direct, &e) {
                return Err(e);
            }
            self.file = reopen_cached(&self.path, OpenOptions::new().write(true), self.written)?;
            self.direct = false;
            self.file.write_all(&self.block.bytes()[..len])?;
        }
        self.written += len as u64;
        self.filled = 0;
        Ok(())
    }

    /// Writes what is left and gives back the file, still to be synced.
    pub fn finish(mut self) -> io::Result<File> {
        if self.filled > 0 {
            let len = self.filled;
            let padded = len.div_ceil(ALIGN) * ALIGN;
            self.block.bytes()[len..padded].fill(0);
            self.write_block(padded)?;
            self.written -= (padded - len) as u64;
            self.file.set_len(self.written)?;
        }
        Ok(self.file)
    }
}

/// Reads a file in aligned blocks through a file opened `O_DIRECT`, handing each block's bytes to
/// `seen` (the store hashes them) before they are read.
pub struct DirectReader {
    file: File,
    path: PathBuf,
    direct: bool,
    block: AlignedBlock,
    pos: usize,
    filled: usize,
    offset: u64,
    len: u64,
    hasher: blake3::Hasher,
}

impl DirectReader {
    pub fn open(path: &Path) -> io::Result<Self> {
        let (file, direct) = open(path, OpenOptions::new().read(true))?;
        let len = file.metadata()?.len();
        Ok(Self {
            file,
            path: path.to_path_buf(),
            direct,
            block: AlignedBlock::new(),
            pos: 0,
            filled: 0,
            offset: 0,
            len,
            hasher: blake3::Hasher::new(),
        })
    }

    /// The file's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads the rest of the file and gives the blake3 hash of all of it.
    pub fn finish(mut self) -> io::Result<String> {
        while self.refill()? > 0 {}
        Ok(self.hasher.finalize().to_hex().to_string())
    }

    /// Reads the next block (a short one at the end of the file); its length, 0 at the end.
    fn refill(&mut self) -> io::Result<usize> {
        let (mut filled, offset) = (0, self.offset);
        while filled < CHUNK {
            match self.file.read(&mut self.block.bytes()[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A short read left the next one unaligned, or the file system cannot do it.
                Err(e) if refused(self.direct, &e) => {
                    self.file = reopen_cached(&self.path, OpenOptions::new().read(true), offset + filled as u64)?;
                    self.direct = false;
                }
                Err(e) => return Err(e),
            }
        }
        super::hash_more(&mut self.hasher, &self.block.raw[self.block.start..self.block.start + filled]);
        (self.pos, self.filled, self.offset) = (0, filled, offset + filled as u64);
        Ok(filled)
    }
}

impl Read for DirectReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.filled && self.refill()? == 0 {
            return Ok(0);
        }
        let n = out.len().min(self.filled - self.pos);
        out[..n].copy_from_slice(&self.block.raw[self.block.start + self.pos..self.block.start + self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lengths around the block and the alignment come back whole, with the hash of what was
    /// written, read in odd-sized pieces; and the same through a block the kernel refuses for
    /// direct transfers (on a file system that takes `O_DIRECT`, the fallback to the page cache).
    #[test]
    fn uncached_files_round_trip_at_every_length() {
        let dir = tempfile::tempdir().unwrap();
        let lengths = [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, CHUNK - 7, CHUNK, CHUNK + ALIGN + 3, 2 * CHUNK + 5];
        for (len, refused) in lengths.into_iter().map(|l| (l, false)).chain([(ALIGN + 1, true), (CHUNK + 5, true)]) {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let path = dir.path().join(format!("f{len}-{refused}"));
            let mut w = DirectWriter::create(&path).unwrap();
            if refused {
                w.block = AlignedBlock::misaligned();
            }
            for piece in data.chunks(1000 + len / 3) {
                w.write_all(piece).unwrap();
            }
            if refused && len > CHUNK {
                assert!(!w.direct, "a refused block reopens the file through the page cache");
            }
            w.finish().unwrap().sync_all().unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), data, "length {len}");

            let mut r = DirectReader::open(&path).unwrap();
            if refused {
                r.block = AlignedBlock::misaligned();
            }
            assert_eq!(r.len(), len as u64);
            let mut back = vec![0u8; len / 2];
            r.read_exact(&mut back).unwrap();
            assert_eq!(back, data[..len / 2]);
            assert_eq!(r.finish().unwrap(), blake3::hash(&data).to_hex().to_string(), "length {len}");
            let mut whole = Vec::new();
            DirectReader::open(&path).unwrap().read_to_end(&mut whole).unwrap();
            assert_eq!(whole, data);
        }
    }
}
