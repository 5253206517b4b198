//! [`InProcessGroup`]: N ranks in one process, one thread per rank, for tests and CPU users. Its
//! gathers wait with a deadline, and the first failure (a rank that does not arrive in time, a
//! rank that leaves, tensors that do not match) poisons the group: every later call on any of
//! its ranks fails with that cause, as a communicator that NCCL's watchdog has aborted does.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::{Error, Result, Tensor, bail};

use super::Communicator;

/// The prefix of this communicator's errors (a sharded loss adds its own name before it).
const GROUP: &str = "in_process_group";

/// The ranks' shared state: the current round's contributions and the last completed round.
struct Exchange {
    /// Each rank's contribution to the round in progress.
    slots: Vec<Option<Tensor>>,
    /// Completed rounds; the round in progress has this index.
    round: u64,
    /// The gathered result of round `round - 1`. No rank can contribute to round `round` + 1
    /// before every rank has returned from round `round`, so the result a waiting rank reads is
    /// always its own round's.
    last: Option<Tensor>,
    /// Which ranks are inside `all_gather` (a second call of one rank from another thread is
    /// refused).
    busy: Vec<bool>,
    /// Why the group failed; every later call fails with it.
    poisoned: Option<String>,
}

/// N ranks in one process: [`InProcessGroup::new`] returns one [`InProcessCommunicator`] per
/// rank, to be moved to one thread each (`all_gather` blocks until every rank has called it).
///
/// Every gather waits at most the group's deadline ([`InProcessGroup::DEFAULT_TIMEOUT`], 10
/// minutes as in `torch.distributed.init_process_group`, or the one given to
/// [`InProcessGroup::with_timeout`]). The first failure poisons the group:
/// - a rank that does not arrive in time (the error names the round and the missing ranks);
/// - a rank whose communicator is dropped (its thread returned or panicked) while others may
///   still call;
/// - ranks that pass tensors of different shapes or dtypes.
///
/// Every call in progress and every later call on any rank then returns an `Err` with that
/// cause. A poisoned group cannot recover: make a new one (`InProcessGroup::new`) and hand its
/// communicators to the ranks.
pub struct InProcessGroup;

impl InProcessGroup {
    /// How long a gather waits for the other ranks unless told otherwise: 10 minutes, the
    /// default timeout of `torch.distributed.init_process_group` ([`super::DEFAULT_TIMEOUT`]).
    pub const DEFAULT_TIMEOUT: Duration = super::DEFAULT_TIMEOUT;

    /// The communicators of `ranks` ranks, with the default deadline.
    ///
    /// # Errors
    /// `ranks` = 0.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(ranks: usize) -> Result<Vec<InProcessCommunicator>> {
        Self::with_timeout(ranks, Self::DEFAULT_TIMEOUT)
    }

    /// The communicators of `ranks` ranks whose gathers wait at most `timeout` for the other
    /// ranks.
    ///
    /// # Errors
    /// `ranks` = 0, or a zero `timeout`.
    pub fn with_timeout(ranks: usize, timeout: Duration) -> Result<Vec<InProcessCommunicator>> {
        if ranks == 0 {
            bail!("{GROUP}: a group needs at least one rank")
        }
        if timeout.is_zero() {
            bail!("{GROUP}: the timeout must be longer than zero")
        }
        let shared = Arc::new(Shared {
            exchange: Mutex::new(Exchange {
                slots: vec![None; ranks],
                round: 0,
                last: None,
                busy: vec![false; ranks],
                poisoned: None,
            }),
            ready: Condvar::new(),
            timeout,
        });
        Ok((0..ranks)
            .map(|rank| InProcessCommunicator {
                rank,
                ranks,
                shared: shared.clone(),
            })
            .collect())
    }
}

struct Shared {
    exchange: Mutex<Exchange>,
    ready: Condvar,
    timeout: Duration,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Exchange> {
        self.exchange.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Poisons the group with `cause` (the first cause stays) and wakes every waiting rank.
    fn poison(&self, ex: &mut Exchange, cause: String) {
        ex.poisoned.get_or_insert(cause);
        self.ready.notify_all();
    }
}

/// One rank of an [`InProcessGroup`]. Dropping it (its thread returned or panicked) poisons the
/// group, so that the other ranks fail at once instead of waiting for it until the deadline.
pub struct InProcessCommunicator {
    rank: usize,
    ranks: usize,
    shared: Arc<Shared>,
}

impl InProcessCommunicator {
    /// How long this group's gathers wait for the other ranks.
    pub fn timeout(&self) -> Duration {
        self.shared.timeout
    }

    /// Contributes `t` to the round in progress and waits, until the deadline, for the others.
    fn gather<'a>(
        &'a self,
        mut ex: MutexGuard<'a, Exchange>,
        t: &Tensor,
    ) -> (MutexGuard<'a, Exchange>, Result<Tensor>) {
        if let Some(cause) = &ex.poisoned {
            let cause = cause.clone();
            return (ex, Err(Error::Msg(cause)));
        }
        let round = ex.round;
        ex.slots[self.rank] = Some(t.clone());
        if ex.slots.iter().all(Option::is_some) {
            let parts: Vec<Tensor> = ex.slots.iter_mut().filter_map(Option::take).collect();
            if let Some(k) = parts
                .iter()
                .position(|p| p.dims() != parts[0].dims() || p.dtype() != parts[0].dtype())
            {
                let cause = format!(
                    "{GROUP}: round {round}: rank {k} sent a {:?} tensor of shape {:?}, rank 0 a \
                     {:?} tensor of shape {:?} (every rank must make the same calls in the same \
                     order)",
                    parts[k].dtype(),
                    parts[k].dims(),
                    parts[0].dtype(),
                    parts[0].dims()
                );
                self.shared.poison(&mut ex, cause.clone());
                return (ex, Err(Error::Msg(cause)));
            }
            match Tensor::stack(&parts, 0) {
                Ok(stacked) => ex.last = Some(stacked),
                Err(e) => {
                    let cause = format!("{GROUP}: round {round}: {e}");
                    self.shared.poison(&mut ex, cause.clone());
                    return (ex, Err(Error::Msg(cause)));
                }
            }
            ex.round += 1;
            self.shared.ready.notify_all();
        }
        let deadline = Instant::now() + self.shared.timeout;
        while ex.round == round && ex.poisoned.is_none() {
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> =
                    (0..self.ranks).filter(|&k| ex.slots[k].is_none()).collect();
                let cause = format!(
                    "{GROUP}: round {round}: rank(s) {missing:?} did not arrive within {:?} (the \
                     group's timeout)",
                    self.shared.timeout
                );
                self.shared.poison(&mut ex, cause);
                break;
            }
            ex = self
                .shared
                .ready
                .wait_timeout(ex, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        // A completed round's result holds even if the group failed afterwards.
        let out = if ex.round > round {
            Ok(ex.last.clone().expect("a completed round keeps its result"))
        } else {
            Err(Error::Msg(ex.poisoned.clone().unwrap_or_default()))
        };
        (ex, out)
    }
}

impl Communicator for InProcessCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.ranks
    }

    /// # Errors
    /// A poisoned group (the cause), a rank that does not arrive before the deadline (the round
    /// and the missing ranks), tensors of different shapes or dtypes, and a second call of this
    /// rank while one is in progress (from another thread; the call in progress is not
    /// disturbed).
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let mut ex = self.shared.lock();
        if ex.busy[self.rank] {
            bail!(
                "{GROUP}: rank {} called all_gather while another call of the same rank is in \
                 progress (one rank's communicator is used by one thread at a time)",
                self.rank
            )
        }
        ex.busy[self.rank] = true;
        let (mut ex, out) = self.gather(ex, t);
        ex.busy[self.rank] = false;
        out
    }
}

impl Drop for InProcessCommunicator {
    fn drop(&mut self) {
        let mut ex = self.shared.lock();
        let cause = format!(
            "{GROUP}: rank {} left the group (its communicator was dropped: the rank returned or \
             panicked)",
            self.rank
        );
        self.shared.poison(&mut ex, cause);
    }
}
