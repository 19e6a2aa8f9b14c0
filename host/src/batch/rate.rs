//! The backfill write-rate limit: a token bucket shared by every shard of a process, so
//! a backfill cannot take the store's whole capacity from the stream.

use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;

pub struct RateLimit {
    /// Rows per second; 0 = unlimited.
    rate: u64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimit {
    pub fn new(rows_per_sec: u64) -> RateLimit {
        RateLimit {
            rate: rows_per_sec,
            state: Mutex::new((rows_per_sec as f64, Instant::now())),
        }
    }

    /// Wait until `rows` may be written. Bursts up to one second's worth; a request larger
    /// than that waits for the debt it creates (so large batches still average out).
    pub async fn acquire(&self, rows: u64) {
        if self.rate == 0 || rows == 0 {
            return;
        }
        let wait = {
            let mut s = self.state.lock().await;
            let (tokens, last) = &mut *s;
            let now = Instant::now();
            *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate as f64)
                .min(self.rate as f64);
            *last = now;
            *tokens -= rows as f64;
            (*tokens < 0.0).then(|| Duration::from_secs_f64(-*tokens / self.rate as f64))
        };
        if let Some(w) = wait {
            tokio::time::sleep(w).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn holds_the_average_rate() {
        let limit = RateLimit::new(1000);
        let start = tokio::time::Instant::now();
        for _ in 0..30 {
            limit.acquire(100).await;
        }
        // 3000 rows at 1000/s with a 1000-row burst: about 2 s of (virtual) time.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(1900), "{took:?}");
        assert!(took <= Duration::from_millis(2100), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn zero_means_unlimited() {
        let limit = RateLimit::new(0);
        let start = tokio::time::Instant::now();
        limit.acquire(1_000_000).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
