//! The storage medium under a volume: a preallocated, locked, partly mapped file in
//! production, the same file opened read-only for inspection, or a simulated disk in crash
//! tests.
//!
//! The volume addresses the medium by absolute file offset. The medium decides how each region
//! is reached: the WAL ring through the memory map (one copy per append), the superblock slots
//! and the extent through positioned reads and writes.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{BlockVolError, Result};
use crate::sys::{self, MappedRegion};

/// Opens an existing volume file (read-only unless `write`), refusing anything that is not a
/// regular file with `NotARegularFile`: first after a `stat`, before the path is opened (a
/// directory, socket or device is never opened for I/O), then on the opened descriptor, in
/// case the path changed in between. The open uses `O_NONBLOCK`, so a FIFO swapped in cannot
/// block it, and `O_NOCTTY`; `O_NONBLOCK` is cleared once the file is known to be regular.
pub(crate) fn open_volume_file(path: &Path, write: bool) -> Result<File> {
    let ctx = || path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| BlockVolError::io("stat", ctx(), e))?;
    check_regular(path, &meta)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| BlockVolError::io("open", ctx(), e))?;
    let meta = file
        .metadata()
        .map_err(|e| BlockVolError::io("stat", ctx(), e))?;
    check_regular(path, &meta)?;
    sys::clear_nonblock(&file).map_err(|e| BlockVolError::io("fcntl", ctx(), e))?;
    Ok(file)
}

fn check_regular(path: &Path, meta: &std::fs::Metadata) -> Result<()> {
    let t = meta.file_type();
    if t.is_file() {
        return Ok(());
    }
    let kind = if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else {
        "something else"
    };
    Err(BlockVolError::NotARegularFile {
        path: path.display().to_string(),
        kind,
    })
}

/// What the volume needs from its storage. Failures are plain `io::Error`s; the volume decides
/// which ones poison it.
pub(crate) trait Medium: Send + Sync {
    /// Total bytes.
    fn len(&self) -> u64;
    /// Reads `buf.len()` bytes at `off`.
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at `off` (not yet durable).
    fn write_at(&self, off: u64, data: &[u8]) -> io::Result<()>;
    /// Writes `bufs` one after another from `off` (not yet durable): the same bytes as one
    /// `write_at` per slice, in order.
    fn write_vectored_at(&self, off: u64, bufs: &[&[u8]]) -> io::Result<()> {
        let mut o = off;
        for b in bufs {
            self.write_at(o, b)?;
            o += b.len() as u64;
        }
        Ok(())
    }
    /// Makes `[off, off + len)` durable.
    fn sync_range(&self, off: u64, len: u64) -> io::Result<()>;
    /// Zeroes `[off, off + len)` (not yet durable).
    fn zero_range(&self, off: u64, len: u64) -> io::Result<()>;
    /// Starts writing `[off, off + len)` to the media without waiting (a hint: it makes
    /// nothing durable, and failures are ignored).
    fn start_writeback(&self, _off: u64, _len: u64) {}
    /// A name for error messages.
    fn describe(&self) -> String;
    /// The first offset at or after `off` that may hold nonzero data (`None`: only zeros
    /// follow). Lets base readers skip unwritten regions without reading them.
    fn next_data(&self, off: u64) -> io::Result<Option<u64>> {
        Ok(Some(off))
    }
    /// The first offset at or after `off` that is known to read as zeros up to the next data
    /// (`u64::MAX` when unknown).
    fn next_hole(&self, _off: u64) -> io::Result<u64> {
        Ok(u64::MAX)
    }
}

/// A real volume file: exclusively locked, fully allocated, WAL region mapped, and the
/// checksum region (version 2) mapped for reading.
pub(crate) struct FileMedium {
    file: File,
    path: PathBuf,
    len: u64,
    wal: MappedRegion,
    wal_offset: u64,
    wal_len: u64,
    /// `(map, file offset, length)` of the checksum region: every extent read looks up its
    /// blocks' checksums, and a copy out of the map costs no system call. Only reads go
    /// through it; writes are positioned writes into the same page cache.
    csum: Option<(MappedRegion, u64, u64)>,
}

/// Where a volume file's regions lie, for `FileMedium::open`.
#[derive(Copy, Clone, Debug)]
pub(crate) struct Layout {
    /// Total length the superblock describes.
    pub len: u64,
    /// File offset of the WAL ring.
    pub wal_offset: u64,
    /// Bytes in the ring.
    pub wal_len: u64,
    /// `(file offset, length)` of the checksum region, when the format has one.
    pub csum: Option<(u64, u64)>,
}

impl FileMedium {
    /// Opens (`create == false`) or creates a file and maps its WAL region. `len` is the total
    /// length the superblock describes; a created file is preallocated to it, and an existing
    /// one with holes (a sparse copy) is allocated before anything is mapped, so no store
    /// through the map can fault on a hole.
    pub(crate) fn open(path: &Path, create: bool, layout: Layout) -> Result<FileMedium> {
        let r = FileMedium::open_inner(path, create, layout);
        if create
            && let Err(e) = &r
            && !matches!(e, BlockVolError::Io { op: "create", .. })
        {
            // The file was created by this call but could not be prepared: do not leave a
            // half-made volume behind.
            let _ = std::fs::remove_file(path);
        }
        r
    }

    fn open_inner(path: &Path, create: bool, layout: Layout) -> Result<FileMedium> {
        let Layout {
            len,
            wal_offset,
            wal_len,
            csum,
        } = layout;
        let ctx = || path.display().to_string();
        let file = if create {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(|e| BlockVolError::io("create", ctx(), e))?
        } else {
            open_volume_file(path, true)?
        };
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(BlockVolError::Locked { path: ctx() });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(BlockVolError::io("lock", ctx(), e));
            }
        }
        if create {
            sys::preallocate(&file, len).map_err(|e| allocation_error(path, len, e))?;
        }
        let meta = file
            .metadata()
            .map_err(|e| BlockVolError::io("stat", ctx(), e))?;
        let actual = meta.len();
        if actual < len {
            return Err(BlockVolError::FileTooShort {
                path: ctx(),
                len: actual,
                required: len,
            });
        }
        if !create {
            allocate_holes(&file, &meta, path, len)?;
        }
        let wal_usize = usize::try_from(wal_len).map_err(|_| {
            BlockVolError::InvalidArgument(format!("wal of {wal_len} bytes cannot be mapped"))
        })?;
        let wal = MappedRegion::map(&file, wal_offset, wal_usize)
            .map_err(|e| BlockVolError::io("mmap wal", ctx(), e))?;
        let csum = match csum {
            Some((off, n)) if n > 0 => {
                let n_usize = usize::try_from(n).map_err(|_| {
                    BlockVolError::InvalidArgument(format!(
                        "checksum region of {n} bytes cannot be mapped"
                    ))
                })?;
                let map = MappedRegion::map(&file, off, n_usize)
                    .map_err(|e| BlockVolError::io("mmap checksums", ctx(), e))?;
                Some((map, off, n))
            }
            _ => None,
        };
        Ok(FileMedium {
            file,
            path: path.to_path_buf(),
            len,
            wal,
            wal_offset,
            wal_len,
            csum,
        })
    }

    /// The file, for syncing its directory entry after creation.
    pub(crate) fn sync_file(&self) -> io::Result<()> {
        self.file.sync_all()
    }

    /// Which part of `[off, off + len)` is in the WAL: `Some(map offset)` when the whole range
    /// is, `None` when none of it is; a straddling range is refused.
    fn wal_part(&self, off: u64, len: u64) -> io::Result<Option<usize>> {
        let end = off
            .checked_add(len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range overflows"))?;
        if end > self.len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("range {off}+{len} beyond the file end {}", self.len),
            ));
        }
        let wal_end = self.wal_offset + self.wal_len;
        if off >= self.wal_offset && end <= wal_end {
            Ok(Some((off - self.wal_offset) as usize))
        } else if end <= self.wal_offset || off >= wal_end {
            Ok(None)
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("range {off}+{len} straddles the WAL boundary"),
            ))
        }
    }
}

/// A volume file opened for reading only, for inspection: `O_RDONLY`, a shared lock (so no
/// read-write opener holds it meanwhile), nothing mapped, positioned reads only. Every write,
/// zeroing and sync is refused, so nothing done through it can change the file, and it works
/// on a read-only file or mount.
pub(crate) struct ReadOnlyFileMedium {
    file: File,
    path: PathBuf,
    len: u64,
}

impl ReadOnlyFileMedium {
    /// Opens `path` read-only under a shared lock. The medium's length is the file's length:
    /// the caller compares it with the superblock's geometry.
    pub(crate) fn open(path: &Path) -> Result<ReadOnlyFileMedium> {
        let ctx = || path.display().to_string();
        let file = open_volume_file(path, false)?;
        match file.try_lock_shared() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(BlockVolError::Locked { path: ctx() });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(BlockVolError::io("lock", ctx(), e));
            }
        }
        let len = file
            .metadata()
            .map_err(|e| BlockVolError::io("stat", ctx(), e))?
            .len();
        Ok(ReadOnlyFileMedium {
            file,
            path: path.to_path_buf(),
            len,
        })
    }
}

fn read_only() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "the volume file is open read-only",
    )
}

impl Medium for ReadOnlyFileMedium {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        if off
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > self.len)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("range {off}+{} beyond the file end {}", buf.len(), self.len),
            ));
        }
        self.file.read_exact_at(buf, off)
    }

    fn write_at(&self, _off: u64, _data: &[u8]) -> io::Result<()> {
        Err(read_only())
    }

    fn sync_range(&self, _off: u64, _len: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn zero_range(&self, _off: u64, _len: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn next_data(&self, off: u64) -> io::Result<Option<u64>> {
        sys::seek_data(&self.file, off)
    }

    fn next_hole(&self, off: u64) -> io::Result<u64> {
        sys::seek_hole(&self.file, off)
    }
}

/// Allocates every hole in `[0, len)` of an existing volume file, so that neither a store
/// through the WAL map (which would be SIGBUS) nor an extent write can fail for want of a block.
/// Volume files are preallocated at creation, but a copy (`cp --sparse=always`, a restore, an
/// image transfer) may have holes. Skipped when the file is visibly allocated: as many blocks
/// as bytes and no hole reported before `len` (some file systems report allocated but unwritten
/// extents as holes: then the allocation runs and is a no-op). The file length never changes:
/// the caller checked it is at least `len`.
fn allocate_holes(file: &File, meta: &std::fs::Metadata, path: &Path, len: u64) -> Result<()> {
    let short = meta.blocks().saturating_mul(512) < len;
    let holed = short
        || sys::seek_hole(file, 0)
            .map_err(|e| BlockVolError::io("seek hole", path.display().to_string(), e))?
            < len;
    if holed {
        sys::preallocate(file, len).map_err(|e| allocation_error(path, len, e))?;
    }
    Ok(())
}

/// `NoSpace` when the file system (or a quota) is full, otherwise the I/O error.
fn allocation_error(path: &Path, len: u64, e: io::Error) -> BlockVolError {
    match e.kind() {
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => BlockVolError::NoSpace {
            path: path.display().to_string(),
            bytes: len,
            source: e,
        },
        _ => BlockVolError::io("fallocate", path.display().to_string(), e),
    }
}

impl Medium for FileMedium {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        match self.wal_part(off, buf.len() as u64)? {
            Some(m) => self.wal.read(m, buf),
            None => match &self.csum {
                Some((map, start, n)) if off >= *start && off - start + buf.len() as u64 <= *n => {
                    map.read((off - start) as usize, buf)
                }
                _ => self.file.read_exact_at(buf, off),
            },
        }
    }

    fn write_at(&self, off: u64, data: &[u8]) -> io::Result<()> {
        match self.wal_part(off, data.len() as u64)? {
            Some(m) => self.wal.write(m, data),
            None => self.file.write_all_at(data, off),
        }
    }

    /// Positioned vectored writes into the page cache, also inside the mapped WAL (the map
    /// shares the same pages): a bulk run of entries then costs one system call per
    /// `IOV_MAX` slices instead of a write fault per page of the map (D54).
    fn write_vectored_at(&self, off: u64, bufs: &[&[u8]]) -> io::Result<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.wal_part(off, len)?;
        sys::write_vectored_at(&self.file, off, bufs)
    }

    fn sync_range(&self, off: u64, len: u64) -> io::Result<()> {
        match self.wal_part(off, len)? {
            Some(m) => self.wal.flush_range(m, len as usize),
            // fdatasync covers every dirty page of the file, including the range asked for.
            None => self.file.sync_data(),
        }
    }

    fn zero_range(&self, off: u64, len: u64) -> io::Result<()> {
        if let Some(m) = self.wal_part(off, len)? {
            // The WAL is mapped: zero through the map so the map and the file agree.
            let zeros = vec![0u8; len.min(1 << 20) as usize];
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(zeros.len() as u64) as usize;
                self.wal.write(m + done as usize, &zeros[..n])?;
                done += n as u64;
            }
            return Ok(());
        }
        if sys::zero_range(&self.file, off, len)? {
            return Ok(());
        }
        write_zeros(&self.file, off, len)
    }

    fn start_writeback(&self, off: u64, len: u64) {
        // The ring is mapped shared: its dirty pages are the file's page cache pages, so
        // starting writeback of the file range covers them.
        sys::start_writeback(&self.file, off, len);
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn next_data(&self, off: u64) -> io::Result<Option<u64>> {
        sys::seek_data(&self.file, off)
    }

    fn next_hole(&self, off: u64) -> io::Result<u64> {
        sys::seek_hole(&self.file, off)
    }
}

/// Writes `len` zero bytes at `off` of `file`, 1 MiB at a time (where a file system cannot
/// zero a range itself).
pub(crate) fn write_zeros(file: &File, off: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], off + done)?;
        done += n as u64;
    }
    Ok(())
}
