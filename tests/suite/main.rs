//! The CPU test suite of candle-margin-softmax: parity with `reference`, finite differences,
//! edge values, property tests and errors. One test binary (`cargo test --test suite`); the
//! grids are functions taking `&Device` so that the kernel suite (`kernels`: on a GPU with the
//! `cuda` feature, through the emulated kernels with `kernel-emu`) reuses them.

mod architecture;
mod common;
mod dispatch;
mod edge;
mod elastic;
mod errors;
mod finite_diff;
mod heads;
#[cfg(any(feature = "cuda", feature = "kernel-emu"))]
mod kernels;
mod magface;
#[cfg(feature = "nccl")]
mod nccl_faults;
mod parity;
mod props;
mod robustness;
mod row_margins;
mod semantics;
mod shard;
mod shard_faults;
mod sub_center;
