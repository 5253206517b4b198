//! The first exchange of every sharded loss: each rank's terms (its shard, B, the input dtype,
//! fingerprints of the loss configuration and of the targets) or the error of its own checks,
//! gathered from every rank and judged by every rank the same way. Nothing is computed unless
//! every rank passed its checks, the shards tile [0, total) exactly once and everything else is
//! equal on every rank; otherwise every rank returns the same `Err`, which names the offending
//! ranks and the field. A rank whose own checks fail still takes part, so that the others learn
//! of it instead of waiting for it.

use candle_core::{DType, Device, Error, Result, Tensor, bail};

use super::{ClassShard, Communicator, gather};
use crate::config::MarginSoftmaxLoss;

/// What the ranks of one sharded loss must agree on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Terms {
    pub(crate) shard: ClassShard,
    pub(crate) rows: usize,
    pub(crate) dtype: DType,
    /// [`fingerprint`] of the loss configuration (head, every option, the class weights).
    pub(crate) config: u64,
    /// [`targets_fingerprint`] of the targets.
    pub(crate) targets: u64,
}

/// FNV-1a over `bytes`: the same value in every process and build, unlike std's hashers.
pub(crate) fn fingerprint(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The fingerprint of the targets' values.
pub(crate) fn targets_fingerprint(values: &[i64]) -> u64 {
    fingerprint(values.iter().flat_map(|v| v.to_le_bytes()))
}

/// The fingerprint of a loss configuration: the head and every option (their `Debug` form, whose
/// floats round-trip exactly), the class weights' bits, and `module` (a head module's own
/// settings).
pub(crate) fn config_fingerprint(cfg: &MarginSoftmaxLoss, module: &str) -> u64 {
    let mut options = cfg.clone();
    options.class_weights = None;
    let weights: Vec<u8> = cfg
        .class_weights
        .as_ref()
        .map(|w| {
            w.values()
                .iter()
                .flat_map(|v| v.to_bits().to_le_bytes())
                .collect()
        })
        .unwrap_or_default();
    fingerprint(
        format!("{options:?}|{module}|{}", weights.len())
            .into_bytes()
            .into_iter()
            .chain(weights),
    )
}

/// The longest part of a rank's own error that travels to the others (bytes of UTF-8).
const MESSAGE_BYTES: usize = 480;
/// status, offset, count, total, rows, dtype, config (2 halves), targets (2 halves), message
/// length, then the message.
const HEADER: usize = 11;
const RECORD: usize = HEADER + MESSAGE_BYTES;

const DTYPES: [DType; 7] = [
    DType::U8,
    DType::U32,
    DType::I64,
    DType::BF16,
    DType::F16,
    DType::F32,
    DType::F64,
];

fn dtype_code(d: DType) -> f64 {
    DTYPES
        .iter()
        .position(|&x| x == d)
        .map_or(-1.0, |i| i as f64)
}

fn dtype_name(code: f64) -> String {
    DTYPES
        .get(code as usize)
        .filter(|_| code >= 0.0)
        .map_or("another dtype".to_string(), |d| format!("{d:?}"))
}

/// A u64 as two exactly representable halves.
fn halves(v: u64) -> [f64; 2] {
    [(v >> 32) as f64, (v & 0xffff_ffff) as f64]
}

fn record(local: std::result::Result<Terms, &Error>) -> Vec<f64> {
    let mut r = vec![0.0; RECORD];
    match local {
        Ok(t) => {
            r[0] = 1.0;
            r[1] = t.shard.offset as f64;
            r[2] = t.shard.count as f64;
            r[3] = t.shard.total as f64;
            r[4] = t.rows as f64;
            r[5] = dtype_code(t.dtype);
            r[6..8].copy_from_slice(&halves(t.config));
            r[8..10].copy_from_slice(&halves(t.targets));
        }
        Err(e) => {
            let msg = e.to_string();
            let msg = msg.lines().next().unwrap_or("");
            let mut end = msg.len().min(MESSAGE_BYTES);
            while !msg.is_char_boundary(end) {
                end -= 1;
            }
            r[10] = end as f64;
            for (slot, b) in r[HEADER..].iter_mut().zip(msg[..end].bytes()) {
                *slot = f64::from(b);
            }
        }
    }
    r
}

/// Exchanges this rank's terms (or the error of its own checks) with every rank through `comm`,
/// on `dev`, and returns `Ok` only when every rank passed its checks, the shards tile [0, total) exactly once
/// and every other term is equal on every rank.
///
/// # Errors
/// The same on every rank, starting with `op`: a rank's own error (naming the rank), a term on
/// which the ranks differ (naming the field and the ranks), shards that overlap or leave classes
/// uncovered, or a failed exchange.
pub(crate) fn agree(
    op: &str,
    comm: &dyn Communicator,
    dev: &Device,
    local: std::result::Result<Terms, &Error>,
) -> Result<()> {
    let mine = Tensor::from_vec(record(local), RECORD, dev)?;
    let all = gather(op, "the ranks' agreement", comm, &mine)?;
    let all: Vec<Vec<f64>> = all.to_dtype(DType::F64)?.to_vec2()?;
    judge(op, &all)
}

/// The verdict on every rank's record, the same on every rank.
fn judge(op: &str, all: &[Vec<f64>]) -> Result<()> {
    let failed: Vec<usize> = (0..all.len()).filter(|&k| all[k][0] != 1.0).collect();
    if let Some(&k) = failed.first() {
        let len = (all[k][10] as usize).min(MESSAGE_BYTES);
        let bytes: Vec<u8> = all[k][HEADER..HEADER + len]
            .iter()
            .map(|&b| b as u8)
            .collect();
        let others = if failed.len() > 1 {
            format!(" (rank(s) {:?} failed theirs too)", &failed[1..])
        } else {
            String::new()
        };
        bail!(
            "{op}: rank {k} failed its own checks{others}: {}",
            String::from_utf8_lossy(&bytes)
        )
    }
    let fields: [(&str, &[usize]); 5] = [
        ("the batch size B", &[4]),
        ("the total number of classes", &[3]),
        ("the input dtype", &[5]),
        (
            "the loss configuration (head, options, class weights)",
            &[6, 7],
        ),
        ("the targets", &[8, 9]),
    ];
    for (field, columns) in fields {
        let value = |k: usize| -> Vec<f64> { columns.iter().map(|&c| all[k][c]).collect() };
        let differ: Vec<usize> = (1..all.len()).filter(|&k| value(k) != value(0)).collect();
        if let Some(&k) = differ.first() {
            let show = |k: usize| match columns {
                [5] => dtype_name(all[k][5]),
                [c] => format!("{}", all[k][*c]),
                _ => "a different fingerprint".to_string(),
            };
            bail!(
                "{op}: the ranks disagree on {field}: rank(s) {differ:?} differ from rank 0 \
                 (rank {k}: {}, rank 0: {})",
                show(k),
                if columns.len() > 1 {
                    "another".to_string()
                } else {
                    show(0)
                }
            )
        }
    }
    check_tiling(op, all)
}

/// The shards must cover [0, total) exactly once: sorted by offset, each starts where the
/// previous one ends.
fn check_tiling(op: &str, all: &[Vec<f64>]) -> Result<()> {
    let total = all[0][3] as usize;
    let mut shards: Vec<(usize, usize, usize)> = all
        .iter()
        .enumerate()
        .map(|(k, r)| (r[1] as usize, r[1] as usize + r[2] as usize, k))
        .collect();
    shards.sort_unstable();
    let mut covered = 0usize;
    let mut previous: Option<(usize, usize, usize)> = None;
    for &(start, end, k) in &shards {
        if start < covered {
            let (ps, pe, pk) = previous.expect("a shard before it");
            bail!(
                "{op}: the shards overlap: rank {k} holds classes [{start}, {end}) and rank {pk} \
                 [{ps}, {pe}) (each class must be held by exactly one rank)"
            )
        }
        if start > covered {
            bail!(
                "{op}: no rank holds classes [{covered}, {start}) of {total} (the shards must \
                 cover every class)"
            )
        }
        covered = end;
        previous = Some((start, end, k));
    }
    if covered != total {
        bail!(
            "{op}: no rank holds classes [{covered}, {total}) of {total} (the shards must cover \
             every class)"
        )
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(offset: usize, count: usize, total: usize) -> Vec<f64> {
        record(Ok(Terms {
            shard: ClassShard {
                offset,
                count,
                total,
            },
            rows: 4,
            dtype: DType::F32,
            config: 7,
            targets: 9,
        }))
    }

    #[test]
    fn tiling() {
        assert!(judge("op", &[rec(0, 4, 10), rec(4, 6, 10)]).is_ok());
        assert!(judge("op", &[rec(4, 6, 10), rec(0, 4, 10)]).is_ok());
        let msg = |all: &[Vec<f64>]| judge("op", all).unwrap_err().to_string();
        assert!(msg(&[rec(0, 6, 10), rec(4, 6, 10)]).contains("overlap"));
        assert!(msg(&[rec(0, 4, 10), rec(6, 4, 10)]).contains("[4, 6)"));
        assert!(msg(&[rec(0, 5, 10), rec(0, 5, 10)]).contains("overlap"));
        assert!(msg(&[rec(0, 10, 10), rec(0, 10, 10)]).contains("overlap"));
        assert!(msg(&[rec(0, 3, 10), rec(3, 4, 10)]).contains("[7, 10)"));
        assert!(msg(&[rec(0, 4, 10), rec(4, 6, 12)]).contains("total number of classes"));
    }

    #[test]
    fn a_rank_s_own_error_travels() {
        let bad = record(Err(&Error::Msg("width 3, want 4 — é".into())));
        let msg = judge("op", &[rec(0, 4, 10), bad]).unwrap_err().to_string();
        // (candle appends a backtrace when RUST_BACKTRACE is set.)
        assert_eq!(
            msg.lines().next(),
            Some("op: rank 1 failed its own checks: width 3, want 4 — é")
        );
    }

    #[test]
    fn fingerprint_is_fnv1a() {
        // The FNV-1a test vectors for "" and "a".
        assert_eq!(fingerprint(*b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fingerprint(*b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
