//! What failed, and what to do about it: the one failure type every source sees, and the one
//! policy that decides whether a failed event is tried again — in place, or later through the
//! retry topic — and when it is dead-lettered instead.
//!
//! **Why in one place.** A failure's *kind* (can it ever succeed?) and *cause* (the plugin, the
//! host's checks, or the store) decide everything downstream, and the rules must agree: an
//! invalid event is never retried; a store outage is not the event's fault, so it never runs out
//! of attempts; everything else gets the group's `retry.maxAttempts` with a doubling backoff.
//!
//! ```
//! use feature_host::retry::{Cause, FailureKind, NextStep, RetryPolicy};
//! use std::time::Duration;
//!
//! let policy = RetryPolicy { max_attempts: 3, backoff: Duration::from_secs(1) };
//! // The first failure of a plugin's transient error: the retry topic, due in 1 s.
//! assert_eq!(
//!     policy.next_step(FailureKind::Retryable, Cause::Plugin, 1, 0),
//!     NextStep::Retry { due_ms: 1_000 }
//! );
//! // The third: out of attempts.
//! assert_eq!(policy.next_step(FailureKind::Retryable, Cause::Plugin, 3, 0), NextStep::DeadLetter);
//! // A store outage never runs out (the wait is capped instead).
//! assert!(matches!(
//!     policy.next_step(FailureKind::Retryable, Cause::Store, 1_000, 0),
//!     NextStep::Retry { .. }
//! ));
//! ```

use crate::dispatch::{GroupId, Route};
use crate::event::EventIdx;
use crate::spec::GroupDef;
use std::time::Duration;

/// Whether an event's failure can ever succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Cannot succeed: dead-letter at once.
    Invalid,
    /// Transient: retry.
    Retryable,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Invalid => "invalid",
            FailureKind::Retryable => "retryable",
        }
    }
}

/// Which part of processing failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The plugin: it rejected the event, asked to retry, trapped or ran out of time.
    Plugin,
    /// The host's checks: a write the group's spec does not allow, or a message the host
    /// cannot read (an unreadable retry record).
    Check,
    /// The store write (the plugin's part succeeded).
    Store,
}

/// One event that failed for one group, in a batch (`event` indexes the batch).
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub event: EventIdx,
    pub group: GroupId,
    pub kind: FailureKind,
    pub cause: Cause,
    pub reason: String,
}

impl Failure {
    /// The event and group that failed.
    pub fn route(&self) -> Route {
        Route {
            event: self.event,
            group: self.group,
        }
    }

    /// A store outage (the store failed transiently; the plugin's part succeeded): not the
    /// event's fault, so it is waited out instead of running out of attempts.
    pub fn is_outage(&self) -> bool {
        is_outage(self.kind, self.cause)
    }
}

fn is_outage(kind: FailureKind, cause: Cause) -> bool {
    kind == FailureKind::Retryable && cause == Cause::Store
}

/// Which failures a batch retries in place, before returning them to its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InPlace {
    /// Every retryable failure, up to its group's attempts, with the group's backoff: for
    /// sources without a retry topic (files, HTTP push, batch shards).
    All,
    /// Store failures only, up to this many attempts from [`STORE_BACKOFF`]; plugin failures
    /// return at once (the Kafka consumer hands them to the retry topic, which does not hold
    /// up the partition).
    StoreOnly(u32),
}

/// First wait of in-place store retries.
pub const STORE_BACKOFF: Duration = Duration::from_millis(100);

/// The longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// Where a failed event goes next, when its source has a retry topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    /// To the retry topic, due at this time (ms since the epoch).
    Retry {
        due_ms: i64,
    },
    DeadLetter,
}

/// One group's retry settings (its spec's `retry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts an event gets, the first processing included.
    pub max_attempts: u32,
    /// Wait after the first failed attempt; doubles per attempt, at most 64× and
    /// [`MAX_BACKOFF`].
    pub backoff: Duration,
}

impl RetryPolicy {
    pub fn of(def: &GroupDef) -> RetryPolicy {
        RetryPolicy {
            max_attempts: def.spec.retry.max_attempts,
            backoff: def.retry_backoff,
        }
    }

    /// Attempts an event gets. A store outage is not the event's fault: it cycles through the
    /// retry topic at the capped backoff until the store is back, instead of running out.
    pub fn attempt_limit(&self, kind: FailureKind, cause: Cause) -> u32 {
        if is_outage(kind, cause) {
            u32::MAX
        } else {
            self.max_attempts
        }
    }

    /// After the `attempts`-th failed attempt (1 = the first processing) of a batch retried in
    /// place: how long to wait before the next, or `None` to return the failure.
    pub fn in_place(&self, f: &Failure, attempts: u32, mode: InPlace) -> Option<Duration> {
        if f.kind != FailureKind::Retryable {
            return None;
        }
        match mode {
            InPlace::All if attempts < self.max_attempts => Some(backoff(self.backoff, attempts)),
            InPlace::StoreOnly(max) if f.cause == Cause::Store && attempts < max => {
                Some(backoff(STORE_BACKOFF, attempts))
            }
            _ => None,
        }
    }

    /// The longest a retried event waits between two attempts.
    pub fn longest_wait(&self) -> Duration {
        backoff(self.backoff, u32::MAX)
    }

    /// `due_ms` as read from a retry record, at most [`longest_wait`](Self::longest_wait)
    /// from `now_ms` and not before the epoch: a record due further out was not written by
    /// this policy (forged, or written under a longer backoff since shortened), and a retry
    /// unit waiting for it would hold its partition's commits back until then.
    pub fn clamp_due(&self, due_ms: i64, now_ms: i64) -> i64 {
        due_ms.clamp(
            0,
            now_ms
                .saturating_add(self.longest_wait().as_millis() as i64)
                .max(0),
        )
    }

    /// After the `attempts`-th failed attempt (1 = the first processing): the retry topic, due
    /// after the backoff, or the dead-letter topic for invalid events and those out of
    /// attempts.
    pub fn next_step(
        &self,
        kind: FailureKind,
        cause: Cause,
        attempts: u32,
        now_ms: i64,
    ) -> NextStep {
        if kind == FailureKind::Invalid || attempts >= self.attempt_limit(kind, cause) {
            return NextStep::DeadLetter;
        }
        NextStep::Retry {
            due_ms: now_ms + backoff(self.backoff, attempts).as_millis() as i64,
        }
    }
}

/// The wait after the `attempts`-th failure: `first`, doubling per attempt, at most 64× and
/// [`MAX_BACKOFF`].
pub fn backoff(first: Duration, attempts: u32) -> Duration {
    first
        .saturating_mul(1 << attempts.saturating_sub(1).min(6))
        .min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 3,
        backoff: Duration::from_secs(1),
    };

    #[test]
    fn a_due_time_further_out_than_the_policy_waits_is_clamped() {
        let now = 1_000_000;
        assert_eq!(POLICY.longest_wait(), Duration::from_secs(64));
        assert_eq!(POLICY.clamp_due(now + 5_000, now), now + 5_000);
        assert_eq!(POLICY.clamp_due(i64::MAX, now), now + 64_000);
        assert_eq!(
            POLICY.clamp_due(i64::MIN, now),
            0,
            "a wait computed from it cannot overflow"
        );
        let slow = RetryPolicy {
            max_attempts: 3,
            backoff: Duration::from_secs(600),
        };
        assert_eq!(slow.longest_wait(), MAX_BACKOFF);
        assert_eq!(slow.clamp_due(i64::MAX, i64::MAX - 1), i64::MAX);
    }

    fn failure(kind: FailureKind, cause: Cause) -> Failure {
        Failure {
            event: EventIdx::new(0),
            group: GroupId::new(0),
            kind,
            cause,
            reason: "x".into(),
        }
    }

    #[test]
    fn backoff_doubles_and_attempts_run_out() {
        let step = |attempts| POLICY.next_step(FailureKind::Retryable, Cause::Plugin, attempts, 0);
        assert_eq!(step(1), NextStep::Retry { due_ms: 1000 });
        assert_eq!(step(2), NextStep::Retry { due_ms: 2000 });
        assert_eq!(step(3), NextStep::DeadLetter);
        let slow = RetryPolicy {
            max_attempts: 100,
            backoff: Duration::from_secs(600),
        };
        assert_eq!(
            slow.next_step(FailureKind::Retryable, Cause::Plugin, 30, 0),
            NextStep::Retry { due_ms: 3_600_000 },
            "at most an hour"
        );
    }

    #[test]
    fn invalid_events_are_dead_lettered_at_once_whatever_the_cause() {
        for cause in [Cause::Plugin, Cause::Check, Cause::Store] {
            assert_eq!(
                POLICY.next_step(FailureKind::Invalid, cause, 1, 0),
                NextStep::DeadLetter
            );
            assert_eq!(
                POLICY.in_place(&failure(FailureKind::Invalid, cause), 1, InPlace::All),
                None
            );
        }
    }

    #[test]
    fn store_outages_never_run_out_of_attempts() {
        assert_eq!(
            POLICY.next_step(FailureKind::Retryable, Cause::Store, 1_000, 0),
            NextStep::Retry { due_ms: 64_000 }
        );
        assert_eq!(
            POLICY.attempt_limit(FailureKind::Retryable, Cause::Plugin),
            3
        );
    }

    #[test]
    fn in_place_store_only_retries_the_store_from_its_own_backoff() {
        let store = failure(FailureKind::Retryable, Cause::Store);
        let plugin = failure(FailureKind::Retryable, Cause::Plugin);
        let mode = InPlace::StoreOnly(3);
        assert_eq!(POLICY.in_place(&store, 1, mode), Some(STORE_BACKOFF));
        assert_eq!(POLICY.in_place(&store, 2, mode), Some(STORE_BACKOFF * 2));
        assert_eq!(POLICY.in_place(&store, 3, mode), None);
        assert_eq!(
            POLICY.in_place(&plugin, 1, mode),
            None,
            "to the retry topic at once"
        );
    }

    #[test]
    fn in_place_all_retries_every_retryable_failure_up_to_the_groups_attempts() {
        let plugin = failure(FailureKind::Retryable, Cause::Plugin);
        assert_eq!(
            POLICY.in_place(&plugin, 1, InPlace::All),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            POLICY.in_place(&plugin, 2, InPlace::All),
            Some(Duration::from_secs(2))
        );
        assert_eq!(POLICY.in_place(&plugin, 3, InPlace::All), None);
    }
}
