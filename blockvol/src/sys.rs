//! The only module allowed to use `unsafe`: the WAL memory map and a few `libc` calls.
//!
//! Everything else in the crate is `#![deny(unsafe_code)]`. The map is a `MmapRaw` (a raw
//! pointer and a length), never turned into a long-lived `&[u8]` or `&mut [u8]`, because other
//! threads write other parts of the ring at the same time. Copies in and out are bounds-checked
//! here; *which* bytes may be touched concurrently is the volume's locking protocol (see the
//! crate docs): appends write only free space beyond the head, under the state lock; readers
//! copy only retained entries, which nobody writes until the persisted tail has passed them.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use memmap2::{MmapOptions, MmapRaw};

/// A shared, writable mapping of one region of the volume file.
pub(crate) struct MappedRegion {
    map: MmapRaw,
    len: usize,
}

impl MappedRegion {
    /// Maps `len` bytes of `file` starting at `offset` (page-aligned) for shared read/write.
    ///
    /// The file is fully allocated before mapping (preallocated at creation, holes of a sparse
    /// copy allocated at open), so no access through the map can fault on a hole (SIGBUS) or
    /// run out of space; the map is never shrunk while it lives.
    pub(crate) fn map(file: &File, offset: u64, len: usize) -> io::Result<MappedRegion> {
        let map = MmapOptions::new().offset(offset).len(len).map_raw(file)?;
        Ok(MappedRegion { map, len })
    }

    fn check(&self, off: usize, len: usize) -> io::Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("map access {off}+{len} outside a map of {} bytes", self.len),
            )),
        }
    }

    /// Copies `buf.len()` bytes at `off` out of the map.
    pub(crate) fn read(&self, off: usize, buf: &mut [u8]) -> io::Result<()> {
        self.check(off, buf.len())?;
        // SAFETY: `check` proved `off + buf.len() <= self.len`, so the source lies inside the
        // live mapping owned by `self.map`, which outlives this call. `buf` is a distinct Rust
        // allocation, so the ranges cannot overlap. The volume's locking protocol guarantees no
        // other thread writes these map bytes during the copy (readers only copy retained
        // entries; writers only write free space).
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_ptr().add(off), buf.as_mut_ptr(), buf.len());
        }
        Ok(())
    }

    /// Copies `data` into the map at `off`.
    pub(crate) fn write(&self, off: usize, data: &[u8]) -> io::Result<()> {
        self.check(off, data.len())?;
        // SAFETY: `check` proved the destination lies inside the live, writable shared mapping.
        // `data` is a distinct allocation, so the ranges cannot overlap. The volume's locking
        // protocol guarantees that no other thread reads or writes these bytes meanwhile
        // (appends, truncation and recovery write only space outside the retained range, under
        // the state lock or before the volume is shared).
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.map.as_mut_ptr().add(off),
                data.len(),
            );
        }
        Ok(())
    }

    /// `msync(MS_SYNC)` of a byte range of the map (rounded out to pages by memmap2).
    pub(crate) fn flush_range(&self, off: usize, len: usize) -> io::Result<()> {
        self.check(off, len)?;
        if len == 0 {
            return Ok(());
        }
        self.map.flush_range(off, len)
    }
}

/// Allocates real blocks for `[0, len)` of the file, so the file has no holes.
pub(crate) fn preallocate(file: &File, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large"))?;
    // SAFETY: `posix_fallocate` only reads its integer arguments; the descriptor is owned by
    // `file`, which is borrowed for the duration of the call.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Clears `O_NONBLOCK` on `file`: volume files are opened with it only so that a path that
/// turned out to be a FIFO could not block the open; the descriptor then behaves as before.
pub(crate) fn clear_nonblock(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: `fcntl(F_GETFL)` only reads the status flags of a descriptor owned by `file`,
    // which is borrowed for the duration of the call.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK == 0 {
        return Ok(());
    }
    // SAFETY: as above; `F_SETFL` only replaces the descriptor's status flags.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Zeroes `[off, off + len)` with `FALLOC_FL_ZERO_RANGE`, keeping the blocks allocated.
/// Returns `Ok(false)` when the file system does not support it (the caller writes zeros).
pub(crate) fn zero_range(file: &File, off: u64, len: u64) -> io::Result<bool> {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "range too large",
        ));
    };
    // SAFETY: `fallocate` only reads its integer arguments; the descriptor is owned by `file`,
    // which is borrowed for the duration of the call.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_ZERO_RANGE, off, len) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => Ok(false),
        _ => Err(err),
    }
}

/// The offset of the first byte at or after `off` that may hold data (`lseek(SEEK_DATA)`), or
/// `None` when only holes follow. File systems may report holes conservatively (as data), never
/// the reverse, and a hole always reads as zeros: skipping holes is therefore always safe.
/// Unsupported file systems report `Some(off)`.
pub(crate) fn seek_data(file: &File, off: u64) -> io::Result<Option<u64>> {
    let Ok(o) = libc::off_t::try_from(off) else {
        return Ok(Some(off));
    };
    // SAFETY: `lseek` only reads its integer arguments; the descriptor is owned by `file`,
    // which is borrowed for the duration of the call. The volume uses positioned I/O only, so
    // moving the descriptor's file offset affects nothing else.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), o, libc::SEEK_DATA) };
    if rc >= 0 {
        return Ok(Some(rc as u64));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(Some(off)),
        _ => Err(err),
    }
}

/// The offset of the first hole at or after `off` (`lseek(SEEK_HOLE)`; the file end counts as a
/// hole). Unsupported file systems report `u64::MAX` (all data).
pub(crate) fn seek_hole(file: &File, off: u64) -> io::Result<u64> {
    let Ok(o) = libc::off_t::try_from(off) else {
        return Ok(u64::MAX);
    };
    // SAFETY: as in `seek_data`: integer arguments only, a borrowed descriptor, and the
    // descriptor's offset is not used by anything else.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), o, libc::SEEK_HOLE) };
    if rc >= 0 {
        return Ok(rc as u64);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENXIO) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(u64::MAX),
        _ => Err(err),
    }
}

/// Starts asynchronous writeback of the dirty pages in `[off, off + len)`
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): no waiting, no durability, errors ignored.
pub(crate) fn start_writeback(file: &File, off: u64, len: u64) {
    let (Ok(off), Ok(len)) = (libc::off64_t::try_from(off), libc::off64_t::try_from(len)) else {
        return;
    };
    // SAFETY: `sync_file_range` reads only its integer arguments; the descriptor is owned by
    // `file`, which is borrowed for the duration of the call.
    let _ =
        unsafe { libc::sync_file_range(file.as_raw_fd(), off, len, libc::SYNC_FILE_RANGE_WRITE) };
}

/// Most slices one `pwritev` takes (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// Writes `bufs` one after another at `off` of `file` with positioned vectored writes
/// (`pwritev`), retrying short writes and interrupts: the same bytes as one `pwrite` per slice,
/// in as few system calls as `IOV_MAX` allows.
pub(crate) fn write_vectored_at(file: &File, mut off: u64, bufs: &[&[u8]]) -> io::Result<()> {
    // Skip empty slices; `first` is the slice being written, `done` the bytes of it written.
    let bufs: Vec<&[u8]> = bufs.iter().copied().filter(|b| !b.is_empty()).collect();
    let (mut first, mut done) = (0usize, 0usize);
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(IOV_MAX.min(bufs.len()));
    while first < bufs.len() {
        iov.clear();
        for (i, b) in bufs[first..].iter().take(IOV_MAX).enumerate() {
            let b = if i == 0 { &b[done..] } else { b };
            iov.push(libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            });
        }
        let o = libc::off64_t::try_from(off)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset overflows"))?;
        // `iov.len()` is at most IOV_MAX, which fits a c_int.
        let count = iov.len() as libc::c_int;
        // SAFETY: every iovec points into a slice of `bufs`, borrowed for the whole call, with
        // its exact length; the kernel only reads them. The descriptor is owned by `file`.
        let rc = unsafe { libc::pwritev64(file.as_raw_fd(), iov.as_ptr(), count, o) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if rc == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwritev wrote nothing",
            ));
        }
        let mut n = rc as usize;
        off += n as u64;
        while n > 0 && first < bufs.len() {
            let left = bufs[first].len() - done;
            if n >= left {
                n -= left;
                first += 1;
                done = 0;
            } else {
                done += n;
                n = 0;
            }
        }
    }
    Ok(())
}
