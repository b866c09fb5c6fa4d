//! ONNX models whose weights live in separate files ("external data": torch's exporter
//! writes them for every model over 2 GB, and on request below that).
//!
//! In a bundle each external file is its own payload entry, and the model's `location`
//! fields name those entries. Entry names are plain file names (no separators, no
//! leading dot), so a location can only ever name another payload of the same signed
//! bundle: nothing is read from beside the model on the device.
//!
//! [`Onnx`] is a model with its external files, as every backend loads it: tract gets
//! the weights copied into its in-memory graph, ONNX Runtime gets the files as in-memory
//! external initializer files.

use std::collections::BTreeMap;
use std::sync::Arc;

use prost::Message;
use tract_onnx::pb;

use crate::RuntimeError;

/// The external data files of a model, by the name its `location` fields use.
pub type ExternalFiles = BTreeMap<String, Arc<[u8]>>;

/// An ONNX model and the external data files it names (none for most models).
#[derive(Debug, Clone, Copy)]
pub struct Onnx<'a> {
    pub model: &'a [u8],
    pub external: &'a ExternalFiles,
}

static NO_FILES: ExternalFiles = BTreeMap::new();

impl<'a> From<&'a [u8]> for Onnx<'a> {
    fn from(model: &'a [u8]) -> Self {
        Onnx {
            model,
            external: &NO_FILES,
        }
    }
}

impl<'a> From<&'a Vec<u8>> for Onnx<'a> {
    fn from(model: &'a Vec<u8>) -> Self {
        Onnx::from(model.as_slice())
    }
}

impl<'a, const N: usize> From<&'a [u8; N]> for Onnx<'a> {
    fn from(model: &'a [u8; N]) -> Self {
        Onnx::from(model.as_slice())
    }
}

/// One tensor stored outside the model file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalRef {
    /// The initializer (or constant) it holds.
    pub tensor: String,
    pub location: String,
    pub offset: u64,
    /// None: to the end of the file.
    pub length: Option<u64>,
}

fn decode(onnx: &[u8]) -> Result<pb::ModelProto, RuntimeError> {
    pb::ModelProto::decode(onnx)
        .map_err(|e| RuntimeError::Load(format!("not an ONNX model (protobuf: {e})")))
}

/// Every tensor of `graph` and its subgraphs (If/Loop/Scan bodies), initializers and
/// constant attributes alike.
fn for_each_tensor(graph: &mut pb::GraphProto, f: &mut dyn FnMut(&mut pb::TensorProto)) {
    for t in &mut graph.initializer {
        f(t);
    }
    for node in &mut graph.node {
        for attr in &mut node.attribute {
            if let Some(t) = attr.t.as_mut() {
                f(t);
            }
            for t in &mut attr.tensors {
                f(t);
            }
            if let Some(g) = attr.g.as_mut() {
                for_each_tensor(g, f);
            }
            for g in &mut attr.graphs {
                for_each_tensor(g, f);
            }
        }
    }
}

fn is_external(t: &pb::TensorProto) -> bool {
    t.data_location == Some(pb::tensor_proto::DataLocation::External as i32)
}

fn reference(t: &pb::TensorProto) -> Result<ExternalRef, String> {
    let field = |key: &str| {
        t.external_data
            .iter()
            .find(|kv| kv.key == key)
            .map(|kv| kv.value.as_str())
    };
    let number = |key: &str| -> Result<Option<u64>, String> {
        field(key)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    format!(
                        "tensor `{}`: external data {key} `{v}` is not a number",
                        t.name
                    )
                })
            })
            .transpose()
    };
    let location = field("location").ok_or_else(|| {
        format!(
            "tensor `{}` is stored externally but names no location",
            t.name
        )
    })?;
    Ok(ExternalRef {
        tensor: t.name.clone(),
        location: location.to_string(),
        offset: number("offset")?.unwrap_or(0),
        length: number("length")?,
    })
}

/// The externally stored tensors of `onnx`, in graph order.
pub fn references(onnx: &[u8]) -> Result<Vec<ExternalRef>, RuntimeError> {
    let mut model = decode(onnx)?;
    let mut refs = Vec::new();
    let mut error = None;
    if let Some(graph) = model.graph.as_mut() {
        for_each_tensor(graph, &mut |t| {
            if is_external(t) {
                match reference(t) {
                    Ok(r) => refs.push(r),
                    Err(e) => {
                        error.get_or_insert(e);
                    }
                }
            }
        });
    }
    match error {
        Some(e) => Err(RuntimeError::Load(e)),
        None => Ok(refs),
    }
}

/// The distinct external files `onnx` names, in order of first use.
pub fn locations(onnx: &[u8]) -> Result<Vec<String>, RuntimeError> {
    let mut out: Vec<String> = Vec::new();
    for r in references(onnx)? {
        if !out.contains(&r.location) {
            out.push(r.location);
        }
    }
    Ok(out)
}

/// `onnx` with every external `location` renamed through `names` (old → new); a
/// location missing from `names` is an error.
pub fn relocate(onnx: &[u8], names: &BTreeMap<String, String>) -> Result<Vec<u8>, RuntimeError> {
    let mut model = decode(onnx)?;
    let mut missing = None;
    if let Some(graph) = model.graph.as_mut() {
        for_each_tensor(graph, &mut |t| {
            if !is_external(t) {
                return;
            }
            for kv in &mut t.external_data {
                if kv.key == "location" {
                    match names.get(&kv.value) {
                        Some(new) => kv.value = new.clone(),
                        None => {
                            missing.get_or_insert(kv.value.clone());
                        }
                    }
                }
            }
        });
    }
    if let Some(m) = missing {
        return Err(RuntimeError::Load(format!(
            "external data file `{m}` has no new name"
        )));
    }
    Ok(model.encode_to_vec())
}

/// The model with every external tensor's bytes copied in (`raw_data`), as tract and the
/// GPU preparation read it. The files must hold every byte range the model names.
pub fn inline(onnx: Onnx<'_>) -> Result<pb::ModelProto, RuntimeError> {
    inline_where(onnx, &|_| true)
}

/// The model with its integer tensors and tensors of at most 1 KiB copied in, the rest
/// left external. ONNX Runtime reads external data from memory only when it creates
/// the session; its shape inference, earlier, needs the data of shape tensors in the
/// model itself ("Cannot parse data from external tensors"). Exporters keep such small
/// tensors inline anyway (onnx's default threshold is 1 KiB); this covers files that
/// moved every tensor out.
pub fn inline_small(onnx: Onnx<'_>) -> Result<Vec<u8>, RuntimeError> {
    use pb::tensor_proto::DataType;
    let integer = [
        DataType::Int64,
        DataType::Int32,
        DataType::Int16,
        DataType::Int8,
    ]
    .map(|d| d as i32);
    let small = |t: &pb::TensorProto| {
        integer.contains(&t.data_type)
            || reference(t).is_ok_and(|r| r.length.is_some_and(|n| n <= 1024))
    };
    inline_where(onnx, &small).map(|m| m.encode_to_vec())
}

fn inline_where(
    onnx: Onnx<'_>,
    which: &dyn Fn(&pb::TensorProto) -> bool,
) -> Result<pb::ModelProto, RuntimeError> {
    let mut model = decode(onnx.model)?;
    let mut error = None;
    if let Some(graph) = model.graph.as_mut() {
        for_each_tensor(graph, &mut |t| {
            if !is_external(t) || error.is_some() || !which(t) {
                return;
            }
            match reference(t).and_then(|r| slice(&r, onnx.external).map(<[u8]>::to_vec)) {
                Ok(bytes) => {
                    t.raw_data = bytes;
                    t.external_data.clear();
                    t.data_location = None;
                }
                Err(e) => error = Some(e),
            }
        });
    }
    match error {
        Some(e) => Err(RuntimeError::Load(e)),
        None => Ok(model),
    }
}

/// The bytes `r` names in `files`.
fn slice<'f>(r: &ExternalRef, files: &'f ExternalFiles) -> Result<&'f [u8], String> {
    let file = files.get(&r.location).ok_or_else(|| {
        format!(
            "tensor `{}` is stored in external data file `{}`, which is not part of the model",
            r.tensor, r.location
        )
    })?;
    let len = file.len() as u64;
    let end = match r.length {
        Some(n) => r.offset.checked_add(n),
        None => Some(len),
    };
    match end {
        Some(end) if r.offset <= end && end <= len => Ok(&file[r.offset as usize..end as usize]),
        _ => Err(format!(
            "tensor `{}`: bytes {}..{} are outside external data file `{}` ({len} bytes)",
            r.tensor,
            r.offset,
            r.length
                .map_or("end".into(), |n| (r.offset.saturating_add(n)).to_string()),
            r.location
        )),
    }
}

/// [`inline`], encoded: one self-contained ONNX file (fails past protobuf's 2 GiB).
pub fn inlined_bytes(onnx: Onnx<'_>) -> Result<Vec<u8>, RuntimeError> {
    if onnx.external.is_empty() && references(onnx.model)?.is_empty() {
        return Ok(onnx.model.to_vec());
    }
    let model = inline(onnx)?;
    if model.encoded_len() > i32::MAX as usize {
        return Err(RuntimeError::Load(
            "the model with its external data is over 2 GiB, more than one ONNX file can hold"
                .into(),
        ));
    }
    Ok(model.encode_to_vec())
}

/// Checks that every external tensor of `onnx` lies inside its file.
pub fn check(onnx: Onnx<'_>) -> Result<(), RuntimeError> {
    for r in references(onnx.model)? {
        slice(&r, onnx.external).map_err(RuntimeError::Load)?;
    }
    Ok(())
}

/// Reads the model entry `entry` of a verified bundle and the external data files it
/// names (each a payload of the same bundle), re-hashing every byte read. A model
/// larger than `max_model`, or a file larger than `max_file`, is refused.
pub fn read_from_bundle<R: std::io::Read + std::io::Seek>(
    verified: &fleetml_protocol::bundle::VerifiedBundle,
    bundle: &mut R,
    entry: &str,
    max_model: u64,
    max_file: u64,
) -> Result<(Vec<u8>, ExternalFiles), String> {
    let model = verified
        .read_entry(bundle, entry, max_model)
        .map_err(|e| e.to_string())?;
    let mut files = ExternalFiles::new();
    for location in locations(&model).map_err(|e| e.to_string())? {
        if verified.manifest.entry(&location).is_none() {
            return Err(format!(
                "`{entry}` keeps weights in external data file `{location}`, which is not in the bundle"
            ));
        }
        let bytes = verified
            .read_entry(bundle, &location, max_file)
            .map_err(|e| e.to_string())?;
        files.insert(location, bytes.into());
    }
    Ok((model, files))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, location: Option<(&str, u64, u64)>) -> pb::TensorProto {
        let mut t = pb::TensorProto {
            name: name.into(),
            dims: vec![2],
            data_type: pb::tensor_proto::DataType::Float as i32,
            ..Default::default()
        };
        match location {
            Some((loc, offset, length)) => {
                t.data_location = Some(pb::tensor_proto::DataLocation::External as i32);
                for (k, v) in [
                    ("location", loc.to_string()),
                    ("offset", offset.to_string()),
                    ("length", length.to_string()),
                ] {
                    t.external_data.push(pb::StringStringEntryProto {
                        key: k.into(),
                        value: v,
                    });
                }
            }
            None => t.raw_data = vec![0; 8],
        }
        t
    }

    fn model(tensors: Vec<pb::TensorProto>) -> Vec<u8> {
        pb::ModelProto {
            graph: Some(pb::GraphProto {
                initializer: tensors,
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn finds_renames_and_inlines_external_tensors() {
        let onnx = model(vec![
            tensor("a", Some(("w.bin", 0, 8))),
            tensor("b", None),
            tensor("c", Some(("w.bin", 8, 8))),
        ]);
        assert_eq!(locations(&onnx).expect("refs"), vec!["w.bin".to_string()]);
        let names = BTreeMap::from([("w.bin".to_string(), "model.onnx.data".to_string())]);
        let moved = relocate(&onnx, &names).expect("relocates");
        assert_eq!(locations(&moved).expect("refs"), vec!["model.onnx.data"]);
        let data: Arc<[u8]> = (0u8..16).collect::<Vec<_>>().into();
        let files = ExternalFiles::from([("model.onnx.data".to_string(), data)]);
        let inlined = inline(Onnx {
            model: &moved,
            external: &files,
        })
        .expect("inlines");
        let init = &inlined.graph.expect("graph").initializer;
        assert_eq!(init[0].raw_data, (0u8..8).collect::<Vec<_>>());
        assert_eq!(init[2].raw_data, (8u8..16).collect::<Vec<_>>());
        assert!(init.iter().all(|t| !is_external(t)));
    }

    #[test]
    fn missing_files_and_ranges_past_the_end_are_named() {
        let onnx = model(vec![tensor("w", Some(("model.onnx.data", 4, 8)))]);
        let none = inline(Onnx::from(&onnx)).expect_err("no file");
        assert!(none.to_string().contains("`model.onnx.data`"), "{none}");
        let files =
            ExternalFiles::from([("model.onnx.data".to_string(), Arc::from(vec![0u8; 10]))]);
        let short = check(Onnx {
            model: &onnx,
            external: &files,
        })
        .expect_err("short file");
        assert!(short.to_string().contains("bytes 4..12"), "{short}");
        let huge = model(vec![tensor("w", Some(("model.onnx.data", u64::MAX, 8)))]);
        assert!(
            check(Onnx {
                model: &huge,
                external: &files
            })
            .is_err()
        );
    }

    proptest::proptest! {
        /// Arbitrary bytes as a model never panic the external-data reader.
        #[test]
        fn arbitrary_models_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = locations(&bytes);
            let _ = inline(Onnx::from(&bytes));
        }

        /// Any offset and length either names bytes inside the file, exactly, or is refused.
        #[test]
        fn any_range_is_inside_or_refused(offset in 0u64..64, length in 0u64..64, size in 0usize..64) {
            let onnx = model(vec![tensor("w", Some(("f", offset, length)))]);
            let data: Arc<[u8]> = (0..size).map(|i| i as u8).collect::<Vec<_>>().into();
            let files = ExternalFiles::from([("f".to_string(), data)]);
            let result = inline(Onnx { model: &onnx, external: &files });
            let end = (offset + length) as usize;
            if end <= size {
                let m = result.expect("inside");
                let raw = &m.graph.expect("graph").initializer[0].raw_data;
                let want: Vec<u8> = (offset as usize..end).map(|i| i as u8).collect();
                proptest::prop_assert_eq!(raw, &want);
            } else {
                proptest::prop_assert!(result.is_err());
            }
        }
    }
}
