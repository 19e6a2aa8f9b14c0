//! Confluent's Parallel Consumer, run beside our consumer by `bench stream`: the Java harness
//! in `bench/parallel-consumer/` (its jars fetched from Maven Central on first use), on the
//! same broker, topic, events, key count, concurrency C and sink latency L.

use anyhow::Context as _;
use std::path::PathBuf;
use std::time::Duration;

/// What one harness run measured.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    pub eps: f64,
    /// What its sink's wait really took per record, on average.
    pub latency_ms: f64,
}

/// The harness launcher: `FH_PARALLEL_CONSUMER_HARNESS`, else the one in this source tree.
pub fn harness() -> PathBuf {
    std::env::var_os("FH_PARALLEL_CONSUMER_HARNESS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/parallel-consumer/run")
        })
}

/// Why the harness cannot run here, if it cannot (then `bench stream` says so and goes on).
pub fn unavailable() -> Option<String> {
    let h = harness();
    if !h.is_file() {
        return Some(format!("{} not found", h.display()));
    }
    for tool in ["java", "mvn"] {
        let found = std::process::Command::new(tool)
            .arg("-version")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Some(format!("{tool} is not installed (scripts/stack install)"));
        }
    }
    None
}

/// Consume `events` messages of `topic` (one partition) as a new consumer group.
pub async fn run(
    brokers: &str,
    topic: &str,
    events: usize,
    concurrency: usize,
    latency: Duration,
) -> anyhow::Result<Measured> {
    let out = tokio::process::Command::new(harness())
        .args(["--bootstrap", brokers, "--topic", topic])
        .args(["--events", &events.to_string()])
        .args(["--concurrency", &concurrency.to_string()])
        .args(["--latency-us", &latency.as_micros().to_string()])
        .args(["--group", &format!("bench-pc-{}", super::unique())])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .with_context(|| format!("cannot run {}", harness().display()))?;
    anyhow::ensure!(
        out.status.success(),
        "the Parallel Consumer harness failed ({})",
        out.status
    );
    parse(&String::from_utf8_lossy(&out.stdout))
}

/// The harness's `name=value` lines.
fn parse(stdout: &str) -> anyhow::Result<Measured> {
    let value = |name: &str| -> anyhow::Result<f64> {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('=')?.trim().parse().ok())
            .with_context(|| format!("the harness printed no {name}=: {stdout:?}"))
    };
    Ok(Measured {
        eps: value("eps")?,
        latency_ms: value("measured_latency_ms")?,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_harness_output_is_read_by_name() {
        let m = super::parse("eps=7812.5\nmeasured_latency_ms=2.07\n").unwrap();
        assert_eq!((m.eps, m.latency_ms), (7812.5, 2.07));
        let e = super::parse("oops").unwrap_err().to_string();
        assert!(e.contains("eps="), "{e}");
    }
}
