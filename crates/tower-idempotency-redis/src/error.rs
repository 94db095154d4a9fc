//! Settings that can be wrong.

/// A builder setting was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The key prefix is over 128 bytes, or has a byte outside printable ASCII, or a brace
    /// (which would change the Cluster hash tag of every key).
    #[error(
        "invalid key prefix {0:?}: at most 128 bytes of printable ASCII without braces or spaces"
    )]
    InvalidPrefix(String),
}
