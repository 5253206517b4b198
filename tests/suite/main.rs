//! The CPU test suite of candle-margin-softmax: parity with `reference`, finite differences,
//! edge values, property tests and errors. One test binary (`cargo test --test suite`); the
//! grids are functions taking `&Device` so that a GPU suite can reuse them.

mod common;
mod edge;
mod errors;
mod finite_diff;
mod gpu;
mod parity;
mod props;
