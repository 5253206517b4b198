//! Criterion benchmarks of the fused CPU op against `reference` (plain candle ops + autograd)
//! and, for the plain softmax head, `candle_nn::loss::cross_entropy`.
//!
//! `cargo bench --bench cpu` runs every group; `cargo bench --bench cpu -- 1024x32000` only the
//! groups whose name contains `1024x32000` (criterion's filter). One group per
//! (head, dtype, shape), named `head/dtype/BxC`, with the functions
//!
//! - `fused_fwd`, `fused_fwd_bwd` (`loss` + `backward()`), `fused_loss_and_grad`,
//! - `reference_fwd`, `reference_fwd_bwd` (`reference::loss` + `backward()`),
//!
//! all with label smoothing 0.1; and for the softmax head also `eps0/…`: the fused op, and
//! `candle_nn::loss::cross_entropy` (which has no label smoothing), both without smoothing.
//! Criterion prints times, not ratios: `cargo bench --bench cpu_summary` prints the speed-ups.
//!
//! Kept short for a 2-core machine: 10 samples of one iteration each (flat sampling, so a 2 s
//! reference step is run ~11 times, not 55), 3 s of measurement, 1 s of warm-up.

mod common;

use std::cell::OnceCell;
use std::time::Duration;

use common::{DTYPES, HEADS, HeadKind, Pass, SHAPES, dtype_name, problem, run, shape_name};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};

fn bench_cpu(c: &mut Criterion) {
    for &shape in &SHAPES {
        for &dtype in &DTYPES {
            for &kind in &HEADS {
                let name = format!(
                    "{}/{}/{}",
                    kind.name(),
                    dtype_name(dtype),
                    shape_name(shape)
                );
                // Built on first use, so only for the groups that the filter keeps.
                let input = OnceCell::new();
                let p = || {
                    input.get_or_init(|| {
                        problem(kind, shape, dtype).unwrap_or_else(|e| panic!("{name}: {e}"))
                    })
                };
                let mut group = c.benchmark_group(&name);
                group
                    .sample_size(10)
                    .sampling_mode(SamplingMode::Flat)
                    .warm_up_time(Duration::from_secs(1))
                    .measurement_time(Duration::from_secs(3))
                    .throughput(Throughput::Elements((shape.0 * shape.1) as u64));
                let cfg = kind.config();
                for pass in [
                    Pass::FusedFwd,
                    Pass::FusedFwdBwd,
                    Pass::FusedLossAndGrad,
                    Pass::ReferenceFwd,
                    Pass::ReferenceFwdBwd,
                ] {
                    group.bench_function(pass.name(), |b| {
                        let p = p();
                        b.iter(|| {
                            run(pass, &cfg, p).unwrap_or_else(|e| panic!("{}: {e}", pass.name()))
                        })
                    });
                }
                if kind == HeadKind::Softmax {
                    let plain = common::softmax_no_smoothing();
                    for pass in [
                        Pass::FusedFwd,
                        Pass::FusedFwdBwd,
                        Pass::FusedLossAndGrad,
                        Pass::CandleNnFwd,
                        Pass::CandleNnFwdBwd,
                    ] {
                        group.bench_function(format!("eps0/{}", pass.name()), |b| {
                            let p = p();
                            b.iter(|| {
                                run(pass, &plain, p)
                                    .unwrap_or_else(|e| panic!("{}: {e}", pass.name()))
                            })
                        });
                    }
                }
                group.finish();
            }
        }
    }
}

criterion_group!(benches, bench_cpu);
criterion_main!(benches);
