//! A click stream through real hosts, with the checks every delivery test ends on: exact
//! totals (nothing lost, nothing applied twice) and every partition committed to its end.

use crate::*;
use std::collections::BTreeMap;
use std::time::Duration;

/// Users the click stream is spread over.
pub const USERS: usize = 40;

/// A topic, a table, and one group `<prefix>-<id>` on them, on a stack.
pub struct Setup {
    pub stack: Stack,
    pub id: String,
    pub topic: String,
    pub table: String,
    pub group: String,
    pub tmp: std::path::PathBuf,
    pub spec_dir: std::path::PathBuf,
}

impl Setup {
    /// A topic of `partitions` on `stack`, a table, and one group on them running `wasm`.
    pub async fn new(
        stack: Stack,
        prefix: &str,
        partitions: i32,
        wasm: &str,
        features: &[(&str, &str)],
        config: &str,
        extra: &str,
    ) -> Setup {
        let id = unique();
        let topic = format!("{prefix}-{id}");
        let table = format!("features-{id}");
        let group = format!("{prefix}-{id}");
        let tmp = std::env::temp_dir().join(format!("fh-e2e-{id}"));
        let spec_dir = tmp.join("specs");
        std::fs::create_dir_all(&spec_dir).unwrap();
        std::fs::write(
            spec_dir.join("group.yaml"),
            group_spec(&group, &[&topic], wasm, features, config, &table, extra),
        )
        .unwrap();
        stack.create_topics(&[&topic], partitions).await;
        Setup {
            stack,
            id,
            topic,
            table,
            group,
            tmp,
            spec_dir,
        }
    }

    /// The user-activity plugin counting clicks, on a topic of `partitions`.
    pub async fn clicks(stack: Stack, partitions: i32) -> Setup {
        Setup::new(
            stack,
            "clicks",
            partitions,
            "user_activity.wasm",
            &[
                ("clicks", "int"),
                ("views", "int"),
                ("last_viewed", "string-list"),
            ],
            "{entity_field: user_id, list_field: item_id, last_k: 3}",
            "",
        )
        .await
    }

    /// A host environment for consumer group `group_id` with its own data dir `name`.
    pub fn env(&self, group_id: &str, name: &str) -> Vec<(&'static str, String)> {
        let mut e = self.stack.host_env(&self.tmp, &self.spec_dir, group_id);
        e.retain(|(k, _)| *k != "FH_DATA_DIR");
        e.push(("FH_DATA_DIR", self.tmp.join(name).display().to_string()));
        e
    }

    /// Clicks stored so far, over every user.
    pub async fn stored(&self, ddb: &aws_sdk_dynamodb::Client) -> i64 {
        counts(ddb, &self.table, &self.group, "clicks")
            .await
            .values()
            .sum()
    }

    /// Wait until the stored counts reach `want` in total, then check they stay exactly
    /// `want`.
    pub async fn assert_exact_counts(&self, want: &BTreeMap<String, i64>) {
        let ddb = self.stack.dynamodb().await;
        let total: i64 = want.values().sum();
        let start = std::time::Instant::now();
        loop {
            let got = counts(&ddb, &self.table, &self.group, "clicks").await;
            let sum: i64 = got.values().sum();
            assert!(sum <= total, "over-counted: {sum} > {total}: {got:?}");
            if sum == total {
                break;
            }
            if start.elapsed() > Duration::from_secs(180) {
                let short: BTreeMap<_, _> = want
                    .iter()
                    .filter(|(u, n)| got.get(*u) != Some(n))
                    .map(|(u, n)| (u, (got.get(u).copied().unwrap_or(0), *n)))
                    .collect();
                panic!(
                    "{sum} of {total} clicks counted after 180 s; (got, want) where they differ: {short:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Anything still in flight (a duplicate) would land now.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let got = counts(&ddb, &self.table, &self.group, "clicks").await;
        assert_eq!(&got, want, "every counter exact");
    }

    /// Every counter exact after the first `n` clicks; then `host` stops with SIGTERM (exit
    /// 0) having committed every partition of the topic to its end.
    pub async fn exact_and_committed(&self, host: Host, group_id: &str, partitions: i32, n: usize) {
        self.assert_exact_counts(&expected(n)).await;
        self.stop_committed(host, group_id, partitions, n);
    }

    /// SIGTERM `host` (exit 0); every partition of the topic is then committed to its end
    /// (`n` messages in all).
    pub fn stop_committed(&self, mut host: Host, group_id: &str, partitions: i32, n: usize) {
        assert!(host.terminate().success(), "host exits 0 on SIGTERM");
        let committed = self.stack.committed(group_id, &self.topic, partitions);
        assert_eq!(
            committed.iter().sum::<i64>(),
            n as i64,
            "every partition committed to its end: {committed:?}"
        );
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

/// The event time of click `i` (see [`crate::ts`]).
pub fn click_time(i: usize) -> i64 {
    crate::ts(i as i64)
}

/// Click `i` of the stream (see [`crate::click`]).
pub fn click_event(i: usize) -> (String, String) {
    crate::click(i, USERS)
}

/// Clicks per user after clicks `0..n`.
pub fn expected(n: usize) -> BTreeMap<String, i64> {
    crate::expected_clicks(n, USERS)
}

/// Produce clicks `range` to `topic`, `pause` apart.
pub async fn produce_clicks(
    stack: &Stack,
    topic: &str,
    range: std::ops::Range<usize>,
    pause: Duration,
) {
    let p = stack.producer();
    for i in range {
        let (user, payload) = click_event(i);
        produce(&p, topic, &user, click_time(i), &payload, &[]).await;
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}

/// [`produce_clicks`] in the background.
pub fn produce_clicks_in_background(
    stack: &Stack,
    topic: &str,
    range: std::ops::Range<usize>,
    pause: Duration,
) -> tokio::task::JoinHandle<()> {
    let (stack, topic) = (stack.clone(), topic.to_owned());
    tokio::spawn(async move { produce_clicks(&stack, &topic, range, pause).await })
}
