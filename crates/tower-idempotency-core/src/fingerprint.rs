//! The request fingerprint: what makes a retry "the same request".

use std::fmt;

use http::{HeaderName, request::Parts};
use sha2::{Digest, Sha256};

use crate::key::short_hex;

/// SHA-256 over a request's method, path, query, selected header values and body.
///
/// A key reused with a different fingerprint is answered 422 instead of replaying a response
/// that belongs to another request.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Wraps digest bytes, as read back from storage or computed by a custom function.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The fingerprint of arbitrary bytes, for custom fingerprint functions that pick a subset of
    /// the payload.
    ///
    /// ```
    /// use tower_idempotency_core::Fingerprint;
    /// assert_eq!(Fingerprint::of(b"amount=10"), Fingerprint::of(b"amount=10"));
    /// assert_ne!(Fingerprint::of(b"amount=10"), Fingerprint::of(b"amount=11"));
    /// ```
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// The default fingerprint of a request: method, path, query, the values of `headers` (in the
    /// order given; every value of a repeated header, in order) and the body.
    ///
    /// With `canonical_json`, a body that is valid JSON is hashed in canonical form (object
    /// members sorted, insignificant whitespace removed, strings re-escaped), so reordered keys
    /// and whitespace do not change the fingerprint. Numbers are kept as written: `1.0` and `1`
    /// differ, which errs towards a 422 rather than a wrong replay. A body that is not valid JSON
    /// is hashed as it is.
    pub fn of_request(
        parts: &Parts,
        headers: &[HeaderName],
        body: &[u8],
        canonical_json: bool,
    ) -> Self {
        let mut h = Sha256::new();
        // Each field is length-prefixed so that no two different requests share an encoding.
        field(&mut h, parts.method.as_str().as_bytes());
        field(&mut h, parts.uri.path().as_bytes());
        field(&mut h, parts.uri.query().unwrap_or("").as_bytes());
        for name in headers {
            field(&mut h, name.as_str().as_bytes());
            let values = parts.headers.get_all(name);
            h.update((values.iter().count() as u64).to_be_bytes());
            for value in values {
                field(&mut h, value.as_bytes());
            }
        }
        match canonical_json.then(|| canonical_json_bytes(body)).flatten() {
            Some(canonical) => {
                h.update(b"J");
                field(&mut h, &canonical);
            }
            None => {
                h.update(b"B");
                field(&mut h, body);
            }
        }
        Self(h.finalize().into())
    }
}

fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", short_hex(&self.0))
    }
}

/// Nesting deeper than this is not canonicalised (the body is hashed as it is), so a hostile
/// body cannot exhaust the stack. serde_json uses the same limit.
const MAX_DEPTH: usize = 128;

/// The canonical form of a JSON text, or `None` if `input` is not exactly one valid JSON value
/// (RFC 8259), has an object with a repeated member name, or nests deeper than 128.
///
/// ```
/// use tower_idempotency_core::fingerprint::canonical_json_bytes;
/// assert_eq!(
///     canonical_json_bytes(br#" { "b": [2, {"y":1,"x":0}], "a": "\u0041" } "#).unwrap(),
///     br#"{"a":"A","b":[2,{"x":0,"y":1}]}"#
/// );
/// assert!(canonical_json_bytes(b"{\"a\":1,\"a\":2}").is_none());
/// ```
pub fn canonical_json_bytes(input: &[u8]) -> Option<Vec<u8>> {
    let mut p = Parser { s: input, i: 0 };
    p.ws();
    let value = p.value(0)?;
    p.ws();
    if p.i != input.len() {
        return None;
    }
    let mut out = Vec::with_capacity(input.len());
    write(&value, &mut out);
    Some(out)
}

enum Json<'a> {
    Object(Vec<(String, Json<'a>)>),
    Array(Vec<Json<'a>>),
    String(String),
    /// A number, `true`, `false` or `null`, kept exactly as written.
    Literal(&'a [u8]),
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, b: u8) -> Option<()> {
        (self.peek() == Some(b)).then(|| self.i += 1)
    }

    fn value(&mut self, depth: usize) -> Option<Json<'a>> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'{' => self.object(depth),
            b'[' => self.array(depth),
            b'"' => self.string().map(Json::String),
            b't' => self.word(b"true"),
            b'f' => self.word(b"false"),
            b'n' => self.word(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn object(&mut self, depth: usize) -> Option<Json<'a>> {
        self.i += 1;
        let mut members: Vec<(String, Json<'a>)> = Vec::new();
        self.ws();
        if self.eat(b'}').is_some() {
            return Some(Json::Object(members));
        }
        loop {
            self.ws();
            let name = self.string()?;
            self.ws();
            self.eat(b':')?;
            self.ws();
            let value = self.value(depth + 1)?;
            members.push((name, value));
            self.ws();
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    break;
                }
                _ => return None,
            }
        }
        members.sort_by(|a, b| a.0.cmp(&b.0));
        // A repeated name has no single meaning (RFC 8259 section 4): do not guess one.
        if members.windows(2).any(|w| w[0].0 == w[1].0) {
            return None;
        }
        Some(Json::Object(members))
    }

    fn array(&mut self, depth: usize) -> Option<Json<'a>> {
        self.i += 1;
        let mut items = Vec::new();
        self.ws();
        if self.eat(b']').is_some() {
            return Some(Json::Array(items));
        }
        loop {
            self.ws();
            items.push(self.value(depth + 1)?);
            self.ws();
            match self.peek()? {
                b',' => self.i += 1,
                b']' => {
                    self.i += 1;
                    return Some(Json::Array(items));
                }
                _ => return None,
            }
        }
    }

    fn word(&mut self, word: &'static [u8]) -> Option<Json<'a>> {
        let start = self.i;
        if self.s[start..].starts_with(word) {
            self.i += word.len();
            Some(Json::Literal(&self.s[start..self.i]))
        } else {
            None
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Option<Json<'a>> {
        let start = self.i;
        self.eat(b'-');
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        if self.eat(b'.').is_some() && self.digits() == 0 {
            return None;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if self.digits() == 0 {
                return None;
            }
        }
        Some(Json::Literal(&self.s[start..self.i]))
    }

    fn hex4(&mut self) -> Option<u32> {
        let digits = self.s.get(self.i..self.i + 4)?;
        let mut v = 0u32;
        for &d in digits {
            v = v * 16 + (d as char).to_digit(16)?;
        }
        self.i += 4;
        Some(v)
    }

    fn string(&mut self) -> Option<String> {
        self.eat(b'"')?;
        let mut out = Vec::new();
        loop {
            let b = self.peek()?;
            self.i += 1;
            match b {
                b'"' => return String::from_utf8(out).ok(),
                b'\\' => {
                    let e = self.peek()?;
                    self.i += 1;
                    let c = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => self.unicode_escape()?,
                        _ => return None,
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
                0x00..=0x1f => return None,
                _ => out.push(b),
            }
        }
    }

    /// After `\u`: one code point, joining a surrogate pair; a lone surrogate is invalid.
    fn unicode_escape(&mut self) -> Option<char> {
        let hi = self.hex4()?;
        match hi {
            0xd800..=0xdbff => {
                self.eat(b'\\')?;
                self.eat(b'u')?;
                let lo = self.hex4()?;
                if !(0xdc00..=0xdfff).contains(&lo) {
                    return None;
                }
                char::from_u32(0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00))
            }
            0xdc00..=0xdfff => None,
            _ => char::from_u32(hi),
        }
    }
}

fn write(value: &Json<'_>, out: &mut Vec<u8>) {
    match value {
        Json::Object(members) => {
            out.push(b'{');
            for (i, (name, value)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(name, out);
                out.push(b':');
                write(value, out);
            }
            out.push(b'}');
        }
        Json::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(item, out);
            }
            out.push(b']');
        }
        Json::String(s) => write_string(s, out),
        Json::Literal(raw) => out.extend_from_slice(raw),
    }
}

/// One escaping for every string: `"` and `\` escaped, control characters as `\u00XX`, the rest
/// as raw UTF-8.
fn write_string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for &b in s.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x00..=0x1f => {
                const DIGITS: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(DIGITS[(b >> 4) as usize]);
                out.push(DIGITS[(b & 0xf) as usize]);
            }
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests;
