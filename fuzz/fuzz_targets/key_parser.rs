//! Fuzzes `IdempotencyKey::parse`: it never panics, and whatever it accepts is 1 to 255 visible
//! ASCII characters that parse back to the same key, bare (unless it opens with a quote) and
//! quoted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_idempotency_core::{IdempotencyKey, MAX_KEY_LEN};

fuzz_target!(|data: &[u8]| {
    let Ok(key) = IdempotencyKey::parse(data) else {
        return;
    };
    let s = key.as_str().as_bytes();
    assert!((1..=MAX_KEY_LEN).contains(&s.len()), "length {}", s.len());
    assert!(s.iter().all(|b| (0x21..=0x7e).contains(b)), "{s:?}");
    // Without a leading quote, the header value is the key itself.
    if data.first() != Some(&b'"') {
        assert_eq!(s, data);
    } else {
        assert!(data.len() >= s.len() + 2);
    }
    let mut quoted = vec![b'"'];
    for &b in s {
        if b == b'"' || b == b'\\' {
            quoted.push(b'\\');
        }
        quoted.push(b);
    }
    quoted.push(b'"');
    assert_eq!(IdempotencyKey::parse(&quoted).as_ref(), Ok(&key));
    if s[0] != b'"' {
        assert_eq!(IdempotencyKey::parse(s).as_ref(), Ok(&key));
    }
});
