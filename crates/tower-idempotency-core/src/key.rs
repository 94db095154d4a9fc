//! The `Idempotency-Key` value, its scope, and the digest the ledger stores.

use std::fmt;

use sha2::{Digest, Sha256};

/// The longest key accepted, in characters.
pub const MAX_KEY_LEN: usize = 255;

/// A validated idempotency key: 1 to 255 characters of visible ASCII (0x21 to 0x7E).
///
/// Parsed from a header value that is either an RFC 8941 string (`"abc"`, as the
/// [IETF draft](https://datatracker.ietf.org/doc/draft-ietf-httpapi-idempotency-key-header/)
/// specifies) or a bare value (`abc`, as most clients send it). The quotes are not part of the key.
///
/// The raw key is deliberately not printable through `Debug`, so it cannot leak into logs:
///
/// ```
/// use tower_idempotency_core::IdempotencyKey;
///
/// let key = IdempotencyKey::parse(br#""order-42""#).unwrap();
/// assert_eq!(key.as_str(), "order-42");
/// assert_eq!(format!("{key:?}"), "IdempotencyKey(..)");
/// assert!(IdempotencyKey::parse(b"").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

/// Why a header value is not a valid idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The header carried no characters (or only the two quotes).
    #[error("the idempotency key is empty")]
    Empty,
    /// The key is longer than [`MAX_KEY_LEN`] characters.
    #[error("the idempotency key is longer than {MAX_KEY_LEN} characters")]
    TooLong,
    /// A character outside visible ASCII (0x21 to 0x7E), such as a space or a control character.
    #[error("the idempotency key contains a character outside visible ASCII (0x21 to 0x7E)")]
    InvalidCharacter,
    /// A value opened with `"` but is not a well-formed RFC 8941 string.
    #[error("the idempotency key is a malformed quoted string")]
    MalformedString,
    /// The header appeared more than once.
    #[error("the idempotency key header is repeated")]
    Repeated,
    /// The request carried no key.
    #[error("the request has no idempotency key")]
    Missing,
}

impl IdempotencyKey {
    /// Parses a header value in either form, validating the key.
    pub fn parse(value: &[u8]) -> Result<Self, KeyError> {
        let key = match value.first() {
            Some(b'"') => unquote(value)?,
            _ => value.to_vec(),
        };
        if key.is_empty() {
            return Err(KeyError::Empty);
        }
        if key.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong);
        }
        if !key.iter().all(|b| (0x21..=0x7e).contains(b)) {
            return Err(KeyError::InvalidCharacter);
        }
        // Every byte is visible ASCII, so this cannot fail; map rather than unwrap all the same.
        String::from_utf8(key)
            .map(Self)
            .map_err(|_| KeyError::InvalidCharacter)
    }

    /// The key itself, without quotes. Avoid logging it: log [`LedgerKey`] instead.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdempotencyKey(..)")
    }
}

/// Decodes an RFC 8941 sf-string (section 3.3.3): `"` chars `"`, with `\"` and `\\` as the only
/// escapes, and nothing after the closing quote.
fn unquote(value: &[u8]) -> Result<Vec<u8>, KeyError> {
    let mut out = Vec::with_capacity(value.len());
    let mut bytes = value[1..].iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' => match bytes.next() {
                Some(&e @ (b'"' | b'\\')) => out.push(e),
                _ => return Err(KeyError::MalformedString),
            },
            b'"' => {
                return if bytes.next().is_none() {
                    Ok(out)
                } else {
                    Err(KeyError::MalformedString)
                };
            }
            0x20..=0x7e => out.push(b),
            _ => return Err(KeyError::InvalidCharacter),
        }
    }
    Err(KeyError::MalformedString)
}

/// The SHA-256 digest of a caller's scope (an API key, a tenant id, a subject).
///
/// Records remember the scope digest so that an operation can be looked up only by its own scope.
/// The default scope is empty.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScopeDigest([u8; 32]);

impl ScopeDigest {
    /// The digest of `scope`.
    pub fn new(scope: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update(b"tower-idempotency/scope\0");
        h.update(scope);
        Self(h.finalize().into())
    }

    /// Wraps digest bytes read back from storage.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for ScopeDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ScopeDigest({})", short_hex(&self.0))
    }
}

/// The ledger's primary key: SHA-256 over (scope, key), so two scopes never share a record and the
/// raw key is never stored.
///
/// ```
/// use tower_idempotency_core::{IdempotencyKey, LedgerKey};
///
/// let key = IdempotencyKey::parse(b"k-1").unwrap();
/// let a = LedgerKey::new(b"tenant-a", &key);
/// let b = LedgerKey::new(b"tenant-b", &key);
/// assert_ne!(a, b);
/// assert_eq!(a.short().len(), 16);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LedgerKey([u8; 32]);

impl LedgerKey {
    /// The ledger key of `key` within `scope`.
    pub fn new(scope: &[u8], key: &IdempotencyKey) -> Self {
        let mut h = Sha256::new();
        h.update(b"tower-idempotency/key\0");
        // Length-prefix the scope so that ("ab", "c") and ("a", "bc") cannot collide.
        h.update((scope.len() as u64).to_be_bytes());
        h.update(scope);
        h.update(key.as_str().as_bytes());
        Self(h.finalize().into())
    }

    /// Wraps digest bytes read back from storage.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 8 bytes as 16 hex digits: enough to find a request in traces, not the key.
    pub fn short(&self) -> String {
        short_hex(&self.0)
    }
}

impl fmt::Debug for LedgerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LedgerKey({self})")
    }
}

/// The same 16 hex digits as [`LedgerKey::short`], written straight to the formatter: a span
/// field recorded with `tracing::field::display(key)` costs nothing unless a subscriber reads it.
impl fmt::Display for LedgerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0[..8].iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

pub(crate) fn short_hex(bytes: &[u8; 32]) -> String {
    hex(&bytes[..8])
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ledger_key_displays_as_its_short_form_without_the_raw_key() {
        let key = IdempotencyKey::parse(b"raw-key-123").unwrap();
        let ledger_key = LedgerKey::new(b"scope", &key);
        assert_eq!(ledger_key.to_string(), ledger_key.short());
        assert_eq!(ledger_key.to_string().len(), 16);
        assert!(
            ledger_key
                .to_string()
                .chars()
                .all(|c| c.is_ascii_hexdigit())
        );
        assert_eq!(
            format!("{ledger_key:?}"),
            format!("LedgerKey({})", ledger_key.short())
        );
    }

    #[test]
    fn accepts_bare_and_quoted_forms_alike() {
        let bare = IdempotencyKey::parse(b"abc-123").unwrap();
        let quoted = IdempotencyKey::parse(br#""abc-123""#).unwrap();
        assert_eq!(bare, quoted);
        assert_eq!(
            IdempotencyKey::parse(br#""a\"b\\c""#).unwrap().as_str(),
            r#"a"b\c"#
        );
    }

    #[test]
    fn length_bounds() {
        assert_eq!(IdempotencyKey::parse(b""), Err(KeyError::Empty));
        assert_eq!(IdempotencyKey::parse(b"\"\""), Err(KeyError::Empty));
        assert!(IdempotencyKey::parse(&[b'a'; 255]).is_ok());
        assert_eq!(IdempotencyKey::parse(&[b'a'; 256]), Err(KeyError::TooLong));
    }

    #[test]
    fn rejects_characters_outside_visible_ascii() {
        for bad in [
            &b"a b"[..],
            b"a\tb",
            b"a\x01",
            b"\x7f",
            "ключ".as_bytes(),
            b"\"a b\"",
        ] {
            assert_eq!(
                IdempotencyKey::parse(bad),
                Err(KeyError::InvalidCharacter),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn rejects_malformed_strings() {
        for bad in [&b"\"abc"[..], b"\"abc\"x", b"\"a\\b\"", b"\"abc\\", b"\""] {
            assert_eq!(
                IdempotencyKey::parse(bad),
                Err(KeyError::MalformedString),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn scope_separates_ledger_keys() {
        let k = IdempotencyKey::parse(b"bc").unwrap();
        let k2 = IdempotencyKey::parse(b"c").unwrap();
        assert_ne!(LedgerKey::new(b"a", &k), LedgerKey::new(b"ab", &k2));
        assert_eq!(LedgerKey::new(b"a", &k), LedgerKey::new(b"a", &k));
    }
}
