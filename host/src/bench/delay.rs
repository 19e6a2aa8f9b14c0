//! A wait that takes what it says, for the benches' simulated sink latency.
//!
//! `tokio::time::sleep(2ms)` takes 2.5–3 ms here: tokio's timer wheel has millisecond slots
//! and rounds a deadline up to the next one, so a bench "at L = 2 ms" would really run at
//! ~2.7 ms and its ceiling `C / L` would be wrong by a third. [`Delays`] keeps the deadlines
//! of every waiter in one heap on a thread of its own, which sleeps with `nanosleep` (tens
//! of microseconds of slack) until the earliest one and wakes exactly the waiters that are
//! due. One thread for any number of concurrent waits, no spinning on a tokio worker.

use std::collections::BinaryHeap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// A deadline and whom to wake; ordered so the heap's top is the earliest.
struct Waiter(Instant, oneshot::Sender<()>);

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl Eq for Waiter {}
impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Waiter {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.0.cmp(&self.0)
    }
}

#[derive(Default)]
struct Queue {
    heap: Mutex<BinaryHeap<Waiter>>,
    changed: Condvar,
}

/// Precise waits (see the module docs). The timer thread ends when the last handle is dropped.
#[derive(Clone)]
pub struct Delays {
    queue: Arc<Queue>,
}

impl Default for Delays {
    fn default() -> Self {
        Delays::new()
    }
}

impl Delays {
    pub fn new() -> Delays {
        let queue = Arc::new(Queue::default());
        let weak = Arc::downgrade(&queue);
        std::thread::Builder::new()
            .name("bench-delays".into())
            .spawn(move || {
                while let Some(queue) = weak.upgrade() {
                    let mut heap = queue.heap.lock().unwrap_or_else(|p| p.into_inner());
                    let now = Instant::now();
                    while heap.peek().is_some_and(|w| w.0 <= now) {
                        let Some(Waiter(_, tx)) = heap.pop() else {
                            break;
                        };
                        let _ = tx.send(());
                    }
                    let next = heap.peek().map(|w| w.0);
                    match next {
                        // Sleep outside the lock so new waiters can queue meanwhile; one
                        // earlier than `next` only waits up to this sleep's slack.
                        Some(at) if at - now < Duration::from_millis(1) => {
                            drop(heap);
                            std::thread::sleep(at - now);
                        }
                        Some(at) => {
                            let _ = queue
                                .changed
                                .wait_timeout(heap, (at - now) - Duration::from_micros(500));
                        }
                        None => {
                            let _ = queue.changed.wait_timeout(heap, Duration::from_millis(50));
                        }
                    }
                }
            })
            .expect("spawn the bench delay thread");
        Delays { queue }
    }

    /// Wait `d` (within tens of microseconds).
    pub async fn wait(&self, d: Duration) {
        let (tx, rx) = oneshot::channel();
        {
            let mut heap = self.queue.heap.lock().unwrap_or_else(|p| p.into_inner());
            heap.push(Waiter(Instant::now() + d, tx));
        }
        self.queue.changed.notify_one();
        let _ = rx.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_end_in_deadline_order_and_not_before_their_time() {
        let delays = Delays::new();
        let start = Instant::now();
        let (a, b) = tokio::join!(
            async {
                delays.wait(Duration::from_millis(6)).await;
                Instant::now()
            },
            async {
                delays.wait(Duration::from_millis(2)).await;
                Instant::now()
            }
        );
        assert!(b < a, "the shorter wait ends first");
        assert!(b - start >= Duration::from_millis(2));
        assert!(a - start >= Duration::from_millis(6));
    }
}
