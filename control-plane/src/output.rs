//! Writing files safely: atomically (temp file + fsync + rename) and with a given mode.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;

/// Mode of files that are not secret (bundles, trust policies).
pub const PUBLIC_FILE: u32 = 0o644;

/// Creates `path` with `mode`, failing if it exists. Used for keys: never overwritten.
pub fn create_new(path: &Path, mode: u32, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| match path.exists() {
            true => format!(
                "{} already exists; refusing to overwrite it",
                path.display()
            ),
            false => format!("creating {}", path.display()),
        })?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(())
}

/// Writes a file atomically: `fill` writes into a temporary file in the same directory,
/// which gets `mode`, is synced and renamed over `path` only if `fill` succeeds. A reader
/// never sees a partial file, and a failure leaves `path` as it was.
pub fn write_atomic(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".fleetml-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    fill(tmp.as_file_mut())?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    tmp.as_file()
        .sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Human size: `2.4 KiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Reads a file into memory, refusing files larger than `max` bytes.
pub fn read_bounded(path: &Path, max: u64, what: &str) -> anyhow::Result<Vec<u8>> {
    let meta = fs::metadata(path).with_context(|| format!("reading {what} {}", path.display()))?;
    anyhow::ensure!(
        meta.len() <= max,
        "{what} {} is {} bytes, more than the limit of {max}",
        path.display(),
        meta.len()
    );
    fs::read(path).with_context(|| format!("reading {what} {}", path.display()))
}
