//! Hashing and sharding of keys that are already uniformly random.

use std::hash::BuildHasher;

/// Both maps are keyed by values that are already uniformly random (SHA-256 digests, v4 UUIDs),
/// so hashing them again with SipHash would be wasted work on the hot path: take 8 bytes.
#[derive(Clone, Copy, Default)]
pub(crate) struct KeyHasher;

impl BuildHasher for KeyHasher {
    type Hasher = PrefixHasher;
    fn build_hasher(&self) -> PrefixHasher {
        PrefixHasher(0)
    }
}

pub(crate) struct PrefixHasher(u64);

impl std::hash::Hasher for PrefixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Digests and UUIDs hash as their bytes (after a length prefix for arrays of slices,
        // which `write_usize` below ignores); fold the first 8 random bytes.
        for chunk in bytes.chunks(8).take(1) {
            let mut buf = [0u8; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(buf);
        }
    }
    fn write_usize(&mut self, _: usize) {}
}

pub(super) fn shard_of(bytes: &[u8], shards: usize) -> usize {
    // The last byte is independent of the 8 the hasher uses, so shard and bucket do not correlate.
    bytes[bytes.len() - 1] as usize % shards
}
