//! Content-addressed files in one directory: bundles as `<sha256>.fmb`, datasets as
//! `<sha256>.parquet`. An upload is written beside them (`.incoming-*`) and renamed
//! into place once verified, so a blob is either whole or absent.

use std::path::{Path, PathBuf};

use super::BlobStore;

/// Blobs in a directory (`DATA_DIR/blobs`, `DATA_DIR/datasets`, or a shared folder).
#[derive(Debug, Clone)]
pub struct FileBlobs {
    dir: PathBuf,
    /// The files' extension (`fmb`, `parquet`).
    ext: &'static str,
}

impl FileBlobs {
    /// Bundle files (`<sha256>.fmb`) in `dir`, created if missing.
    pub fn open(dir: &Path) -> std::io::Result<FileBlobs> {
        FileBlobs::open_with_ext(dir, "fmb")
    }

    /// Blobs named `<sha256>.EXT` in `dir`, created if missing.
    pub fn open_with_ext(dir: &Path, ext: &'static str) -> std::io::Result<FileBlobs> {
        std::fs::create_dir_all(dir)?;
        Ok(FileBlobs {
            dir: dir.to_path_buf(),
            ext,
        })
    }

    /// The directory the blobs are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where blob `digest` is (it may not exist).
    pub fn path(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{digest}.{}", self.ext))
    }
}

impl BlobStore for FileBlobs {
    fn incoming(&self) -> std::io::Result<tempfile::NamedTempFile> {
        tempfile::Builder::new()
            .prefix(".incoming-")
            .tempfile_in(&self.dir)
    }

    fn keep(&self, file: tempfile::NamedTempFile, digest: &str) -> std::io::Result<()> {
        file.persist(self.path(digest)).map_err(|e| e.error)?;
        // The rename is durable once the directory is.
        std::fs::File::open(&self.dir)?.sync_all()
    }

    fn local(&self, digest: &str) -> std::io::Result<PathBuf> {
        Ok(self.path(digest))
    }

    fn exists(&self, digest: &str) -> std::io::Result<bool> {
        Ok(self.path(digest).is_file())
    }

    fn remove(&self, digest: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(digest)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn an_upload_is_kept_under_its_digest_and_nothing_else_stays() {
        let dir = tempfile::tempdir().expect("temp dir");
        let blobs = FileBlobs::open(&dir.path().join("blobs")).expect("opens");
        let mut up = blobs.incoming().expect("incoming");
        up.write_all(b"bundle bytes").expect("write");
        assert!(!blobs.path("abc").exists());
        blobs.keep(up, "abc").expect("keep");
        assert_eq!(
            std::fs::read(blobs.path("abc")).expect("read"),
            b"bundle bytes"
        );
        let names: Vec<String> = std::fs::read_dir(dir.path().join("blobs"))
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["abc.fmb"], "no upload left behind");
        // An upload dropped before it is kept leaves nothing either.
        drop(blobs.incoming().expect("incoming"));
        assert_eq!(
            std::fs::read_dir(dir.path().join("blobs"))
                .expect("list")
                .count(),
            1
        );
    }
}
