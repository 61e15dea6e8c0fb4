//! The hostile-frontend fuzzer's parts (driven by `hostile_frontend.rs`).

pub mod gen;
pub mod rng;
pub mod wire;
