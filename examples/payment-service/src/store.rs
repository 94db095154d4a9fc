//! The `payments` table, on SQLite or PostgreSQL.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tower_idempotency::{LedgerTx, TransactionalLedger};
use tower_idempotency_sqlx::{
    PostgresLedger, SqliteLedger,
    sqlx::{
        self, Executor, PgPool, Postgres, Row, Sqlite, SqlitePool, postgres::PgRow,
        sqlite::SqliteRow,
    },
};
use uuid::Uuid;

use crate::auth::Tenant;

/// The longest `customer` accepted, in characters.
pub const MAX_CUSTOMER_LEN: usize = 200;

/// How many payments `GET /payments?customer=..` returns at most (the oldest first).
pub const LIST_LIMIT: i64 = 100;

const SQLITE_SCHEMA: &str = "\
CREATE TABLE IF NOT EXISTS payments (
    id         TEXT PRIMARY KEY,
    tenant     TEXT NOT NULL,
    amount     INTEGER NOT NULL CHECK (amount > 0),
    currency   TEXT NOT NULL,
    customer   TEXT NOT NULL,
    status     TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS payments_tenant_customer ON payments (tenant, customer, created_at);";

const POSTGRES_SCHEMA: &str = "\
CREATE TABLE IF NOT EXISTS payments (
    id         TEXT PRIMARY KEY,
    tenant     TEXT NOT NULL,
    amount     BIGINT NOT NULL CHECK (amount > 0),
    currency   TEXT NOT NULL,
    customer   TEXT NOT NULL,
    status     TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS payments_tenant_customer ON payments (tenant, customer, created_at);";

/// The body of `POST /payments`. Unknown fields are refused, so that a misspelt field is an
/// error rather than silently ignored.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPayment {
    /// Positive, in minor units (cents).
    #[schema(minimum = 1)]
    pub amount: i64,
    /// ISO 4217 style: three upper-case ASCII letters.
    #[schema(pattern = "^[A-Z]{3}$", example = "EUR")]
    pub currency: String,
    /// Who pays: 1 to [`MAX_CUSTOMER_LEN`] characters.
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    pub customer: String,
}

impl NewPayment {
    /// Checks the values that the types do not: `Err` carries the problem's detail.
    pub fn validate(&self) -> Result<(), String> {
        if self.amount <= 0 {
            return Err("amount: must be a positive integer of minor units".into());
        }
        if self.currency.len() != 3 || !self.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err("currency: must be three upper-case ASCII letters, such as EUR".into());
        }
        let len = self.customer.chars().count();
        if self.customer.trim().is_empty() || len > MAX_CUSTOMER_LEN {
            return Err(format!(
                "customer: must be 1 to {MAX_CUSTOMER_LEN} characters, not blank"
            ));
        }
        Ok(())
    }
}

/// A payment as stored and answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Payment {
    /// `pay_` and 32 hex digits.
    pub id: String,
    /// In minor units.
    pub amount: i64,
    /// Three upper-case letters.
    pub currency: String,
    /// Who paid.
    pub customer: String,
    /// Always `succeeded`: a failed charge writes no payment.
    #[schema(pattern = "^succeeded$")]
    pub status: String,
    /// RFC 3339, UTC, milliseconds.
    pub created_at: String,
}

impl Payment {
    /// A new succeeded payment for `new`, with a fresh id, created now.
    pub fn succeeded(new: NewPayment) -> Self {
        Self {
            id: format!("pay_{}", Uuid::new_v4().simple()),
            amount: new.amount,
            currency: new.currency,
            customer: new.customer,
            status: "succeeded".to_owned(),
            created_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        }
    }
}

/// Where payments are kept: the database of the idempotency ledger.
#[derive(Debug, Clone)]
pub enum Store {
    /// A SQLite file (or memory), the same one as the ledger's.
    Sqlite(SqlitePool),
    /// A PostgreSQL database.
    Postgres(PgPool),
}

const INSERT: &str = "INSERT INTO payments (id, tenant, amount, currency, customer, status, \
    created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)";
const SELECT_ONE: &str = "SELECT id, amount, currency, customer, status, created_at \
    FROM payments WHERE tenant = $1 AND id = $2";
const SELECT_BY_CUSTOMER: &str = "SELECT id, amount, currency, customer, status, created_at \
    FROM payments WHERE tenant = $1 AND customer = $2 ORDER BY created_at, id LIMIT $3";

/// Writes one payment row on a SQLite executor (a pool, a connection or a transaction).
///
/// Exactly-once mode runs it on the ledger's transaction ([`PaymentLedger`]).
pub async fn insert_payment_sqlite<'e, E>(
    executor: E,
    tenant: &Tenant,
    payment: &Payment,
) -> Result<(), sqlx::Error>
where
    E: Executor<'e, Database = Sqlite>,
{
    sqlx::query(INSERT)
        .bind(&payment.id)
        .bind(tenant.id())
        .bind(payment.amount)
        .bind(&payment.currency)
        .bind(&payment.customer)
        .bind(&payment.status)
        .bind(&payment.created_at)
        .execute(executor)
        .await?;
    Ok(())
}

/// Writes one payment row on a PostgreSQL executor (a pool, a connection or a transaction).
///
/// Exactly-once mode runs it on the ledger's transaction ([`PaymentLedger`]).
pub async fn insert_payment_postgres<'e, E>(
    executor: E,
    tenant: &Tenant,
    payment: &Payment,
) -> Result<(), sqlx::Error>
where
    E: Executor<'e, Database = Postgres>,
{
    sqlx::query(INSERT)
        .bind(&payment.id)
        .bind(tenant.id())
        .bind(payment.amount)
        .bind(&payment.currency)
        .bind(&payment.customer)
        .bind(&payment.status)
        .bind(&payment.created_at)
        .execute(executor)
        .await?;
    Ok(())
}

/// A ledger whose database also holds the `payments` table, so that exactly-once mode can write
/// a payment in the transaction that stores its response ([`LedgerTx`]).
pub trait PaymentLedger: TransactionalLedger {
    /// Writes `payment` for `tenant` on the request's transaction: it commits with the stored
    /// response, or not at all.
    fn insert_in(
        tx: &mut LedgerTx<Self>,
        tenant: &Tenant,
        payment: &Payment,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
}

impl PaymentLedger for SqliteLedger {
    async fn insert_in(
        tx: &mut LedgerTx<Self>,
        tenant: &Tenant,
        payment: &Payment,
    ) -> Result<(), sqlx::Error> {
        insert_payment_sqlite(&mut **tx, tenant, payment).await
    }
}

impl PaymentLedger for PostgresLedger {
    async fn insert_in(
        tx: &mut LedgerTx<Self>,
        tenant: &Tenant,
        payment: &Payment,
    ) -> Result<(), sqlx::Error> {
        insert_payment_postgres(&mut **tx, tenant, payment).await
    }
}

fn sqlite_payment(row: &SqliteRow) -> Result<Payment, sqlx::Error> {
    Ok(Payment {
        id: row.try_get("id")?,
        amount: row.try_get("amount")?,
        currency: row.try_get("currency")?,
        customer: row.try_get("customer")?,
        status: row.try_get("status")?,
        created_at: row.try_get("created_at")?,
    })
}

fn postgres_payment(row: &PgRow) -> Result<Payment, sqlx::Error> {
    Ok(Payment {
        id: row.try_get("id")?,
        amount: row.try_get("amount")?,
        currency: row.try_get("currency")?,
        customer: row.try_get("customer")?,
        status: row.try_get("status")?,
        created_at: row.try_get("created_at")?,
    })
}

impl Store {
    /// Creates the `payments` table and its index if they do not exist. On PostgreSQL this runs
    /// under an advisory lock, so instances (and tests) starting together do not race.
    pub async fn migrate(&self) -> Result<(), sqlx::Error> {
        match self {
            Self::Sqlite(pool) => {
                sqlx::raw_sql(SQLITE_SCHEMA).execute(pool).await?;
            }
            Self::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext('payment-service:payments'))")
                    .execute(&mut *tx)
                    .await?;
                sqlx::raw_sql(POSTGRES_SCHEMA).execute(&mut *tx).await?;
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// Writes `payment` for `tenant`.
    pub async fn insert(&self, tenant: &Tenant, payment: &Payment) -> Result<(), sqlx::Error> {
        match self {
            Self::Sqlite(pool) => insert_payment_sqlite(pool, tenant, payment).await,
            Self::Postgres(pool) => insert_payment_postgres(pool, tenant, payment).await,
        }
    }

    /// The tenant's payment `id`, if it exists.
    pub async fn get(&self, tenant: &Tenant, id: &str) -> Result<Option<Payment>, sqlx::Error> {
        match self {
            Self::Sqlite(pool) => sqlx::query(SELECT_ONE)
                .bind(tenant.id())
                .bind(id)
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(sqlite_payment)
                .transpose(),
            Self::Postgres(pool) => sqlx::query(SELECT_ONE)
                .bind(tenant.id())
                .bind(id)
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(postgres_payment)
                .transpose(),
        }
    }

    /// The tenant's payments by `customer`, oldest first, at most [`LIST_LIMIT`].
    pub async fn by_customer(
        &self,
        tenant: &Tenant,
        customer: &str,
    ) -> Result<Vec<Payment>, sqlx::Error> {
        match self {
            Self::Sqlite(pool) => sqlx::query(SELECT_BY_CUSTOMER)
                .bind(tenant.id())
                .bind(customer)
                .bind(LIST_LIMIT)
                .fetch_all(pool)
                .await?
                .iter()
                .map(sqlite_payment)
                .collect(),
            Self::Postgres(pool) => sqlx::query(SELECT_BY_CUSTOMER)
                .bind(tenant.id())
                .bind(customer)
                .bind(LIST_LIMIT)
                .fetch_all(pool)
                .await?
                .iter()
                .map(postgres_payment)
                .collect(),
        }
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        match self {
            Self::Sqlite(pool) => sqlx::query("SELECT 1").execute(pool).await.map(drop),
            Self::Postgres(pool) => sqlx::query("SELECT 1").execute(pool).await.map(drop),
        }
    }
}
