//! Output text of a sequence: bytes of tokens → UTF-8 text without splitting a character, and
//! stop strings matched across token boundaries and never emitted.

/// Accumulates token bytes and releases only complete UTF-8 characters.
#[derive(Default, Debug)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Add a token's bytes; return the text that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..good]).expect("valid prefix"));
                    match e.error_len() {
                        // Bytes that can never become valid: replace them and go on.
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..good + bad);
                        }
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..good);
                            return out;
                        }
                    }
                }
            }
        }
    }

    /// End of output: whatever is left is not a whole character.
    pub fn finish(&mut self) -> String {
        if self.pending.is_empty() {
            String::new()
        } else {
            self.pending.clear();
            "\u{FFFD}".to_string()
        }
    }
}

/// Holds back text that may be the start of a stop string.
#[derive(Debug)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What [`StopMatcher::push`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum StopCheck {
    /// Text safe to emit; generation goes on.
    Continue(String),
    /// A stop string matched: emit this text (everything before it) and stop.
    Stop(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            stops,
            held: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> StopCheck {
        if self.stops.is_empty() {
            return StopCheck::Continue(text.to_string());
        }
        self.held.push_str(text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..at].to_string();
            self.held.clear();
            return StopCheck::Stop(out);
        }
        // Keep the longest tail of `held` that is a prefix of some stop string.
        let mut keep_from = self.held.len();
        for (i, _) in self.held.char_indices().rev() {
            let tail = &self.held[i..];
            if tail.len() >= self.stops.iter().map(String::len).max().unwrap_or(0) {
                break;
            }
            if self.stops.iter().any(|s| s.starts_with(tail)) {
                keep_from = i;
            }
        }
        let out = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        StopCheck::Continue(out)
    }

    /// Generation ended for another reason: release what was held back.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_characters_are_never_split() {
        let mut s = Utf8Stream::default();
        let bytes = "a日🤖b".as_bytes();
        let mut out = String::new();
        for b in bytes {
            let piece = s.push(&[*b]);
            assert!(!piece.contains('\u{FFFD}'));
            out.push_str(&piece);
        }
        assert_eq!(out, "a日🤖b");
        assert_eq!(s.push(&[0xff, b'x']), "\u{FFFD}x");
        assert_eq!(s.push(&[0xe6]), "");
        assert_eq!(s.finish(), "\u{FFFD}");
    }

    #[test]
    fn stop_strings_match_across_pieces_and_are_not_emitted() {
        let mut m = StopMatcher::new(vec!["END".into(), "\n\n".into()]);
        assert_eq!(m.push("hello E"), StopCheck::Continue("hello ".into()));
        assert_eq!(m.push("N"), StopCheck::Continue("".into()));
        assert_eq!(m.push("Dless"), StopCheck::Stop(String::new()));
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("a EN"), StopCheck::Continue("a ".into()));
        assert_eq!(m.push("X"), StopCheck::Continue("ENX".into()));
        assert_eq!(m.push("E"), StopCheck::Continue("".into()));
        assert_eq!(m.flush(), "E");
        let mut m = StopMatcher::new(vec!["\n\n".into()]);
        assert_eq!(m.push("one\n"), StopCheck::Continue("one".into()));
        assert_eq!(m.push("\ntwo"), StopCheck::Stop("".into()));
    }
}
