//! Progress of the runs in this process: counters the shards bump, and the CLI's progress
//! line (rows, rows/s, ETA).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub struct Progress {
    rows: AtomicU64,
    failed: AtomicU64,
}

impl Progress {
    pub fn rows(&self, n: u64) {
        self.rows.fetch_add(n, Ordering::Relaxed);
    }

    pub fn failed(&self, n: u64) {
        self.failed.fetch_add(n, Ordering::Relaxed);
    }

    /// (rows finished, rows dead-lettered) since this process started.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.rows.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// One progress line. `done` counts rows finished by this run overall (including those a
/// previous attempt finished); `rate` is this process's rows/s.
pub fn line(run: &str, done: u64, total: Option<u64>, rate: f64, failed: u64) -> String {
    let mut s = format!("{run}: {} rows", group(done));
    if let Some(t) = total.filter(|t| *t > 0) {
        s.push_str(&format!(
            " of {} ({:.0}%)",
            group(t),
            done as f64 * 100.0 / t as f64
        ));
    }
    s.push_str(&format!(", {} rows/s", group(rate as u64)));
    if let Some(t) = total
        && rate > 0.0
        && t > done
    {
        let eta = Duration::from_secs(((t - done) as f64 / rate).ceil() as u64);
        s.push_str(&format!(", ETA {}", humantime::format_duration(eta)));
    }
    if failed > 0 {
        s.push_str(&format!(", {failed} dead-lettered"));
    }
    s
}

/// 1234567 → "1,234,567".
fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Rows/s over a sliding window of samples.
#[derive(Debug)]
pub struct Rate {
    samples: std::collections::VecDeque<(Instant, u64)>,
    window: Duration,
}

impl Rate {
    pub fn new(window: Duration) -> Rate {
        Rate {
            samples: Default::default(),
            window,
        }
    }

    pub fn sample(&mut self, rows: u64) -> f64 {
        let now = Instant::now();
        self.samples.push_back((now, rows));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > self.window)
            && self.samples.len() > 2
        {
            self.samples.pop_front();
        }
        let (t0, r0) = self.samples.front().copied().unwrap_or((now, rows));
        let dt = now.duration_since(t0).as_secs_f64();
        if dt <= 0.0 {
            0.0
        } else {
            rows.saturating_sub(r0) as f64 / dt
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_shows_rows_percent_rate_and_eta() {
        assert_eq!(
            line("r1", 25_000, Some(100_000), 5_000.0, 0),
            "r1: 25,000 rows of 100,000 (25%), 5,000 rows/s, ETA 15s"
        );
        assert_eq!(
            line("r1", 999, None, 0.0, 2),
            "r1: 999 rows, 0 rows/s, 2 dead-lettered"
        );
        assert_eq!(group(1_000), "1,000");
        assert_eq!(group(100), "100");
    }
}
