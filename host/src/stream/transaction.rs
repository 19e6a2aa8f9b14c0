//! Transactional hand-off: the records a host hands to retry and dead-letter topics and the
//! offset commits that finish their source events are committed in one Kafka transaction.
//!
//! **Guarantee.** A hand-off record becomes visible to `read_committed` readers — the host's
//! own retry consumer, `dlq replay`, and anyone reading the topics with that isolation level —
//! exactly when the commit that finishes its source offset (in the low watermark or the
//! finished-offset map, [`super::offset_map`]) is. A host that dies leaves its open
//! transaction to the broker, which aborts it `FH_KAFKA_TRANSACTION_TIMEOUT` after it was
//! opened (at once when a host with the same `FH_KAFKA_TRANSACTIONAL_ID` starts); the next
//! owner hands the events off again — for the first time, as far as any reader can tell. A
//! zombie (a member the group has moved on from) is fenced: its offsets carry its group
//! generation (KIP-447), the coordinator refuses them, and its transaction aborts.
//!
//! **How.** A transaction is open between commits. A batch's hand-offs and the finishing of
//! its units happen under a shared [`gate`](Transactions::enter), only while the transaction
//! is open; a commit takes the gate exclusively, so every record in the transaction belongs
//! to a finished unit, and the offsets sent with it cover that unit. A failed delivery fails
//! the transaction (Kafka cannot drop one record of it): the hand-off
//! [poisons](Transactions::poison) it, and the commit aborts it instead; the consumer then
//! rewinds every partition that handed off in it to its last commit, as a rebalance would.
//! A commit or abort the brokers cannot answer now (an outage) is retried at the next
//! interval; hand-offs wait for the next transaction meanwhile.
//!
//! **A stuck producer is replaced.** librdkafka's transactional calls should return within
//! their timeout, but `send_offsets_to_transaction` can wait for as long as the group's
//! coordinator stays away when its broker dies (librdkafka issues 5456 and 5511, open in
//! 2.12) — on the poll thread, that would stall every partition. Each call runs on a thread
//! of its own and is waited for a bounded time; one that overruns marks the producer
//! [wedged](State::Wedged), and the next commit replaces it with a new producer of the same
//! transactional id, which fences the stuck one: its transaction is aborted (or, if its
//! commit had reached the coordinator, completed) by the brokers, and the partitions that
//! handed off in it are rewound to what the brokers say was committed.
//!
//! **Limit.** `read_committed` readers of a partition wait behind an open transaction: after
//! a crash, a retry or dead letter of the crashed host's partitions is read up to
//! `FH_KAFKA_TRANSACTION_TIMEOUT` late.

use super::handoff::{Destination, Refusals};
use super::kafka::{KafkaClient, KafkaContext, Republisher};
use crate::metrics::{GroupLabels, Metrics};
use rdkafka::TopicPartitionList;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::producer::{FutureProducer, Producer as _};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// How much longer than its own timeout a transactional call is waited for before its
/// producer counts as stuck.
const CALL_MARGIN: Duration = Duration::from_secs(5);

/// How long registering a transactional id may take (the brokers abort a fenced
/// producer's open transaction first).
const INIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a commit did not happen.
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    /// The transaction was aborted (and the next one opened): its records are gone, its
    /// offsets not committed. Partitions that handed off in it must be rewound.
    #[error("transaction aborted: {reason}")]
    Aborted {
        reason: String,
        /// The brokers refused the offsets' metadata as too large.
        metadata_too_large: bool,
    },
    /// The brokers did not answer in time: the commit (or the abort) is retried by the next
    /// call; nothing is decided yet.
    #[error("transaction not finished yet: {0}")]
    Pending(String),
    /// The producer cannot go on (fenced by another producer with its transactional id, or
    /// an unrecoverable client error): the consumer must stop.
    #[error("transactional producer failed for good: {0}")]
    Fatal(String),
}

/// Where the transaction is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Hand-offs may add records.
    Open,
    /// `commit_transaction` did not finish; call it again.
    Committing,
    /// Must be aborted (a delivery or the commit failed).
    Doomed {
        reason: String,
        metadata_too_large: bool,
    },
    /// A call did not return in time: the producer must be replaced, which ends its
    /// transaction.
    Wedged { reason: String },
}

/// The consumer's transactional producer and the open transaction's state.
pub struct Transactions {
    /// Swapped for a new one when it is stuck ([`State::Wedged`]); only under the exclusive
    /// gate, so no hand-off is using it then.
    republisher: RwLock<Arc<Republisher>>,
    client: KafkaClient,
    id: String,
    timeout: Duration,
    gate: tokio::sync::RwLock<()>,
    state: Mutex<State>,
    /// Permanent refusals kept across aborts ([`super::handoff`]).
    pub refusals: Refusals,
    /// How long one transactional call may block the poll thread.
    call_timeout: Duration,
    /// Hand-offs are counted when their transaction commits.
    metrics: Arc<Metrics>,
}

impl Transactions {
    /// A transactional producer with `id` (unique per live host) and the broker-side
    /// `timeout` of its transactions. Call [`start`](Self::start) before the first hand-off.
    pub fn new(
        client: &KafkaClient,
        id: &str,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        Ok(Transactions {
            republisher: RwLock::new(Arc::new(Republisher::transactional(client, id, timeout)?)),
            client: client.clone(),
            id: id.to_owned(),
            timeout,
            gate: tokio::sync::RwLock::new(()),
            state: Mutex::new(State::Open),
            refusals: Refusals::default(),
            call_timeout: timeout.min(Duration::from_secs(10)),
            metrics,
        })
    }

    /// Register the transactional id (fencing an earlier producer with it, whose open
    /// transaction is aborted) and open the first transaction. Blocking.
    pub fn start(&self) -> anyhow::Result<()> {
        let r = self.republisher();
        bounded(&r, "init_transactions", INIT_TIMEOUT, |p, t| p.init_transactions(t))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .map_err(|e| anyhow::anyhow!("cannot initialize Kafka transactions: {e} (the brokers must allow transactions, and the principal needs Write and Describe on its transactional id)"))?;
        r.producer()
            .begin_transaction()
            .map_err(|e| anyhow::anyhow!("cannot begin a Kafka transaction: {e}"))
    }

    /// The producer of the open transaction.
    pub fn republisher(&self) -> Arc<Republisher> {
        self.republisher
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Run `call` on the current producer with the call timeout; an overrun wedges it.
    fn call<T: Send + 'static>(
        &self,
        what: &'static str,
        call: impl FnOnce(&FutureProducer<KafkaContext>, Duration) -> KafkaResult<T> + Send + 'static,
    ) -> Result<KafkaResult<T>, TxnError> {
        bounded(&self.republisher(), what, self.call_timeout, call).inspect_err(|e| {
            *self.state() = State::Wedged {
                reason: e.to_string(),
            };
        })
    }

    /// Enter the shared gate: hold it from a batch's first hand-off until its units are
    /// finished, so that no commit falls in between. `None` while no transaction takes
    /// records (one is being committed or must be aborted): try again shortly.
    pub async fn enter(&self) -> Option<tokio::sync::RwLockReadGuard<'_, ()>> {
        let gate = self.gate.read().await;
        (*self.state() == State::Open).then_some(gate)
    }

    /// A delivery in the open transaction failed, or its records must not become visible:
    /// the next commit aborts it. A transaction whose commit is under way can no longer be
    /// aborted (librdkafka only resumes the commit): false then.
    pub fn poison(&self, reason: String) -> bool {
        let mut state = self.state();
        match *state {
            State::Open => {
                *state = State::Doomed {
                    reason,
                    metadata_too_large: false,
                };
                true
            }
            State::Doomed { .. } | State::Wedged { .. } => true,
            State::Committing => false,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hold the gate exclusively: no hand-off is in progress or starts until it is dropped.
    /// Blocking (the poll thread): waits for the hand-offs in progress.
    pub fn exclusive(&self) -> Exclusive<'_> {
        Exclusive {
            txn: self,
            _gate: self.gate.blocking_write(),
        }
    }
}

/// The transaction with no hand-off in progress: what to commit is read under it.
pub struct Exclusive<'a> {
    txn: &'a Transactions,
    _gate: tokio::sync::RwLockWriteGuard<'a, ()>,
}

impl Exclusive<'_> {
    /// Whether the transaction must be aborted (or its commit finished) before anything else.
    pub fn unsettled(&self) -> bool {
        *self.txn.state() != State::Open
    }

    /// Commit the open transaction with `offsets` (and their metadata) for `group`, then open
    /// the next. A transaction that must be aborted is aborted instead, and one whose commit
    /// did not finish is finished ([`Committed::Earlier`]: `offsets` were not sent). Blocking.
    pub fn commit(
        &self,
        offsets: &TopicPartitionList,
        group: Option<ConsumerGroupMetadata>,
    ) -> Result<Committed, TxnError> {
        let txn = self.txn;
        let state = txn.state().clone();
        match state {
            State::Wedged { reason } => return txn.replace(reason).map(|()| Committed::Now),
            State::Doomed {
                reason,
                metadata_too_large,
            } => {
                return txn
                    .abort(reason, metadata_too_large)
                    .map(|()| Committed::Now);
            }
            State::Committing => return txn.finish_commit().map(|()| Committed::Earlier),
            State::Open => {}
        }
        if offsets.count() > 0 {
            let Some(group) = group else {
                return Err(TxnError::Pending(
                    "the consumer has no group metadata yet".into(),
                ));
            };
            let offsets = offsets.clone();
            let sent = txn.call("send_offsets_to_transaction", move |p, t| {
                p.send_offsets_to_transaction(&offsets, &group, t)
            })?;
            if let Err(e) = sent {
                return match classify(&e) {
                    Class::Retry => Err(TxnError::Pending(format!("offsets not sent: {e}"))),
                    Class::Fatal => Err(TxnError::Fatal(e.to_string())),
                    Class::Abort => {
                        let too_large = e.rdkafka_error_code()
                            == Some(rdkafka::types::RDKafkaErrorCode::OffsetMetadataTooLarge);
                        txn.abort(format!("offsets refused: {e}"), too_large)
                            .map(|()| Committed::Now)
                    }
                };
            }
        }
        *txn.state() = State::Committing;
        txn.finish_commit().map(|()| Committed::Now)
    }
}

/// What a successful [`Exclusive::commit`] committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// The given offsets, with the transaction's records.
    Now,
    /// An earlier call's offsets and records, whose commit had not finished; the given
    /// offsets were not sent.
    Earlier,
}

impl Transactions {
    /// `commit_transaction`, then the next transaction.
    fn finish_commit(&self) -> Result<(), TxnError> {
        if let Err(e) = self.call("commit_transaction", |p, t| p.commit_transaction(t))? {
            return match classify(&e) {
                Class::Retry => Err(TxnError::Pending(format!("commit not finished: {e}"))),
                Class::Fatal => Err(TxnError::Fatal(e.to_string())),
                Class::Abort => self.abort(format!("commit failed: {e}"), false),
            };
        }
        self.metrics.transaction_pending_records.set(0);
        for (group, destination) in self.refusals.committed() {
            let labels = GroupLabels::new(&group);
            match destination {
                Destination::Retry => self.metrics.retries.get_or_create(&labels).inc(),
                Destination::DeadLetter => self.metrics.dead_letters.get_or_create(&labels).inc(),
            };
        }
        self.begin()
    }

    /// Abort the transaction and open the next: `Aborted`, or `Pending` (the state stays
    /// doomed) when the brokers do not answer.
    fn abort(&self, reason: String, metadata_too_large: bool) -> Result<(), TxnError> {
        *self.state() = State::Doomed {
            reason: reason.clone(),
            metadata_too_large,
        };
        if let Err(e) = self.call("abort_transaction", |p, t| p.abort_transaction(t))? {
            return match classify(&e) {
                Class::Fatal => Err(TxnError::Fatal(format!(
                    "cannot abort the transaction: {e}"
                ))),
                _ => Err(TxnError::Pending(format!("abort not finished: {e}"))),
            };
        }
        tracing::warn!(%reason, "Kafka transaction aborted; partitions that handed off in it are rewound to their last commit");
        self.refusals.aborted();
        self.metrics.transaction_pending_records.set(0);
        self.begin()?;
        Err(TxnError::Aborted {
            reason,
            metadata_too_large,
        })
    }

    /// Replace a stuck producer with a new one of the same transactional id: registering it
    /// fences the stuck one and ends its transaction, whose outcome the rewind reads back
    /// from the brokers (`Aborted`), or `Pending` while the brokers cannot register it (the
    /// producer stays wedged; the next commit tries again).
    fn replace(&self, reason: String) -> Result<(), TxnError> {
        let fresh = Republisher::transactional(&self.client, &self.id, self.timeout)
            .map(Arc::new)
            .map_err(|e| {
                TxnError::Pending(format!("cannot create a new transactional producer: {e:#}"))
            })?;
        match bounded(&fresh, "init_transactions", INIT_TIMEOUT, |p, t| {
            p.init_transactions(t)
        })? {
            Ok(()) => {}
            Err(e) if classify(&e) == Class::Fatal => {
                return Err(TxnError::Fatal(format!(
                    "cannot register a new transactional producer: {e}"
                )));
            }
            Err(e) => {
                return Err(TxnError::Pending(format!(
                    "a new transactional producer is not registered yet: {e}"
                )));
            }
        }
        let stuck = std::mem::replace(
            &mut *self.republisher.write().unwrap_or_else(|p| p.into_inner()),
            fresh,
        );
        // Destroying a client waits for its threads, and this one's may be stuck.
        std::thread::spawn(move || drop(stuck));
        tracing::error!(%reason, "the transactional producer was stuck and is replaced; partitions that handed off in its transaction are rewound to their last commit");
        self.metrics.kafka_producer_replacements.inc();
        self.refusals.aborted();
        self.metrics.transaction_pending_records.set(0);
        self.begin()?;
        Err(TxnError::Aborted {
            reason,
            metadata_too_large: false,
        })
    }

    fn begin(&self) -> Result<(), TxnError> {
        self.republisher()
            .producer()
            .begin_transaction()
            .map_err(|e| TxnError::Fatal(format!("cannot begin the next transaction: {e}")))?;
        *self.state() = State::Open;
        Ok(())
    }
}

/// Run `call` on `republisher`'s producer with `timeout`, on a thread of its own, and wait
/// for it `timeout` and [`CALL_MARGIN`]: an overrun is `Pending`, the thread is left to
/// finish whenever librdkafka lets it (it holds its own handle on the producer).
fn bounded<T: Send + 'static>(
    republisher: &Arc<Republisher>,
    what: &'static str,
    timeout: Duration,
    call: impl FnOnce(&FutureProducer<KafkaContext>, Duration) -> KafkaResult<T> + Send + 'static,
) -> Result<KafkaResult<T>, TxnError> {
    let r = republisher.clone();
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("fh-kafka-txn".into())
        .spawn(move || {
            let _ = tx.send(call(r.producer(), timeout));
        })
        .map_err(|e| TxnError::Pending(format!("cannot start a thread for {what}: {e}")))?;
    rx.recv_timeout(timeout + CALL_MARGIN).map_err(|_| {
        TxnError::Pending(format!(
            "{what} did not return within {:?} (a coordinator that went away with its broker): the transactional producer is replaced",
            timeout + CALL_MARGIN
        ))
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Retry,
    Abort,
    Fatal,
}

fn classify(e: &KafkaError) -> Class {
    match e {
        KafkaError::Transaction(t) if t.is_fatal() => Class::Fatal,
        KafkaError::Transaction(t) if t.txn_requires_abort() => Class::Abort,
        KafkaError::Transaction(t) if t.is_retriable() => Class::Retry,
        KafkaError::Transaction(_) => Class::Abort,
        // The flush before a commit timed out: not decided yet.
        _ => Class::Retry,
    }
}
