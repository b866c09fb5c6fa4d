//! Writes a trained [`Model`] as an ONNX graph (opset 13) with the protobuf types that
//! `tract-onnx` exposes:
//!
//! `input f32[N,25] → Sub(mean) → Div(std) → MatMul(W1) → Add(b1) → Relu → MatMul(W2)
//! → Add(b2) → Softmax(axis=1) → probabilities f32[N,2]`

use prost::Message;
use tract_onnx::pb;

use crate::train::Model;
use crate::{COLUMNS, INPUT, OUTPUT};

const FLOAT: i32 = 1; // TensorProto.DataType.FLOAT

fn tensor(name: &str, dims: &[i64], data: &[f64]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: FLOAT,
        float_data: data.iter().map(|v| *v as f32).collect(),
        ..Default::default()
    }
}

fn value_info(name: &str, dims: &[Result<i64, &str>]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{Dimension, dimension::Value};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            denotation: String::new(),
            value: Some(match d {
                Ok(n) => Value::DimValue(*n),
                Err(sym) => Value::DimParam(sym.to_string()),
            }),
        })
        .collect();
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            denotation: String::new(),
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: FLOAT,
                shape: Some(pb::TensorShapeProto { dim }),
            })),
        }),
        doc_string: String::new(),
    }
}

fn node(
    op: &str,
    inputs: &[&str],
    output: &str,
    attribute: Vec<pb::AttributeProto>,
) -> pb::NodeProto {
    pb::NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        name: output.into(),
        op_type: op.into(),
        attribute,
        ..Default::default()
    }
}

/// Encodes the model as ONNX bytes. Deterministic: the same model gives the same bytes.
pub fn encode(model: &Model, producer_version: &str) -> Vec<u8> {
    let h = model.hidden as i64;
    let axis = pb::AttributeProto {
        name: "axis".into(),
        r#type: 2, // INT
        i: 1,
        ..Default::default()
    };
    let graph = pb::GraphProto {
        name: "claims_triage".into(),
        node: vec![
            node("Sub", &[INPUT, "mean"], "centered", vec![]),
            node("Div", &["centered", "std"], "scaled", vec![]),
            node("MatMul", &["scaled", "w1"], "h_lin", vec![]),
            node("Add", &["h_lin", "b1"], "h_pre", vec![]),
            node("Relu", &["h_pre"], "hidden", vec![]),
            node("MatMul", &["hidden", "w2"], "logits_lin", vec![]),
            node("Add", &["logits_lin", "b2"], "logits", vec![]),
            node("Softmax", &["logits"], OUTPUT, vec![axis]),
        ],
        initializer: vec![
            tensor("mean", &[COLUMNS as i64], &model.mean),
            tensor("std", &[COLUMNS as i64], &model.std),
            tensor("w1", &[COLUMNS as i64, h], &model.w1),
            tensor("b1", &[h], &model.b1),
            tensor("w2", &[h, 2], &model.w2),
            tensor("b2", &[2], &model.b2),
        ],
        input: vec![value_info(INPUT, &[Err("N"), Ok(COLUMNS as i64)])],
        output: vec![value_info(OUTPUT, &[Err("N"), Ok(2)])],
        doc_string: "Insurance-claim triage: P(fast-track), P(investigate)".into(),
        ..Default::default()
    };
    let model = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        producer_name: "fleetml-claims".into(),
        producer_version: producer_version.into(),
        graph: Some(graph),
        ..Default::default()
    };
    model.encode_to_vec()
}
