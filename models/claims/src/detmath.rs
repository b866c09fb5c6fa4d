//! Deterministic math: the same bits on every platform, from `+ - * /` alone.

// ln 2 split into a high part with trailing zero bits (so k * LN2_HI is exact) and the rest.
const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
const INV_LN2: f64 = std::f64::consts::LOG2_E;

/// e^x, accurate to a few ulp, computed with a fixed sequence of basic operations.
pub fn exp(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x > 709.0 {
        return f64::INFINITY;
    }
    if x < -745.0 {
        return 0.0;
    }
    // x = k ln2 + r, |r| <= ln2 / 2
    let k = (x * INV_LN2).round();
    let r = (x - k * LN2_HI) - k * LN2_LO;
    // Taylor series to degree 14 by Horner: the remainder is below 1e-17 for |r| <= 0.35.
    let mut p = 1.0;
    let mut i = 14.0;
    while i >= 1.0 {
        p = 1.0 + p * r / i;
        i -= 1.0;
    }
    scale_by_pow2(p, k as i32)
}

fn scale_by_pow2(mut v: f64, mut k: i32) -> f64 {
    // Multiply in steps that stay within the normal exponent range.
    while k > 1000 {
        v *= f64::from_bits(((1000 + 1023) as u64) << 52);
        k -= 1000;
    }
    while k < -1000 {
        v *= f64::from_bits(((-1000i32 + 1023) as u64) << 52);
        k += 1000;
    }
    v * f64::from_bits(((k + 1023) as u64) << 52)
}

/// Numerically stable logistic function.
pub fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + exp(-z))
    } else {
        let e = exp(z);
        e / (1.0 + e)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_matches_std_closely() {
        for i in -2000..2000 {
            let x = f64::from(i) * 0.173;
            let (ours, std) = (super::exp(x), x.exp());
            assert!(
                ((ours - std) / std).abs() < 1e-14,
                "x={x} ours={ours} std={std}"
            );
        }
    }
}
