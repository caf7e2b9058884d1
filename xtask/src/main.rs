//! Project tasks (work in progress).
fn main() {}
