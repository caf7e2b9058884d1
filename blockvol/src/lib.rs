//! Crash-safe, memmap2-backed block volume file (work in progress).
