//! Fault injection for the sharded losses ([`MarginSoftmaxLoss::sharded_loss`] and
//! [`MarginHead::sharded_loss`]) on the in-process group with a short deadline: for N = 2, 3
//! and 7 ranks, one rank fails its own checks, fails after the agreement, returns early, panics,
//! sleeps past the deadline, or passes a different B, dtype, targets, configuration or shard.
//! Every other rank must return an `Err` naming the op within the deadline (the same `Err` on
//! every rank wherever the agreement can see the fault), no rank thread may stay blocked, and a
//! new group must then give every rank the unsharded loss.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Result, Tensor, Var, bail};
use candle_margin_softmax::{
    ClassShard, Communicator, Head, InProcessCommunicator, InProcessGroup, MarginHead,
    MarginSoftmaxLoss, Reduction,
};

use crate::common::{rng, seed_of};

/// The fault groups' deadline: long enough for healthy ranks on a loaded 2-core machine to meet,
/// short enough to keep the tests quick.
const DEADLINE: Duration = Duration::from_millis(1500);
/// How long past the deadline a rank may take to return its `Err`.
const SLACK: Duration = Duration::from_secs(3);
const ROWS: usize = 5;
const CLASSES: usize = 21;
const DIM: usize = 6;
const RANKS: [usize; 3] = [2, 3, 7];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Api {
    Op,
    Head,
}

impl Api {
    fn prefix(self) -> &'static str {
        match self {
            Api::Op => "margin_softmax_ce(arcface)",
            Api::Head => "margin_head(arcface)",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// An input one class too wide: the rank's own checks fail before the first exchange.
    OwnCheck,
    /// The rank's second exchange fails (as when its computation fails after the agreement); the
    /// rank lives on.
    AfterAgreement,
    /// The rank never calls and drops its communicator.
    ReturnEarly,
    Panic,
    /// The rank calls only after the deadline.
    Sleep,
    OtherRows,
    OtherDtype,
    OtherTargets,
    OtherConfig,
    /// One class more, taken from the previous rank's shard.
    Overlap,
    /// One class less.
    Gap,
    /// The previous rank's shard.
    Duplicate,
}

/// The same inputs on every rank: cosines for the op, embeddings and W for the head.
struct Data {
    cosines: Vec<f64>,
    embeddings: Vec<f64>,
    weight: Vec<f64>,
    targets: Vec<i64>,
}

fn data() -> Arc<Data> {
    use rand::Rng;
    let mut r = rng(seed_of("shard faults"));
    let mut uniform = |n: usize, lo: f64, hi: f64| -> Vec<f64> {
        (0..n).map(|_| r.random_range(lo..hi)).collect()
    };
    let cosines = uniform(ROWS * CLASSES, -0.9, 0.9);
    let embeddings = uniform(ROWS * DIM, -1.0, 1.0);
    let weight = uniform(CLASSES * DIM, -1.0, 1.0);
    let targets = (0..ROWS as i64)
        .map(|i| (i * 4 + 1) % CLASSES as i64)
        .collect();
    Arc::new(Data {
        cosines,
        embeddings,
        weight,
        targets,
    })
}

fn config() -> MarginSoftmaxLoss {
    MarginSoftmaxLoss::new(Head::arcface())
}

/// A communicator whose exchange number `fail_at` fails without reaching the group.
struct FailingAt {
    inner: InProcessCommunicator,
    fail_at: usize,
    calls: AtomicUsize,
}

impl Communicator for FailingAt {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        if self.calls.fetch_add(1, Ordering::SeqCst) == self.fail_at {
            bail!("injected fault")
        }
        self.inner.all_gather(t)
    }
}

/// One rank's step: its shard (altered by `fault`), its inputs, the sharded loss and its
/// backward; the loss and the input's (op) or the embeddings' (head) gradient.
fn step(
    api: Api,
    rank: usize,
    ranks: usize,
    comm: Arc<dyn Communicator>,
    fault: Option<Fault>,
    d: &Data,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let dev = Device::Cpu;
    let mut shard = ClassShard::even(CLASSES, ranks, rank)?;
    let previous = ClassShard::even(CLASSES, ranks, rank.saturating_sub(1))?;
    match fault {
        Some(Fault::Overlap) => {
            shard.offset -= 1;
            shard.count += 1;
        }
        Some(Fault::Gap) => shard.count -= 1,
        Some(Fault::Duplicate) => shard = previous,
        _ => {}
    }
    let rows = if fault == Some(Fault::OtherRows) {
        ROWS - 1
    } else {
        ROWS
    };
    let dtype = if fault == Some(Fault::OtherDtype) {
        DType::F32
    } else {
        DType::F64
    };
    let mut targets = d.targets[..rows].to_vec();
    if fault == Some(Fault::OtherTargets) {
        targets[0] = (targets[0] + 1) % CLASSES as i64;
    }
    let targets = Tensor::from_vec(targets, rows, &dev)?;
    let mut cfg = config();
    if fault == Some(Fault::OtherConfig) {
        cfg = cfg.label_smoothing(0.1);
    }
    let width = shard.count + usize::from(fault == Some(Fault::OwnCheck));
    let columns = |values: &[f64], cols: usize, rows: usize| -> Result<Tensor> {
        // Columns [offset, offset + width) of a [rows, cols] matrix, past its end wrapping.
        let v: Vec<f64> = (0..rows)
            .flat_map(|i| (0..width).map(move |j| (i, (shard.offset + j) % cols)))
            .map(|(i, j)| values[i * cols + j])
            .collect();
        Tensor::from_vec(v, (rows, width), &dev)?.to_dtype(dtype)
    };
    match api {
        Api::Op => {
            let x = Var::from_tensor(&columns(&d.cosines, CLASSES, rows)?)?;
            let loss = cfg.sharded_loss(x.as_tensor(), &targets, shard, comm)?;
            let grads = loss.backward()?;
            let g = grads.get(&x).expect("a gradient").to_dtype(DType::F64)?;
            Ok((
                vec![loss.to_dtype(DType::F64)?.to_scalar()?],
                g.flatten_all()?.to_vec1()?,
            ))
        }
        Api::Head => {
            // W's rows of this shard (as [width, DIM]).
            let w: Vec<f64> = (0..width)
                .flat_map(|j| {
                    let c = (shard.offset + j) % CLASSES;
                    d.weight[c * DIM..(c + 1) * DIM].to_vec()
                })
                .collect();
            let w = Tensor::from_vec(w, (width, DIM), &dev)?.to_dtype(dtype)?;
            let f = Var::from_tensor(
                &Tensor::from_vec(d.embeddings[..rows * DIM].to_vec(), (rows, DIM), &dev)?
                    .to_dtype(dtype)?,
            )?;
            let head = MarginHead::from_weight(cfg, w, None)?;
            let loss = head.sharded_loss(f.as_tensor(), &targets, shard, comm)?;
            let grads = loss.backward()?;
            let g = grads.get(&f).expect("a gradient").to_dtype(DType::F64)?;
            Ok((
                vec![loss.to_dtype(DType::F64)?.to_scalar()?],
                g.flatten_all()?.to_vec1()?,
            ))
        }
    }
}

/// What a rank's thread ended with, and when.
#[derive(Debug)]
enum Outcome {
    Done(std::result::Result<(Vec<f64>, Vec<f64>), String>),
    Panicked,
    ReturnedEarly,
}

/// Runs `ranks` ranks of `api` on a new group with `deadline`, rank `faulty` doing `fault`; each
/// rank's outcome and how long it took. Panics if a rank thread has not ended within the deadline
/// and its slack (a rank left blocked).
fn run(
    api: Api,
    ranks: usize,
    faulty: Option<(usize, Fault)>,
    deadline: Duration,
) -> Vec<(Outcome, Duration)> {
    let d = data();
    let comms = InProcessGroup::with_timeout(ranks, deadline).expect("group");
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    for (rank, comm) in comms.into_iter().enumerate() {
        let fault = faulty.filter(|(k, _)| *k == rank).map(|(_, f)| f);
        let (tx, d) = (tx.clone(), d.clone());
        std::thread::spawn(move || {
            let outcome = match fault {
                Some(Fault::ReturnEarly) => {
                    drop(comm);
                    Outcome::ReturnedEarly
                }
                _ => {
                    let comm: Arc<dyn Communicator> = match fault {
                        Some(Fault::AfterAgreement) => Arc::new(FailingAt {
                            inner: comm,
                            fail_at: 1,
                            calls: AtomicUsize::new(0),
                        }),
                        _ => Arc::new(comm),
                    };
                    // A rank that fails after the agreement stays alive (as a training loop
                    // that catches the error would), holding its communicator.
                    let keep = (fault == Some(Fault::AfterAgreement)).then(|| comm.clone());
                    let result = catch_unwind(AssertUnwindSafe(move || {
                        if fault == Some(Fault::Panic) {
                            panic!("rank {rank}: injected panic");
                        }
                        if fault == Some(Fault::Sleep) {
                            std::thread::sleep(deadline + Duration::from_millis(500));
                        }
                        step(api, rank, ranks, comm, fault, &d).map_err(|e| e.to_string())
                    }));
                    if keep.is_some() {
                        std::thread::sleep(deadline + Duration::from_millis(200));
                    }
                    match result {
                        Ok(r) => Outcome::Done(r),
                        Err(_) => Outcome::Panicked,
                    }
                }
            };
            let _ = tx.send((rank, outcome, start.elapsed()));
        });
    }
    drop(tx);
    let mut out: Vec<Option<(Outcome, Duration)>> = (0..ranks).map(|_| None).collect();
    let limit = deadline + Duration::from_millis(500) + SLACK;
    for _ in 0..ranks {
        let left = limit.saturating_sub(start.elapsed());
        let (rank, outcome, took) = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("{api:?} N={ranks} {faulty:?}: a rank is still blocked"));
        out[rank] = Some((outcome, took));
    }
    out.into_iter().map(|o| o.expect("every rank")).collect()
}

/// The unsharded loss and gradient of `api` (the oracle of the clean runs).
fn unsharded(api: Api) -> Result<(f64, Vec<f64>)> {
    let d = data();
    let dev = Device::Cpu;
    let targets = Tensor::from_vec(d.targets.clone(), ROWS, &dev)?;
    let (loss, var) = match api {
        Api::Op => {
            let x = Var::from_tensor(&Tensor::from_vec(d.cosines.clone(), (ROWS, CLASSES), &dev)?)?;
            (config().loss(x.as_tensor(), &targets)?, x)
        }
        Api::Head => {
            let w = Tensor::from_vec(d.weight.clone(), (CLASSES, DIM), &dev)?;
            let f = Var::from_tensor(&Tensor::from_vec(d.embeddings.clone(), (ROWS, DIM), &dev)?)?;
            let head = MarginHead::from_weight(config(), w, None)?;
            (head.loss(f.as_tensor(), &targets)?, f)
        }
    };
    let g = loss.backward()?.get(&var).expect("a gradient").clone();
    Ok((loss.to_scalar()?, g.flatten_all()?.to_vec1()?))
}

/// A clean run on a new group: every rank returns the unsharded loss (the same bits on every
/// rank).
fn clean_run_works(api: Api, ranks: usize) {
    let (want, _) = unsharded(api).expect("unsharded");
    let outcomes = run(api, ranks, None, Duration::from_secs(60));
    let mut first: Option<f64> = None;
    for (rank, (outcome, _)) in outcomes.iter().enumerate() {
        let Outcome::Done(Ok((loss, _))) = outcome else {
            panic!("{api:?} N={ranks}: clean rank {rank}: {outcome:?}")
        };
        assert!(
            (loss[0] - want).abs() <= 1e-12 * want.abs(),
            "{api:?} N={ranks}: {loss:?} vs {want}"
        );
        assert_eq!(
            *first.get_or_insert(loss[0]),
            loss[0],
            "{api:?} N={ranks}: bits differ"
        );
    }
}

/// Runs `fault` on the last rank for every N and both APIs, checks every rank's outcome with
/// `check(api, ranks, faulty, outcomes)`, then that a new group works.
fn each_case(fault: Fault, check: impl Fn(Api, usize, usize, &[(Outcome, Duration)])) {
    for api in [Api::Op, Api::Head] {
        for ranks in RANKS {
            let faulty = ranks - 1;
            let outcomes = run(api, ranks, Some((faulty, fault)), DEADLINE);
            for (rank, (outcome, took)) in outcomes.iter().enumerate() {
                if rank == faulty {
                    continue;
                }
                let Outcome::Done(Err(msg)) = outcome else {
                    panic!("{api:?} N={ranks} {fault:?}: rank {rank} got {outcome:?}")
                };
                assert!(
                    msg.starts_with(api.prefix()),
                    "{api:?} N={ranks} {fault:?}: {msg}"
                );
                assert!(
                    *took <= DEADLINE + SLACK,
                    "{api:?} N={ranks} {fault:?}: rank {rank} took {took:?}"
                );
            }
            check(api, ranks, faulty, &outcomes);
            clean_run_works(api, ranks);
        }
    }
}

/// The message of rank `rank`'s `Err` (its first line: candle appends a backtrace when
/// RUST_BACKTRACE is set).
fn err(outcomes: &[(Outcome, Duration)], rank: usize) -> &str {
    match &outcomes[rank].0 {
        Outcome::Done(Err(m)) => m.lines().next().unwrap_or(""),
        other => panic!("rank {rank}: not an Err: {other:?}"),
    }
}

/// The faults the agreement sees: every rank, the faulty one included, returns the same `Err`,
/// at once (well before the deadline), containing `want`.
fn agreed_failure(fault: Fault, want: &'static str) {
    each_case(fault, |api, ranks, faulty, outcomes| {
        let first = err(outcomes, 0).to_string();
        assert!(first.contains(want), "{api:?} N={ranks} {fault:?}: {first}");
        for rank in 0..ranks {
            assert_eq!(
                err(outcomes, rank),
                first,
                "{api:?} N={ranks} {fault:?} rank {rank}"
            );
            assert!(
                outcomes[rank].1 < DEADLINE,
                "{api:?} N={ranks} {fault:?}: waited"
            );
        }
        let _ = faulty;
    });
}

#[test]
fn fault_own_check_fails_every_rank() {
    agreed_failure(Fault::OwnCheck, "failed its own checks");
}

#[test]
fn fault_other_batch_size() {
    agreed_failure(Fault::OtherRows, "the batch size");
}

#[test]
fn fault_other_dtype() {
    agreed_failure(Fault::OtherDtype, "dtype");
}

#[test]
fn fault_other_targets() {
    agreed_failure(Fault::OtherTargets, "the targets");
}

#[test]
fn fault_other_configuration() {
    agreed_failure(Fault::OtherConfig, "the loss configuration");
}

#[test]
fn fault_overlapping_shard() {
    agreed_failure(Fault::Overlap, "overlap");
}

#[test]
fn fault_gapped_shard() {
    agreed_failure(Fault::Gap, "no rank holds");
}

#[test]
fn fault_duplicated_shard() {
    agreed_failure(Fault::Duplicate, "overlap");
}

#[test]
fn fault_after_agreement_names_the_missing_rank() {
    each_case(Fault::AfterAgreement, |api, ranks, faulty, outcomes| {
        assert!(err(outcomes, faulty).contains("injected fault"));
        for rank in (0..ranks).filter(|&k| k != faulty) {
            let msg = err(outcomes, rank);
            assert!(
                msg.contains("did not arrive") && msg.contains(&format!("[{faulty}]")),
                "{api:?} N={ranks}: {msg}"
            );
        }
    });
}

#[test]
fn fault_sleep_past_the_deadline() {
    each_case(Fault::Sleep, |api, ranks, faulty, outcomes| {
        for rank in (0..ranks).filter(|&k| k != faulty) {
            let msg = err(outcomes, rank);
            assert!(msg.contains("did not arrive"), "{api:?} N={ranks}: {msg}");
        }
        // The sleeper finds the group poisoned with that cause.
        assert!(
            err(outcomes, faulty).contains("did not arrive"),
            "{api:?} N={ranks}"
        );
    });
}

#[test]
fn fault_return_early() {
    each_case(Fault::ReturnEarly, |api, ranks, faulty, outcomes| {
        for rank in (0..ranks).filter(|&k| k != faulty) {
            let msg = err(outcomes, rank);
            assert!(
                msg.contains(&format!("rank {faulty} left")),
                "{api:?} N={ranks}: {msg}"
            );
            assert!(
                outcomes[rank].1 < DEADLINE,
                "{api:?} N={ranks}: waited for the deadline"
            );
        }
    });
}

#[test]
fn fault_panic() {
    each_case(Fault::Panic, |api, ranks, faulty, outcomes| {
        assert!(matches!(outcomes[faulty].0, Outcome::Panicked));
        for rank in (0..ranks).filter(|&k| k != faulty) {
            let msg = err(outcomes, rank);
            assert!(
                msg.contains(&format!("rank {faulty} left")),
                "{api:?} N={ranks}: {msg}"
            );
        }
    });
}

/// Each rank of `shards` computing the op's sharded loss on its columns of the cosines (targets
/// below every total); each rank's loss or error message.
fn op_with_shards(shards: &[ClassShard]) -> Vec<std::result::Result<f64, String>> {
    let d = data();
    let comms = InProcessGroup::with_timeout(shards.len(), Duration::from_secs(20)).expect("group");
    std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .zip(shards)
            .map(|(comm, &s)| {
                let d = d.clone();
                scope.spawn(move || -> std::result::Result<f64, String> {
                    let run = || -> Result<f64> {
                        let dev = Device::Cpu;
                        let x: Vec<f64> = (0..ROWS)
                            .flat_map(|i| (s.offset..s.offset + s.count).map(move |j| (i, j)))
                            .map(|(i, j)| d.cosines[i * CLASSES + j])
                            .collect();
                        let x = Tensor::from_vec(x, (ROWS, s.count), &dev)?;
                        let t: Vec<i64> = d.targets.iter().map(|t| t % 10).collect();
                        let t = Tensor::from_vec(t, ROWS, &dev)?;
                        config()
                            .sharded_loss(&x, &t, s, Arc::new(comm))?
                            .to_scalar()
                    };
                    run().map_err(|e| e.to_string())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank"))
            .collect()
    })
}

/// The layouts that gave every rank a wrong loss without an error (issue 21's table): now the
/// same `Err` on every rank, naming the op.
#[test]
fn bad_layouts_fail_together() {
    let s = |offset, count, total| ClassShard {
        offset,
        count,
        total,
    };
    let cases: [(&str, Vec<ClassShard>, &str); 6] = [
        ("overlapping", vec![s(0, 6, 10), s(4, 6, 10)], "overlap"),
        (
            "gap",
            vec![s(0, 4, 10), s(6, 4, 10)],
            "no rank holds classes [4, 6)",
        ),
        (
            "the same slice twice",
            vec![s(0, 5, 10), s(0, 5, 10)],
            "overlap",
        ),
        (
            "3-way shards in 2 ranks",
            vec![s(0, 4, 10), s(4, 3, 10)],
            "[7, 10)",
        ),
        (
            "every rank all classes",
            vec![s(0, 10, 10), s(0, 10, 10)],
            "overlap",
        ),
        (
            "totals 10 vs 12",
            vec![s(0, 5, 10), s(5, 7, 12)],
            "total number of classes",
        ),
    ];
    for (name, shards, want) in cases {
        let got = op_with_shards(&shards);
        let first_line = |r: &std::result::Result<f64, String>| -> String {
            r.as_ref()
                .expect_err(name)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        };
        let first = first_line(&got[0]);
        assert!(
            first.starts_with("margin_softmax_ce(arcface)") && first.contains(want),
            "{name}: {first}"
        );
        for r in &got {
            assert_eq!(first_line(r), first, "{name}");
        }
    }
    // A valid uneven layout gives every rank the same loss.
    let got = op_with_shards(&[s(3, 7, 10), s(0, 3, 10)]);
    assert!(got.iter().all(|r| r.is_ok() && *r == got[0]), "{got:?}");
}

/// After a failure the group is poisoned: later calls on any rank fail with the cause, not with
/// a later, unrelated message.
#[test]
fn a_poisoned_group_keeps_its_cause() {
    let comms = InProcessGroup::with_timeout(2, Duration::from_millis(200)).expect("group");
    let t = Tensor::zeros(3, DType::F64, &Device::Cpu).expect("tensor");
    let first = comms[0]
        .all_gather(&t)
        .expect_err("rank 1 never arrives")
        .to_string()
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    assert!(first.contains("rank(s) [1] did not arrive"), "{first}");
    for comm in &comms {
        let other = Tensor::zeros(5, DType::F32, &Device::Cpu).expect("tensor");
        assert_eq!(
            comm.all_gather(&other)
                .expect_err("poisoned")
                .to_string()
                .lines()
                .next(),
            Some(first.as_str())
        );
    }
}

/// One rank's communicator called from two threads at once: the second call gets an `Err`
/// naming the communicator, the first completes.
#[test]
fn one_rank_from_two_threads() {
    let mut comms = InProcessGroup::with_timeout(2, Duration::from_secs(20)).expect("group");
    let rank1 = comms.pop().expect("rank 1");
    let rank0 = comms.pop().expect("rank 0");
    let t = Tensor::ones(2, DType::F64, &Device::Cpu).expect("tensor");
    let (first, second) = std::thread::scope(|scope| {
        let a = scope.spawn(|| rank0.all_gather(&t).map(|_| ()).map_err(|e| e.to_string()));
        std::thread::sleep(Duration::from_millis(200));
        let b = rank0.all_gather(&t).map(|_| ()).map_err(|e| e.to_string());
        rank1.all_gather(&t).expect("rank 1");
        (a.join().expect("thread"), b)
    });
    let errors: Vec<&String> = [&first, &second]
        .into_iter()
        .filter_map(|r| r.as_ref().err())
        .collect();
    assert_eq!(errors.len(), 1, "{first:?} {second:?}");
    assert!(
        errors[0].starts_with("in_process_group: rank 0 called all_gather while"),
        "{}",
        errors[0]
    );
}

/// B = 0, op and head, one and two ranks: loss 0 and an empty gradient, as unsharded.
#[test]
fn empty_batch_sharded() -> Result<()> {
    let dev = Device::Cpu;
    for ranks in [1usize, 2] {
        let comms = InProcessGroup::with_timeout(ranks, Duration::from_secs(20))?;
        let results: Vec<Result<(f64, f64)>> = std::thread::scope(|scope| {
            let handles: Vec<_> = comms
                .into_iter()
                .enumerate()
                .map(|(rank, comm)| {
                    let dev = dev.clone();
                    scope.spawn(move || -> Result<(f64, f64)> {
                        let comm: Arc<dyn Communicator> = Arc::new(comm);
                        let shard = ClassShard::even(CLASSES, ranks, rank)?;
                        let t = Tensor::zeros(0, DType::I64, &dev)?;
                        let x = Var::zeros((0, shard.count), DType::F64, &dev)?;
                        let op = config().sharded_loss(x.as_tensor(), &t, shard, comm.clone())?;
                        let g = op.backward()?.get(&x).expect("gradient").dims().to_vec();
                        assert_eq!(g, [0, shard.count]);
                        let w = Tensor::ones((shard.count, DIM), DType::F64, &dev)?;
                        let f = Var::zeros((0, DIM), DType::F64, &dev)?;
                        let head = MarginHead::from_weight(config(), w, None)?;
                        let hl = head.sharded_loss(f.as_tensor(), &t, shard, comm)?;
                        let g = hl.backward()?.get(&f).expect("gradient").dims().to_vec();
                        assert_eq!(g, [0, DIM]);
                        Ok((op.to_scalar()?, hl.to_scalar()?))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("rank"))
                .collect()
        });
        for r in results {
            assert_eq!(r?, (0.0, 0.0), "N={ranks}");
        }
    }
    Ok(())
}

/// A second `backward()` after one whose exchange failed (the head, `Reduction::None`, the other
/// rank never back-propagating): an `Err` naming the op, not a panic.
#[test]
fn second_backward_after_a_failed_one() -> Result<()> {
    let d = data();
    let dev = Device::Cpu;
    let comms = InProcessGroup::with_timeout(2, DEADLINE)?;
    let targets = Tensor::from_vec(d.targets.clone(), ROWS, &dev)?;
    let errors: Vec<Option<(String, String)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let (d, dev, targets) = (d.clone(), dev.clone(), targets.clone());
                scope.spawn(move || -> Result<Option<(String, String)>> {
                    let shard = ClassShard::even(CLASSES, 2, rank)?;
                    let w = Tensor::from_vec(d.weight.clone(), (CLASSES, DIM), &dev)?
                        .narrow(0, shard.offset, shard.count)?
                        .copy()?;
                    let f = Var::from_tensor(&Tensor::from_vec(
                        d.embeddings.clone(),
                        (ROWS, DIM),
                        &dev,
                    )?)?;
                    let cfg = config().reduction(Reduction::None);
                    let head = MarginHead::from_weight(cfg, w, None)?;
                    let loss = head.sharded_loss(f.as_tensor(), &targets, shard, Arc::new(comm))?;
                    if rank == 1 {
                        // Rank 1 skips its backward and keeps its communicator past rank 0's
                        // deadline.
                        std::thread::sleep(DEADLINE + Duration::from_millis(300));
                        return Ok(None);
                    }
                    let first = loss
                        .sum_all()?
                        .backward()
                        .expect_err("rank 1 never exchanges");
                    let second = loss.sum_all()?.backward().expect_err("spent");
                    Ok(Some((first.to_string(), second.to_string())))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank").expect("rank ran"))
            .collect()
    });
    let (first, second) = errors[0].clone().expect("rank 0's errors");
    assert!(first.contains("did not arrive"), "{first}");
    assert!(second.starts_with("margin_head"), "{second}");
    Ok(())
}

/// `ClassShard::even` refuses what `validate` would reject: fewer classes than ranks.
#[test]
fn even_and_validate_agree() {
    let msg = ClassShard::even(3, 4, 3)
        .expect_err("3 classes, 4 ranks")
        .to_string();
    assert!(msg.starts_with("class_shard:"), "{msg}");
    for (total, ranks) in [(4usize, 4usize), (10, 3), (21, 7)] {
        for rank in 0..ranks {
            ClassShard::even(total, ranks, rank)
                .and_then(|s| s.validate())
                .expect("even shards validate");
        }
    }
}
