//! The baselines' raw file operations: the only `unsafe` in the benchmark besides the counting
//! allocator. Each is one libc or memmap2 call with a borrowed descriptor.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use memmap2::{MmapMut, MmapOptions};

/// Allocates `[0, len)` of `file` (`posix_fallocate`), as `blockvol` does for a volume file, so
/// a baseline file has the same on-disk state (allocated, unwritten extents) as a volume's.
pub fn preallocate(file: &File, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large"))?;
    // SAFETY: `posix_fallocate` reads only its integer arguments; the descriptor is borrowed
    // from `file` for the duration of the call.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// A shared writable mapping of the whole of `file`.
pub fn map_shared(file: &File, len: usize) -> io::Result<MmapMut> {
    // SAFETY: the file was created by the caller for this benchmark and is not truncated or
    // written by anyone else while the mapping lives, so the mapped bytes stay valid.
    unsafe { MmapOptions::new().len(len).map_mut(file) }
}

/// Drops `file`'s clean pages from the page cache (`POSIX_FADV_DONTNEED`), for cold-cache
/// measurements; affects no other file.
pub fn drop_cache(file: &File) -> io::Result<()> {
    // SAFETY: `posix_fadvise` reads only its integer arguments; the descriptor is borrowed.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}
