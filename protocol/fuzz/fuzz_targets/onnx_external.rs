//! Fuzzes the reader of ONNX external-data references (`fleetml_inference::external`),
//! which the builder runs on an operator's model and the agent on a bundle's.
#![no_main]

use fleetml_inference::external;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = external::locations(data);
    let _ = external::inline(external::Onnx::from(data));
    let _ = external::inline_small(external::Onnx::from(data));
});
