//! The `.fmb` bundle container: one file per model version.
//!
//! ```text
//! offset  size  field
//! 0       8     magic: 89 46 4D 42 0D 0A 1A 0A  ("\x89FMB\r\n\x1a\n", PNG-style: catches text-mode mangling)
//! 8       2     container format version, big-endian (1)
//! 10      2     signature count S, big-endian (at most MAX_SIGNATURES)
//! 12      4     manifest length M, big-endian (at most Limits::max_manifest)
//! 16      M     manifest: canonical CBOR (see `manifest`)
//! 16+M    72*S  signatures: 8-byte key id, then a 64-byte ed25519 signature over the M manifest bytes
//! …             payloads: the bytes of each manifest entry, in manifest order, back to back
//! EOF           nothing may follow the last payload
//! ```
//!
//! The signatures cover exactly the stored manifest bytes; the manifest carries the size
//! and SHA-256 of every payload, so the signatures cover the payloads too. The header's
//! counts are framing only: changing them moves what is read as manifest or signature and
//! verification fails.
//!
//! Verification reads the bundle once, front to back, in fixed-size chunks, and checks in
//! this order, stopping at the first failure with a distinct [`BundleError`]:
//! 1. container structure and size limits (magic, version, counts, lengths, truncation);
//! 2. the signature threshold of the [`TrustPolicy`] over the manifest bytes;
//! 3. manifest decoding (canonical CBOR), then every payload's size and SHA-256, and that
//!    nothing follows the last payload;
//! 4. manifest semantic checks (names, tensors, feature schema, versions).
//!
//! Nothing here writes anywhere: a caller that stores or activates a bundle must do so
//! only with a [`VerifiedBundle`] in hand, and must re-hash what it copies (see
//! [`VerifiedBundle::read_entry`]), since a file can change between two reads.

use std::collections::BTreeSet;
use std::fmt;
use std::io::{self, Read, Seek, SeekFrom, Write};

use crate::crypto::{KEY_ID_LEN, KeyId, SIGNATURE_LEN, Sha256, Sha256Hasher};
use crate::manifest::{Manifest, ManifestDecodeError, ManifestError};
use crate::trust::TrustPolicy;

pub const MAGIC: [u8; 8] = [0x89, b'F', b'M', b'B', b'\r', b'\n', 0x1a, b'\n'];
pub const CONTAINER_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 16;
/// Bytes per stored signature: key id + ed25519 signature.
pub const SIGNATURE_RECORD_LEN: usize = KEY_ID_LEN + SIGNATURE_LEN;
/// The most signatures a bundle may carry.
pub const MAX_SIGNATURES: u16 = 32;
/// Size of the buffer payloads are streamed through.
pub const CHUNK: usize = 64 * 1024;

/// Bounds applied while reading a bundle. Nothing is allocated from a length field
/// before it has been checked against these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest manifest accepted, in bytes.
    pub max_manifest: u32,
    /// Largest single payload accepted, in bytes.
    pub max_entry: u64,
    /// Largest total payload accepted, in bytes.
    pub max_total: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_manifest: 1 << 20,
            max_entry: 16 << 30,
            max_total: 32 << 30,
        }
    }
}

/// Where in a bundle something went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Region {
    Header,
    Manifest,
    Signatures,
    Payload(String),
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Region::Header => f.write_str("the header"),
            Region::Manifest => f.write_str("the manifest"),
            Region::Signatures => f.write_str("the signatures"),
            Region::Payload(name) => write!(f, "payload `{name}`"),
        }
    }
}

fn key_list(keys: &[KeyId]) -> String {
    if keys.is_empty() {
        return "none".into();
    }
    keys.iter()
        .map(KeyId::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    #[error("reading the bundle failed: {0}")]
    Io(#[source] io::Error),
    #[error("not a fleetml bundle: the file does not start with the .fmb magic bytes")]
    BadMagic,
    #[error(
        "bundle container version {0} is not supported (this build reads version {CONTAINER_VERSION})"
    )]
    UnsupportedVersion(u16),
    #[error("bundle is truncated: it ends inside {0}")]
    Truncated(Region),
    #[error("manifest length {len} exceeds the limit of {max} bytes")]
    ManifestTooLarge { len: u32, max: u32 },
    #[error("bundle declares {count} signatures, more than the limit of {MAX_SIGNATURES}")]
    TooManySignatures { count: u16 },
    #[error("bundle carries two signatures by key {0}")]
    DuplicateSignature(KeyId),
    #[error("bundle is not signed")]
    Unsigned,
    #[error(
        "signature by trusted key {key} does not verify: the manifest or the signature was altered after signing"
    )]
    BadSignature { key: KeyId },
    #[error("no signature is by a key the trust policy trusts (signed by: {})", key_list(.signers))]
    UntrustedSigners { signers: Vec<KeyId> },
    #[error(
        "only {valid} valid signature(s) by trusted keys; the trust policy requires {required}"
    )]
    BelowThreshold { valid: u32, required: u32 },
    #[error(transparent)]
    Manifest(#[from] ManifestDecodeError),
    #[error("payload `{entry}` is {size} bytes, more than the limit of {max}")]
    EntryTooLarge { entry: String, size: u64, max: u64 },
    #[error("payloads total {total} bytes, more than the limit of {max}")]
    TotalTooLarge { total: u64, max: u64 },
    #[error(
        "payload `{entry}` does not match its SHA-256 in the manifest: it was altered or replaced"
    )]
    DigestMismatch { entry: String },
    #[error("bundle has unexpected bytes after its last payload")]
    TrailingData,
    #[error("manifest is signed but invalid: {0}")]
    Invalid(#[from] ManifestError),
    #[error("bundle has no payload named `{0}`")]
    NoSuchEntry(String),
}

impl From<io::Error> for BundleError {
    fn from(e: io::Error) -> Self {
        BundleError::Io(e)
    }
}

/// A signature as stored in a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureRecord {
    pub key: KeyId,
    pub signature: [u8; SIGNATURE_LEN],
}

/// The front of a bundle (header, manifest, signatures), read and decoded but not trusted.
/// Used to inspect and to add signatures; never to run anything.
#[derive(Debug, Clone)]
pub struct Unverified {
    pub manifest_bytes: Vec<u8>,
    pub manifest: Manifest,
    pub signatures: Vec<SignatureRecord>,
}

impl Unverified {
    /// Byte offset at which the payloads start.
    pub fn payload_offset(&self) -> u64 {
        payload_offset(self.manifest_bytes.len(), self.signatures.len())
    }

    /// Total size of the bundle this front describes.
    pub fn bundle_size(&self) -> u64 {
        self.payload_offset()
            .saturating_add(self.manifest.payload_size())
    }

    /// Reads payload `name` into memory, hashed against the manifest, refusing payloads
    /// over `max` bytes. The signatures are not checked: for inspecting a bundle, not
    /// for using it.
    pub fn read_entry<R: Read + Seek>(
        &self,
        bundle: &mut R,
        name: &str,
        max: u64,
    ) -> Result<Vec<u8>, BundleError> {
        read_entry(&self.manifest, self.payload_offset(), bundle, name, max)
    }
}

fn payload_offset(manifest_len: usize, signatures: usize) -> u64 {
    (HEADER_LEN + manifest_len + signatures * SIGNATURE_RECORD_LEN) as u64
}

/// A bundle that passed every check, with what the caller needs to use it.
#[derive(Debug, Clone)]
pub struct VerifiedBundle {
    pub manifest: Manifest,
    pub manifest_bytes: Vec<u8>,
    /// SHA-256 of the whole bundle file: its content address.
    pub digest: Sha256,
    pub size: u64,
    /// Byte offset at which the payloads start.
    pub payload_offset: u64,
    /// Trusted keys whose signatures verified.
    pub signed_by: Vec<KeyId>,
    /// Signatures that did not count: by keys the policy does not trust, or that did not
    /// verify while the threshold was met by others.
    pub ignored: Vec<KeyId>,
}

/// Reads exactly `buf.len()` bytes or reports truncation in `region`.
fn read_exact_in<R: Read>(r: &mut R, buf: &mut [u8], region: &Region) -> Result<(), BundleError> {
    match r.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            Err(BundleError::Truncated(region.clone()))
        }
        Err(e) => Err(BundleError::Io(e)),
    }
}

/// A reader that hashes everything read through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256Hasher,
    count: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Reads and checks the structure of header, manifest bytes and signatures.
fn read_front<R: Read>(
    r: &mut R,
    limits: &Limits,
) -> Result<(Vec<u8>, Vec<SignatureRecord>), BundleError> {
    let mut header = [0u8; HEADER_LEN];
    // A file shorter than the magic is not a bundle at all; one that has the magic but
    // ends inside the header is a truncated bundle.
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(BundleError::Io(e)),
        }
    }
    if got < MAGIC.len() || header[..MAGIC.len()] != MAGIC {
        return Err(BundleError::BadMagic);
    }
    if got < HEADER_LEN {
        return Err(BundleError::Truncated(Region::Header));
    }
    let version = u16::from_be_bytes([header[8], header[9]]);
    if version != CONTAINER_VERSION {
        return Err(BundleError::UnsupportedVersion(version));
    }
    let count = u16::from_be_bytes([header[10], header[11]]);
    if count > MAX_SIGNATURES {
        return Err(BundleError::TooManySignatures { count });
    }
    let len = u32::from_be_bytes([header[12], header[13], header[14], header[15]]);
    if len > limits.max_manifest {
        return Err(BundleError::ManifestTooLarge {
            len,
            max: limits.max_manifest,
        });
    }
    if len == 0 {
        return Err(BundleError::Manifest(ManifestDecodeError::Malformed(
            "the manifest is empty".into(),
        )));
    }
    let mut manifest = vec![0u8; len as usize];
    read_exact_in(r, &mut manifest, &Region::Manifest)?;
    let mut signatures = Vec::with_capacity(count as usize);
    let mut seen = BTreeSet::new();
    for _ in 0..count {
        let mut rec = [0u8; SIGNATURE_RECORD_LEN];
        read_exact_in(r, &mut rec, &Region::Signatures)?;
        let mut key = [0u8; KEY_ID_LEN];
        key.copy_from_slice(&rec[..KEY_ID_LEN]);
        let mut signature = [0u8; SIGNATURE_LEN];
        signature.copy_from_slice(&rec[KEY_ID_LEN..]);
        if !seen.insert(key) {
            return Err(BundleError::DuplicateSignature(KeyId(key)));
        }
        signatures.push(SignatureRecord {
            key: KeyId(key),
            signature,
        });
    }
    Ok((manifest, signatures))
}

/// Outcome of checking signatures against a policy.
struct SignatureCheck {
    valid: Vec<KeyId>,
    ignored: Vec<KeyId>,
}

fn check_signatures(
    manifest: &[u8],
    signatures: &[SignatureRecord],
    policy: &TrustPolicy,
) -> Result<SignatureCheck, BundleError> {
    if signatures.is_empty() {
        return Err(BundleError::Unsigned);
    }
    let mut valid = Vec::new();
    let mut bad = Vec::new();
    let mut untrusted = Vec::new();
    for sig in signatures {
        match policy.key(&sig.key) {
            None => untrusted.push(sig.key),
            Some(k) if k.public.verify(manifest, &sig.signature) => valid.push(sig.key),
            Some(_) => bad.push(sig.key),
        }
    }
    if (valid.len() as u64) < u64::from(policy.threshold) {
        if let Some(key) = bad.first() {
            return Err(BundleError::BadSignature { key: *key });
        }
        if valid.is_empty() {
            return Err(BundleError::UntrustedSigners { signers: untrusted });
        }
        return Err(BundleError::BelowThreshold {
            valid: valid.len() as u32,
            required: policy.threshold,
        });
    }
    bad.extend(untrusted);
    Ok(SignatureCheck {
        valid,
        ignored: bad,
    })
}

fn check_sizes(manifest: &Manifest, limits: &Limits) -> Result<(), BundleError> {
    let mut total: u64 = 0;
    for e in &manifest.entries {
        if e.size > limits.max_entry {
            return Err(BundleError::EntryTooLarge {
                entry: e.name.clone(),
                size: e.size,
                max: limits.max_entry,
            });
        }
        total = total.saturating_add(e.size);
    }
    if total > limits.max_total {
        return Err(BundleError::TotalTooLarge {
            total,
            max: limits.max_total,
        });
    }
    Ok(())
}

/// Streams `size` bytes of `entry` from `r` through SHA-256 and compares.
fn hash_entry<R: Read>(
    r: &mut R,
    entry: &crate::manifest::Entry,
    buf: &mut [u8],
    mut sink: impl FnMut(&[u8]) -> io::Result<()>,
) -> Result<(), BundleError> {
    let region = Region::Payload(entry.name.clone());
    let mut hasher = Sha256Hasher::new();
    let mut left = entry.size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        read_exact_in(r, &mut buf[..n], &region)?;
        hasher.update(&buf[..n]);
        sink(&buf[..n])?;
        left -= n as u64;
    }
    if hasher.finish() != entry.sha256 {
        return Err(BundleError::DigestMismatch {
            entry: entry.name.clone(),
        });
    }
    Ok(())
}

/// Verifies a whole bundle read from `reader`, in one pass, in bounded memory.
pub fn verify<R: Read>(
    reader: R,
    policy: &TrustPolicy,
    limits: &Limits,
) -> Result<VerifiedBundle, BundleError> {
    let mut r = Hashing {
        inner: reader,
        hasher: Sha256Hasher::new(),
        count: 0,
    };
    let (manifest_bytes, signatures) = read_front(&mut r, limits)?;
    let sigs = check_signatures(&manifest_bytes, &signatures, policy)?;
    let manifest = Manifest::from_canonical_cbor(&manifest_bytes)?;
    check_sizes(&manifest, limits)?;
    let mut buf = vec![0u8; CHUNK];
    for entry in &manifest.entries {
        hash_entry(&mut r, entry, &mut buf, |_| Ok(()))?;
    }
    match r.read(&mut buf[..1]) {
        Ok(0) => {}
        Ok(_) => return Err(BundleError::TrailingData),
        Err(e) => return Err(BundleError::Io(e)),
    }
    manifest.validate()?;
    let payload_offset = payload_offset(manifest_bytes.len(), signatures.len());
    Ok(VerifiedBundle {
        manifest,
        manifest_bytes,
        digest: r.hasher.finish(),
        size: r.count,
        payload_offset,
        signed_by: sigs.valid,
        ignored: sigs.ignored,
    })
}

/// Reads the front of a bundle without checking any signature: for `inspect` and `sign`.
pub fn read_unverified<R: Read>(mut reader: R, limits: &Limits) -> Result<Unverified, BundleError> {
    let (manifest_bytes, signatures) = read_front(&mut reader, limits)?;
    let manifest = Manifest::from_canonical_cbor(&manifest_bytes)?;
    Ok(Unverified {
        manifest_bytes,
        manifest,
        signatures,
    })
}

/// Byte offset of payload `name` of `manifest` in a bundle whose payloads start at
/// `payload_offset`.
fn entry_offset(manifest: &Manifest, payload_offset: u64, name: &str) -> Option<u64> {
    let mut offset = payload_offset;
    for e in &manifest.entries {
        if e.name == name {
            return Some(offset);
        }
        offset += e.size;
    }
    None
}

/// Copies payload `name` of `manifest` from `bundle` into `out`, re-hashing it.
fn copy_entry<R: Read + Seek, W: Write>(
    manifest: &Manifest,
    payload_offset: u64,
    bundle: &mut R,
    name: &str,
    out: &mut W,
) -> Result<u64, BundleError> {
    let entry = manifest
        .entry(name)
        .ok_or_else(|| BundleError::NoSuchEntry(name.to_string()))?;
    let offset = entry_offset(manifest, payload_offset, name)
        .ok_or_else(|| BundleError::NoSuchEntry(name.into()))?;
    bundle.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; CHUNK];
    hash_entry(bundle, entry, &mut buf, |chunk| out.write_all(chunk))?;
    Ok(entry.size)
}

/// Reads payload `name` of `manifest` into memory (re-hashed), refusing payloads over
/// `max` bytes.
fn read_entry<R: Read + Seek>(
    manifest: &Manifest,
    payload_offset: u64,
    bundle: &mut R,
    name: &str,
    max: u64,
) -> Result<Vec<u8>, BundleError> {
    let entry = manifest
        .entry(name)
        .ok_or_else(|| BundleError::NoSuchEntry(name.to_string()))?;
    if entry.size > max {
        return Err(BundleError::EntryTooLarge {
            entry: name.into(),
            size: entry.size,
            max,
        });
    }
    let mut out = Vec::with_capacity(entry.size as usize);
    copy_entry(manifest, payload_offset, bundle, name, &mut out)?;
    Ok(out)
}

impl VerifiedBundle {
    /// Byte offset of a payload within the bundle file.
    pub fn entry_offset(&self, name: &str) -> Option<u64> {
        entry_offset(&self.manifest, self.payload_offset, name)
    }

    /// Copies payload `name` from the (already verified) bundle file into `out`,
    /// re-hashing it on the way: if the file changed since verification, the copy fails
    /// with [`BundleError::DigestMismatch`] and the caller must discard what it wrote.
    pub fn copy_entry<R: Read + Seek, W: Write>(
        &self,
        bundle: &mut R,
        name: &str,
        out: &mut W,
    ) -> Result<u64, BundleError> {
        copy_entry(&self.manifest, self.payload_offset, bundle, name, out)
    }

    /// Reads payload `name` into memory (re-hashed), refusing payloads over `max` bytes.
    pub fn read_entry<R: Read + Seek>(
        &self,
        bundle: &mut R,
        name: &str,
        max: u64,
    ) -> Result<Vec<u8>, BundleError> {
        read_entry(&self.manifest, self.payload_offset, bundle, name, max)
    }
}

/// Writes a bundle: the front (header, manifest, signatures) then each payload in
/// manifest order. The caller supplies the payload bytes through `payload`, which is
/// asked for each entry in turn and must produce exactly the bytes the manifest describes;
/// what it writes is hashed and checked, so a writer cannot produce a bundle that lies.
pub fn write<W: Write>(
    out: &mut W,
    manifest_bytes: &[u8],
    signatures: &[SignatureRecord],
    manifest: &Manifest,
    mut payload: impl FnMut(&str, &mut dyn Write) -> io::Result<()>,
) -> Result<(), BundleError> {
    let len = u32::try_from(manifest_bytes.len()).map_err(|_| BundleError::ManifestTooLarge {
        len: u32::MAX,
        max: Limits::default().max_manifest,
    })?;
    let count = u16::try_from(signatures.len())
        .ok()
        .filter(|c| *c <= MAX_SIGNATURES)
        .ok_or(BundleError::TooManySignatures { count: u16::MAX })?;
    out.write_all(&MAGIC)?;
    out.write_all(&CONTAINER_VERSION.to_be_bytes())?;
    out.write_all(&count.to_be_bytes())?;
    out.write_all(&len.to_be_bytes())?;
    out.write_all(manifest_bytes)?;
    for s in signatures {
        out.write_all(&s.key.0)?;
        out.write_all(&s.signature)?;
    }
    for entry in &manifest.entries {
        let mut checked = CheckedWriter {
            inner: &mut *out,
            hasher: Sha256Hasher::new(),
            count: 0,
        };
        payload(&entry.name, &mut checked)?;
        let CheckedWriter { hasher, count, .. } = checked;
        if count != entry.size || hasher.finish() != entry.sha256 {
            return Err(BundleError::DigestMismatch {
                entry: entry.name.clone(),
            });
        }
    }
    Ok(())
}

struct CheckedWriter<'a, W: Write> {
    inner: &'a mut W,
    hasher: Sha256Hasher,
    count: u64,
}

impl<W: Write> Write for CheckedWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Rewrites `bundle` into `out` with `signature` added (or kept once if that key already
/// signed). The payloads are streamed through unchanged and re-hashed.
/// Returns `false` when the key had already signed and nothing changed.
pub fn add_signature<R: Read, W: Write>(
    mut bundle: R,
    out: &mut W,
    signature: SignatureRecord,
    limits: &Limits,
) -> Result<bool, BundleError> {
    let front = read_unverified(&mut bundle, limits)?;
    check_sizes(&front.manifest, limits)?;
    let mut signatures = front.signatures.clone();
    let changed = match signatures.iter_mut().find(|s| s.key == signature.key) {
        Some(existing) if existing.signature == signature.signature => false,
        Some(existing) => {
            // ed25519 is deterministic, so a different signature by the same key means the
            // old one was over other bytes: replace it.
            existing.signature = signature.signature;
            true
        }
        None => {
            signatures.push(signature);
            true
        }
    };
    let mut buf = vec![0u8; CHUNK];
    let mut pending: Option<BundleError> = None;
    write(
        out,
        &front.manifest_bytes,
        &signatures,
        &front.manifest,
        |name, w| {
            let Some(entry) = front.manifest.entry(name) else {
                return Err(io::Error::other("entry vanished"));
            };
            match hash_entry(&mut bundle, entry, &mut buf, |chunk| w.write_all(chunk)) {
                Ok(()) => Ok(()),
                Err(e) => {
                    pending = Some(e);
                    Err(io::Error::other("payload check failed"))
                }
            }
        },
    )
    .map_err(|e| pending.take().unwrap_or(e))?;
    match bundle.read(&mut buf[..1]) {
        Ok(0) => Ok(changed),
        Ok(_) => Err(BundleError::TrailingData),
        Err(e) => Err(BundleError::Io(e)),
    }
}
