//! Reads a WXAUTO-MGT database (read-only): `instances`, `service_platforms`, `delivery_rules`,
//! `fixed_listeners` and the count of manual `listeners`. Columns are read by name, so older
//! files without the later-added columns still load.

use std::collections::HashMap;
use std::path::Path;

use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OpenFlags};
use serde_json::Value;

use super::ImportError;
use crate::secret::Secret;

/// Everything the importer uses from the database.
#[derive(Debug, Default)]
pub(super) struct MgtDb {
    pub instances: Vec<MgtInstance>,
    pub platforms: Vec<MgtPlatform>,
    pub rules: Vec<MgtRule>,
    pub fixed_listeners: Vec<MgtFixedListener>,
    /// Rows of `listeners` with `manual_added = 1`.
    pub manual_listeners: usize,
    /// Expected tables that are not in the file.
    pub missing_tables: Vec<&'static str>,
}

#[derive(Debug)]
pub(super) struct MgtInstance {
    pub instance_id: String,
    pub name: String,
    pub base_url: String,
    pub api_key: Secret,
    pub enabled: bool,
    /// The JSON `config` (`poll_interval`, `timeout_minutes`, `timeout`, `retry_limit`).
    pub config: Value,
}

#[derive(Debug)]
pub(super) struct MgtPlatform {
    pub platform_id: String,
    pub name: String,
    pub kind: String,
    /// The JSON `config`; holds secrets (`api_key`, `password`): never print it.
    pub config: Value,
    pub enabled: bool,
}

#[derive(Debug)]
pub(super) struct MgtRule {
    pub rule_id: String,
    pub name: String,
    pub instance_id: String,
    pub chat_pattern: String,
    pub platform_id: String,
    pub priority: i64,
    pub enabled: bool,
    pub only_at: bool,
    pub at_name: String,
    pub reply_at_sender: bool,
}

#[derive(Debug)]
pub(super) struct MgtFixedListener {
    pub session_name: String,
    pub enabled: bool,
    pub description: String,
}

/// One row, by column name.
struct Row(HashMap<String, SqlValue>);

// === reading ===

/// Opens `path` read-only and reads the four tables.
pub(super) fn read(path: &Path) -> Result<MgtDb, ImportError> {
    if !path.is_file() {
        return Err(ImportError::NoDatabase(path.to_path_buf()));
    }
    let open = |err: rusqlite::Error| ImportError::Database {
        path: path.to_path_buf(),
        reason: err.to_string(),
    };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(open)?;
    let tables = table_names(&conn).map_err(open)?;
    let mut db = MgtDb::default();
    for table in [
        "instances",
        "service_platforms",
        "delivery_rules",
        "fixed_listeners",
    ] {
        if !tables.iter().any(|name| name == table) {
            db.missing_tables.push(table);
        }
    }
    if db.missing_tables.len() == 4 {
        return Err(ImportError::NotMgt(path.to_path_buf()));
    }
    let has = |table: &str| tables.iter().any(|name| name == table);
    if has("instances") {
        db.instances = rows(&conn, "instances")
            .map_err(open)?
            .into_iter()
            .map(|row| MgtInstance {
                instance_id: row.text("instance_id"),
                name: row.text("name"),
                base_url: row.text("base_url"),
                api_key: Secret::new(row.text("api_key")),
                enabled: row.flag("enabled", true),
                config: row.json("config"),
            })
            .collect();
    }
    if has("service_platforms") {
        db.platforms = rows(&conn, "service_platforms")
            .map_err(open)?
            .into_iter()
            .map(|row| MgtPlatform {
                platform_id: row.text("platform_id"),
                name: row.text("name"),
                kind: row.text("type"),
                config: row.json("config"),
                enabled: row.flag("enabled", true),
            })
            .collect();
    }
    if has("delivery_rules") {
        db.rules = rows(&conn, "delivery_rules")
            .map_err(open)?
            .into_iter()
            .map(|row| MgtRule {
                rule_id: row.text("rule_id"),
                name: row.text("name"),
                instance_id: row.text("instance_id"),
                chat_pattern: row.text("chat_pattern"),
                platform_id: row.text("platform_id"),
                priority: row.int("priority").unwrap_or(0),
                enabled: row.flag("enabled", true),
                only_at: row.flag("only_at_messages", false),
                at_name: row.text("at_name"),
                reply_at_sender: row.flag("reply_at_sender", false),
            })
            .collect();
    }
    if has("fixed_listeners") {
        db.fixed_listeners = rows(&conn, "fixed_listeners")
            .map_err(open)?
            .into_iter()
            .map(|row| MgtFixedListener {
                session_name: row.text("session_name"),
                enabled: row.flag("enabled", true),
                description: row.text("description"),
            })
            .collect();
    }
    if has("listeners") {
        db.manual_listeners = rows(&conn, "listeners")
            .map_err(open)?
            .iter()
            .filter(|row| row.flag("manual_added", false))
            .count();
    }
    Ok(db)
}

fn table_names(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT name FROM sqlite_master WHERE type = 'table'")?;
    let names = stmt.query_map([], |row| row.get(0))?;
    names.collect()
}

/// Every row of `table` in rowid order (WXAUTO-MGT's tie order), by column name.
fn rows(conn: &Connection, table: &str) -> rusqlite::Result<Vec<Row>> {
    // `table` is one of our literals, never user input.
    let mut stmt = conn.prepare(&format!("SELECT * FROM {table} ORDER BY rowid"))?;
    let names: Vec<String> = stmt.column_names().into_iter().map(str::to_owned).collect();
    let mut rows = stmt.query([])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let mut values = HashMap::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            values.insert(name.clone(), row.get::<_, SqlValue>(i)?);
        }
        out.push(Row(values));
    }
    Ok(out)
}

// === impl Row ===

impl Row {
    /// A column as text; NULL and a missing column are empty.
    fn text(&self, name: &str) -> String {
        match self.0.get(name) {
            Some(SqlValue::Text(text)) => text.clone(),
            Some(SqlValue::Integer(n)) => n.to_string(),
            Some(SqlValue::Real(x)) => x.to_string(),
            Some(SqlValue::Blob(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
            Some(SqlValue::Null) | None => String::new(),
        }
    }

    fn int(&self, name: &str) -> Option<i64> {
        match self.0.get(name)? {
            SqlValue::Integer(n) => Some(*n),
            SqlValue::Text(text) => text.trim().parse().ok(),
            // Whole numbers stored as REAL; anything else is not an integer.
            #[allow(clippy::cast_possible_truncation)]
            SqlValue::Real(x) if x.fract() == 0.0 && x.abs() < 9.0e15 => Some(*x as i64),
            _ => None,
        }
    }

    /// A 0/1 column (also `true`/`false` text); `default` when NULL or missing.
    fn flag(&self, name: &str, default: bool) -> bool {
        match self.0.get(name) {
            Some(SqlValue::Text(text)) => match text.trim().to_ascii_lowercase().as_str() {
                "1" | "true" => true,
                "0" | "false" | "" => false,
                _ => default,
            },
            Some(SqlValue::Null) | None => default,
            Some(_) => self.int(name).map_or(default, |n| n != 0),
        }
    }

    /// A JSON text column; NULL, missing or invalid JSON is `Null`.
    fn json(&self, name: &str) -> Value {
        let text = self.text(name);
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }
}
