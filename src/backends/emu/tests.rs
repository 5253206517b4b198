//! The emulated kernels' ABI against the Rust side's constants.

use super::ffi::ms_emu_abi;
use super::*;
use crate::backends::launch::params::MAX_SPHERE_M;
use crate::backends::launch::{BLOCK, CLUSTER, FINALIZE_BLOCK, TARGETS_BLOCK};

/// The Rust mirrors of the kernel ABI agree with the C++ build of the kernels.
#[test]
fn abi_matches_the_kernels() {
    let mut got = [0u64; 12];
    // SAFETY: ms_emu_abi writes exactly 12 values.
    unsafe { ms_emu_abi(got.as_mut_ptr()) };
    let want = [
        std::mem::size_of::<MsParams>(),
        std::mem::align_of::<MsParams>(),
        BLOCK as usize,
        FINALIZE_BLOCK as usize,
        STAT_COLUMNS,
        ROWINFO_COLUMNS,
        PARTIAL_COLUMNS,
        MAX_SPHERE_M,
        std::mem::size_of::<Launch>(),
        TARGETS_BLOCK as usize,
        CLUSTER,
        EMULATED_COOPERATIVE_BLOCKS,
    ]
    .map(|v| v as u64);
    assert_eq!(
        got, want,
        "[sizeof MsParams, alignof, MS_BLOCK, MS_FINALIZE_BLOCK, stat, rowinfo, partial \
         columns, MS_MAX_SPHERE_M, sizeof EmuLaunch, MS_TARGETS_BLOCK, MS_CLUSTER, cuda_emu::max_cooperative_blocks]"
    );
}
