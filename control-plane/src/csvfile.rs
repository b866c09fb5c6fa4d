//! The CSV files a bundle is built from (reference, golden and labelled rows), opened
//! with their size bounded.

use std::fs::File;
use std::path::Path;

use anyhow::Context;

/// Largest CSV read at build time.
pub const MAX_CSV: u64 = 1 << 30;

/// A CSV reader on `path` (at most [`MAX_CSV`] bytes) and its header.
pub fn open(path: &Path) -> anyhow::Result<(csv::Reader<File>, csv::StringRecord)> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    anyhow::ensure!(
        size <= MAX_CSV,
        "{} is larger than {} bytes",
        path.display(),
        MAX_CSV
    );
    let mut reader =
        csv::Reader::from_path(path).with_context(|| format!("reading {}", path.display()))?;
    let header = reader
        .headers()
        .with_context(|| format!("reading the header of {}", path.display()))?
        .clone();
    Ok((reader, header))
}
