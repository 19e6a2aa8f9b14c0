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

/// `url` as it may be shown: its user info replaced by `***` (a user name may be a token),
/// and its path and query by `/…` (a webhook's path is its credential; a Redis URL's is its
/// database). `scheme://[***@]host[:port][/…]`; text that is not a URL is `<not a URL>`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<not a URL>".into();
    };
    // The user info ends at the last `@` before the host: a password may hold `/`, `?` or
    // `#` (parsers disagree whether it may), so look for the `@` first. A path with an `@`
    // in it is then hidden as if it were user info: shown too little, never too much.
    let (user_info, rest) = match rest.rsplit_once('@') {
        Some((user_info, host)) => (Some(user_info), host),
        None => (None, rest),
    };
    let (host, path) = match rest.find(['/', '?', '#']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    // Any user info is hidden whole: a token is often the user name (`https://<token>@`,
    // `https://<token>:x-oauth-basic@`).
    let user = if user_info.is_some() { "***@" } else { "" };
    // A port is digits: anything else after a `:` is a password that lost its `@`
    // (`redis://:hunter2`).
    let host = match host.rsplit_once(':') {
        Some((_, port)) if !host.ends_with(']') && !port.bytes().all(|b| b.is_ascii_digit()) => {
            "***"
        }
        _ => host,
    };
    let path = if path.is_empty() || path == "/" {
        path
    } else {
        "/…"
    };
    format!("{scheme}://{user}{host}{path}")
}

/// A setting that must never be printed: a token, a URL with a password, credentials. Its
/// `Debug` shows `<redacted>`, so a settings struct that derives `Debug` can be logged, or
/// end up in a panic message, without leaking it; the value is read with
/// [`Secret::expose`], where it is used.
///
/// ```
/// let token: feature_host::text::Secret = "hunter2".parse().unwrap();
/// assert_eq!(format!("{token:?}"), "<redacted>");
/// assert_eq!(token.expose(), "hunter2");
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Secret, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret(s)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret(s.to_owned())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_are_shown_without_their_secrets() {
        use super::redact_url;
        assert_eq!(
            redact_url("redis://:hunter2@cache.example:6379/0"),
            "redis://***@cache.example:6379/…"
        );
        assert_eq!(
            redact_url("rediss://app:p@ss:w@rd@cache.example:6380"),
            "rediss://***@cache.example:6380"
        );
        assert_eq!(redact_url("http://[::1]:8080/x"), "http://[::1]:8080/…");
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
    fn no_part_of_a_password_or_token_shows() {
        use super::redact_url;
        // A password may hold `/`, `?` and `#` (URL parsers disagree on whether it may).
        for url in [
            "redis://app:hun/ter2@cache.example:6379/0",
            "redis://app:hun?ter2@cache.example:6379",
            "redis://app:hun#ter2@cache.example:6379",
        ] {
            let shown = redact_url(url);
            assert!(!shown.contains("hun"), "{url} shown as {shown}");
            assert!(
                shown.contains("cache.example:6379"),
                "{url} shown as {shown}"
            );
        }
        // A token passed as the user name (GitHub-, Slack-style URLs).
        for url in [
            "https://ghp_hunter2@api.example/hooks",
            "https://ghp_hunter2:x-oauth-basic@api.example/hooks",
        ] {
            assert_eq!(redact_url(url), "https://***@api.example/…", "{url}");
        }
        // A password whose `@` was forgotten.
        assert_eq!(redact_url("redis://:hunter2"), "redis://***");
    }

    #[test]
    fn cuts_on_a_character_boundary_within_the_bound() {
        assert_eq!(super::truncate("abc", 3), "abc");
        assert_eq!(super::truncate("abcdef", 4), "a…");
        let t = super::truncate(&"é".repeat(10), 8);
        assert!(t.len() <= 8 && t.ends_with('…'), "{t}");
    }
}
