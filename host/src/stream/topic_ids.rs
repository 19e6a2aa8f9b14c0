//! Topic incarnations: a Kafka topic deleted and created again under the same name (a
//! common way to purge a retry backlog) restarts its offsets at 0. Positions name the
//! incarnation they were read from — `<topic>~<topic id>` (KIP-516's id, base64) — so an
//! entity's watermark of the old incarnation (whose floor may be far above 0) never marks
//! the new one's events as applied.
//!
//! **Guarantee.** Every host reading a topic on one cluster derives the same source name
//! for it, so a partition that moves between hosts keeps its positions. A topic's committed
//! group offsets (and their finished maps, [`super::offset_map`]) are deleted with it by the
//! brokers, so only the entity watermarks needed the id.
//!
//! **Limit.** Brokers older than Kafka 2.8 have no topic ids: their topics keep the bare
//! name (as every position did before ids), so a recreated topic there is still read as the
//! old one. Watermarks written under the bare name before an upgrade are left in the
//! entities, unused: events finished but not committed when a partition moves between an
//! old and a new host *during* the upgrade (a crash, a drain timeout) may be applied again
//! (a graceful rollout commits first), and so is a dead letter replayed before the upgrade
//! and replayed again after it (its identity now names the dead-letter topic's id). Each
//! incarnation leaves one watermark entry per partition in every entity it wrote.

use rdkafka::bindings as rd;
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::time::Duration;

/// The source name of positions read from `topic` whose id is `id` (`None`: no id, the
/// bare name). Kafka topic names cannot contain `~`.
pub fn source_name(topic: &str, id: Option<&str>) -> String {
    match id {
        Some(id) => format!("{topic}~{id}"),
        None => topic.to_owned(),
    }
}

/// Why the ids could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TopicIdError {
    #[error("DescribeTopics failed: {0}")]
    Request(String),
    #[error("DescribeTopics gave no answer within {0:?}")]
    Timeout(Duration),
    #[error("topic {topic}: {reason}")]
    Topic { topic: String, reason: String },
}

/// The source name ([`source_name`]) of each of `topics`' positions, asked through `client`
/// (any consumer or producer). Blocking, up to `timeout`.
pub fn sources<C: rdkafka::client::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topics: &[String],
    timeout: Duration,
) -> Result<HashMap<String, String>, TopicIdError> {
    // SAFETY: `client` is borrowed, so its handle lives through the call.
    let ids = unsafe { describe(client.native_ptr(), topics, timeout) }?;
    Ok(ids
        .into_iter()
        .map(|(topic, id)| {
            if id.is_none() {
                tracing::warn!(%topic, "the brokers give this topic no id (Kafka before 2.8): its positions carry the bare name, and a topic created again under it is read as the old one");
            }
            let source = source_name(&topic, id.as_deref());
            (topic, source)
        })
        .collect())
}

/// The ids of `topics` (those the brokers give none, `None`), asked through the client
/// `rk` (any consumer or producer handle). Blocking, up to `timeout`.
///
/// # Safety
/// `rk` must be a live client handle for the whole call.
unsafe fn describe(
    rk: *mut rd::rd_kafka_t,
    topics: &[String],
    timeout: Duration,
) -> Result<HashMap<String, Option<String>>, TopicIdError> {
    let mut out = HashMap::new();
    if topics.is_empty() {
        return Ok(out);
    }
    let names: Vec<CString> = topics
        .iter()
        .map(|t| {
            CString::new(t.as_str())
                .map_err(|_| TopicIdError::Request(format!("topic name {t:?} holds a NUL")))
        })
        .collect::<Result<_, _>>()?;
    let mut ptrs: Vec<*const std::os::raw::c_char> = names.iter().map(|n| n.as_ptr()).collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: every handle created here is destroyed before returning; the result's
    // descriptions (and their names and ids) are owned by `event`, read before it is
    // destroyed; `rk` is live (the caller's promise).
    unsafe {
        let collection = rd::rd_kafka_TopicCollection_of_topic_names(ptrs.as_mut_ptr(), ptrs.len());
        let options = rd::rd_kafka_AdminOptions_new(
            rk,
            rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS,
        );
        let mut errstr = [0 as std::os::raw::c_char; 256];
        rd::rd_kafka_AdminOptions_set_request_timeout(
            options,
            ms,
            errstr.as_mut_ptr(),
            errstr.len(),
        );
        let queue = rd::rd_kafka_queue_new(rk);
        rd::rd_kafka_DescribeTopics(rk, collection, options, queue);
        // One extra second: the request's own timeout answers first.
        let event = rd::rd_kafka_queue_poll(queue, ms.saturating_add(1000));
        let result = if event.is_null() {
            Err(TopicIdError::Timeout(timeout))
        } else if rd::rd_kafka_event_error(event)
            != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
        {
            Err(TopicIdError::Request(text(
                rd::rd_kafka_event_error_string(event),
            )))
        } else {
            let res = rd::rd_kafka_event_DescribeTopics_result(event);
            let mut n = 0usize;
            let descs = rd::rd_kafka_DescribeTopics_result_topics(res, &mut n);
            let descs = if descs.is_null() {
                &[][..]
            } else {
                std::slice::from_raw_parts(descs, n)
            };
            let mut failed = None;
            for &d in descs {
                let topic = text(rd::rd_kafka_TopicDescription_name(d));
                let err = rd::rd_kafka_TopicDescription_error(d);
                if !err.is_null()
                    && rd::rd_kafka_error_code(err)
                        != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
                {
                    failed.get_or_insert(TopicIdError::Topic {
                        topic,
                        reason: text(rd::rd_kafka_error_string(err)),
                    });
                    continue;
                }
                let uuid = rd::rd_kafka_TopicDescription_topic_id(d);
                let id = (!uuid.is_null()
                    && (rd::rd_kafka_Uuid_most_significant_bits(uuid) != 0
                        || rd::rd_kafka_Uuid_least_significant_bits(uuid) != 0))
                    .then(|| url_safe(&text(rd::rd_kafka_Uuid_base64str(uuid))));
                out.insert(topic, id);
            }
            match failed {
                Some(e) => Err(e),
                None => Ok(()),
            }
        };
        if !event.is_null() {
            rd::rd_kafka_event_destroy(event);
        }
        rd::rd_kafka_queue_destroy(queue);
        rd::rd_kafka_AdminOptions_destroy(options);
        rd::rd_kafka_TopicCollection_destroy(collection);
        result?;
    }
    for t in topics {
        if !out.contains_key(t) {
            return Err(TopicIdError::Topic {
                topic: t.clone(),
                reason: "not in the answer".into(),
            });
        }
    }
    Ok(out)
}

/// librdkafka prints ids in standard base64; Kafka's tools (`kafka-topics --describe`) in the
/// URL-safe alphabet without padding. Positions use the form operators see.
fn url_safe(id: &str) -> String {
    id.trim_end_matches('=')
        .chars()
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            c => c,
        })
        .collect()
}

/// # Safety
/// `p` is null or a NUL-terminated string.
unsafe fn text(p: *const std::os::raw::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: the caller's promise.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_names_round_trip_to_their_topic() {
        assert_eq!(
            source_name("clicks", Some("AAECAwQFBgcICQoLDA0ODw")),
            "clicks~AAECAwQFBgcICQoLDA0ODw"
        );
        assert_eq!(source_name("clicks", None), "clicks");
    }

    #[test]
    fn ids_read_as_kafkas_tools_print_them() {
        assert_eq!(
            url_safe("MLezvaEuT963Z8jb4K1a/w=="),
            "MLezvaEuT963Z8jb4K1a_w"
        );
        assert_eq!(url_safe("a+b"), "a-b");
    }

    #[test]
    fn two_incarnations_have_distinct_sources() {
        assert_ne!(
            source_name("g.retry", Some("a")),
            source_name("g.retry", Some("b"))
        );
    }
}
