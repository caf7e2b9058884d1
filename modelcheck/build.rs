//! Compiles the engine's sources in model-checking mode (see `engine/src/sync.rs`).
fn main() {
    println!("cargo::rustc-cfg=engine_model");
}
