//! Versioned datasets: immutable tables named by the SHA-256 of their Parquet file
//! (`DATA_DIR/datasets/<sha256>.parquet`, or `PREFIX/datasets/` in the object storage
//! `--blobs s3://` names; readable by pandas, polars and DuckDB), each
//! with a manifest (sources, devices, time range, rows, schema, filters) in the store
//! ([`DatasetStore`]). They come from files (CSV, JSON lines, Parquet), from query results, and
//! from the data devices captured.
//!
//! Columns are numbers (Float64) or text (Utf8), nullable: what the feature schema and
//! the trainers need, and what every reader understands. The Parquet bytes are a pure
//! function of the table (one row group, Snappy, fixed writer settings), so the same
//! rows in the same order always get the same name.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, Float64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use fleetml_protocol::crypto::sha256;
use serde_json::Value;

pub use crate::records::{ColumnInfo, DatasetManifest};
use crate::refusal::Refusal;
use crate::store::{BlobStore, DatasetStore, StoreError};

/// Most rows one dataset holds.
pub const MAX_ROWS: usize = 5_000_000;

/// One column's values.
#[derive(Debug, Clone, PartialEq)]
pub enum Column {
    Number(Vec<Option<f64>>),
    Text(Vec<Option<String>>),
}

impl Column {
    pub fn len(&self) -> usize {
        match self {
            Column::Number(v) => v.len(),
            Column::Text(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_missing(&self, row: usize) -> bool {
        match self {
            Column::Number(v) => v[row].is_none(),
            Column::Text(v) => v[row].is_none(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Column::Number(_) => "number",
            Column::Text(_) => "text",
        }
    }

    fn take(&self, keep: &[usize]) -> Column {
        match self {
            Column::Number(v) => Column::Number(keep.iter().map(|i| v[*i]).collect()),
            Column::Text(v) => Column::Text(keep.iter().map(|i| v[*i].clone()).collect()),
        }
    }

    /// The value as text (CSV cells).
    pub fn cell(&self, row: usize) -> String {
        match self {
            Column::Number(v) => v[row].map(fmt_number).unwrap_or_default(),
            Column::Text(v) => v[row].clone().unwrap_or_default(),
        }
    }
}

fn fmt_number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

/// A table of named columns of equal length.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Table {
    pub columns: Vec<(String, Column)>,
}

/// A cell while a table is read: a number, text, or missing.
#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Missing,
    Number(f64),
    Text(String),
}

fn cell_of_text(s: &str) -> Cell {
    let t = s.trim();
    if t.is_empty() || matches!(t, "NA" | "NaN" | "nan" | "null" | "NULL" | "None") {
        Cell::Missing
    } else if let Ok(n) = t.parse::<f64>() {
        if n.is_finite() {
            Cell::Number(n)
        } else {
            Cell::Missing
        }
    } else {
        Cell::Text(s.to_string())
    }
}

fn cell_of_json(v: &Value) -> Cell {
    match v {
        Value::Null => Cell::Missing,
        Value::Number(n) => n.as_f64().map_or(Cell::Missing, Cell::Number),
        Value::Bool(b) => Cell::Number(f64::from(u8::from(*b))),
        Value::String(s) => Cell::Text(s.clone()),
        other => Cell::Text(other.to_string()),
    }
}

impl Table {
    pub fn rows(&self) -> usize {
        self.columns.first().map_or(0, |(_, c)| c.len())
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }

    /// Builds columns from rows of cells under `names`: a column of only numbers (and
    /// missing values) is numeric, any other is text.
    fn from_cells(names: Vec<String>, rows: Vec<Vec<Cell>>) -> Result<Table, String> {
        if rows.len() > MAX_ROWS {
            return Err(format!(
                "{} rows, more than the limit of {MAX_ROWS}",
                rows.len()
            ));
        }
        let mut columns = Vec::with_capacity(names.len());
        for (i, name) in names.into_iter().enumerate() {
            let get = |r: &Vec<Cell>| r.get(i).cloned().unwrap_or(Cell::Missing);
            let numeric = rows.iter().all(|r| !matches!(get(r), Cell::Text(_)));
            let column = if numeric {
                Column::Number(
                    rows.iter()
                        .map(|r| match get(r) {
                            Cell::Number(n) => Some(n),
                            _ => None,
                        })
                        .collect(),
                )
            } else {
                Column::Text(
                    rows.iter()
                        .map(|r| match get(r) {
                            Cell::Number(n) => Some(fmt_number(n)),
                            Cell::Text(t) => Some(t),
                            Cell::Missing => None,
                        })
                        .collect(),
                )
            };
            columns.push((name, column));
        }
        Ok(Table { columns })
    }

    pub fn from_csv(bytes: &[u8]) -> Result<Table, String> {
        let mut reader = csv::ReaderBuilder::new().flexible(false).from_reader(bytes);
        let names: Vec<String> = reader
            .headers()
            .map_err(|e| format!("CSV header: {e}"))?
            .iter()
            .map(str::to_string)
            .collect();
        check_names(&names)?;
        let mut rows = Vec::new();
        for (i, record) in reader.records().enumerate() {
            let record = record.map_err(|e| format!("CSV row {}: {e}", i + 2))?;
            rows.push(record.iter().map(cell_of_text).collect());
            if rows.len() > MAX_ROWS {
                return Err(format!("more than {MAX_ROWS} rows"));
            }
        }
        Table::from_cells(names, rows)
    }

    /// JSON lines of flat objects; columns in the order keys first appear.
    pub fn from_jsonl(bytes: &[u8]) -> Result<Table, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
        let mut objects = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value =
                serde_json::from_str(line).map_err(|e| format!("line {}: {e}", i + 1))?;
            let Value::Object(map) = v else {
                return Err(format!("line {}: not a JSON object", i + 1));
            };
            objects.push(map);
        }
        Table::from_objects(&objects)
    }

    pub fn from_objects(objects: &[serde_json::Map<String, Value>]) -> Result<Table, String> {
        let mut names: Vec<String> = Vec::new();
        let mut index = BTreeMap::new();
        for o in objects {
            for k in o.keys() {
                if !index.contains_key(k) {
                    index.insert(k.clone(), names.len());
                    names.push(k.clone());
                }
            }
        }
        check_names(&names)?;
        let rows = objects
            .iter()
            .map(|o| {
                names
                    .iter()
                    .map(|n| o.get(n).map_or(Cell::Missing, cell_of_json))
                    .collect()
            })
            .collect();
        Table::from_cells(names, rows)
    }

    pub fn from_parquet(bytes: Vec<u8>) -> Result<Table, String> {
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
            .map_err(|e| format!("not a Parquet file: {e}"))?
            .build()
            .map_err(|e| format!("Parquet: {e}"))?;
        let mut names: Vec<String> = Vec::new();
        let mut rows: Vec<Vec<Cell>> = Vec::new();
        for batch in reader {
            let batch = batch.map_err(|e| format!("Parquet: {e}"))?;
            if names.is_empty() {
                names = batch
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| f.name().clone())
                    .collect();
                check_names(&names)?;
            }
            let cast: Vec<Vec<Cell>> = batch
                .columns()
                .iter()
                .zip(batch.schema().fields())
                .map(|(a, f)| column_cells(a, f.name()))
                .collect::<Result<_, _>>()?;
            for r in 0..batch.num_rows() {
                rows.push(cast.iter().map(|c| c[r].clone()).collect());
            }
            if rows.len() > MAX_ROWS {
                return Err(format!("more than {MAX_ROWS} rows"));
            }
        }
        Table::from_cells(names, rows)
    }

    /// The rows with no missing value in any of `columns`.
    pub fn drop_na(&self, columns: &[String]) -> Result<Table, String> {
        for c in columns {
            if self.column(c).is_none() {
                return Err(format!("--drop-na: no column `{c}`"));
            }
        }
        let keep: Vec<usize> = (0..self.rows())
            .filter(|r| {
                columns
                    .iter()
                    .all(|c| self.column(c).is_some_and(|col| !col.is_missing(*r)))
            })
            .collect();
        Ok(self.take(&keep))
    }

    fn take(&self, keep: &[usize]) -> Table {
        Table {
            columns: self
                .columns
                .iter()
                .map(|(n, c)| (n.clone(), c.take(keep)))
                .collect(),
        }
    }

    /// Rows of `self` then rows of `other`, matching columns by name (a column only one
    /// side has is missing on the other; a column numeric on one side and text on the
    /// other becomes text).
    pub fn concat(&self, other: &Table) -> Table {
        let mut names: Vec<String> = self.columns.iter().map(|(n, _)| n.clone()).collect();
        for (n, _) in &other.columns {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        let cells = |t: &Table, name: &str| -> Vec<Cell> {
            match t.column(name) {
                Some(Column::Number(v)) => v
                    .iter()
                    .map(|x| x.map_or(Cell::Missing, Cell::Number))
                    .collect(),
                Some(Column::Text(v)) => v
                    .iter()
                    .map(|x| x.clone().map_or(Cell::Missing, |s| cell_of_text(&s)))
                    .collect(),
                None => vec![Cell::Missing; t.rows()],
            }
        };
        let columns: Vec<Vec<Cell>> = names
            .iter()
            .map(|n| {
                let mut c = cells(self, n);
                c.extend(cells(other, n));
                c
            })
            .collect();
        let rows = self.rows() + other.rows();
        let rows: Vec<Vec<Cell>> = (0..rows)
            .map(|r| columns.iter().map(|c| c[r].clone()).collect())
            .collect();
        Table::from_cells(names, rows).unwrap_or_default()
    }

    pub fn schema(&self) -> Vec<ColumnInfo> {
        self.columns
            .iter()
            .map(|(n, c)| ColumnInfo {
                name: n.clone(),
                kind: c.kind().into(),
            })
            .collect()
    }

    /// The canonical Parquet bytes of the table.
    pub fn to_parquet(&self) -> Result<Vec<u8>, String> {
        use parquet::arrow::ArrowWriter;
        use parquet::basic::Compression;
        use parquet::file::properties::WriterProperties;
        let fields: Vec<Field> = self
            .columns
            .iter()
            .map(|(n, c)| {
                Field::new(
                    n,
                    match c {
                        Column::Number(_) => DataType::Float64,
                        Column::Text(_) => DataType::Utf8,
                    },
                    true,
                )
            })
            .collect();
        let schema = Arc::new(Schema::new(fields));
        let arrays: Vec<ArrayRef> = self
            .columns
            .iter()
            .map(|(_, c)| -> ArrayRef {
                match c {
                    Column::Number(v) => Arc::new(Float64Array::from(v.clone())),
                    Column::Text(v) => Arc::new(StringArray::from(v.clone())),
                }
            })
            .collect();
        let batch = RecordBatch::try_new(schema.clone(), arrays).map_err(|e| e.to_string())?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_created_by("fleetml datasets".into())
            .set_max_row_group_size(MAX_ROWS)
            .build();
        let mut out = Vec::new();
        let mut writer =
            ArrowWriter::try_new(&mut out, schema, Some(props)).map_err(|e| e.to_string())?;
        writer.write(&batch).map_err(|e| e.to_string())?;
        writer.close().map_err(|e| e.to_string())?;
        Ok(out)
    }

    pub fn to_csv(&self) -> Vec<u8> {
        let mut w = csv::Writer::from_writer(Vec::new());
        let _ = w.write_record(self.columns.iter().map(|(n, _)| n.as_str()));
        for r in 0..self.rows() {
            let _ = w.write_record(self.columns.iter().map(|(_, c)| c.cell(r)));
        }
        w.into_inner().unwrap_or_default()
    }
}

fn column_cells(a: &ArrayRef, name: &str) -> Result<Vec<Cell>, String> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float32Type, Float64Type, Int32Type, Int64Type};
    // Row i's cell, or missing where the array holds a null.
    let cells = |value: &dyn Fn(usize) -> Cell| -> Vec<Cell> {
        (0..a.len())
            .map(|i| {
                if a.is_null(i) {
                    Cell::Missing
                } else {
                    value(i)
                }
            })
            .collect()
    };
    let out = match a.data_type() {
        DataType::Float64 => {
            let x = a.as_primitive::<Float64Type>();
            cells(&|i| Cell::Number(x.value(i)))
        }
        DataType::Float32 => {
            let x = a.as_primitive::<Float32Type>();
            cells(&|i| Cell::Number(f64::from(x.value(i))))
        }
        DataType::Int64 => {
            let x = a.as_primitive::<Int64Type>();
            cells(&|i| Cell::Number(x.value(i) as f64))
        }
        DataType::Int32 => {
            let x = a.as_primitive::<Int32Type>();
            cells(&|i| Cell::Number(f64::from(x.value(i))))
        }
        DataType::Boolean => {
            let x = a.as_boolean();
            cells(&|i| Cell::Number(f64::from(u8::from(x.value(i)))))
        }
        DataType::Utf8 => {
            let x = a.as_string::<i32>();
            cells(&|i| Cell::Text(x.value(i).to_string()))
        }
        DataType::LargeUtf8 => {
            let x = a.as_string::<i64>();
            cells(&|i| Cell::Text(x.value(i).to_string()))
        }
        other => {
            return Err(format!(
                "column `{name}` has Parquet/Arrow type {other}; datasets hold numbers and text"
            ));
        }
    };
    Ok(out)
}

fn check_names(names: &[String]) -> Result<(), String> {
    if names.is_empty() {
        return Err("no columns".into());
    }
    let mut seen = std::collections::BTreeSet::new();
    for n in names {
        if n.is_empty() || n.len() > 200 {
            return Err(format!("column name `{n}` must be 1–200 characters"));
        }
        if !seen.insert(n) {
            return Err(format!("column `{n}` appears twice"));
        }
    }
    Ok(())
}

/// Where a table came from, for its manifest.
#[derive(Debug, Clone, Default)]
pub struct Provenance {
    pub name: String,
    pub sources: Vec<String>,
    pub devices: Vec<String>,
    pub time_range: Option<(u64, u64)>,
    pub filters: Vec<String>,
}

/// Dataset files in a [`BlobStore`] (`DATA_DIR/datasets`, or object storage shared by
/// the replicas), their manifests in a [`DatasetStore`].
#[derive(Clone)]
pub struct Datasets {
    store: Arc<dyn DatasetStore>,
    files: Arc<dyn BlobStore>,
}

impl std::fmt::Debug for Datasets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datasets").finish_non_exhaustive()
    }
}

impl Datasets {
    /// Manifests in `store`, Parquet files in `files`.
    pub fn open_in(store: Arc<dyn DatasetStore>, files: Arc<dyn BlobStore>) -> Datasets {
        Datasets { store, files }
    }

    /// A local file holding dataset `id` (fetched from object storage on first use).
    pub fn local(&self, id: &str) -> std::io::Result<PathBuf> {
        self.files.local(id)
    }

    /// Whether the file of dataset `id` is kept (without fetching it); an error when
    /// the store that keeps it does not answer.
    pub fn available(&self, id: &str) -> std::io::Result<bool> {
        self.files.exists(id)
    }

    /// Keeps `table` (once per content); `false` when it was already there.
    pub fn put(
        &self,
        table: &Table,
        p: Provenance,
        now_ms: u64,
    ) -> Result<(bool, DatasetManifest), String> {
        if table.rows() == 0 {
            return Err("the dataset would have no rows".into());
        }
        let bytes = table.to_parquet()?;
        let id = sha256(&bytes).to_string();
        if let Some(m) = self.get(&id).map_err(|e| e.to_string())? {
            return Ok((false, m));
        }
        let manifest = DatasetManifest {
            id: id.clone(),
            name: p.name,
            created_ms: now_ms,
            sources: p.sources,
            devices: p.devices,
            time_range: p.time_range,
            rows: table.rows() as u64,
            bytes: bytes.len() as u64,
            schema: table.schema(),
            filters: p.filters,
        };
        let keep = || -> std::io::Result<()> {
            use std::io::Write;
            use std::os::unix::fs::PermissionsExt;
            let mut file = self.files.incoming()?;
            file.write_all(&bytes)?;
            file.as_file()
                .set_permissions(std::fs::Permissions::from_mode(crate::output::PUBLIC_FILE))?;
            file.as_file().sync_all()?;
            self.files.keep(file, &id)
        };
        keep().map_err(|e| format!("keeping dataset {id}: {e}"))?;
        self.store
            .put_dataset(&manifest)
            .map_err(|e| e.to_string())?;
        Ok((true, manifest))
    }

    pub fn get(&self, id: &str) -> Result<Option<DatasetManifest>, StoreError> {
        self.store.dataset(id)
    }

    /// The dataset whose id is `id` or starts with it (at least 8 hex digits).
    pub fn find(&self, id: &str) -> Result<Option<DatasetManifest>, StoreError> {
        if id.len() < 8 {
            return Ok(None);
        }
        let matches: Vec<DatasetManifest> = self
            .list()?
            .into_iter()
            .filter(|m| m.id.starts_with(id))
            .collect();
        Ok((matches.len() == 1).then(|| matches[0].clone()))
    }

    /// Every dataset, oldest first.
    /// The dataset `id`, or the one whose id starts with `id` (8 hex digits or more).
    pub fn resolve(&self, id: &str) -> Result<DatasetManifest, Refusal> {
        let found = match self.get(id)? {
            Some(m) => Some(m),
            None => self.find(id)?,
        };
        found.ok_or_else(|| Refusal::not_found(format!("no dataset `{id}` (fleetctl data list)")))
    }

    pub fn list(&self) -> Result<Vec<DatasetManifest>, StoreError> {
        self.store.datasets()
    }

    /// The table of dataset `id`, re-hashed on the way in.
    pub fn load(&self, id: &str) -> Result<Table, String> {
        let bytes = self.local(id).and_then(std::fs::read).map_err(|e| {
            format!("dataset {id} is not available ({e}); it may have been deleted")
        })?;
        if sha256(&bytes).to_string() != id {
            return Err(format!(
                "dataset {id} changed on disk: its bytes no longer hash to its name"
            ));
        }
        Table::from_parquet(bytes)
    }

    /// Deletes a dataset (its file, then its manifest); `false` when there was none.
    /// The file goes first: when removing it fails (object storage away), the manifest
    /// stays, so the delete can be sent again rather than leaving a file no call finds.
    pub fn delete(&self, id: &str) -> Result<bool, StoreError> {
        self.files
            .remove(id)
            .map_err(|e| StoreError::unavailable(format_args!("removing dataset {id}"), e))?;
        self.store.remove_dataset(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_json_lines_and_parquet_round_trip_to_the_same_content_hash() {
        let csv = b"a,b,c\n1,x,\n2.5,y,3\n,z,4\n";
        let t = Table::from_csv(csv).expect("test");
        assert_eq!(t.rows(), 3);
        assert!(matches!(t.column("a"), Some(Column::Number(_))));
        assert!(matches!(t.column("b"), Some(Column::Text(_))));
        let parquet = t.to_parquet().expect("test");
        let back = Table::from_parquet(parquet.clone()).expect("test");
        assert_eq!(back, t);
        assert_eq!(back.to_parquet().expect("test"), parquet, "canonical bytes");
        let jsonl = b"{\"a\":1,\"b\":\"x\",\"c\":null}\n{\"a\":2.5,\"b\":\"y\",\"c\":3}\n{\"a\":null,\"b\":\"z\",\"c\":4}\n";
        let j = Table::from_jsonl(jsonl).expect("test");
        assert_eq!(j.to_parquet().expect("test"), parquet);
        assert_eq!(
            t.drop_na(&["a".into(), "c".into()]).expect("test").rows(),
            1
        );
        assert!(t.drop_na(&["nope".into()]).is_err());
        assert_eq!(t.concat(&j).rows(), 6);
        assert_eq!(
            String::from_utf8(t.to_csv()).expect("test"),
            "a,b,c\n1,x,\n2.5,y,3\n,z,4\n"
        );
    }

    #[test]
    fn bad_input_is_named() {
        assert!(
            Table::from_csv(b"a,a\n1,2\n")
                .expect_err("test")
                .contains("twice")
        );
        assert!(
            Table::from_jsonl(b"[1]\n")
                .expect_err("test")
                .contains("line 1")
        );
        assert!(
            Table::from_parquet(b"nope".to_vec())
                .expect_err("test")
                .contains("not a Parquet")
        );
    }
}
