//! Table names: validation, quoting, and the names derived from them.

/// Why `with_table` refused a table name. (Named apart from `tower_idempotency::ConfigError`,
/// the layer's, so that both can be imported side by side.)
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TableNameError {
    /// The table name is not `[a-z_][a-z0-9_]{0,62}` (for PostgreSQL, optionally
    /// `schema.table` with each part so).
    #[error(
        "invalid table name {name:?}: expected [a-z_][a-z0-9_]{{0,62}}{}",
        if *.schema_allowed { ", optionally schema-qualified" } else { "" }
    )]
    Invalid {
        /// The name that was refused.
        name: String,
        /// Whether a `schema.table` name would have been accepted.
        schema_allowed: bool,
    },
}

/// The table name used by `new`: `idempotency_records`.
pub const DEFAULT_TABLE: &str = "idempotency_records";

/// A validated table name, optionally schema-qualified. (`pub` only because [`Backend`]'s
/// methods take it; neither is nameable outside the crate.)
///
/// [`Backend`]: crate::backend::Backend
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    schema: Option<String>,
    name: String,
}

fn is_identifier(part: &str) -> bool {
    let bytes = part.as_bytes();
    matches!(bytes.first(), Some(b'a'..=b'z' | b'_'))
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
}

impl TableName {
    pub(crate) fn parse(name: &str, schema_allowed: bool) -> Result<Self, TableNameError> {
        let invalid = || TableNameError::Invalid {
            name: name.to_owned(),
            schema_allowed,
        };
        let (schema, table) = match name.split_once('.') {
            Some((schema, table)) if schema_allowed => (Some(schema), table),
            Some(_) => return Err(invalid()),
            None => (None, name),
        };
        if !is_identifier(table) || schema.is_some_and(|s| !is_identifier(s)) {
            return Err(invalid());
        }
        Ok(Self {
            schema: schema.map(str::to_owned),
            name: table.to_owned(),
        })
    }

    pub(crate) fn default_name() -> Self {
        Self {
            schema: None,
            name: DEFAULT_TABLE.to_owned(),
        }
    }

    /// The name as given: `table` or `schema.table`.
    pub(crate) fn display(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{schema}.{}", self.name),
            None => self.name.clone(),
        }
    }

    /// The name quoted for SQL. Validation already rules out anything that needs escaping; the
    /// quotes let reserved words such as `order` be table names.
    pub(crate) fn quoted(&self) -> String {
        match &self.schema {
            Some(schema) => format!("\"{schema}\".\"{}\"", self.name),
            None => format!("\"{}\"", self.name),
        }
    }

    /// `name` quoted and qualified with the table's schema, if it has one: an object that lives
    /// beside the table, such as one of its indexes.
    pub(crate) fn sibling(&self, name: &str) -> String {
        match &self.schema {
            Some(schema) => format!("\"{schema}\".\"{name}\""),
            None => format!("\"{name}\""),
        }
    }

    /// A name derived from the table's own (unqualified) name, at most 63 bytes (PostgreSQL's
    /// limit, past which it would silently truncate). A name that fits is `{table}{suffix}`; a
    /// longer one keeps a prefix of the table name and adds a hash of all of it, so that two
    /// tables whose names share a long prefix do not derive the same name (issue 14: the second
    /// table's `CREATE INDEX IF NOT EXISTS` then found the first table's index and made none).
    pub(crate) fn derived(&self, suffix: &str) -> String {
        if self.name.len() + suffix.len() <= 63 {
            return format!("{}{suffix}", self.name);
        }
        let hash = format!("_{:016x}", fnv1a(self.name.as_bytes()));
        let keep = 63 - hash.len() - suffix.len();
        format!("{}{hash}{suffix}", &self.name[..keep])
    }
}

/// 64-bit FNV-1a: tiny, and fixed forever (unlike `std`'s hasher), as derived names must be.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Fills the placeholders of a shipped migration: `{{table}}`, and the names of its indexes
/// (`{{operation_index}}`, `{{purge_index}}`, `{{expires_index}}`: unqualified, as `CREATE INDEX`
/// takes them, which puts an index in its table's schema; `{{expires_index_qualified}}` with the
/// table's schema, as `DROP INDEX` needs it).
pub(crate) fn render_migration(sql: &str, table: &TableName) -> String {
    sql.replace("{{table}}", &table.quoted())
        .replace(
            "{{expires_index_qualified}}",
            &table.sibling(&table.derived("_expires_at")),
        )
        .replace(
            "{{purge_index}}",
            &format!("\"{}\"", table.derived("_purge_from")),
        )
        .replace(
            "{{operation_index}}",
            &format!("\"{}\"", table.derived("_operation_id")),
        )
        .replace(
            "{{expires_index}}",
            &format!("\"{}\"", table.derived("_expires_at")),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_rejects_names() {
        for good in ["a", "_", "idempotency_records", "t1", &"a".repeat(63)] {
            assert!(TableName::parse(good, false).is_ok(), "{good}");
        }
        for bad in [
            "",
            "1a",
            "A",
            "a-b",
            "a b",
            "a;drop",
            "\"a\"",
            "é",
            &"a".repeat(64),
            "s.t",
        ] {
            assert!(TableName::parse(bad, false).is_err(), "{bad}");
        }
        assert_eq!(
            TableName::parse("billing.records", true)
                .expect("a schema-qualified name")
                .quoted(),
            "\"billing\".\"records\""
        );
        for bad in ["s.", ".t", "s.t.u", "S.t", "s.T"] {
            assert!(TableName::parse(bad, true).is_err(), "{bad}");
        }
    }

    #[test]
    fn derived_names_fit_and_differ() {
        let long = TableName::parse(&"a".repeat(63), false).expect("valid");
        let op = long.derived("_operation_id");
        let exp = long.derived("_expires_at");
        assert!(op.len() <= 63 && exp.len() <= 63);
        assert_ne!(op, exp);
    }

    #[test]
    fn long_names_with_a_common_prefix_derive_different_names() {
        let base = "t".repeat(58);
        let a = TableName::parse(&format!("{base}_a"), false).expect("valid");
        let b = TableName::parse(&format!("{base}_b"), false).expect("valid");
        for suffix in ["_operation_id", "_expires_at", "_purge_from"] {
            let (da, db) = (a.derived(suffix), b.derived(suffix));
            assert!(da.len() <= 63 && db.len() <= 63, "{da} {db}");
            assert!(da.ends_with(suffix));
            assert_ne!(da, db);
        }
        // Names that fit keep the plain form, so existing indexes keep their names.
        assert_eq!(
            TableName::default_name().derived("_expires_at"),
            "idempotency_records_expires_at"
        );
    }
}
