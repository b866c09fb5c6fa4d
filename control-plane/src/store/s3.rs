//! Bundle and dataset files in S3-compatible object storage: `fleetctl serve --blobs
//! s3://BUCKET/PREFIX`, the endpoint, region and credentials from the usual
//! environment variables (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`; `AWS_ALLOW_HTTP=true` for a plain
//! endpoint on a private network). Objects are `PREFIX/<sha256>.fmb` (bundles) and
//! `PREFIX/datasets/<sha256>.parquet` (datasets, [`S3Blobs::scoped`]).
//!
//! The object store is the shared, durable copy; each replica keeps a local cache of the
//! blobs it served (`DATA_DIR/blob-cache`), filled whole on first use and checked
//! against the digest the blob is named by. Devices keep downloading from the control
//! plane (ranges, resumes, their one pinned CA and token), not from presigned URLs: an
//! edge device often cannot reach or trust the object store's endpoint, and a bundle is
//! written once and read by a fleet, so one fetch per replica is cheap.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;

use super::{BlobStore, off_runtime};

/// Blobs in an S3 bucket under a prefix, with a local cache.
#[derive(Debug, Clone)]
pub struct S3Blobs {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    /// The objects' extension (`fmb`, `parquet`).
    ext: &'static str,
    /// What the operator named (`s3://BUCKET/PREFIX`), for messages.
    url: String,
    cache: super::blobs::FileBlobs,
    runtime: Arc<OwnRuntime>,
}

/// The store's runtime, shut down without waiting when the last store goes (dropping a
/// runtime blocks, which panics on another runtime's worker — where the control plane
/// drops its stores at shutdown).
#[derive(Debug)]
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

fn io(what: impl std::fmt::Display, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("{what}: {e}"))
}

impl S3Blobs {
    /// The blobs at `url` (`s3://BUCKET[/PREFIX]`), cached in `cache`. Checks that the
    /// bucket answers, so a wrong endpoint or credential fails at start.
    pub fn open(url: &str, cache: &Path) -> std::io::Result<S3Blobs> {
        S3Blobs::open_with(url, cache, &[])
    }

    /// [`S3Blobs::open`] with `settings` (`AWS_…` names and values) over the
    /// environment's.
    pub fn open_with(
        url: &str,
        cache: &Path,
        settings: &[(String, String)],
    ) -> std::io::Result<S3Blobs> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| {
            io(
                format!("--blobs {url}"),
                "not s3://BUCKET/PREFIX (or a folder)",
            )
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(io(format!("--blobs {url}"), "no bucket named"));
        }
        let mut builder = object_store::aws::AmazonS3Builder::from_env();
        for (k, v) in settings {
            let key: object_store::aws::AmazonS3ConfigKey = k
                .to_ascii_lowercase()
                .parse()
                .map_err(|e| io(format!("setting {k}"), e))?;
            builder = builder.with_config(key, v);
        }
        let store = builder
            .with_bucket_name(bucket)
            .build()
            .map_err(|e| io(format!("--blobs {url}"), e))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("blob-store")
            .enable_all()
            .build()?;
        let blobs = S3Blobs {
            store: Arc::new(store),
            prefix: prefix.trim_matches('/').to_string(),
            ext: "fmb",
            url: url.to_string(),
            cache: super::blobs::FileBlobs::open(cache)?,
            runtime: Arc::new(OwnRuntime(Some(runtime))),
        };
        // Listing (one page, under the prefix) fails on a missing bucket, a wrong
        // endpoint or a refused credential, where a missing object would not.
        let prefix = (!blobs.prefix.is_empty()).then(|| ObjectPath::from(blobs.prefix.as_str()));
        let (store, named) = (blobs.store.clone(), blobs.url.clone());
        blobs.block(async move {
            store
                .list_with_delimiter(prefix.as_ref())
                .await
                .map(|_| ())
                .map_err(|e| {
                    io(
                        format!(
                            "--blobs {named}: the object store does not answer (check the bucket, AWS_ENDPOINT_URL, AWS_REGION and the credentials)"
                        ),
                        e,
                    )
                })
        })?;
        Ok(blobs)
    }

    /// The same bucket and connection for other blobs: objects `PREFIX/SUB/<sha256>.EXT`,
    /// cached in `cache`.
    pub fn scoped(&self, sub: &str, ext: &'static str, cache: &Path) -> std::io::Result<S3Blobs> {
        let prefix = if self.prefix.is_empty() {
            sub.to_string()
        } else {
            format!("{}/{sub}", self.prefix)
        };
        Ok(S3Blobs {
            store: self.store.clone(),
            url: format!("{}/{sub}", self.url.trim_end_matches('/')),
            prefix,
            ext,
            cache: super::blobs::FileBlobs::open_with_ext(cache, ext)?,
            runtime: self.runtime.clone(),
        })
    }

    /// Uploads each blob the cache holds and the bucket lacks, after checking it against
    /// its name: the datasets a release before this one kept only in
    /// `DATA_DIR/datasets`, which would otherwise be read by this replica alone and left
    /// out of the bucket's backups. Returns how many went up; a file whose bytes do not
    /// hash to its name is reported and left where it is.
    pub fn push_cached(&self) -> std::io::Result<usize> {
        use std::io::Write;
        let suffix = format!(".{}", self.ext);
        let mut pushed = 0;
        for entry in std::fs::read_dir(self.cache.dir())? {
            let path = entry?.path();
            let Some(digest) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(&suffix))
                .filter(|d| d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()))
                .map(str::to_string)
            else {
                continue;
            };
            if self.in_bucket(&digest)? {
                continue;
            }
            let bytes = std::fs::read(&path)?;
            let seen = fleetml_protocol::crypto::sha256(&bytes).to_string();
            if seen != digest {
                tracing::warn!(
                    file = %path.display(),
                    "not uploaded: its bytes hash to {seen}, not to its name"
                );
                continue;
            }
            let mut file = self.cache.incoming()?;
            file.write_all(&bytes)?;
            file.as_file().sync_all()?;
            self.keep(file, &digest)?;
            pushed += 1;
        }
        Ok(pushed)
    }

    /// Whether object `digest` is in the bucket.
    fn in_bucket(&self, digest: &str) -> std::io::Result<bool> {
        let object = self.object(digest);
        self.block(async {
            match self.store.head(&object).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(io(format!("reading {object} from {}", self.url), e)),
            }
        })
    }

    fn object(&self, digest: &str) -> ObjectPath {
        let name = format!("{digest}.{}", self.ext);
        if self.prefix.is_empty() {
            ObjectPath::from(name)
        } else {
            ObjectPath::from(format!("{}/{name}", self.prefix))
        }
    }

    /// Runs `f` on the store's own runtime, off the caller's.
    fn block<R: Send>(&self, f: impl std::future::Future<Output = R> + Send) -> R {
        let runtime = self
            .runtime
            .0
            .as_ref()
            .expect("the runtime lives as long as the store");
        off_runtime(|| runtime.block_on(f))
    }

    /// Copies object `digest` into the cache, checking its SHA-256 on the way.
    fn fetch(&self, digest: &str) -> std::io::Result<()> {
        let object = self.object(digest);
        let mut file = self.cache.incoming()?;
        let target = file.reopen()?;
        let got = self.block(async {
            let meta = match self.store.head(&object).await {
                Ok(m) => m,
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("no blob {digest} in {}", self.url),
                    ));
                }
                Err(e) => return Err(io(format!("reading {object} from {}", self.url), e)),
            };
            let mut reader = object_store::buffered::BufReader::new(self.store.clone(), &meta);
            let mut out = tokio::fs::File::from_std(target);
            tokio::io::copy(&mut reader, &mut out).await?;
            out.sync_all().await
        });
        got?;
        let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
        std::io::copy(&mut file.as_file_mut(), &mut HashWriter(&mut hasher))?;
        let seen = hex::encode(hasher.finish());
        if seen != digest {
            return Err(io(
                format!("blob {digest} in {}", self.url),
                format!(
                    "its bytes hash to {seen}: the object was changed or damaged; push the bundle (or import the dataset) again"
                ),
            ));
        }
        self.cache.keep(file, digest)
    }
}

/// Feeds what is written to a SHA-256 context.
struct HashWriter<'a>(&'a mut ring::digest::Context);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl BlobStore for S3Blobs {
    fn incoming(&self) -> std::io::Result<tempfile::NamedTempFile> {
        self.cache.incoming()
    }

    fn keep(&self, file: tempfile::NamedTempFile, digest: &str) -> std::io::Result<()> {
        let object = self.object(digest);
        let source = file.reopen()?;
        self.block(async {
            let mut upload =
                object_store::buffered::BufWriter::new(self.store.clone(), object.clone());
            let mut from = tokio::fs::File::from_std(source);
            tokio::io::copy(&mut from, &mut upload).await?;
            tokio::io::AsyncWriteExt::shutdown(&mut upload)
                .await
                .map_err(|e| io(format!("writing {object} to {}", self.url), e))
        })?;
        // Kept in the cache too: the replica that took the upload serves it at once.
        self.cache.keep(file, digest)
    }

    fn local(&self, digest: &str) -> std::io::Result<PathBuf> {
        let path = self.cache.path(digest);
        if !path.exists() {
            self.fetch(digest)?;
        }
        Ok(path)
    }

    fn exists(&self, digest: &str) -> std::io::Result<bool> {
        Ok(self.cache.path(digest).is_file() || self.in_bucket(digest)?)
    }

    fn remove(&self, digest: &str) -> std::io::Result<()> {
        let object = self.object(digest);
        self.block(async {
            match self.store.delete(&object).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(io(format!("removing {object} from {}", self.url), e)),
            }
        })?;
        self.cache.remove(digest)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// The blobs at `url` on `server` (its endpoint and credentials).
    fn open(
        server: &fleetml_testkit::S3Server,
        url: &str,
        cache: &Path,
    ) -> std::io::Result<S3Blobs> {
        S3Blobs::open_with(url, cache, &server.env())
    }

    fn digest(bytes: &[u8]) -> String {
        hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
    }

    /// A blob kept through one replica is read through another (a fresh cache, fetched
    /// from the server); a missing one is NotFound; an object changed in the bucket is
    /// refused by its digest; a bucket that does not exist fails at open.
    #[test]
    fn blobs_round_trip_through_an_s3_server_and_a_changed_object_is_refused() {
        let server = fleetml_testkit::S3Server::start();
        server.create_bucket("fleet");
        let tmp = tempfile::tempdir().expect("tempdir");
        let one = open(&server, "s3://fleet/bundles", &tmp.path().join("one")).expect("opens");
        let bytes = vec![7u8; 3 << 20];
        let d = digest(&bytes);
        let mut up = one.incoming().expect("incoming");
        up.write_all(&bytes).expect("write");
        up.as_file().sync_all().expect("sync");
        one.keep(up, &d).expect("kept");
        let two = open(&server, "s3://fleet/bundles", &tmp.path().join("two")).expect("opens");
        let path = two.local(&d).expect("fetched");
        assert!(path.starts_with(tmp.path().join("two")));
        assert_eq!(std::fs::read(&path).expect("read"), bytes);

        let missing = digest(b"nothing");
        let e = two.local(&missing).expect_err("no such blob");
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");

        let fake = digest(b"claimed");
        assert_eq!(
            server.request("PUT", &format!("/fleet/bundles/{fake}.fmb"), b"other bytes"),
            200
        );
        let e = two.local(&fake).expect_err("refused");
        assert!(e.to_string().contains("hash to"), "{e}");
        assert!(!tmp.path().join("two").join(format!("{fake}.fmb")).exists());

        let e =
            open(&server, "s3://no-such-bucket", &tmp.path().join("three")).expect_err("no bucket");
        assert!(e.to_string().contains("does not answer"), "{e}");
        let e = open(&server, "/not/s3", &tmp.path().join("four")).expect_err("not s3");
        assert!(e.to_string().contains("s3://BUCKET/PREFIX"), "{e}");
    }

    /// Datasets go to object storage beside the bundles (`PREFIX/datasets/`): one
    /// replica imports a dataset, another (its own cache, the same manifests) reads it
    /// and deletes it, and then the object is gone from the bucket and neither replica
    /// can load it.
    #[test]
    fn a_dataset_kept_by_one_replica_is_read_and_deleted_by_another() {
        use crate::datasets::{Datasets, Provenance, Table};
        let server = fleetml_testkit::S3Server::start();
        server.create_bucket("fleet");
        let tmp = tempfile::tempdir().expect("tempdir");
        let manifests: Arc<dyn crate::store::DatasetStore> =
            Arc::new(crate::store::memory::MemoryStore::default());
        let files = |name: &str| {
            let bundles =
                open(&server, "s3://fleet/fleetml", &tmp.path().join(name)).expect("opens");
            bundles
                .scoped(
                    "datasets",
                    "parquet",
                    &tmp.path().join(name).join("datasets"),
                )
                .expect("scoped")
        };
        let replica = |name: &str| Datasets::open_in(manifests.clone(), Arc::new(files(name)));
        // A third view of the bucket, with a cache of its own that stays empty.
        let bucket = files("c");
        let (a, b) = (replica("a"), replica("b"));
        let table = Table::from_csv(b"x,y\n1,a\n2,b\n").expect("csv");
        let (new, m) = a.put(&table, Provenance::default(), 1).expect("kept");
        assert!(new);
        assert!(bucket.exists(&m.id).expect("head"), "in the bucket");
        assert_eq!(
            bucket.object(&m.id).to_string(),
            format!("fleetml/datasets/{}.parquet", m.id)
        );

        assert!(
            b.available(&m.id).expect("head"),
            "seen by the other replica before it fetched"
        );
        assert_eq!(b.load(&m.id).expect("fetched by the other replica"), table);
        assert!(
            b.local(&m.id)
                .expect("cached")
                .starts_with(tmp.path().join("b"))
        );

        // A dataset an earlier release kept only in one replica's DATA_DIR/datasets goes
        // up at start; a file whose bytes do not match its name does not.
        let older = Table::from_csv(b"x,y\n3,c\n")
            .expect("csv")
            .to_parquet()
            .expect("parquet");
        let older_id = digest(&older);
        let dir = tmp.path().join("d").join("datasets");
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join(format!("{older_id}.parquet")), &older).expect("write");
        let bad = digest(b"claimed");
        std::fs::write(dir.join(format!("{bad}.parquet")), b"other bytes").expect("write");
        let d = files("d");
        assert_eq!(d.push_cached().expect("pushed"), 1);
        assert!(bucket.exists(&older_id).expect("head"), "uploaded");
        assert!(
            !bucket.exists(&bad).expect("head"),
            "a mismatched file stays local"
        );
        assert_eq!(d.push_cached().expect("pushed"), 0, "once");

        assert!(b.delete(&m.id).expect("deleted"));
        assert!(!bucket.exists(&m.id).expect("head"), "gone from the bucket");
        assert!(!b.available(&m.id).expect("head"));
        assert!(b.load(&m.id).is_err());
        assert!(a.get(&m.id).expect("reads").is_none(), "manifest gone too");
    }

    /// The last store dropped on an async runtime's worker (as at the control plane's
    /// shutdown) does not panic.
    #[test]
    fn the_store_can_be_dropped_on_a_runtime() {
        let server = fleetml_testkit::S3Server::start();
        server.create_bucket("drop");
        let tmp = tempfile::tempdir().expect("tempdir");
        let blobs = open(&server, "s3://drop", tmp.path()).expect("opens");
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .expect("runtime")
            .block_on(async move { tokio::spawn(async move { drop(blobs) }).await })
            .expect("dropped without a panic");
    }
}
