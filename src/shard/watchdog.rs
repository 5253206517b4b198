//! The deadline on an asynchronous collective (NCCL's), the way PyTorch's NCCL watchdog keeps
//! one: look at the operation in flight until it completes, fails, or runs past the deadline;
//! on a failure or at the deadline, abort the communicator and poison it with the cause, so that
//! every later call fails with that cause instead of waiting on a dead communicator.
//!
//! It knows nothing of NCCL (the communicator hands it a probe and an abort), so the whole
//! policy is tested here on the CPU with probes that complete, fail or never finish.

use std::time::{Duration, Instant};

use candle_core::{Error, Result};

/// What one look at an operation in flight found.
#[derive(Debug)]
pub(crate) enum Progress {
    /// It completed.
    Done,
    /// Not yet.
    Pending,
    /// It failed (the communicator's asynchronous error, or the stream's).
    Failed(String),
}

/// One communicator's deadline, round counter and poison.
#[derive(Debug)]
pub(crate) struct Watchdog {
    /// The prefix of every error (the communicator's name).
    name: &'static str,
    timeout: Duration,
    /// Collectives started so far; the one in flight has this index.
    round: u64,
    /// The first failure, once there was one: every later call returns it.
    poisoned: Option<String>,
}

impl Watchdog {
    pub(crate) fn new(name: &'static str, timeout: Duration) -> Self {
        Self {
            name,
            timeout,
            round: 0,
            poisoned: None,
        }
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The cause, once the communicator has been poisoned.
    pub(crate) fn check(&self) -> Result<()> {
        match &self.poisoned {
            Some(cause) => Err(Error::Msg(cause.clone())),
            None => Ok(()),
        }
    }

    /// Runs the next collective round: `start` issues it, then `probe` is polled until it
    /// reports `Done` (Ok), `Failed`, or the deadline passes. On a failure (of `start` too) and
    /// at the deadline, `abort` is called exactly once and the watchdog is poisoned with the
    /// cause, which names `what`, the round and, at the deadline, the timeout. A poisoned
    /// watchdog starts nothing.
    pub(crate) fn round(
        &mut self,
        what: &str,
        start: impl FnOnce() -> std::result::Result<(), String>,
        probe: impl FnMut() -> Progress,
        abort: impl FnOnce() -> std::result::Result<(), String>,
    ) -> Result<()> {
        self.check()?;
        let label = format!("round {} ({what})", self.round);
        self.round += 1;
        self.watch(&label, start, probe, abort)
    }

    /// As [`Watchdog::round`] for the communicator's set-up (`what`), which is not a round.
    pub(crate) fn setup(
        &mut self,
        what: &str,
        start: impl FnOnce() -> std::result::Result<(), String>,
        probe: impl FnMut() -> Progress,
        abort: impl FnOnce() -> std::result::Result<(), String>,
    ) -> Result<()> {
        self.check()?;
        self.watch(what, start, probe, abort)
    }

    fn watch(
        &mut self,
        label: &str,
        start: impl FnOnce() -> std::result::Result<(), String>,
        probe: impl FnMut() -> Progress,
        abort: impl FnOnce() -> std::result::Result<(), String>,
    ) -> Result<()> {
        let failure = match start() {
            Err(e) => e,
            Ok(()) => match poll_until(Instant::now() + self.timeout, probe) {
                Progress::Done => return Ok(()),
                Progress::Failed(e) => e,
                Progress::Pending => format!(
                    "did not complete within {:?} (the communicator's timeout): a rank did not \
                     join it or stalled (NCCL does not say which)",
                    self.timeout
                ),
            },
        };
        let aborted = match abort() {
            Ok(()) => "the communicator was aborted".to_string(),
            Err(e) => format!("aborting the communicator failed too: {e}"),
        };
        let cause = format!(
            "{}: {label}: {failure}; {aborted}, make a new one to go on",
            self.name
        );
        self.poisoned = Some(cause.clone());
        Err(Error::Msg(cause))
    }
}

/// Polls `probe` until it is not `Pending` or `deadline` passes (then `Pending`). The first
/// looks spin (a collective of a few kilobytes completes in microseconds); later ones sleep,
/// doubling from 10 µs to 1 ms, so that a long wait costs little CPU.
fn poll_until(deadline: Instant, mut probe: impl FnMut() -> Progress) -> Progress {
    const SPINS: u32 = 64;
    let mut looks = 0u32;
    let mut nap = Duration::from_micros(10);
    loop {
        match probe() {
            Progress::Pending => {}
            settled => return settled,
        }
        let now = Instant::now();
        if now >= deadline {
            return Progress::Pending;
        }
        looks += 1;
        if looks < SPINS {
            std::hint::spin_loop();
        } else {
            std::thread::sleep(nap.min(deadline - now));
            nap = (nap * 2).min(Duration::from_millis(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    const NAME: &str = "test_communicator";

    fn first_line(e: &Error) -> String {
        e.to_string().lines().next().unwrap_or_default().to_string()
    }

    #[test]
    fn a_round_that_completes_is_ok_and_aborts_nothing() {
        let mut dog = Watchdog::new(NAME, Duration::from_secs(5));
        for pending_looks in [0, 1, 200] {
            let looks = Cell::new(0);
            let aborts = Cell::new(0);
            dog.round(
                "all_gather",
                || Ok(()),
                || {
                    looks.set(looks.get() + 1);
                    if looks.get() > pending_looks {
                        Progress::Done
                    } else {
                        Progress::Pending
                    }
                },
                || {
                    aborts.set(aborts.get() + 1);
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(looks.get(), pending_looks + 1);
            assert_eq!(aborts.get(), 0);
        }
        assert!(dog.check().is_ok());
    }

    #[test]
    fn the_deadline_aborts_once_and_poisons_with_round_and_timeout() {
        let mut dog = Watchdog::new(NAME, Duration::from_millis(50));
        dog.round("all_gather", || Ok(()), || Progress::Done, || Ok(()))
            .unwrap();
        let aborts = Cell::new(0);
        let started = Instant::now();
        let err = dog
            .round(
                "all_gather",
                || Ok(()),
                || Progress::Pending,
                || {
                    aborts.set(aborts.get() + 1);
                    Ok(())
                },
            )
            .unwrap_err();
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(50), "{waited:?}");
        assert!(waited < Duration::from_secs(2), "{waited:?}");
        assert_eq!(aborts.get(), 1);
        assert_eq!(
            first_line(&err),
            "test_communicator: round 1 (all_gather): did not complete within 50ms (the \
             communicator's timeout): a rank did not join it or stalled (NCCL does not say \
             which); the communicator was aborted, make a new one to go on"
        );
        // Every later call fails with the first cause and starts nothing.
        let started_again = Cell::new(false);
        let later = dog
            .round(
                "all_gather",
                || {
                    started_again.set(true);
                    Ok(())
                },
                || Progress::Done,
                || Ok(()),
            )
            .unwrap_err();
        assert!(!started_again.get());
        assert_eq!(first_line(&later), first_line(&err));
        assert_eq!(first_line(&dog.check().unwrap_err()), first_line(&err));
    }

    #[test]
    fn an_asynchronous_error_aborts_and_poisons_with_it() {
        let mut dog = Watchdog::new(NAME, Duration::from_secs(5));
        let looks = Cell::new(0);
        let aborts = Cell::new(0);
        let err = dog
            .round(
                "all_gather",
                || Ok(()),
                || {
                    looks.set(looks.get() + 1);
                    if looks.get() < 3 {
                        Progress::Pending
                    } else {
                        Progress::Failed("ncclRemoteError: a peer left".into())
                    }
                },
                || {
                    aborts.set(aborts.get() + 1);
                    Err("ncclInternalError".into())
                },
            )
            .unwrap_err();
        assert_eq!((looks.get(), aborts.get()), (3, 1));
        assert_eq!(
            first_line(&err),
            "test_communicator: round 0 (all_gather): ncclRemoteError: a peer left; aborting the \
             communicator failed too: ncclInternalError, make a new one to go on"
        );
        assert!(dog.check().is_err());
    }

    #[test]
    fn a_start_that_fails_aborts_without_probing() {
        let mut dog = Watchdog::new(NAME, Duration::from_secs(5));
        let probed = Cell::new(false);
        let aborts = Cell::new(0);
        let err = dog
            .setup(
                "ncclCommInitRankConfig",
                || Err("ncclInvalidArgument".into()),
                || {
                    probed.set(true);
                    Progress::Done
                },
                || {
                    aborts.set(aborts.get() + 1);
                    Ok(())
                },
            )
            .unwrap_err();
        assert!(!probed.get());
        assert_eq!(aborts.get(), 1);
        assert!(
            first_line(&err)
                .starts_with("test_communicator: ncclCommInitRankConfig: ncclInvalidArgument;"),
            "{err}"
        );
    }

    #[test]
    fn the_setup_is_not_a_round() {
        let mut dog = Watchdog::new(NAME, Duration::from_secs(5));
        dog.setup(
            "ncclCommInitRankConfig",
            || Ok(()),
            || Progress::Done,
            || Ok(()),
        )
        .unwrap();
        let err = dog
            .round(
                "all_gather",
                || Err("ncclSystemError".into()),
                || Progress::Done,
                || Ok(()),
            )
            .unwrap_err();
        assert!(
            first_line(&err)
                .starts_with("test_communicator: round 0 (all_gather): ncclSystemError;"),
            "{err}"
        );
    }

    #[test]
    fn a_long_wait_sleeps_instead_of_spinning() {
        // 200 ms of Pending with at most 1 ms naps: a few hundred looks, not millions.
        let mut dog = Watchdog::new(NAME, Duration::from_millis(200));
        let looks = Cell::new(0u64);
        let _ = dog.round(
            "all_gather",
            || Ok(()),
            || {
                looks.set(looks.get() + 1);
                Progress::Pending
            },
            || Ok(()),
        );
        assert!(looks.get() < 1_000, "{} looks", looks.get());
    }
}
