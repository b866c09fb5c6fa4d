//! Feature schema checks against model inputs, and row encoding.

use fleetml_protocol::features::{FeatureError, FeatureSchema, RawValue, RowQuality};
use fleetml_protocol::manifest::{DType, Dim, TensorSpec};

use crate::fixture::schema;

fn input(columns: u64) -> Vec<TensorSpec> {
    vec![TensorSpec {
        name: "input".into(),
        dtype: DType::F32,
        shape: vec![Dim::Symbol("N".into()), Dim::Fixed(columns)],
    }]
}

#[test]
fn a_matching_schema_is_accepted() {
    assert_eq!(schema().check_against(&input(3)), Ok(()));
}

#[test]
fn mismatches_name_the_feature() {
    let s = schema();
    match s.check_against(&input(2)) {
        Err(FeatureError::ColumnOutOfRange {
            feature,
            start: 1,
            end: 3,
            columns: 2,
            ..
        }) => assert_eq!(feature, "kind"),
        other => panic!("{other:?}"),
    }
    let err = s.check_against(&input(4)).expect_err("uncovered column");
    assert_eq!(
        err,
        FeatureError::Uncovered {
            input: "input".into(),
            column: 3
        }
    );

    let mut wrong_input = s.clone();
    wrong_input.features[0].input = "pixels".into();
    let err = wrong_input
        .check_against(&input(3))
        .expect_err("unknown input");
    assert!(
        err.to_string()
            .contains("feature `amount` feeds input `pixels`"),
        "{err}"
    );

    let mut overlap = s.clone();
    overlap.features[1].column = 0;
    assert!(
        matches!(overlap.check_against(&input(3)), Err(FeatureError::Overlap { first, second, column: 0, .. }) if first == "amount" && second == "kind")
    );

    let ints = vec![TensorSpec {
        name: "input".into(),
        dtype: DType::I64,
        shape: vec![Dim::Fixed(1), Dim::Fixed(3)],
    }];
    assert!(
        matches!(s.check_against(&ints), Err(FeatureError::InputNotFloat { feature, .. }) if feature == "amount")
    );

    let symbolic = vec![TensorSpec {
        name: "input".into(),
        dtype: DType::F32,
        shape: vec![Dim::Symbol("N".into()), Dim::Symbol("D".into())],
    }];
    assert!(matches!(
        s.check_against(&symbolic),
        Err(FeatureError::UnsizedInput { .. })
    ));
}

#[test]
fn toml_schemas_are_checked_on_load() {
    let cases: &[(&str, &str)] = &[
        ("", "no features"),
        (
            "[[features]]\nname = \"a\"\ntype = \"float\"\ninput = \"i\"\ncolumn = 0\ncolour = 1\n",
            "unknown field `colour`",
        ),
        (
            "[[features]]\nname = \"a\"\ntype = \"float\"\nmin = 5.0\nmax = 1.0\ninput = \"i\"\ncolumn = 0\n",
            "feature `a`: `min` is greater than `max`",
        ),
        (
            "[[features]]\nname = \"c\"\ntype = \"category\"\ninput = \"i\"\ncolumn = 0\n",
            "feature `c`: a category feature needs `values`",
        ),
        (
            "[[features]]\nname = \"c\"\ntype = \"category\"\nvalues = [\"x\", \"x\"]\ninput = \"i\"\ncolumn = 0\n",
            "value `x` is listed twice",
        ),
        (
            "[[features]]\nname = \"a b\"\ntype = \"float\"\ninput = \"i\"\ncolumn = 0\n",
            "feature `a b`: names must be",
        ),
        (
            "[[features]]\nname = \"a\"\ntype = \"text\"\ninput = \"i\"\ncolumn = 0\n",
            "unknown variant `text`",
        ),
    ];
    for (text, expected) in cases {
        let err = FeatureSchema::from_toml(text).expect_err(text);
        assert!(
            err.to_string().contains(expected),
            "{text:?}: got `{err}`, expected `{expected}`"
        );
    }
    let s = schema();
    assert_eq!(FeatureSchema::from_toml(&s.to_toml()), Ok(s));
}

#[test]
fn rows_encode_with_one_hot_imputation_and_quality_counts() {
    let mut s = schema();
    s.features[0].impute = Some(-1.0);
    let mut out = [9.0f32; 3];
    let q = s.encode_row(
        "input",
        &[RawValue::Number(12.5), RawValue::Text("b".into())],
        &mut out,
    );
    assert_eq!((out, q), ([12.5, 0.0, 1.0], RowQuality::default()));
    let q = s.encode_row(
        "input",
        &[RawValue::Missing, RawValue::Text("zz".into())],
        &mut out,
    );
    assert_eq!(out, [-1.0, 0.0, 0.0]);
    assert_eq!(
        q,
        RowQuality {
            missing: 1,
            unseen_category: 1,
            ..Default::default()
        }
    );
    let q = s.encode_row(
        "input",
        &[RawValue::Number(-3.0), RawValue::Missing],
        &mut out,
    );
    assert_eq!(
        q,
        RowQuality {
            missing: 1,
            out_of_range: 1,
            ..Default::default()
        }
    );
    assert_eq!(RawValue::parse(" 3.5 "), RawValue::Number(3.5));
    assert_eq!(RawValue::parse(""), RawValue::Missing);
    assert_eq!(RawValue::parse("NA"), RawValue::Missing);
    assert_eq!(RawValue::parse("auto"), RawValue::Text("auto".into()));
}

#[test]
fn an_empty_schema_means_raw_tensors_only() {
    let empty = FeatureSchema { features: vec![] };
    assert!(empty.is_empty());
    assert_eq!(empty.validate(), Ok(()));
    assert_eq!(empty.check_against(&input(3)), Ok(()));
    // A schema *file* without features is a mistake, not a raw-tensor model.
    assert_eq!(FeatureSchema::from_toml(""), Err(FeatureError::Empty));
}
