//! The integration tests, as one test binary: cargo runs test binaries one after another, and
//! the tests of one binary side by side, so one binary runs every integration test in parallel
//! with the others (`RUST_TEST_THREADS`, set in `.cargo/config.toml`) and is linked once.
//! `cargo test --test integration MODULE::` runs one file's tests.

mod support;

mod boot;
mod config_check;
mod config_layers;
mod docker_boundary;
mod faults;
mod fleet;
mod fuzz;
mod iam_policy;
mod image;
mod lifecycle;
mod node;
mod operator;
mod secrets;
mod security;
mod supervise;
