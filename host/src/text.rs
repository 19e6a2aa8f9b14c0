//! Bounding texts that come from plugins, stores and producers before they travel in logs,
//! headers and API answers.

/// Cut `text` to at most `max` bytes on a character boundary, marked with `…` (counted in
/// the `max`) when cut.
pub fn cut(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let at = (0..=max.saturating_sub('…'.len_utf8()))
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    text.truncate(at);
    text.push('…');
}

/// [`cut`] of a copy of `text`.
pub fn truncate(text: &str, max: usize) -> String {
    let mut out = text.to_owned();
    cut(&mut out, max);
    out
}

/// `url` as it may be shown: the password of its user info replaced by `***`, and its path
/// and query by `/…` (a webhook's path is its credential; a Redis URL's is its database).
/// `scheme://[user[:***]@]host[:port][/…]`; text that is not a URL is shown as `<not a URL>`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<not a URL>".into();
    };
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => format!("{user_info}@{host}"),
        },
        None => authority.to_owned(),
    };
    let path = if path.is_empty() || path == "/" {
        path
    } else {
        "/…"
    };
    format!("{scheme}://{authority}{path}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_are_shown_without_their_secrets() {
        use super::redact_url;
        assert_eq!(
            redact_url("redis://:hunter2@cache.example:6379/0"),
            "redis://:***@cache.example:6379/…"
        );
        assert_eq!(
            redact_url("rediss://app:p@ss:w@rd@cache.example:6380"),
            "rediss://app:***@cache.example:6380"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            redact_url("https://hooks.example/services/T0/B0/secret?x=1"),
            "https://hooks.example/…"
        );
        assert_eq!(redact_url("http://relay:8080/"), "http://relay:8080/");
        assert_eq!(redact_url("hunter2"), "<not a URL>");
    }

    #[test]
    fn cuts_on_a_character_boundary_within_the_bound() {
        assert_eq!(super::truncate("abc", 3), "abc");
        assert_eq!(super::truncate("abcdef", 4), "a…");
        let t = super::truncate(&"é".repeat(10), 8);
        assert!(t.len() <= 8 && t.ends_with('…'), "{t}");
    }
}
