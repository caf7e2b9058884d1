//! Integration crate (work in progress).
