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

#[cfg(test)]
mod tests {
    #[test]
    fn cuts_on_a_character_boundary_within_the_bound() {
        assert_eq!(super::truncate("abc", 3), "abc");
        assert_eq!(super::truncate("abcdef", 4), "a…");
        let t = super::truncate(&"é".repeat(10), 8);
        assert!(t.len() <= 8 && t.ends_with('…'), "{t}");
    }
}
