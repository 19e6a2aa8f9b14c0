//! `feature-host bench backfill`: rows/s of a local-engine backfill of a generated Parquet
//! click export (through the user-activity plugin into the configured stores), at 1, 2 and 4
//! shards, next to the sink ceiling measured in the same run.
//!
//! The ceiling sends the stores exactly the entity writes the backfill made — per batch of
//! `FH_BATCH_ROWS` rows, one item per distinct user in it, with the items' real sizes, from
//! as many concurrent streams as there are shards — with plain clients and none of our work
//! (no decoding, no plugin, no merge, no conditions, no checkpoints): DynamoDB `BatchGetItem`
//! per 100 keys and one `PutItem` per entity, plus one Redis pipeline (the group is
//! write-through), as in `bench sinks`. On the embedded store (no services configured) the
//! ceiling is our [`FeatureWriter`] alone, fed the same mutations precomputed.

use super::{Report, unique};
use crate::batch::executor::{Request, claim, execute, submit_backfill};
use crate::batch::{BatchContext, format::write_click_parquet};
use crate::config::{BatchSettings, StoreKind, StoreSettings};
use crate::feature::{Mutation, Op, Position, Value};
use crate::sink::dynamo::encode_item;
use crate::sink::redis_cache::RedisCache;
use anyhow::Context as _;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone, clap::Args)]
pub struct BackfillBenchArgs {
    /// Rows in the generated source.
    #[arg(long, default_value_t = 200_000)]
    pub rows: usize,
    /// Parquet files the rows are spread over.
    #[arg(long, default_value_t = 8)]
    pub files: usize,
    /// Rows per Parquet row group.
    #[arg(long, default_value_t = 10_000)]
    pub group_rows: usize,
    /// Distinct users (entities).
    #[arg(long, default_value_t = 5_000)]
    pub users: usize,
    /// Shard counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub shards: Vec<u32>,
    #[command(flatten)]
    pub stores: StoreSettings,
    #[command(flatten)]
    pub batch: BatchSettings,
}

fn row(i: usize, users: usize) -> (String, String, &'static str, i64) {
    (
        format!("u{}", (i * 7919) % users),
        format!("i{i}"),
        if i.is_multiple_of(3) { "view" } else { "click" },
        1_764_000_000_000 + i as i64,
    )
}

pub async fn run(args: BackfillBenchArgs) -> anyhow::Result<Report> {
    let id = unique();
    let dir = std::env::temp_dir().join(format!("fh-bench-backfill-{id}"));
    let data = dir.join("export");
    std::fs::create_dir_all(&data)?;
    let per_file = args.rows.div_ceil(args.files.max(1));
    let rows: Vec<_> = (0..args.rows).map(|i| row(i, args.users)).collect();
    for (f, chunk) in rows.chunks(per_file).enumerate() {
        write_click_parquet(
            &data.join(format!("part-{f:03}.parquet")),
            chunk,
            args.group_rows,
        )?;
    }
    let specs_dir = dir.join("specs");
    std::fs::create_dir_all(&specs_dir)?;
    for &s in &args.shards {
        std::fs::write(
            specs_dir.join(format!("s{s}.yaml")),
            format!(
                "{}---
apiVersion: feature-host/v1
kind: Ingestion
metadata: {{name: bench-{id}-s{s}}}
spec:
  featureGroup: bench-{id}-s{s}
  source: {{uri: \"{}/*.parquet\", format: parquet}}
  parallelism: {s}
",
                super::group_yaml(&format!("bench-{id}-s{s}"), None, "write-through"),
                data.display()
            ),
        )?;
    }
    let mut stores = args.stores.clone();
    stores.spec_dir = specs_dir.clone();
    if stores.store_kind() == StoreKind::Embedded {
        stores.data_dir = dir.join("data");
    }
    // The export lies beside the specs.
    let scope = crate::spec::SpecScope::new(std::slice::from_ref(&dir), None)?;
    let specs = crate::spec::load_dir_in(&specs_dir, &stores.plugin_dir, &scope)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let jobs_table = format!("bench-jobs-{id}");
    let (writer, jobs) = crate::app::connect(&stores, Some(&jobs_table)).await?;
    crate::app::ensure_tables(&writer, &specs).await?;
    let pipeline = Arc::new(crate::app::build_pipeline(&specs, writer.clone()).await?);
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let dynamo = match stores.store_kind() {
        StoreKind::Dynamodb => Some(
            crate::sink::dynamo::DynamoStore::connect(stores.dynamodb_endpoint.as_deref())
                .await
                .client()
                .clone(),
        ),
        _ => None,
    };
    let redis = match &stores.redis_url {
        Some(url) if dynamo.is_some() => Some(
            redis::Client::open(url.expose())?
                .get_connection_manager()
                .await?,
        ),
        _ => None,
    };
    let batch_rows = args.batch.rows_per_batch.max(1);
    eprintln!(
        "backfill: {} rows, {} files, {} users, {} rows per batch, on {} ({} ceiling)",
        args.rows,
        args.files,
        args.users,
        batch_rows,
        writer.store().backend(),
        if dynamo.is_some() {
            "plain-client"
        } else {
            "writer-only"
        }
    );
    let mut report = Report::default();
    report.add("backfill_rows", args.rows as f64);
    let specs = Arc::new(specs);
    let mut per_shard_1 = None;
    for (n, &s) in args.shards.iter().enumerate() {
        let name = format!("bench-{id}-s{s}");
        let mut settings = args.batch.clone();
        settings.workers = s as usize;
        let ctx = BatchContext::new(
            pipeline.clone(),
            specs.clone(),
            jobs.clone().context("job state")?,
            settings,
            crate::stream::dead_letter::DeadLetterFile::new(dir.join("dead-letters.jsonl")),
            stop.clone(),
            "127.0.0.1:8080",
            crate::batch::owner_id(),
        );
        let start = Instant::now();
        let run = submit_backfill(
            &ctx.jobs,
            &specs,
            &Request {
                ingestion: name.clone(),
                ..Default::default()
            },
            None,
        )
        .await?;
        anyhow::ensure!(claim(&ctx, &run.id).await?, "cannot claim the bench run");
        let done = execute(&ctx, &run.id).await?;
        let took = start.elapsed().as_secs_f64();
        anyhow::ensure!(
            done.status == crate::batch::run::Status::Succeeded,
            "bench backfill {} {}: {:?}",
            run.id,
            done.status,
            done.reason
        );
        let rows_per_s = args.rows as f64 / took;

        // The ceiling: the same entity writes per batch, from `s` concurrent streams.
        let shards = crate::batch::run::list_shards(&ctx.jobs, &run.id).await?;
        let mut streams: Vec<Vec<Vec<usize>>> = Vec::new(); // shard → batches → row indices
        let mut offset = 0usize;
        for sh in &shards {
            let n_rows = sh.value.checkpoint.rows_done as usize;
            let idx: Vec<usize> = (offset..offset + n_rows).collect();
            streams.push(idx.chunks(batch_rows).map(<[usize]>::to_vec).collect());
            offset += n_rows;
        }
        anyhow::ensure!(
            offset == args.rows,
            "shards cover {offset} of {} rows",
            args.rows
        );
        let sink = pipeline.group(&name).context("bench group")?.sink.clone();
        let ceiling_time = match (&dynamo, &redis) {
            (Some(client), Some(redis)) => {
                let users: Vec<String> = (0..args.users).map(|u| format!("u{u}")).collect();
                let mut items = BTreeMap::new();
                for chunk in users.chunks(100) {
                    let keys: Vec<String> = chunk.iter().map(|u| sink.target.key(u)).collect();
                    for (u, v) in chunk.iter().zip(
                        ctx.pipeline
                            .writer()
                            .store()
                            .load(&sink.target, &keys)
                            .await?,
                    ) {
                        if let Some(v) = v? {
                            items.insert(u.clone(), (sink.target.key(u), v));
                        }
                    }
                }
                let items = Arc::new(items);
                let start = Instant::now();
                let rows = &rows;
                let tasks = streams.into_iter().map(|batches| {
                    let (client, redis, items, table) = (
                        client.clone(),
                        redis.clone(),
                        items.clone(),
                        sink.target.table.clone(),
                    );
                    async move {
                        for b in batches {
                            let users: BTreeSet<&str> =
                                b.iter().map(|&i| rows[i].0.as_str()).collect();
                            let entries: Vec<&(String, crate::feature::Versioned)> =
                                users.iter().filter_map(|u| items.get(*u)).collect();
                            let keys: Vec<String> =
                                entries.iter().map(|(k, _)| k.clone()).collect();
                            let dynamo_items: Vec<_> =
                                entries.iter().map(|(k, v)| encode_item(k, v)).collect();
                            super::sinks::raw_dynamodb(&client, &table, &keys, &dynamo_items)
                                .await?;
                            let cached = entries
                                .iter()
                                .map(|(k, v)| Ok((format!("fh:raw:{k}"), RedisCache::fields(v)?)))
                                .collect::<Result<Vec<_>, crate::sink::SinkError>>()?;
                            super::sinks::raw_redis_pipeline(&redis, &cached, false).await?;
                        }
                        anyhow::Ok(())
                    }
                });
                for r in futures::future::join_all(tasks).await {
                    r?;
                }
                start.elapsed().as_secs_f64()
            }
            _ => {
                // Writer-only: the plugin's mutations precomputed, applied batch by batch.
                let start = Instant::now();
                let source = format!("ceiling-{}", unique());
                let rows = &rows;
                let tasks = streams.into_iter().enumerate().map(|(sh, batches)| {
                    let (writer, sink, source) =
                        (ctx.pipeline.writer().clone(), sink.clone(), source.clone());
                    async move {
                        for b in batches {
                            let muts: Vec<(String, Mutation)> = b
                                .iter()
                                .map(|&i| {
                                    let r = &rows[i];
                                    let mut ops = vec![(
                                        if r.2 == "click" { "clicks" } else { "views" }.to_owned(),
                                        Op::Incr(Value::Int(1)),
                                        r.3,
                                    )];
                                    if r.2 == "view" {
                                        ops.push((
                                            "last_viewed".into(),
                                            Op::Append {
                                                item: Value::String(r.1.clone()),
                                                cap: 10,
                                            },
                                            r.3,
                                        ));
                                    }
                                    (
                                        r.0.clone(),
                                        Mutation {
                                            position: Some(Position::sequential(
                                                &source, sh as i32, i as i64,
                                            )),
                                            ops,
                                            overwrite: false,
                                        },
                                    )
                                })
                                .collect();
                            let rep = writer.apply(&sink, muts).await;
                            anyhow::ensure!(
                                rep.failed.is_empty(),
                                "ceiling write failed: {:?}",
                                rep.failed.first()
                            );
                        }
                        anyhow::Ok(())
                    }
                });
                for r in futures::future::join_all(tasks).await {
                    r?;
                }
                start.elapsed().as_secs_f64()
            }
        };
        let ceiling = args.rows as f64 / ceiling_time;
        report.add(&format!("backfill_s{s}_rows_per_s"), rows_per_s);
        report.add(&format!("backfill_s{s}_ceiling_rows_per_s"), ceiling);
        report.add(&format!("backfill_s{s}_vs_ceiling"), rows_per_s / ceiling);
        report.add(
            &format!("backfill_s{s}_rows_per_s_per_shard"),
            rows_per_s / s as f64,
        );
        if n == 0 {
            per_shard_1 = Some((s, rows_per_s));
        } else if let Some((s0, r0)) = per_shard_1 {
            report.add(&format!("backfill_s{s}_vs_s{s0}"), rows_per_s / r0);
        }
        if let Some(client) = &dynamo {
            let _ = client
                .delete_table()
                .table_name(&sink.target.table)
                .send()
                .await;
        }
    }
    if let Some(client) = &dynamo {
        let _ = client.delete_table().table_name(&jobs_table).send().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}
