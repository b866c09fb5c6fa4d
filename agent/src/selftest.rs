//! The golden self-test: run a bundle's golden inputs and compare with its stored outputs.

use fleetml_protocol::golden::{self, Comparison, Golden, GoldenError};

use crate::runtime::{Backend, RuntimeError};

#[derive(Debug, thiserror::Error)]
pub enum SelfTestError {
    #[error(transparent)]
    Golden(#[from] GoldenError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("golden self-test cannot compare outputs: {0}")]
    Mismatch(String),
    #[error(
        "golden self-test failed: {failures} output values differ beyond tolerance (abs {abs_tol}, rel {rel_tol}); worst is `{output}`[{index}]: max abs error {max_abs:e}, max rel error {max_rel:e}"
    )]
    Failed {
        failures: usize,
        abs_tol: f32,
        rel_tol: f32,
        output: String,
        index: usize,
        max_abs: f32,
        max_rel: f32,
    },
}

/// Outcome of a passed self-test.
#[derive(Debug, Clone, PartialEq)]
pub struct SelfTest {
    pub rows: u64,
    pub comparison: Comparison,
}

/// Runs the golden vectors (CBOR bytes of a verified bundle's `golden.cbor`) on `model`.
pub fn run(model: &dyn Backend, golden_cbor: &[u8]) -> Result<SelfTest, SelfTestError> {
    run_within(model, golden_cbor, None)
}

/// [`run`], accepting differences up to `widen` (abs, rel) where that is wider than the
/// bundle's own tolerances: a board's allowance for a provider that computes in fp16.
pub fn run_within(
    model: &dyn Backend,
    golden_cbor: &[u8],
    widen: Option<(f32, f32)>,
) -> Result<SelfTest, SelfTestError> {
    let mut golden = Golden::from_cbor(golden_cbor)?;
    if let Some((abs, rel)) = widen {
        golden.abs_tolerance = golden.abs_tolerance.max(abs);
        golden.rel_tolerance = golden.rel_tolerance.max(rel);
    }
    let outputs = model.run(&golden.inputs)?;
    let comparison = golden::compare(&golden, &outputs).map_err(SelfTestError::Mismatch)?;
    if !comparison.passed() {
        let (output, index) = comparison.worst.clone().unwrap_or_default();
        return Err(SelfTestError::Failed {
            failures: comparison.failures,
            abs_tol: golden.abs_tolerance,
            rel_tol: golden.rel_tolerance,
            output,
            index,
            max_abs: comparison.max_abs_error,
            max_rel: comparison.max_rel_error,
        });
    }
    let rows = golden
        .inputs
        .first()
        .and_then(|t| t.shape.first().copied())
        .unwrap_or(0);
    Ok(SelfTest { rows, comparison })
}
