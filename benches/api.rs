//! Placeholder replaced by the API benchmark.
fn main() {}
