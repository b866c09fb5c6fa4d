//! The insurance-claim triage example: a deterministic generator of realistic claims, a
//! small neural network trained on them (one hidden ReLU layer, softmax over
//! {fast-track, investigate}), and an ONNX writer for the result.
//!
//! Everything is a pure function of the seed and the configuration: the random stream is
//! ChaCha8 seeded from the seed's bytes, and all arithmetic is IEEE-754 `+ - * /` and
//! `sqrt` in a fixed order (no libm transcendental functions, whose last bits differ
//! between platforms), so the same seed gives a bit-identical `model.onnx` everywhere.

pub mod data;
pub mod detmath;
pub mod onnx;
pub mod train;

use fleetml_protocol::features::{Encoding, Feature, FeatureSchema, FeatureType};

/// Name of the model's single input tensor, `f32[N, COLUMNS]`.
pub const INPUT: &str = "input";
/// Name of the model's single output tensor, `f32[N, 2]`: P(fast-track), P(investigate).
pub const OUTPUT: &str = "probabilities";
/// Name of the label column in the CSV files.
pub const LABEL: &str = "investigate";

fn numeric(
    name: &str,
    kind: FeatureType,
    unit: &str,
    min: f64,
    max: f64,
    column: u32,
    description: &str,
) -> Feature {
    Feature {
        name: name.into(),
        kind,
        unit: (!unit.is_empty()).then(|| unit.to_string()),
        description: Some(description.into()),
        min: Some(min),
        max: Some(max),
        values: Vec::new(),
        encoding: None,
        impute: None,
        input: INPUT.into(),
        column,
    }
}

fn category(name: &str, values: &[&str], column: u32, description: &str) -> Feature {
    Feature {
        name: name.into(),
        kind: FeatureType::Category,
        unit: None,
        description: Some(description.into()),
        min: None,
        max: None,
        values: values.iter().map(|v| v.to_string()).collect(),
        encoding: Some(Encoding::OneHot),
        impute: None,
        input: INPUT.into(),
        column,
    }
}

pub const CLAIM_TYPES: [&str; 4] = ["auto", "home", "health", "travel"];
pub const CHANNELS: [&str; 3] = ["agent", "online", "phone"];
pub const REGIONS: [&str; 5] = ["north", "south", "east", "west", "central"];
pub const YES_NO: [&str; 2] = ["yes", "no"];

/// The feature schema of the claims model (written to `features.toml`).
pub fn schema() -> FeatureSchema {
    use FeatureType::{Float, Int};
    let mut features = vec![
        numeric(
            "claim_amount",
            Float,
            "EUR",
            0.0,
            1_000_000.0,
            0,
            "Amount claimed",
        ),
        numeric(
            "policy_tenure_months",
            Int,
            "months",
            0.0,
            600.0,
            1,
            "Time since the policy started",
        ),
        numeric(
            "customer_age",
            Int,
            "years",
            18.0,
            100.0,
            2,
            "Age of the policy holder",
        ),
        numeric(
            "prior_claims",
            Int,
            "",
            0.0,
            50.0,
            3,
            "Claims by the holder in the last 5 years",
        ),
        numeric(
            "report_delay_days",
            Int,
            "days",
            0.0,
            3650.0,
            4,
            "Days between incident and report",
        ),
        numeric(
            "vehicle_age_years",
            Float,
            "years",
            0.0,
            60.0,
            5,
            "Age of the vehicle (0 when no vehicle)",
        ),
        numeric(
            "witness_count",
            Int,
            "",
            0.0,
            20.0,
            6,
            "Witnesses named in the report",
        ),
        numeric(
            "deductible",
            Float,
            "EUR",
            0.0,
            10_000.0,
            7,
            "Policy deductible",
        ),
        numeric(
            "annual_premium",
            Float,
            "EUR",
            0.0,
            50_000.0,
            8,
            "Yearly premium of the policy",
        ),
        numeric(
            "incident_hour",
            Int,
            "hour",
            0.0,
            23.0,
            9,
            "Local hour of the incident",
        ),
        numeric("injuries", Int, "", 0.0, 20.0, 10, "People injured"),
        category("claim_type", &CLAIM_TYPES, 11, "Line of business"),
        category("channel", &CHANNELS, 15, "How the claim was filed"),
        category("region", &REGIONS, 18, "Sales region of the policy"),
        category(
            "police_report",
            &YES_NO,
            23,
            "Whether a police report was filed",
        ),
    ];
    // Witnesses are often not recorded; the model was trained with 0 in their place.
    features[6].impute = Some(0.0);
    FeatureSchema { features }
}

/// Columns of the input tensor.
pub const COLUMNS: usize = 25;

/// What one run of the trainer produces.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// `(file name, bytes)`: model.onnx, features.toml, lineage.toml, and the CSV files.
    pub files: Vec<(&'static str, Vec<u8>)>,
    pub holdout_accuracy: f64,
    pub holdout_auc: f64,
    pub drifted_auc: f64,
}

/// Inputs of a run. Everything that changes the output is here.
#[derive(Debug, Clone)]
pub struct Run {
    pub seed: u64,
    pub rows: usize,
    pub holdout: usize,
    pub drifted: usize,
    pub train: train::Config,
    /// SHA-256 of the dependency lockfile, when the caller knows it.
    pub lockfile_sha256: Option<String>,
    /// Repository and commit of this code, when the caller knows them.
    pub code: Option<(String, Option<String>)>,
}

impl Default for Run {
    fn default() -> Self {
        Run {
            seed: 42,
            rows: 4000,
            holdout: 1000,
            drifted: 1000,
            train: train::Config::default(),
            lockfile_sha256: None,
            code: None,
        }
    }
}

fn csv_bytes(schema: &FeatureSchema, claims: &[data::Claim]) -> Vec<u8> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut header: Vec<&str> = schema.features.iter().map(|f| f.name.as_str()).collect();
    header.push(LABEL);
    w.write_record(&header).expect("writing to memory");
    for c in claims {
        let mut rec: Vec<String> = c.values.iter().map(data::cell).collect();
        rec.push(u8::from(c.investigate).to_string());
        w.write_record(&rec).expect("writing to memory");
    }
    w.into_inner().expect("writing to memory")
}

/// Generates the data, trains, and renders every artifact.
pub fn run(run: &Run) -> Artifacts {
    use fleetml_protocol::manifest::{CodeRef, DatasetRef, Framework, Lineage, Param};

    let schema = schema();
    let reference = data::Generator::new(run.seed, 1).claims(run.rows, &data::Shift::NONE);
    let holdout = data::Generator::new(run.seed, 2).claims(run.holdout, &data::Shift::NONE);
    let drifted = data::Generator::new(run.seed, 3).claims(run.drifted, &data::Shift::DRIFTED);

    let x = train::encode(&schema, &reference);
    let y: Vec<bool> = reference.iter().map(|c| c.investigate).collect();
    let model = train::train(&x, &y, &run.train, run.seed);
    let score = |claims: &[data::Claim]| {
        let x = train::encode(&schema, claims);
        let scores: Vec<f64> = x.iter().map(|r| model.predict(r)).collect();
        let labels: Vec<bool> = claims.iter().map(|c| c.investigate).collect();
        train::evaluate(&scores, &labels)
    };
    let (holdout_accuracy, holdout_auc) = score(&holdout);
    let (_, drifted_auc) = score(&drifted);

    let reference_csv = csv_bytes(&schema, &reference);
    let dataset_sha = hex::encode(ring::digest::digest(&ring::digest::SHA256, &reference_csv));
    let mut hyperparameters = std::collections::BTreeMap::new();
    let int = |v: usize| Param::Int(i64::try_from(v).unwrap_or(i64::MAX));
    hyperparameters.insert("hidden_units".into(), int(run.train.hidden));
    hyperparameters.insert("epochs".into(), int(run.train.epochs));
    hyperparameters.insert("batch_size".into(), int(run.train.batch));
    hyperparameters.insert(
        "learning_rate".into(),
        Param::Float(run.train.learning_rate),
    );
    hyperparameters.insert("momentum".into(), Param::Float(run.train.momentum));
    hyperparameters.insert("l2".into(), Param::Float(run.train.l2));
    hyperparameters.insert("training_rows".into(), int(run.rows));
    let lineage = Lineage {
        dependencies_lock_sha256: run.lockfile_sha256.clone(),
        container_image: None,
        cuda_version: None,
        cudnn_version: None,
        driver_version: None,
        seed: Some(run.seed),
        training_device: Some(format!("cpu ({})", std::env::consts::ARCH)),
        dataset: Some(DatasetRef {
            uri: "models/claims/reference.csv".into(),
            sha256: Some(dataset_sha),
        }),
        code: run
            .code
            .clone()
            .map(|(repository, commit)| CodeRef { repository, commit }),
        framework: Some(Framework {
            name: "fleetml-claims".into(),
            version: Some(env!("CARGO_PKG_VERSION").into()),
        }),
        hyperparameters,
    };

    let files = vec![
        (
            "model.onnx",
            onnx::encode(&model, env!("CARGO_PKG_VERSION")),
        ),
        ("features.toml", schema.to_toml().into_bytes()),
        ("lineage.toml", lineage.to_toml().into_bytes()),
        ("reference.csv", reference_csv),
        ("holdout.csv", csv_bytes(&schema, &holdout)),
        ("drifted.csv", csv_bytes(&schema, &drifted)),
    ];
    Artifacts {
        files,
        holdout_accuracy,
        holdout_auc,
        drifted_auc,
    }
}
