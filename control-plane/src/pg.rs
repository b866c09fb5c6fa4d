//! `fleetctl data import --postgres URL --query SQL`: rows of a PostgreSQL query as JSON
//! objects, ready to become a dataset. Numbers, text and booleans map directly; other
//! column types are refused with a hint to cast them in the query (`amount::float8`).
//!
//! TLS when the URL asks for it (`sslmode=require`): rustls on the ring provider,
//! checking the server's certificate and name against `--postgres-ca FILE`, else
//! `PGSSLROOTCERT`, else the system's CA store — stricter than libpq's `require`, which
//! does not check the certificate. Without `sslmode=require` the connection is plain
//! (`prefer` does not silently fall back to TLS without checking).

use anyhow::{Context, bail};
use postgres::types::Type;
use serde_json::{Map, Value, json};

/// Most rows one import reads.
pub const MAX_ROWS: usize = crate::datasets::MAX_ROWS;

/// `postgres://user@host:port/db` of `url`, without its password, for the manifest.
pub fn describe(url: &str) -> anyhow::Result<String> {
    let config: postgres::Config = url
        .parse()
        .context("--postgres: not a PostgreSQL connection string (postgres://USER[:PASSWORD]@HOST[:PORT]/DB)")?;
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            postgres::config::Host::Tcp(h) => h.clone(),
            postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_default();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    Ok(format!(
        "postgres://{}@{host}:{port}/{}",
        config.get_user().unwrap_or(""),
        config.get_dbname().unwrap_or("")
    ))
}

/// The CAs a PostgreSQL server's certificate is checked against.
fn tls_roots(
    ca: Option<&std::path::Path>,
) -> anyhow::Result<std::sync::Arc<fleetml_net::tls::rustls::ClientConfig>> {
    let file = ca
        .map(std::path::Path::to_path_buf)
        .or_else(|| std::env::var_os("PGSSLROOTCERT").map(Into::into));
    match file {
        Some(f) => {
            let pem = std::fs::read(&f)
                .with_context(|| format!("reading the PostgreSQL CA {}", f.display()))?;
            fleetml_net::tls::client_config(&pem, &f.display().to_string())
                .map_err(anyhow::Error::msg)
        }
        None => fleetml_net::tls::system_roots().map_err(anyhow::Error::msg),
    }
}

/// The TLS connector `config` asks for: rustls, checking the server against `ca` (else
/// `PGSSLROOTCERT`, else the system's CAs), when it says `sslmode=require`; None (plain)
/// otherwise. Every PostgreSQL connection of the control plane chooses through this.
pub(crate) fn tls_for(
    config: &postgres::Config,
    ca: Option<&std::path::Path>,
) -> anyhow::Result<Option<tokio_postgres_rustls::MakeRustlsConnect>> {
    if config.get_ssl_mode() != postgres::config::SslMode::Require {
        return Ok(None);
    }
    Ok(Some(tokio_postgres_rustls::MakeRustlsConnect::new(
        std::sync::Arc::unwrap_or_clone(tls_roots(ca)?),
    )))
}

/// Runs `sql` and returns its rows as CSV (columns in the query's order) and the row
/// count.
pub fn query_csv(
    url: &str,
    sql: &str,
    ca: Option<&std::path::Path>,
) -> anyhow::Result<(Vec<u8>, usize)> {
    let (names, rows) = query(url, sql, ca)?;
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(&names)?;
    for row in &rows {
        w.write_record(names.iter().map(|n| match &row[n] {
            Value::Null => String::new(),
            Value::Bool(b) => u8::from(*b).to_string(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }))?;
    }
    Ok((
        w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?,
        rows.len(),
    ))
}

/// A query's column names in order, and its rows.
pub type Rows = (Vec<String>, Vec<Map<String, Value>>);

/// Runs `sql`; returns its column names in order and its rows.
pub fn query(url: &str, sql: &str, ca: Option<&std::path::Path>) -> anyhow::Result<Rows> {
    let where_ = describe(url)?;
    let config: postgres::Config = url.parse().context("--postgres")?;
    let mut client = match tls_for(&config, ca)? {
        Some(tls) => config
            .connect(tls)
            .with_context(|| format!("connecting to {where_} over TLS"))?,
        None => config
            .connect(postgres::NoTls)
            .with_context(|| format!("connecting to {where_}"))?,
    };
    let rows = client
        .query(sql, &[])
        .with_context(|| format!("running the query on {where_}"))?;
    if rows.len() > MAX_ROWS {
        bail!(
            "the query returned {} rows, more than the limit of {MAX_ROWS}",
            rows.len()
        );
    }
    let names: Vec<String> = rows
        .first()
        .map(|r| r.columns().iter().map(|c| c.name().to_string()).collect())
        .unwrap_or_default();
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let mut object = Map::new();
        for (i, column) in row.columns().iter().enumerate() {
            let t = column.type_();
            let v = if *t == Type::BOOL {
                json!(row.try_get::<_, Option<bool>>(i)?)
            } else if *t == Type::INT2 {
                json!(row.try_get::<_, Option<i16>>(i)?)
            } else if *t == Type::INT4 {
                json!(row.try_get::<_, Option<i32>>(i)?)
            } else if *t == Type::INT8 {
                json!(row.try_get::<_, Option<i64>>(i)?)
            } else if *t == Type::FLOAT4 {
                json!(row.try_get::<_, Option<f32>>(i)?)
            } else if *t == Type::FLOAT8 {
                json!(row.try_get::<_, Option<f64>>(i)?)
            } else if [Type::TEXT, Type::VARCHAR, Type::BPCHAR, Type::NAME].contains(t) {
                json!(row.try_get::<_, Option<String>>(i)?)
            } else {
                bail!(
                    "column `{}` has PostgreSQL type {t}; datasets hold numbers and text: cast it in the query (`{0}::float8` or `{0}::text`)",
                    column.name()
                );
            };
            object.insert(column.name().to_string(), v);
        }
        out.push(object);
    }
    Ok((names, out))
}
