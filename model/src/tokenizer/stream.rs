//! Streaming detokenization: ids in, whole UTF-8 text out.

use super::error::Result;
use super::Tokenizer;

/// Streaming detokenizer: push ids one at a time, get the text they complete.
///
/// Bytes of a character split over several tokens are held back until the character is whole,
/// so every returned piece is valid UTF-8 and the concatenation of all pieces plus
/// [`finish`](Self::finish) equals [`Tokenizer::decode`] of all ids.
#[derive(Debug)]
pub struct TokenStream<'a> {
    tokenizer: &'a Tokenizer,
    skip_special: bool,
    pending: Vec<u8>,
    /// Whether the next byte, if it is the first of the output and a space, is dropped.
    strip_leading_space: bool,
}

impl<'a> TokenStream<'a> {
    /// A stream that leaves control tokens out.
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self::with_special(tokenizer, true)
    }

    /// A stream that leaves control tokens out if `skip_special`, or writes them as text.
    pub fn with_special(tokenizer: &'a Tokenizer, skip_special: bool) -> Self {
        TokenStream {
            tokenizer,
            skip_special,
            pending: Vec::new(),
            strip_leading_space: tokenizer.strip_leading_space,
        }
    }

    /// Adds one token; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        if let Some(mut piece) = self.tokenizer.piece(id, self.skip_special)? {
            if self.strip_leading_space && !piece.is_empty() {
                self.strip_leading_space = false;
                piece = piece.strip_prefix(b" ").unwrap_or(piece);
            }
            self.pending.extend_from_slice(piece);
        }
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The prefix was just checked to be UTF-8.
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            break;
                        }
                        // Bytes that can never be UTF-8: one replacement character, as decode does.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
        Ok((!out.is_empty()).then_some(out))
    }

    /// Ends the stream: returns the held-back bytes of an unfinished character as U+FFFD, if any.
    pub fn finish(&mut self) -> Result<Option<String>> {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        Ok((!out.is_empty()).then_some(out))
    }
}
