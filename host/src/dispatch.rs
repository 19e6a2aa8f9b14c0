//! Routing: which feature groups an event goes to. Events and groups are M:N — a topic feeds
//! every group that lists it (subject to the group's filter), and a group may list many
//! topics.

use crate::event::{Event, EventIdx};
use crate::spec::{FilterSpec, SpecSet};
use std::collections::HashMap;

/// A feature group by its place in the host's spec set (the [`Router`]'s order). Only
/// meaningful inside one host: records, commits and the API name groups by name, since
/// another host (or this one after a spec change) may number them differently.
///
/// ```
/// use feature_host::dispatch::GroupId;
///
/// let names = ["users", "items"];
/// assert_eq!(names[GroupId::new(1).index()], "items");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(usize);

impl GroupId {
    pub const fn new(index: usize) -> GroupId {
        GroupId(index)
    }

    pub const fn index(self) -> usize {
        self.0
    }
}

impl std::fmt::Display for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "group {}", self.0)
    }
}

/// One event of a batch for one of its groups: the unit every step after routing works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    pub event: EventIdx,
    pub group: GroupId,
}

#[derive(Debug, Clone)]
enum Filter {
    Header {
        name: String,
        values: Vec<String>,
    },
    Field {
        pointer: String,
        values: Vec<String>,
    },
}

impl Filter {
    fn from_spec(f: &FilterSpec) -> Filter {
        match (&f.header, &f.field) {
            (Some(name), _) => Filter::Header {
                name: name.clone(),
                values: f.values.clone(),
            },
            (None, Some(pointer)) => Filter::Field {
                pointer: pointer.clone(),
                values: f.values.clone(),
            },
            // Spec validation requires exactly one; an empty filter matches nothing.
            (None, None) => Filter::Header {
                name: String::new(),
                values: Vec::new(),
            },
        }
    }

    fn matches(&self, event: &Event, json: &mut LazyJson) -> bool {
        match self {
            Filter::Header { name, values } => event
                .header(name)
                .and_then(|v| std::str::from_utf8(v).ok())
                .is_some_and(|v| values.iter().any(|x| x == v)),
            Filter::Field { pointer, values } => {
                match json.get(&event.payload).and_then(|j| j.pointer(pointer)) {
                    Some(serde_json::Value::String(s)) => values.iter().any(|x| x == s),
                    Some(other @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                        let s = other.to_string();
                        values.contains(&s)
                    }
                    _ => false,
                }
            }
        }
    }
}

/// Parse the payload at most once per event, only if some field filter needs it.
#[derive(Default)]
struct LazyJson(Option<Option<serde_json::Value>>);

impl LazyJson {
    fn get(&mut self, payload: &[u8]) -> Option<&serde_json::Value> {
        self.0
            .get_or_insert_with(|| serde_json::from_slice(payload).ok())
            .as_ref()
    }
}

/// Routes events to feature groups (by index into [`Router::groups`]).
#[derive(Debug, Clone, Default)]
pub struct Router {
    groups: Vec<String>,
    by_topic: HashMap<String, Vec<(GroupId, Option<Filter>)>>,
}

impl Router {
    pub fn new(specs: &SpecSet) -> Router {
        let mut router = Router::default();
        for (i, (name, g)) in specs.groups.iter().enumerate() {
            router.groups.push(name.clone());
            for s in &g.spec.sources {
                router
                    .by_topic
                    .entry(s.topic.clone())
                    .or_default()
                    .push((GroupId(i), s.filter.as_ref().map(Filter::from_spec)));
            }
        }
        router
    }

    /// Group names, indexed as [`Router::route`] returns them.
    pub fn groups(&self) -> &[String] {
        &self.groups
    }

    /// The name of group `g`.
    pub fn name(&self, g: GroupId) -> &str {
        &self.groups[g.0]
    }

    /// The group named `name`.
    pub fn id(&self, name: &str) -> Option<GroupId> {
        self.groups.iter().position(|n| n == name).map(GroupId)
    }

    /// Every group, in order.
    pub fn ids(&self) -> impl Iterator<Item = GroupId> + use<> {
        (0..self.groups.len()).map(GroupId)
    }

    /// Topics some group consumes.
    pub fn topics(&self) -> impl Iterator<Item = &str> {
        self.by_topic.keys().map(String::as_str)
    }

    /// The groups `event` goes to.
    pub fn route(&self, event: &Event) -> Vec<GroupId> {
        let Some(targets) = self.by_topic.get(&event.topic) else {
            return Vec::new();
        };
        let mut json = LazyJson::default();
        targets
            .iter()
            .filter(|(_, f)| f.as_ref().is_none_or(|f| f.matches(event, &mut json)))
            .map(|(i, _)| *i)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{FilterSpec, SourceSpec};

    fn router(groups: &[(&str, Vec<SourceSpec>)]) -> Router {
        let mut r = Router::default();
        for (i, (name, sources)) in groups.iter().enumerate() {
            r.groups.push(name.to_string());
            for s in sources {
                r.by_topic
                    .entry(s.topic.clone())
                    .or_default()
                    .push((GroupId(i), s.filter.as_ref().map(Filter::from_spec)));
            }
        }
        r
    }

    fn ids(ids: &[usize]) -> Vec<GroupId> {
        ids.iter().copied().map(GroupId).collect()
    }

    fn src(topic: &str, filter: Option<FilterSpec>) -> SourceSpec {
        SourceSpec {
            topic: topic.into(),
            filter,
        }
    }

    fn ev(topic: &str, payload: &str, headers: &[(&str, &str)]) -> Event {
        Event {
            topic: topic.into(),
            partition: 0,
            offset: 0,
            key: None,
            timestamp_ms: 0,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
            payload: payload.as_bytes().to_vec(),
            position: None,
        }
    }

    #[test]
    fn many_to_many() {
        let r = router(&[
            ("users", vec![src("web", None), src("app", None)]),
            ("items", vec![src("web", None)]),
        ]);
        assert_eq!(r.route(&ev("web", "{}", &[])), ids(&[0, 1]));
        assert_eq!(r.route(&ev("app", "{}", &[])), ids(&[0]));
        assert!(r.route(&ev("other", "{}", &[])).is_empty());
    }

    #[test]
    fn header_and_field_filters() {
        let by_header = FilterSpec {
            header: Some("type".into()),
            field: None,
            values: vec!["click".into()],
        };
        let by_field = FilterSpec {
            header: None,
            field: Some("/after/status".into()),
            values: vec!["live".into(), "7".into()],
        };
        let r = router(&[
            ("a", vec![src("t", Some(by_header))]),
            ("b", vec![src("t", Some(by_field))]),
        ]);
        assert_eq!(r.route(&ev("t", "{}", &[("type", "click")])), ids(&[0]));
        assert!(r.route(&ev("t", "{}", &[("type", "view")])).is_empty());
        assert_eq!(
            r.route(&ev("t", r#"{"after":{"status":"live"}}"#, &[])),
            ids(&[1])
        );
        assert_eq!(
            r.route(&ev("t", r#"{"after":{"status":7}}"#, &[])),
            ids(&[1])
        );
        assert!(r.route(&ev("t", "not json", &[])).is_empty());
    }
}
