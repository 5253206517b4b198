//! The emulated kernels' C ABI (kernels/emu/capi.cpp): the entry points' signatures, one
//! table of them per element type ([`EmuElement`]), and the ABI constants.

use half::{bf16, f16};

use crate::backends::launch::Launch;
use crate::backends::launch::params::MsParams;
use crate::math::{Acc, Element};

pub(super) type Partial<T, A> = unsafe extern "C" fn(
    *const Launch,
    i32,
    *const T,
    *const i32,
    *const A,
    *const A,
    *const MsParams,
    *mut A,
);
pub(super) type Finalize<T, A> = unsafe extern "C" fn(
    *const Launch,
    *const T,
    *const i32,
    *const A,
    *const A,
    *const A,
    *const MsParams,
    *const A,
    *mut A,
    *mut A,
    *mut A,
    *const A,
);
pub(super) type Backward<T, A> = unsafe extern "C" fn(
    *const Launch,
    i32,
    *const T,
    *const i32,
    *const A,
    *const A,
    *const MsParams,
    *mut T,
);
pub(super) type Fused<T, A> = unsafe extern "C" fn(
    *const Launch,
    i32,
    i32,
    *const T,
    *const i32,
    *const A,
    *const A,
    *const A,
    *const MsParams,
    *mut A,
    *mut T,
    *mut A,
    *const A,
    *mut A,
    i64,
);
/// `ms_targets_{u8|u32|i64}_{A}` by the targets' dtype code (0, 1, 2): raw, rows, classes,
/// ignore_index, has_ignore, weights, has_weights, mean, out, first_invalid, upstream.
pub(super) type Targets<A> = unsafe extern "C" fn(
    *const Launch,
    i32,
    *const std::ffi::c_void,
    i64,
    i64,
    i64,
    i32,
    *const A,
    i32,
    i32,
    *mut i32,
    *mut i64,
    *mut A,
);

/// The entry points of one element type (each but finalize takes the variant's index).
pub(super) struct Kernels<T, A> {
    pub(super) partial: Partial<T, A>,
    pub(super) finalize: Finalize<T, A>,
    pub(super) backward: Backward<T, A>,
    /// `ms_fused`, `ms_fused_warp`, `ms_fused_cluster` or `ms_fused_l2` by [`OnePass`].
    pub(super) fused: Fused<T, A>,
}

/// Which of the one-pass kernels a `loss_and_grad` plan launches (capi.cpp's `kind`).
#[derive(Clone, Copy)]
pub(super) enum OnePass {
    Block = 0,
    Warp = 1,
    Cluster = 2,
    /// Cooperative, with the partial states' buffer and the rows a group ([`L2Work`]).
    L2 = 3,
}

/// An input element type and its emulated kernels.
pub(super) trait EmuElement: Element<Acc: EmuAcc> {
    const KERNELS: Kernels<Self, Self::Acc>;
}

/// An accumulation type and its emulated `ms_targets`.
pub(super) trait EmuAcc: Acc {
    const TARGETS: Targets<Self>;
}

/// Declares `ms_emu_{kernel}_{suffix}` of kernels/emu/capi.cpp for one element type. f16 and
/// bf16 are `#[repr(transparent)]` over u16, as `__half` and `__nv_bfloat16` are 2-byte structs.
macro_rules! emu_element {
    ($t:ty, $acc:ty, $partial:ident, $finalize:ident, $backward:ident, $fused:ident) => {
        unsafe extern "C" {
            fn $partial(
                l: *const Launch,
                variant: i32,
                x: *const $t,
                targets: *const i32,
                scale: *const $acc,
                weights: *const $acc,
                p: *const MsParams,
                partials: *mut $acc,
            );
            fn $finalize(
                l: *const Launch,
                x: *const $t,
                targets: *const i32,
                scale: *const $acc,
                weights: *const $acc,
                poly: *const $acc,
                p: *const MsParams,
                partials: *const $acc,
                stats: *mut $acc,
                row_info: *mut $acc,
                grad_scale: *mut $acc,
                upstream: *const $acc,
            );
            fn $backward(
                l: *const Launch,
                variant: i32,
                x: *const $t,
                targets: *const i32,
                row_info: *const $acc,
                weights: *const $acc,
                p: *const MsParams,
                grad: *mut $t,
            );
            fn $fused(
                l: *const Launch,
                kind: i32,
                variant: i32,
                x: *const $t,
                targets: *const i32,
                scale: *const $acc,
                weights: *const $acc,
                poly: *const $acc,
                p: *const MsParams,
                stats: *mut $acc,
                grad: *mut $t,
                grad_scale: *mut $acc,
                upstream: *const $acc,
                partials: *mut $acc,
                group_rows: i64,
            );
        }
        impl EmuElement for $t {
            const KERNELS: Kernels<$t, $acc> = Kernels {
                partial: $partial,
                finalize: $finalize,
                backward: $backward,
                fused: $fused,
            };
        }
    };
}

emu_element!(
    f32,
    f32,
    ms_emu_forward_partial_f32,
    ms_emu_forward_finalize_f32,
    ms_emu_backward_f32,
    ms_emu_fused_f32
);
emu_element!(
    f64,
    f64,
    ms_emu_forward_partial_f64,
    ms_emu_forward_finalize_f64,
    ms_emu_backward_f64,
    ms_emu_fused_f64
);
emu_element!(
    f16,
    f32,
    ms_emu_forward_partial_f16,
    ms_emu_forward_finalize_f16,
    ms_emu_backward_f16,
    ms_emu_fused_f16
);
emu_element!(
    bf16,
    f32,
    ms_emu_forward_partial_bf16,
    ms_emu_forward_finalize_bf16,
    ms_emu_backward_bf16,
    ms_emu_fused_bf16
);

unsafe extern "C" {
    fn ms_emu_targets_f32(
        l: *const Launch,
        dtype: i32,
        raw: *const std::ffi::c_void,
        rows: i64,
        classes: i64,
        ignore_index: i64,
        has_ignore: i32,
        weights: *const f32,
        has_weights: i32,
        mean: i32,
        out: *mut i32,
        first_invalid: *mut i64,
        upstream: *mut f32,
    );
    fn ms_emu_targets_f64(
        l: *const Launch,
        dtype: i32,
        raw: *const std::ffi::c_void,
        rows: i64,
        classes: i64,
        ignore_index: i64,
        has_ignore: i32,
        weights: *const f64,
        has_weights: i32,
        mean: i32,
        out: *mut i32,
        first_invalid: *mut i64,
        upstream: *mut f64,
    );
}
impl EmuAcc for f32 {
    const TARGETS: Targets<f32> = ms_emu_targets_f32;
}
impl EmuAcc for f64 {
    const TARGETS: Targets<f64> = ms_emu_targets_f64;
}

/// The most blocks the emulator runs in one cooperative grid (`cuda_emu::max_cooperative_blocks`
/// in kernels/emu/cuda_emu.h; the ABI test compares them).
pub(super) const EMULATED_COOPERATIVE_BLOCKS: usize = 64;

#[cfg(test)]
unsafe extern "C" {
    /// The kernel ABI's constants as the C++ build sees them (see capi.cpp).
    pub(super) fn ms_emu_abi(out: *mut u64);
}
