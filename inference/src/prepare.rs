//! The GPU preparation pass: rewrites an ONNX model into the form wonnx 0.5 can compile,
//! and says which of its operators wonnx cannot run at all.
//!
//! wonnx plans every buffer at compile time, so it needs (measured on an H100 with the
//! PP-OCR direction classifier) every input and intermediate shape to be static and
//! written into the graph's `value_info`, and it lacks some operators. The pass:
//!
//! 1. fixes every graph input to a static shape (declared shapes, symbols set to the
//!    batch size);
//! 2. lowers operators that have an exact decomposition into ones wonnx has
//!    (`HardSigmoid(x) = Clip(x * alpha + beta, 0, 1)`);
//! 3. types the rewritten model with tract and writes each tensor's static shape and
//!    element type into `value_info` (and onto the graph outputs);
//! 4. checks every node against the operators wonnx 0.5.1 compiles and lists the rest.
//!
//! The pass needs no GPU: it runs in `fleetctl bundle build --prepare gpu` and, for
//! bundles built without it, on the device before the GPU self-test.

use std::collections::{BTreeMap, HashSet};

use fleetml_protocol::manifest::{Dim, TensorSpec};
use prost::Message;
use serde::{Deserialize, Serialize};
use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

/// Version of wonnx whose operator set [`WONNX_OPS`] describes.
pub const WONNX_TARGET: &str = "wonnx-0.5.1";

/// Operators wonnx 0.5.1 compiles (its `compiler.rs`, plus those its optimizer folds
/// away: `Constant`, `Shape`, `Size`, `ConstantOfShape`). `Sum` is named there but
/// returns "unimplemented", so it is not listed.
pub const WONNX_OPS: &[&str] = &[
    "Abs",
    "Acos",
    "Acosh",
    "Add",
    "And",
    "Asin",
    "Asinh",
    "Atan",
    "Atanh",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Ceil",
    "Celu",
    "Clip",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "Cos",
    "Cosh",
    "Div",
    "Dropout",
    "Elu",
    "Equal",
    "Exp",
    "Flatten",
    "Floor",
    "Gather",
    "Gemm",
    "GlobalAveragePool",
    "Greater",
    "GreaterOrEqual",
    "Identity",
    "LeakyRelu",
    "Less",
    "LessOrEqual",
    "Log",
    "MatMul",
    "MaxPool",
    "Mod",
    "Mul",
    "Neg",
    "OneHot",
    "Or",
    "PRelu",
    "Pad",
    "Pow",
    "Reciprocal",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSum",
    "ReduceSumSquare",
    "Relu",
    "Reshape",
    "Resize",
    "Round",
    "Shape",
    "Sigmoid",
    "Sign",
    "Sin",
    "Sinh",
    "Size",
    "Softmax",
    "Softplus",
    "Softsign",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Tan",
    "Tanh",
    "Transpose",
    "Unsqueeze",
];

/// The outcome of the pass, stored next to the prepared model in a bundle
/// (`gpu/compat.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompatReport {
    /// The backend the model was prepared for, e.g. `wonnx-0.5.1`.
    pub target: String,
    /// The batch size the inputs were fixed to.
    pub batch: u64,
    /// The static input shapes of the prepared model.
    pub inputs: Vec<TensorSpec>,
    /// Operators rewritten into others, with how many nodes each.
    pub lowered: BTreeMap<String, usize>,
    /// Tensors whose shape was written into `value_info`.
    pub shapes_filled: usize,
    /// Tensors whose shape tract could not make static (wonnx will refuse the model).
    pub shapes_unknown: Vec<String>,
    /// Operators the target cannot run, with how many nodes each. Empty means the
    /// model is expected to compile.
    pub unsupported: BTreeMap<String, usize>,
}

impl CompatReport {
    /// Whether the target is expected to run the prepared model.
    pub fn is_compatible(&self) -> bool {
        self.unsupported.is_empty() && self.shapes_unknown.is_empty()
    }

    /// One line for operators and logs, e.g.
    /// `wonnx-0.5.1 cannot run ConvTranspose (2 nodes), Slice (1 node)`.
    pub fn summary(&self) -> String {
        if self.is_compatible() {
            return format!("{} can run every operator of the model", self.target);
        }
        let mut parts: Vec<String> = self
            .unsupported
            .iter()
            .map(|(op, n)| format!("{op} ({n} node{})", if *n == 1 { "" } else { "s" }))
            .collect();
        if !self.shapes_unknown.is_empty() {
            parts.push(format!(
                "tensors without a static shape: {}",
                self.shapes_unknown.join(", ")
            ));
        }
        format!("{} cannot run {}", self.target, parts.join(", "))
    }
}

/// A model prepared for the GPU backend.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub onnx: Vec<u8>,
    pub report: CompatReport,
}

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("the model is not a valid ONNX protobuf: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("the model has no graph")]
    NoGraph,
    #[error("input `{input}` dimension {axis} is `{dim}`; declare a size for it (--input-shape)")]
    UnknownDim {
        input: String,
        axis: usize,
        dim: String,
    },
    #[error("input `{0}` has no tensor type")]
    Untyped(String),
    #[error("tract cannot type the rewritten model: {0}")]
    Type(String),
}

/// Prepares `onnx` for wonnx, with `inputs` giving declared shapes (a symbolic
/// dimension, and any input dimension the model leaves open, becomes `batch`).
pub fn prepare_gpu(
    onnx: &[u8],
    inputs: &[TensorSpec],
    batch: u64,
) -> Result<Prepared, PrepareError> {
    let mut model = pb::ModelProto::decode(onnx)?;
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .unwrap_or(1);
    let graph = model.graph.as_mut().ok_or(PrepareError::NoGraph)?;

    let static_inputs = fix_input_shapes(graph, inputs, batch)?;
    let mut lowered = lower(graph, opset);
    let folded = fold_constants(&mut model)?;
    if folded > 0 {
        lowered.insert("constant subgraphs (folded)".into(), folded);
    }

    // Type the rewritten model and record every tensor's static fact.
    let facts = infer_facts(&model)?;
    let graph = model.graph.as_mut().ok_or(PrepareError::NoGraph)?;
    let known: HashSet<String> = graph
        .input
        .iter()
        .map(|i| i.name.clone())
        .chain(graph.initializer.iter().map(|t| t.name.clone()))
        .collect();
    let mut value_info = Vec::new();
    let mut shapes_unknown = Vec::new();
    let produced: Vec<String> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().filter(|o| !o.is_empty()).cloned())
        .collect();
    for name in produced {
        if known.contains(&name) {
            continue;
        }
        match facts.get(&name) {
            Some((elem_type, shape)) => value_info.push(value_info_proto(&name, *elem_type, shape)),
            None => shapes_unknown.push(name),
        }
    }
    let shapes_filled = value_info.len();
    for output in &mut graph.output {
        if let Some(v) = value_info.iter().find(|v| v.name == output.name) {
            output.r#type = v.r#type.clone();
        }
    }
    let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    value_info.retain(|v| !outputs.contains(v.name.as_str()));
    graph.value_info = value_info;

    let mut unsupported = unsupported_ops(graph);
    unsupported.extend(unsupported_variants(graph));

    Ok(Prepared {
        onnx: model.encode_to_vec(),
        report: CompatReport {
            target: WONNX_TARGET.to_string(),
            batch,
            inputs: static_inputs,
            lowered,
            shapes_filled,
            shapes_unknown,
            unsupported,
        },
    })
}

/// Operators of `graph` wonnx cannot run, with how many nodes each.
fn unsupported_ops(graph: &pb::GraphProto) -> BTreeMap<String, usize> {
    let supported: HashSet<&str> = WONNX_OPS.iter().copied().collect();
    let mut unsupported = BTreeMap::new();
    for node in &graph.node {
        let foreign = !(node.domain.is_empty() || node.domain == "ai.onnx");
        if foreign || !supported.contains(node.op_type.as_str()) {
            let op = if foreign {
                format!("{}.{}", node.domain, node.op_type)
            } else {
                node.op_type.clone()
            };
            *unsupported.entry(op).or_insert(0) += 1;
        }
    }
    unsupported
}

/// Operator variants wonnx 0.5.1 accepts but computes wrongly, found from the static
/// shapes of a prepared graph. Measured on Mesa's llvmpipe: its single-row matrix kernel
/// (`gemm_1.wgsl`, used when M = 1) reads the inner dimension four at a time and silently
/// drops the remainder when K is not a multiple of 4 (the claims model, K = 25); and
/// `Concat` along an inner axis (ONNX node tests `concat_2d_axis_1` and friends).
fn unsupported_variants(graph: &pb::GraphProto) -> BTreeMap<String, usize> {
    let mut shapes: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for v in graph
        .input
        .iter()
        .chain(&graph.value_info)
        .chain(&graph.output)
    {
        if let Some(pb::type_proto::Value::TensorType(t)) =
            v.r#type.as_ref().and_then(|t| t.value.as_ref())
            && let Some(shape) = &t.shape
        {
            let dims: Option<Vec<i64>> = shape
                .dim
                .iter()
                .map(|d| match d.value {
                    Some(pb::tensor_shape_proto::dimension::Value::DimValue(n)) => Some(n),
                    _ => None,
                })
                .collect();
            if let Some(dims) = dims {
                shapes.insert(&v.name, dims);
            }
        }
    }
    for t in &graph.initializer {
        shapes.insert(&t.name, t.dims.clone());
    }
    let mut problems = BTreeMap::new();
    for node in &graph.node {
        if node.op_type == "Concat" {
            // Measured on llvmpipe with the ONNX node tests: wonnx concatenates as if
            // along the outermost axis; any other effective axis comes out wrong.
            let axis = node
                .attribute
                .iter()
                .find(|a| a.name == "axis")
                .map_or(0, |a| a.i);
            let outer = node
                .input
                .first()
                .and_then(|i| shapes.get(i.as_str()))
                .map(|s| {
                    let axis = if axis < 0 {
                        axis + s.len() as i64
                    } else {
                        axis
                    };
                    s.iter().take(axis.max(0) as usize).product::<i64>()
                });
            if outer.is_some_and(|o| o > 1) {
                *problems
                    .entry("Concat along an inner axis".to_string())
                    .or_insert(0) += 1;
            }
            continue;
        }
        if !matches!(node.op_type.as_str(), "MatMul" | "Gemm") {
            continue;
        }
        let transposed_a = node.op_type == "Gemm"
            && node
                .attribute
                .iter()
                .any(|a| a.name == "transA" && a.i != 0);
        let Some(left) = node.input.first().and_then(|i| shapes.get(i.as_str())) else {
            continue;
        };
        let (m, k) = match left.as_slice() {
            [k] => (1, *k),
            [.., m, k] if !transposed_a => (*m, *k),
            _ => continue,
        };
        if m == 1 && k % 4 != 0 {
            *problems
                .entry(format!(
                    "{} with one row and an inner dimension not a multiple of 4",
                    node.op_type
                ))
                .or_insert(0) += 1;
        }
    }
    problems
}

/// What a device needs to know about an already prepared model before handing it to
/// wonnx: its static inputs and outputs, and the operators wonnx cannot run.
#[derive(Debug, Clone)]
pub struct PreparedModel {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub unsupported: BTreeMap<String, usize>,
}

/// The inputs (initializers excluded) and outputs an ONNX file declares, read from its
/// graph without any runtime: element types from the protobuf, sizes as given, named
/// symbols for `dim_param`s and `NAME:AXIS` for unnamed dimensions. For models a
/// runtime cannot type, so a bundle can still say what they take.
pub fn declared_io(onnx: &[u8]) -> Result<(Vec<TensorSpec>, Vec<TensorSpec>), PrepareError> {
    use fleetml_protocol::manifest::DType;
    use pb::tensor_shape_proto::dimension::Value as DimValue;
    let model = pb::ModelProto::decode(onnx)?;
    let graph = model.graph.as_ref().ok_or(PrepareError::NoGraph)?;
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let spec = |v: &pb::ValueInfoProto| -> Result<TensorSpec, PrepareError> {
        let Some(pb::type_proto::Value::TensorType(t)) =
            v.r#type.as_ref().and_then(|t| t.value.as_ref())
        else {
            return Err(PrepareError::Untyped(v.name.clone()));
        };
        let dtype = match t.elem_type {
            1 => DType::F32,
            2 => DType::U8,
            3 => DType::I8,
            4 => DType::U16,
            5 => DType::I16,
            6 => DType::I32,
            7 => DType::I64,
            8 => DType::String,
            9 => DType::Bool,
            10 => DType::F16,
            11 => DType::F64,
            12 => DType::U32,
            13 => DType::U64,
            _ => return Err(PrepareError::Untyped(v.name.clone())),
        };
        let dims = t.shape.as_ref().map(|s| s.dim.as_slice()).unwrap_or(&[]);
        let shape = dims
            .iter()
            .enumerate()
            .map(|(axis, d)| match &d.value {
                Some(DimValue::DimValue(n)) if *n >= 0 => Dim::Fixed(*n as u64),
                Some(DimValue::DimParam(p)) if !p.is_empty() => Dim::Symbol(p.clone()),
                _ => Dim::Symbol(format!("{}:{axis}", v.name)),
            })
            .collect();
        Ok(TensorSpec {
            name: v.name.clone(),
            dtype,
            shape,
        })
    };
    let inputs = graph
        .input
        .iter()
        .filter(|v| !initializers.contains(v.name.as_str()))
        .map(spec)
        .collect::<Result<_, _>>()?;
    let outputs = graph.output.iter().map(spec).collect::<Result<_, _>>()?;
    Ok((inputs, outputs))
}

/// Reads back a model produced by [`prepare_gpu`]. An input or output without a static
/// shape is an error: the model was not prepared.
pub fn inspect_prepared(onnx: &[u8]) -> Result<PreparedModel, PrepareError> {
    let model = pb::ModelProto::decode(onnx)?;
    let graph = model.graph.as_ref().ok_or(PrepareError::NoGraph)?;
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let spec = |v: &pb::ValueInfoProto| -> Result<TensorSpec, PrepareError> {
        use pb::tensor_shape_proto::dimension::Value as DimValue;
        let Some(pb::type_proto::Value::TensorType(t)) =
            v.r#type.as_ref().and_then(|t| t.value.as_ref())
        else {
            return Err(PrepareError::Untyped(v.name.clone()));
        };
        let dims = t.shape.as_ref().map(|s| s.dim.as_slice()).unwrap_or(&[]);
        let shape = dims
            .iter()
            .enumerate()
            .map(|(axis, d)| match &d.value {
                Some(DimValue::DimValue(n)) if *n >= 0 => Ok(Dim::Fixed(*n as u64)),
                other => Err(PrepareError::UnknownDim {
                    input: v.name.clone(),
                    axis,
                    dim: match other {
                        Some(DimValue::DimParam(p)) => p.clone(),
                        _ => "?".into(),
                    },
                }),
            })
            .collect::<Result<_, _>>()?;
        Ok(TensorSpec {
            name: v.name.clone(),
            dtype: fleetml_protocol::manifest::DType::F32,
            shape,
        })
    };
    Ok(PreparedModel {
        inputs: graph
            .input
            .iter()
            .filter(|i| !initializers.contains(i.name.as_str()))
            .map(spec)
            .collect::<Result<_, _>>()?,
        outputs: graph.output.iter().map(spec).collect::<Result<_, _>>()?,
        unsupported: {
            let mut u = unsupported_ops(graph);
            u.extend(unsupported_variants(graph));
            u
        },
    })
}

/// Sets every non-initializer graph input to a static shape.
fn fix_input_shapes(
    graph: &mut pb::GraphProto,
    declared: &[TensorSpec],
    batch: u64,
) -> Result<Vec<TensorSpec>, PrepareError> {
    use pb::tensor_shape_proto::dimension::Value as DimValue;
    let initializers: HashSet<String> = graph.initializer.iter().map(|t| t.name.clone()).collect();
    let mut fixed = Vec::new();
    for input in &mut graph.input {
        if initializers.contains(&input.name) {
            continue;
        }
        let name = input.name.clone();
        let Some(pb::type_proto::Value::TensorType(tensor)) =
            input.r#type.as_mut().and_then(|t| t.value.as_mut())
        else {
            return Err(PrepareError::Untyped(name));
        };
        let spec = declared.iter().find(|s| s.name == name);
        let from_model: Vec<Option<DimValue>> = tensor
            .shape
            .as_ref()
            .map(|s| s.dim.iter().map(|d| d.value.clone()).collect())
            .unwrap_or_default();
        let rank = spec.map(|s| s.shape.len()).unwrap_or(from_model.len());
        let mut dims = Vec::with_capacity(rank);
        for axis in 0..rank {
            let size = match (spec.map(|s| &s.shape[axis]), from_model.get(axis)) {
                (Some(Dim::Fixed(n)), _) => *n as i64,
                (Some(Dim::Symbol(_)), _) => batch as i64,
                (None, Some(Some(DimValue::DimValue(n)))) if *n > 0 => *n,
                (None, Some(Some(DimValue::DimParam(_)))) if axis == 0 => batch as i64,
                (None, other) => {
                    return Err(PrepareError::UnknownDim {
                        input: name,
                        axis,
                        dim: match other {
                            Some(Some(DimValue::DimParam(p))) => p.clone(),
                            _ => "?".into(),
                        },
                    });
                }
            };
            dims.push(size);
        }
        tensor.shape = Some(pb::TensorShapeProto {
            dim: dims
                .iter()
                .map(|n| pb::tensor_shape_proto::Dimension {
                    denotation: String::new(),
                    value: Some(DimValue::DimValue(*n)),
                })
                .collect(),
        });
        fixed.push(TensorSpec {
            name,
            dtype: spec
                .map(|s| s.dtype)
                .unwrap_or(fleetml_protocol::manifest::DType::F32),
            shape: dims.iter().map(|n| Dim::Fixed(*n as u64)).collect(),
        });
    }
    Ok(fixed)
}

/// Rewrites operators with exact decompositions; returns how many nodes of each.
fn lower(graph: &mut pb::GraphProto, opset: i64) -> BTreeMap<String, usize> {
    let mut lowered = BTreeMap::new();
    let mut nodes = Vec::with_capacity(graph.node.len());
    let mut initializers = Vec::new();
    let taken: HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().chain(&n.input).cloned())
        .chain(graph.initializer.iter().map(|t| t.name.clone()))
        .collect();
    let mut fresh = {
        let mut counter = 0usize;
        move |hint: &str| loop {
            counter += 1;
            let name = format!("fleetml_gpu_{hint}_{counter}");
            if !taken.contains(&name) {
                return name;
            }
        }
    };
    for node in std::mem::take(&mut graph.node) {
        let is_default_domain = node.domain.is_empty() || node.domain == "ai.onnx";
        if !(is_default_domain && node.op_type == "HardSigmoid") {
            nodes.push(node);
            continue;
        }
        // HardSigmoid(x) = max(0, min(1, alpha * x + beta)), alpha 0.2 and beta 0.5 by
        // default (ONNX operator spec).
        let attr = |name: &str, default: f32| {
            node.attribute
                .iter()
                .find(|a| a.name == name)
                .map(|a| a.f)
                .unwrap_or(default)
        };
        let (alpha, beta) = (attr("alpha", 0.2), attr("beta", 0.5));
        let x = node.input[0].clone();
        let y = node.output[0].clone();
        let alpha_name = fresh("alpha");
        let beta_name = fresh("beta");
        let scaled = fresh("scaled");
        let shifted = fresh("shifted");
        initializers.push(scalar(&alpha_name, alpha));
        initializers.push(scalar(&beta_name, beta));
        nodes.push(simple_node(
            &fresh("mul"),
            "Mul",
            &[&x, &alpha_name],
            &scaled,
        ));
        nodes.push(simple_node(
            &fresh("add"),
            "Add",
            &[&scaled, &beta_name],
            &shifted,
        ));
        let mut clip = if opset >= 11 {
            let lo = fresh("zero");
            let hi = fresh("one");
            initializers.push(scalar(&lo, 0.0));
            initializers.push(scalar(&hi, 1.0));
            simple_node(&node.name, "Clip", &[&shifted, &lo, &hi], &y)
        } else {
            let mut clip = simple_node(&node.name, "Clip", &[&shifted], &y);
            clip.attribute = vec![float_attr("min", 0.0), float_attr("max", 1.0)];
            clip
        };
        if clip.name.is_empty() {
            clip.name = fresh("clip");
        }
        nodes.push(clip);
        *lowered.entry("HardSigmoid".to_string()).or_insert(0) += 1;
    }
    graph.node = nodes;
    graph.initializer.extend(initializers);
    lowered
}

fn simple_node(name: &str, op: &str, inputs: &[&str], output: &str) -> pb::NodeProto {
    pb::NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        name: name.to_string(),
        op_type: op.to_string(),
        ..Default::default()
    }
}

fn float_attr(name: &str, value: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.to_string(),
        r#type: pb::attribute_proto::AttributeType::Float as i32,
        f: value,
        ..Default::default()
    }
}

/// A one-element f32 initializer (shape `[1]`, which broadcasts against any tensor).
fn scalar(name: &str, value: f32) -> pb::TensorProto {
    pb::TensorProto {
        dims: vec![1],
        data_type: pb::tensor_proto::DataType::Float as i32,
        float_data: vec![value],
        name: name.to_string(),
        ..Default::default()
    }
}

fn value_info_proto(name: &str, elem_type: i32, shape: &[usize]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{Dimension, dimension::Value as DimValue};
    pb::ValueInfoProto {
        name: name.to_string(),
        r#type: Some(pb::TypeProto {
            denotation: String::new(),
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type,
                shape: Some(pb::TensorShapeProto {
                    dim: shape
                        .iter()
                        .map(|d| Dimension {
                            denotation: String::new(),
                            value: Some(DimValue::DimValue(*d as i64)),
                        })
                        .collect(),
                }),
            })),
        }),
        doc_string: String::new(),
    }
}

/// Largest tensor constant folding writes into the model (elements).
const MAX_FOLDED: usize = 1 << 20;

/// Replaces every node whose outputs tract can compute without the model's inputs (with
/// static input shapes, `Shape → Slice → Concat → Reshape` chains become constants) by
/// initializers, then drops nodes nothing reads any more. Returns how many nodes were
/// replaced.
fn fold_constants(model: &mut pb::ModelProto) -> Result<usize, PrepareError> {
    let ty = |e: TractError| PrepareError::Type(format!("{e:#}"));
    let parsed = tract_onnx::onnx().parse(model, None).map_err(ty)?;
    let mut inference = parsed.model;
    let _ = inference.analyse(false);
    let mut constants: BTreeMap<String, pb::TensorProto> = BTreeMap::new();
    for (name, outlet) in &parsed.outlets_by_name {
        if let Ok(fact) = inference.outlet_fact(*outlet)
            && let Some(value) = fact.value.concretize()
            && value.len() <= MAX_FOLDED
            && let Some(proto) = tensor_proto(name, &value)
        {
            constants.insert(name.clone(), proto);
        }
    }
    let opset = model.opset_import.clone();
    let graph = model.graph.as_mut().ok_or(PrepareError::NoGraph)?;
    // Values known without running the model: initializers, `Constant` nodes, and what
    // tract inferred above; nodes fed only by those are then evaluated one by one.
    let mut known: BTreeMap<String, pb::TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.clone(), t.clone()))
        .collect();
    for node in &graph.node {
        if node.op_type == "Constant"
            && let (Some(out), Some(t)) = (
                node.output.first(),
                node.attribute
                    .iter()
                    .find(|a| a.name == "value")
                    .and_then(|a| a.t.clone()),
            )
        {
            known.insert(
                out.clone(),
                pb::TensorProto {
                    name: out.clone(),
                    ..t
                },
            );
        }
    }
    let mut folded = 0;
    let mut kept = Vec::with_capacity(graph.node.len());
    for node in std::mem::take(&mut graph.node) {
        let outputs: Vec<String> = node
            .output
            .iter()
            .filter(|o| !o.is_empty())
            .cloned()
            .collect();
        if node.op_type == "Constant" || node.input.is_empty() || outputs.is_empty() {
            kept.push(node);
            continue;
        }
        let mut values: Option<Vec<pb::TensorProto>> =
            outputs.iter().map(|o| constants.get(o).cloned()).collect();
        if values.is_none()
            && node
                .input
                .iter()
                .filter(|i| !i.is_empty())
                .all(|i| known.contains_key(i))
        {
            values = evaluate(&node, &known, &opset);
        }
        match values {
            Some(values) => {
                for v in values {
                    known.insert(v.name.clone(), v.clone());
                    graph.initializer.push(v);
                }
                folded += 1;
            }
            None => kept.push(node),
        }
    }
    graph.node = kept;
    // Drop what no longer feeds anything.
    loop {
        let used: HashSet<String> = graph
            .node
            .iter()
            .flat_map(|n| n.input.iter().cloned())
            .chain(graph.output.iter().map(|o| o.name.clone()))
            .collect();
        let before = graph.node.len();
        graph
            .node
            .retain(|n| n.output.iter().any(|o| !o.is_empty() && used.contains(o)));
        graph
            .initializer
            .retain(|t| used.contains(&t.name) || graph.input.iter().any(|i| i.name == t.name));
        if graph.node.len() == before {
            break;
        }
    }
    Ok(folded)
}

/// Runs one node whose inputs are all `known`, with tract, as a model of its own.
fn evaluate(
    node: &pb::NodeProto,
    known: &BTreeMap<String, pb::TensorProto>,
    opset: &[pb::OperatorSetIdProto],
) -> Option<Vec<pb::TensorProto>> {
    let outputs: Vec<&String> = node.output.iter().filter(|o| !o.is_empty()).collect();
    let model = pb::ModelProto {
        ir_version: 8,
        opset_import: opset.to_vec(),
        graph: Some(pb::GraphProto {
            node: vec![node.clone()],
            name: "fold".into(),
            initializer: node
                .input
                .iter()
                .filter(|i| !i.is_empty())
                .filter_map(|i| known.get(i).cloned())
                .collect(),
            output: outputs
                .iter()
                .map(|o| pb::ValueInfoProto {
                    name: o.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let run = || -> TractResult<TVec<TValue>> {
        tract_onnx::onnx()
            .model_for_proto_model(&model)?
            .into_optimized()?
            .into_runnable()?
            .run(tvec![])
    };
    let values = std::panic::catch_unwind(run).ok()?.ok()?;
    if values.len() != outputs.len() {
        return None;
    }
    outputs
        .iter()
        .zip(values)
        .map(|(name, v)| {
            (v.len() <= MAX_FOLDED)
                .then(|| tensor_proto(name, &v))
                .flatten()
        })
        .collect()
}

/// `value` as an ONNX initializer named `name`, for the element types folding produces.
fn tensor_proto(name: &str, value: &Tensor) -> Option<pb::TensorProto> {
    use pb::tensor_proto::DataType as D;
    let mut proto = pb::TensorProto {
        dims: value.shape().iter().map(|d| *d as i64).collect(),
        name: name.to_string(),
        ..Default::default()
    };
    match value.datum_type() {
        DatumType::F32 => {
            proto.data_type = D::Float as i32;
            proto.float_data = value
                .to_plain_array_view::<f32>()
                .ok()?
                .iter()
                .copied()
                .collect();
        }
        // tract computes shapes (and int64 casts of them) as symbolic dimensions.
        DatumType::I64 | DatumType::TDim => {
            let value = value.cast_to::<i64>().ok()?;
            proto.data_type = D::Int64 as i32;
            proto.int64_data = value
                .to_plain_array_view::<i64>()
                .ok()?
                .iter()
                .copied()
                .collect();
        }
        DatumType::I32 => {
            proto.data_type = D::Int32 as i32;
            proto.int32_data = value
                .to_plain_array_view::<i32>()
                .ok()?
                .iter()
                .copied()
                .collect();
        }
        _ => return None,
    }
    Some(proto)
}

/// Static element type (ONNX code) and shape of every named tensor tract can type.
fn infer_facts(
    model: &pb::ModelProto,
) -> Result<BTreeMap<String, (i32, Vec<usize>)>, PrepareError> {
    let ty = |e: TractError| PrepareError::Type(format!("{e:#}"));
    let parsed = tract_onnx::onnx().parse(model, None).map_err(ty)?;
    let mut facts = BTreeMap::new();
    // Facts from inference first: they are keyed by the ONNX names exactly.
    let mut inference = parsed.model;
    let _ = inference.analyse(false);
    for (name, outlet) in &parsed.outlets_by_name {
        if let Ok(fact) = inference.outlet_fact(*outlet)
            && let (Some(dt), Ok(Some(shape))) = (
                fact.datum_type.concretize(),
                fact.shape.as_concrete_finite(),
            )
            && let Some(code) = onnx_elem_type(dt)
        {
            facts.insert(name.clone(), (code, shape.to_vec()));
        }
    }
    // Then from the typed model (which resolves more), by outlet label.
    if let Ok(typed) = inference.into_typed() {
        for node in typed.nodes() {
            for (ix, output) in node.outputs.iter().enumerate() {
                let Some(label) = typed.outlet_label(OutletId::new(node.id, ix)) else {
                    continue;
                };
                if facts.contains_key(label) {
                    continue;
                }
                if let (Some(shape), Some(code)) = (
                    output.fact.shape.as_concrete(),
                    onnx_elem_type(output.fact.datum_type),
                ) {
                    facts.insert(label.to_string(), (code, shape.to_vec()));
                }
            }
        }
    }
    Ok(facts)
}

fn onnx_elem_type(dt: DatumType) -> Option<i32> {
    use pb::tensor_proto::DataType as D;
    Some(match dt {
        DatumType::F32 => D::Float,
        DatumType::F64 => D::Double,
        DatumType::F16 => D::Float16,
        DatumType::I8 => D::Int8,
        DatumType::I16 => D::Int16,
        DatumType::I32 => D::Int32,
        DatumType::I64 => D::Int64,
        DatumType::U8 => D::Uint8,
        DatumType::U16 => D::Uint16,
        DatumType::U32 => D::Uint32,
        DatumType::U64 => D::Uint64,
        DatumType::Bool => D::Bool,
        _ => return None,
    } as i32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuModel;
    use fleetml_protocol::golden::Tensor;
    use fleetml_protocol::manifest::DType;

    fn input(name: &str, dims: &[Option<i64>]) -> pb::ValueInfoProto {
        use pb::tensor_shape_proto::{Dimension, dimension::Value as DimValue};
        pb::ValueInfoProto {
            name: name.into(),
            r#type: Some(pb::TypeProto {
                denotation: String::new(),
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: pb::tensor_proto::DataType::Float as i32,
                    shape: Some(pb::TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|d| Dimension {
                                denotation: String::new(),
                                value: Some(match d {
                                    Some(n) => DimValue::DimValue(*n),
                                    None => DimValue::DimParam("N".into()),
                                }),
                            })
                            .collect(),
                    }),
                })),
            }),
            doc_string: String::new(),
        }
    }

    fn model(opset: i64, nodes: Vec<pb::NodeProto>, inits: Vec<pb::TensorProto>) -> Vec<u8> {
        let out = nodes.last().expect("test value").output[0].clone();
        pb::ModelProto {
            ir_version: 8,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: opset,
            }],
            graph: Some(pb::GraphProto {
                node: nodes,
                name: "g".into(),
                initializer: inits,
                input: vec![input("x", &[None, Some(4)])],
                output: vec![pb::ValueInfoProto {
                    name: out,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn hard_sigmoid_model(opset: i64) -> Vec<u8> {
        let mut hs = simple_node("hs", "HardSigmoid", &["x"], "h");
        hs.attribute = vec![float_attr("alpha", 0.3), float_attr("beta", 0.4)];
        model(
            opset,
            vec![hs, simple_node("relu", "Relu", &["h"], "y")],
            vec![],
        )
    }

    fn run(onnx: &[u8], rows: u64) -> Vec<f32> {
        let spec = TensorSpec {
            name: "x".into(),
            dtype: DType::F32,
            shape: vec![Dim::Fixed(rows), Dim::Fixed(4)],
        };
        let m = CpuModel::load_with_inputs(onnx, &[spec]).expect("test value");
        let data: Vec<f32> = (0..rows * 4).map(|i| i as f32 - 4.0).collect();
        let out = m
            .run(&[Tensor::f32("x", vec![rows, 4], data)])
            .expect("test value");
        out[0].data.to_f32()
    }

    #[test]
    fn hard_sigmoid_is_lowered_exactly_and_shapes_are_filled() {
        for opset in [9, 13] {
            let original = hard_sigmoid_model(opset);
            let prepared = prepare_gpu(&original, &[], 2).expect("test value");
            let report = &prepared.report;
            assert_eq!(report.lowered.get("HardSigmoid"), Some(&1), "opset {opset}");
            assert!(report.is_compatible(), "{}", report.summary());
            assert_eq!(report.inputs[0].shape, vec![Dim::Fixed(2), Dim::Fixed(4)]);

            let graph = pb::ModelProto::decode(&prepared.onnx[..])
                .expect("test value")
                .graph
                .expect("test value");
            assert!(graph.node.iter().all(|n| n.op_type != "HardSigmoid"));
            // Every intermediate has a static shape; the output carries its own.
            assert_eq!(report.shapes_filled, 4, "mul, add, clip, relu outputs");
            assert_eq!(graph.value_info.len(), 3);
            for v in &graph.value_info {
                let Some(pb::type_proto::Value::TensorType(t)) =
                    v.r#type.as_ref().and_then(|t| t.value.as_ref())
                else {
                    panic!("{} has no tensor type", v.name)
                };
                let dims: Vec<_> = t
                    .shape
                    .as_ref()
                    .expect("test value")
                    .dim
                    .iter()
                    .map(|d| d.value.clone())
                    .collect();
                assert_eq!(dims.len(), 2, "{}", v.name);
            }
            assert!(graph.output[0].r#type.is_some());
            assert_eq!(run(&original, 2), run(&prepared.onnx, 2), "opset {opset}");
            let back = inspect_prepared(&prepared.onnx).expect("test value");
            assert_eq!(back.inputs, report.inputs);
            assert_eq!(back.outputs[0].shape, vec![Dim::Fixed(2), Dim::Fixed(4)]);
            assert!(back.unsupported.is_empty());
            assert!(
                inspect_prepared(&original).is_err(),
                "symbolic batch is not prepared"
            );
        }
    }

    #[test]
    fn unsupported_operators_are_listed_with_counts() {
        let nodes = vec![
            simple_node("a", "Relu", &["x"], "a"),
            simple_node("b", "Erf", &["a"], "b"),
            simple_node("c", "Erf", &["b"], "c"),
            simple_node("d", "Softmax", &["c"], "d"),
        ];
        let prepared = prepare_gpu(&model(13, nodes, vec![]), &[], 1).expect("test value");
        let report = prepared.report;
        assert!(!report.is_compatible());
        assert_eq!(report.unsupported.len(), 1);
        assert_eq!(report.unsupported["Erf"], 2);
        assert_eq!(report.summary(), "wonnx-0.5.1 cannot run Erf (2 nodes)");
    }

    #[test]
    fn a_one_row_matmul_with_an_odd_inner_dimension_is_flagged() {
        let w = pb::TensorProto {
            dims: vec![4, 3],
            data_type: pb::tensor_proto::DataType::Float as i32,
            float_data: vec![0.5; 12],
            name: "w".into(),
            ..Default::default()
        };
        let nodes = vec![
            simple_node("a", "Relu", &["x"], "a"),
            simple_node("b", "MatMul", &["a", "w"], "b"),
        ];
        // K = 4: fine at any batch.
        let ok = prepare_gpu(&model(13, nodes.clone(), vec![w.clone()]), &[], 1).expect("prepares");
        assert!(ok.report.is_compatible(), "{}", ok.report.summary());
        // K = 3 (x is [N, 4] sliced by a MatMul with a [4, 3] matrix, then [N, 3] x [3, 2]).
        let w2 = pb::TensorProto {
            dims: vec![3, 2],
            name: "w2".into(),
            float_data: vec![0.5; 6],
            ..w.clone()
        };
        let mut nodes = nodes;
        nodes.push(simple_node("c", "MatMul", &["b", "w2"], "c"));
        let one_row = prepare_gpu(
            &model(13, nodes.clone(), vec![w.clone(), w2.clone()]),
            &[],
            1,
        )
        .expect("prepares");
        assert_eq!(
            one_row.report.summary(),
            "wonnx-0.5.1 cannot run MatMul with one row and an inner dimension not a multiple of 4 (1 node)"
        );
        let back = inspect_prepared(&one_row.onnx).expect("prepared");
        assert_eq!(back.unsupported, one_row.report.unsupported);
        let two_rows = prepare_gpu(&model(13, nodes, vec![w, w2]), &[], 2).expect("prepares");
        assert!(
            two_rows.report.is_compatible(),
            "{}",
            two_rows.report.summary()
        );
    }

    #[test]
    fn an_open_dimension_other_than_the_batch_must_be_declared() {
        let mut m = pb::ModelProto::decode(&hard_sigmoid_model(13)[..]).expect("test value");
        let g = m.graph.as_mut().expect("test value");
        g.input[0] = input("x", &[Some(1), None]);
        let err = prepare_gpu(&m.encode_to_vec(), &[], 1).expect_err("fails");
        assert_eq!(
            err.to_string(),
            "input `x` dimension 1 is `N`; declare a size for it (--input-shape)"
        );
        let declared = TensorSpec {
            name: "x".into(),
            dtype: DType::F32,
            shape: vec![Dim::Symbol("N".into()), Dim::Fixed(4)],
        };
        let ok = prepare_gpu(&m.encode_to_vec(), &[declared], 3).expect("test value");
        assert_eq!(
            ok.report.inputs[0].shape,
            vec![Dim::Fixed(3), Dim::Fixed(4)]
        );
    }

    #[test]
    fn garbage_is_a_decode_error() {
        assert!(matches!(
            prepare_gpu(b"\xff\xff\xff not onnx", &[], 1),
            Err(PrepareError::Decode(_))
        ));
    }
}
