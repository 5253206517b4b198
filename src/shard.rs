//! Class sharding (model parallelism): W and the logits split by class over ranks, each rank
//! holding one contiguous slice of the classes ([`ClassShard`]). A sharded loss exchanges only a
//! few values per row through a [`Communicator`]: each rank's online softmax state over its
//! slice (max, Σ exp, and the sums the criterion options need) and its targets' inputs, and, for
//! the embeddings' gradient, the [B, D] partial sums. Every rank merges the gathered states in
//! rank order, so every rank computes the same bits whatever the timing.
//!
//! [`InProcessGroup`] runs N ranks in one process (one thread per rank, or all on one thread in
//! turn is not possible: a gather waits for every rank), for tests and CPU users; with the
//! feature `nccl`, [`NcclCommunicator`] wraps a cudarc NCCL communicator, one per GPU.

use std::sync::{Arc, Condvar, Mutex};

use candle_core::{Result, Tensor, bail};

use crate::heads::HEAD_OP;

/// Which classes a rank holds: `count` classes from `offset`, out of `total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassShard {
    pub offset: usize,
    pub count: usize,
    pub total: usize,
}

impl ClassShard {
    /// The shard of `rank` when `total` classes are split over `ranks` as evenly as possible:
    /// the first `total % ranks` ranks hold one class more.
    ///
    /// # Errors
    /// `ranks` = 0 or `rank` ≥ `ranks`.
    pub fn even(total: usize, ranks: usize, rank: usize) -> Result<Self> {
        if ranks == 0 || rank >= ranks {
            bail!("{HEAD_OP}: shard {rank} of {ranks} ranks does not exist")
        }
        let base = total / ranks;
        let extra = total % ranks;
        let offset = rank * base + rank.min(extra);
        Ok(Self {
            offset,
            count: base + usize::from(rank < extra),
            total,
        })
    }

    /// Checks `offset + count ≤ total` and `count` ≥ 1 (a rank holds at least one class).
    ///
    /// # Errors
    /// A shard outside the class range, or an empty one.
    pub fn validate(&self) -> Result<()> {
        if self.count == 0
            || self
                .offset
                .checked_add(self.count)
                .is_none_or(|e| e > self.total)
        {
            bail!(
                "{HEAD_OP}: shard of {} classes from {} is not a non-empty part of {} classes",
                self.count,
                self.offset,
                self.total
            )
        }
        Ok(())
    }
}

/// The collective a sharded loss needs, implemented over NCCL, threads, or anything else.
pub trait Communicator: Send + Sync {
    /// This rank, in 0..world_size.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world_size(&self) -> usize;
    /// Every rank's `t` (the same shape and dtype on every rank) stacked in rank order:
    /// [world_size, ..t's shape], on `t`'s device. Every rank must call it, in the same order.
    ///
    /// # Errors
    /// A failed exchange, or tensors of different shapes or dtypes across ranks.
    fn all_gather(&self, t: &Tensor) -> Result<Tensor>;
}

/// The state the ranks of one [`InProcessGroup`] share.
struct Exchange {
    /// Each rank's contribution to the current round.
    slots: Vec<Option<Tensor>>,
    /// The gathered result of the last completed round, and how many ranks still have to read
    /// it.
    result: Option<(Tensor, usize)>,
    /// Completed rounds (a rank waits for the round it contributed to).
    round: u64,
    /// Set when a rank's contribution did not match; every waiting rank then fails.
    failed: Option<String>,
}

/// N ranks in one process: [`InProcessGroup::new`] returns one [`InProcessCommunicator`] per
/// rank, to be moved to one thread each (`all_gather` blocks until every rank has called it).
pub struct InProcessGroup;

impl InProcessGroup {
    /// The communicators of `ranks` ranks.
    ///
    /// # Errors
    /// `ranks` = 0.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(ranks: usize) -> Result<Vec<InProcessCommunicator>> {
        if ranks == 0 {
            bail!("{HEAD_OP}: an in-process group needs at least one rank")
        }
        let shared = Arc::new((
            Mutex::new(Exchange {
                slots: vec![None; ranks],
                result: None,
                round: 0,
                failed: None,
            }),
            Condvar::new(),
        ));
        Ok((0..ranks)
            .map(|rank| InProcessCommunicator {
                rank,
                ranks,
                shared: shared.clone(),
            })
            .collect())
    }
}

/// One rank of an [`InProcessGroup`].
pub struct InProcessCommunicator {
    rank: usize,
    ranks: usize,
    shared: Arc<(Mutex<Exchange>, Condvar)>,
}

impl Communicator for InProcessCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.ranks
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let (lock, ready) = &*self.shared;
        let mut ex = lock.lock().unwrap_or_else(|e| e.into_inner());
        // Wait until the previous round's result has been read by every rank.
        while ex.result.is_some() && ex.failed.is_none() {
            ex = ready.wait(ex).unwrap_or_else(|e| e.into_inner());
        }
        if let Some(msg) = &ex.failed {
            bail!("{msg}")
        }
        let my_round = ex.round;
        ex.slots[self.rank] = Some(t.clone());
        if ex.slots.iter().all(Option::is_some) {
            let parts: Vec<Tensor> = ex
                .slots
                .iter_mut()
                .map(|s| s.take().expect("set"))
                .collect();
            let same = parts
                .iter()
                .all(|p| p.dims() == parts[0].dims() && p.dtype() == parts[0].dtype());
            if !same {
                ex.failed = Some(format!(
                    "{HEAD_OP}: all_gather got tensors of different shapes or dtypes across ranks"
                ));
                ready.notify_all();
                bail!("{}", ex.failed.clone().unwrap_or_default())
            }
            let stacked = Tensor::stack(&parts, 0)?;
            ex.result = Some((stacked, self.ranks));
            ex.round += 1;
            ready.notify_all();
        }
        while ex.round == my_round && ex.failed.is_none() {
            ex = ready.wait(ex).unwrap_or_else(|e| e.into_inner());
        }
        if let Some(msg) = &ex.failed {
            bail!("{msg}")
        }
        let (result, left) = ex.result.as_mut().expect("a completed round has a result");
        let out = result.clone();
        *left -= 1;
        if *left == 0 {
            ex.result = None;
            ready.notify_all();
        }
        Ok(out)
    }
}

/// The sum over ranks of each rank's `t`, added in rank order (the same bits on every rank).
pub(crate) fn all_reduce_sum(comm: &dyn Communicator, t: &Tensor) -> Result<Tensor> {
    let gathered = comm.all_gather(t)?;
    let mut sum = gathered.get(0)?;
    for k in 1..comm.world_size() {
        sum = (sum + gathered.get(k)?)?;
    }
    Ok(sum)
}
