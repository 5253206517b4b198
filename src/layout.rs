//! The columns of the per-row arrays that the op saves and passes between its parts, shared by
//! the ops (`src/op.rs`), every backend and the kernels (`kernels/params.cuh`: `MS_STAT_COLUMNS`,
//! `MS_ROWINFO_COLUMNS`, `MS_PARTIAL_COLUMNS`, checked against these by the emulated backend's
//! ABI test).

/// The forward op's statistics [B, STAT_COLUMNS]: the row's loss ℓ first.
pub(crate) const STAT_LOSS: usize = 0;
/// The row's max logit M and ln Σ_j exp(z_j − M), two consecutive columns (lse = M + ln Σ).
pub(crate) const STAT_MAX: usize = 1;
/// The row's class weight w_y (1 without class weights; 0 for an ignored row).
pub(crate) const STAT_WEIGHT: usize = 3;
/// a, k, g_y occupy three consecutive columns from here.
pub(crate) const STAT_GRAD_CONSTANTS: usize = 4;
/// dℓ/dr, the derivative by the row's scale.
pub(crate) const STAT_D_SCALE: usize = 7;
pub(crate) const STAT_COLUMNS: usize = 8;
/// With per-row margins (CPU only so far), the statistics carry dℓ/d(m1, m2, m3) in three more
/// columns from here: [B, STAT_COLUMNS_ROW_MARGINS].
pub(crate) const STAT_D_MARGINS: usize = 8;
pub(crate) const STAT_COLUMNS_ROW_MARGINS: usize = 11;

/// The statistics' column count: [`STAT_COLUMNS`], or with per-row margins
/// [`STAT_COLUMNS_ROW_MARGINS`].
pub(crate) fn stat_columns(row_margins: bool) -> usize {
    if row_margins {
        STAT_COLUMNS_ROW_MARGINS
    } else {
        STAT_COLUMNS
    }
}
/// [M, ln Σ, a, k, g_y, r] per row for the backward op.
pub(crate) const ROWINFO_COLUMNS: usize = 6;
/// With per-row margins, [M, ln Σ, a, k, g_y, r, m1, m2, m3].
pub(crate) const ROWINFO_COLUMNS_ROW_MARGINS: usize = 9;
/// The row parameters with per-row margins, [B, ROW_PARAMS]: (r, m1, m2, m3) per row (the row
/// scale alone is a \[B\] tensor).
pub(crate) const ROW_PARAMS: usize = 4;
/// The online state of a slice's non-target entries, per row: max, Σ exp(z − max),
/// Σ exp(z − max)·v, Σ w·v, Σ w·z (the kernels' `MS_PARTIAL_COLUMNS` layout).
pub(crate) const PARTIAL_COLUMNS: usize = 5;
