//! The spec reference (`docs/spec-reference.md`), rendered from the JSON Schema so that it
//! cannot drift from what validation accepts: `feature-host schema --markdown`.

use serde_json::Value;
use std::fmt::Write as _;

/// Markdown for every document kind and every type they use.
pub fn markdown(schema: &Value) -> String {
    let defs = schema["$defs"].as_object().cloned().unwrap_or_default();
    let mut out = String::from(
        "# Spec reference\n\n\
         Generated from the JSON Schema by `feature-host schema --markdown`; a test keeps this \
         file current. Field names are camelCase; unknown fields are errors. \
         `feature-host validate` reports every problem with its file and field.\n\n",
    );
    for doc in schema["oneOf"].as_array().into_iter().flatten() {
        let kind = doc["properties"]["kind"]["const"].as_str().unwrap_or("?");
        let _ = writeln!(out, "## kind: {kind}\n");
        table(&mut out, doc);
    }
    let mut names: Vec<&String> = defs.keys().collect();
    names.sort();
    for name in names {
        let def = &defs[name];
        if name == "AutoLiteral" {
            continue; // shown inline as `"auto"`
        }
        let _ = writeln!(out, "## {name}\n");
        if let Some(d) = def["description"].as_str() {
            let _ = writeln!(out, "{}\n", one_line(d));
        }
        if def["properties"].is_object() {
            table(&mut out, def);
        } else if let Some(choices) = def["oneOf"].as_array().or(def["enum"].as_array()) {
            out.push_str("| value | meaning |\n|---|---|\n");
            for c in choices {
                let value = c["const"].as_str().or(c.as_str()).unwrap_or("?");
                let meaning = c["description"].as_str().map(one_line).unwrap_or_default();
                let _ = writeln!(out, "| `{value}` | {meaning} |");
            }
            out.push('\n');
        } else {
            let _ = writeln!(out, "Type: {}\n", type_of(def));
        }
    }
    out
}

fn table(out: &mut String, def: &Value) {
    let required: Vec<&str> = def["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    out.push_str("| field | type | required | default | description |\n|---|---|---|---|---|\n");
    let props = def["properties"].as_object().cloned().unwrap_or_default();
    let mut names: Vec<&String> = props.keys().collect();
    // Required fields first, then alphabetical.
    names.sort_by_key(|n| (!required.contains(&n.as_str()), n.as_str()));
    for name in names {
        let p = &props[name];
        let default = match &p["default"] {
            Value::Null => String::new(),
            v => format!("`{v}`"),
        };
        let _ = writeln!(
            out,
            "| `{name}` | {} | {} | {default} | {} |",
            type_of(p),
            if required.contains(&name.as_str()) {
                "yes"
            } else {
                ""
            },
            p["description"].as_str().map(one_line).unwrap_or_default()
        );
    }
    out.push('\n');
}

/// A short type: `string`, `integer (1–100)`, `[FeatureSpec](#featurespec)`, `list of …`.
fn type_of(p: &Value) -> String {
    if let Some(r) = p["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap_or(r);
        if name == "AutoLiteral" {
            return "`\"auto\"`".into();
        }
        return format!("[{name}](#{})", name.to_lowercase());
    }
    if let Some(c) = p["const"].as_str() {
        return format!("`{c}`");
    }
    if let Some(any) = p["anyOf"].as_array().or(p["oneOf"].as_array()) {
        return any.iter().map(type_of).collect::<Vec<_>>().join(" or ");
    }
    let ty = match &p["type"] {
        Value::String(t) => t.clone(),
        Value::Array(ts) => ts
            .iter()
            .filter_map(Value::as_str)
            .filter(|t| *t != "null")
            .collect::<Vec<_>>()
            .join(" or "),
        _ => "any JSON".into(),
    };
    let mut s = if ty == "array" {
        format!("list of {}", type_of(&p["items"]))
    } else {
        ty
    };
    if let (Some(min), Some(max)) = (p["minimum"].as_f64(), p["maximum"].as_f64()) {
        let _ = write!(s, " ({min}–{max})");
    }
    if let Some(pattern) = p["pattern"].as_str() {
        let _ = write!(s, " matching `{}`", pattern.replace('|', "\\|"));
    }
    if let Some(n) = p["minItems"].as_u64() {
        let _ = write!(s, ", at least {n}");
    }
    s
}

fn one_line(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_of_every_kind_is_documented() {
        let md = markdown(&super::super::json_schema());
        for needle in [
            "## kind: FeatureGroup",
            "## kind: Ingestion",
            "| `featureGroup` | string | yes |",
            "| `maxAttempts` | integer (1–100) |  | `5` |",
            "| `write-around` | Store, then invalidate the cache entry. |",
            "[FeatureSpec](#featurespec)",
            "`\"auto\"` or integer (1–10000)",
        ] {
            assert!(md.contains(needle), "missing {needle:?} in:\n{md}");
        }
    }
}
