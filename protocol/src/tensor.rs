//! Dense tensors of the element types real models use, and their little-endian byte
//! form (golden vectors, binary request bodies).
//!
//! A [`Tensor`] is a name, a shape and [`TensorData`]: one typed vector per ONNX element
//! type fleetml serves (f32, f16, f64, i8, i32, i64, u8, bool). In CBOR (`golden.cbor`)
//! an f32 tensor is `{name, shape, data: [f32…]}`, exactly as before typed tensors
//! existed, so older bundles decode unchanged; any other type is
//! `{name, shape, dtype, bytes}` with the elements little-endian in one byte string.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The element type of a tensor, as a manifest declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F16,
    F32,
    F64,
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    Bool,
    String,
}

impl DType {
    pub fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::F32 | DType::F64)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json_like_name(*self);
        f.write_str(s)
    }
}

fn serde_json_like_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "f16",
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::I8 => "i8",
        DType::I16 => "i16",
        DType::I32 => "i32",
        DType::I64 => "i64",
        DType::U8 => "u8",
        DType::U16 => "u16",
        DType::U32 => "u32",
        DType::U64 => "u64",
        DType::Bool => "bool",
        DType::String => "string",
    }
}

/// One dimension of a tensor shape: a fixed size or a named symbol (e.g. the batch `N`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    Fixed(u64),
    Symbol(String),
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbol(s) => f.write_str(s),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

impl fmt::Display for TensorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dims: Vec<String> = self.shape.iter().map(Dim::to_string).collect();
        write!(f, "{}: {}[{}]", self.name, self.dtype, dims.join(", "))
    }
}

/// A dense tensor in row-major order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "Wire", try_from = "Wire")]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<u64>,
    pub data: TensorData,
}

/// The elements of a tensor, by type. f16 elements are kept as their IEEE 754 binary16
/// bits.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    F16(Vec<u16>),
    F64(Vec<f64>),
    I8(Vec<i8>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    U8(Vec<u8>),
    Bool(Vec<bool>),
}

/// Why bytes or numbers do not make a tensor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    #[error("element type `{0}` is not supported (f32, f16, f64, i8, i32, i64, u8, bool are)")]
    Unsupported(DType),
    #[error("{len} bytes are not a whole number of {dtype} elements ({size} bytes each)")]
    Ragged {
        dtype: DType,
        len: usize,
        size: usize,
    },
    #[error("tensor `{name}` has shape {shape:?} but {len} values")]
    ShapeMismatch {
        name: String,
        shape: Vec<u64>,
        len: usize,
    },
    #[error("value {value} at index {index} is not a valid {dtype}")]
    BadValue {
        dtype: DType,
        index: usize,
        value: String,
    },
}

macro_rules! each_type {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            TensorData::F32($v) => $body,
            TensorData::F16($v) => $body,
            TensorData::F64($v) => $body,
            TensorData::I8($v) => $body,
            TensorData::I32($v) => $body,
            TensorData::I64($v) => $body,
            TensorData::U8($v) => $body,
            TensorData::Bool($v) => $body,
        }
    };
}

macro_rules! map_same {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            TensorData::F32($v) => TensorData::F32($body),
            TensorData::F16($v) => TensorData::F16($body),
            TensorData::F64($v) => TensorData::F64($body),
            TensorData::I8($v) => TensorData::I8($body),
            TensorData::I32($v) => TensorData::I32($body),
            TensorData::I64($v) => TensorData::I64($body),
            TensorData::U8($v) => TensorData::U8($body),
            TensorData::Bool($v) => TensorData::Bool($body),
        }
    };
}

impl TensorData {
    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
            TensorData::F16(_) => DType::F16,
            TensorData::F64(_) => DType::F64,
            TensorData::I8(_) => DType::I8,
            TensorData::I32(_) => DType::I32,
            TensorData::I64(_) => DType::I64,
            TensorData::U8(_) => DType::U8,
            TensorData::Bool(_) => DType::Bool,
        }
    }

    pub fn len(&self) -> usize {
        each_type!(self, v => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The f32 elements, when the tensor is f32.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            TensorData::F32(v) => Some(v),
            _ => None,
        }
    }

    /// Every element as f32 (integers and booleans converted; f64 rounded). For
    /// monitoring and comparisons, never for feeding a model.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            TensorData::F32(v) => v.clone(),
            TensorData::F16(v) => v.iter().map(|b| f16_to_f32(*b)).collect(),
            TensorData::F64(v) => v.iter().map(|x| *x as f32).collect(),
            TensorData::I8(v) => v.iter().map(|x| f32::from(*x)).collect(),
            TensorData::I32(v) => v.iter().map(|x| *x as f32).collect(),
            TensorData::I64(v) => v.iter().map(|x| *x as f32).collect(),
            TensorData::U8(v) => v.iter().map(|x| f32::from(*x)).collect(),
            TensorData::Bool(v) => v.iter().map(|x| f32::from(u8::from(*x))).collect(),
        }
    }

    /// Element `i` as f64 (f16 decoded), for comparisons and JSON.
    pub fn get_f64(&self, i: usize) -> Option<f64> {
        Some(match self {
            TensorData::F32(v) => f64::from(*v.get(i)?),
            TensorData::F16(v) => f64::from(f16_to_f32(*v.get(i)?)),
            TensorData::F64(v) => *v.get(i)?,
            TensorData::I8(v) => f64::from(*v.get(i)?),
            TensorData::I32(v) => f64::from(*v.get(i)?),
            TensorData::I64(v) => *v.get(i)? as f64,
            TensorData::U8(v) => f64::from(*v.get(i)?),
            TensorData::Bool(v) => f64::from(u8::from(*v.get(i)?)),
        })
    }

    /// Elements `range` as a new vector of the same type.
    pub fn slice(&self, range: std::ops::Range<usize>) -> TensorData {
        map_same!(self, v => v[range].to_vec())
    }

    /// Appends `other`'s elements; false (and nothing appended) when the types differ.
    pub fn extend(&mut self, other: &TensorData) -> bool {
        match (self, other) {
            (TensorData::F32(a), TensorData::F32(b)) => a.extend_from_slice(b),
            (TensorData::F16(a), TensorData::F16(b)) => a.extend_from_slice(b),
            (TensorData::F64(a), TensorData::F64(b)) => a.extend_from_slice(b),
            (TensorData::I8(a), TensorData::I8(b)) => a.extend_from_slice(b),
            (TensorData::I32(a), TensorData::I32(b)) => a.extend_from_slice(b),
            (TensorData::I64(a), TensorData::I64(b)) => a.extend_from_slice(b),
            (TensorData::U8(a), TensorData::U8(b)) => a.extend_from_slice(b),
            (TensorData::Bool(a), TensorData::Bool(b)) => a.extend_from_slice(b),
            _ => return false,
        }
        true
    }

    /// `len` zero (false) elements of `dtype`.
    pub fn zeros(dtype: DType, len: usize) -> Result<TensorData, TensorError> {
        Ok(match dtype {
            DType::F32 => TensorData::F32(vec![0.0; len]),
            DType::F16 => TensorData::F16(vec![0; len]),
            DType::F64 => TensorData::F64(vec![0.0; len]),
            DType::I8 => TensorData::I8(vec![0; len]),
            DType::I32 => TensorData::I32(vec![0; len]),
            DType::I64 => TensorData::I64(vec![0; len]),
            DType::U8 => TensorData::U8(vec![0; len]),
            DType::Bool => TensorData::Bool(vec![false; len]),
            other => return Err(TensorError::Unsupported(other)),
        })
    }

    /// Bytes per element of `dtype`, for the types tensors hold.
    pub fn element_size(dtype: DType) -> Result<usize, TensorError> {
        Ok(match dtype {
            DType::F32 | DType::I32 => 4,
            DType::F16 => 2,
            DType::F64 | DType::I64 => 8,
            DType::I8 | DType::U8 | DType::Bool => 1,
            other => return Err(TensorError::Unsupported(other)),
        })
    }

    /// Decodes little-endian elements of `dtype`. Booleans are one byte each, 0 or 1.
    /// Allocates exactly what `bytes` holds; callers bound `bytes`.
    pub fn from_le_bytes(dtype: DType, bytes: &[u8]) -> Result<TensorData, TensorError> {
        let size = Self::element_size(dtype)?;
        if !bytes.len().is_multiple_of(size) {
            return Err(TensorError::Ragged {
                dtype,
                len: bytes.len(),
                size,
            });
        }
        fn each<const N: usize, T>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
            bytes
                .chunks_exact(N)
                .map(|c| {
                    let mut a = [0u8; N];
                    a.copy_from_slice(c);
                    f(a)
                })
                .collect()
        }
        Ok(match dtype {
            DType::F32 => TensorData::F32(each(bytes, f32::from_le_bytes)),
            DType::F16 => TensorData::F16(each(bytes, u16::from_le_bytes)),
            DType::F64 => TensorData::F64(each(bytes, f64::from_le_bytes)),
            DType::I8 => TensorData::I8(each(bytes, i8::from_le_bytes)),
            DType::I32 => TensorData::I32(each(bytes, i32::from_le_bytes)),
            DType::I64 => TensorData::I64(each(bytes, i64::from_le_bytes)),
            DType::U8 => TensorData::U8(bytes.to_vec()),
            DType::Bool => {
                if let Some(index) = bytes.iter().position(|b| *b > 1) {
                    return Err(TensorError::BadValue {
                        dtype,
                        index,
                        value: bytes[index].to_string(),
                    });
                }
                TensorData::Bool(bytes.iter().map(|b| *b == 1).collect())
            }
            other => return Err(TensorError::Unsupported(other)),
        })
    }

    /// The elements little-endian, booleans one byte each.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            TensorData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I8(v) => v.iter().map(|x| x.to_le_bytes()[0]).collect(),
            TensorData::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::U8(v) => v.clone(),
            TensorData::Bool(v) => v.iter().map(|x| u8::from(*x)).collect(),
        }
    }

    /// Elements of `dtype` from numbers as JSON or CBOR give them (f64, or i64 when the
    /// number is an integer, so i64 inputs such as token ids survive exactly). Values
    /// out of the type's range, fractions for integer types and anything but 0/1 for
    /// booleans are refused with their index.
    pub fn from_numbers(
        dtype: DType,
        values: impl ExactSizeIterator<Item = Number>,
    ) -> Result<TensorData, TensorError> {
        let bad = |index: usize, n: Number| TensorError::BadValue {
            dtype,
            index,
            value: n.to_string(),
        };
        macro_rules! ints {
            ($t:ty, $variant:ident) => {{
                let mut out = Vec::with_capacity(values.len());
                for (i, n) in values.enumerate() {
                    out.push(
                        n.to_int()
                            .and_then(|x| <$t>::try_from(x).ok())
                            .ok_or_else(|| bad(i, n))?,
                    );
                }
                TensorData::$variant(out)
            }};
        }
        Ok(match dtype {
            DType::F32 => TensorData::F32(values.map(|n| n.to_f64() as f32).collect()),
            DType::F64 => TensorData::F64(values.map(Number::to_f64).collect()),
            DType::F16 => TensorData::F16(values.map(|n| f32_to_f16(n.to_f64() as f32)).collect()),
            DType::I8 => ints!(i8, I8),
            DType::I32 => ints!(i32, I32),
            DType::I64 => ints!(i64, I64),
            DType::U8 => ints!(u8, U8),
            DType::Bool => {
                let mut out = Vec::with_capacity(values.len());
                for (i, n) in values.enumerate() {
                    out.push(match n.to_int() {
                        Some(0) => false,
                        Some(1) => true,
                        _ => return Err(bad(i, n)),
                    });
                }
                TensorData::Bool(out)
            }
            other => return Err(TensorError::Unsupported(other)),
        })
    }
}

/// A number as a text format carries it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl Number {
    fn to_f64(self) -> f64 {
        match self {
            Number::Int(i) => i as f64,
            Number::Float(f) => f,
            Number::Bool(b) => f64::from(u8::from(b)),
        }
    }

    fn to_int(self) -> Option<i64> {
        match self {
            Number::Int(i) => Some(i),
            Number::Float(f) if f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15 => {
                Some(f as i64)
            }
            Number::Float(_) => None,
            Number::Bool(b) => Some(i64::from(b)),
        }
    }
}

impl std::fmt::Display for Number {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Number::Int(i) => write!(f, "{i}"),
            Number::Float(x) => write!(f, "{x}"),
            Number::Bool(b) => write!(f, "{b}"),
        }
    }
}

impl Tensor {
    /// An f32 tensor.
    pub fn f32(name: impl Into<String>, shape: Vec<u64>, data: Vec<f32>) -> Tensor {
        Tensor {
            name: name.into(),
            shape,
            data: TensorData::F32(data),
        }
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// The number of elements the shape holds (None on overflow).
    pub fn elements(&self) -> Option<usize> {
        elements(&self.shape)
    }

    /// Checks that the shape holds exactly the elements there are.
    pub fn check(&self) -> Result<(), TensorError> {
        if self.elements() != Some(self.data.len()) {
            return Err(TensorError::ShapeMismatch {
                name: self.name.clone(),
                shape: self.shape.clone(),
                len: self.data.len(),
            });
        }
        Ok(())
    }

    /// Rows `start..end` along axis 0.
    pub fn rows(&self, start: u64, end: u64) -> Tensor {
        let rows = self.shape.first().copied().unwrap_or(1).max(1);
        let per_row = self.data.len() / rows as usize;
        let mut shape = self.shape.clone();
        if let Some(first) = shape.first_mut() {
            *first = end - start;
        }
        Tensor {
            name: self.name.clone(),
            shape,
            data: self
                .data
                .slice(start as usize * per_row..end as usize * per_row),
        }
    }
}

/// The number of elements of `shape` (None on overflow).
pub fn elements(shape: &[u64]) -> Option<usize> {
    shape
        .iter()
        .try_fold(1u64, |acc, d| acc.checked_mul(*d))
        .and_then(|n| usize::try_from(n).ok())
}

/// IEEE 754 binary16 bits to f32 (exact).
pub fn f16_to_f32(bits: u16) -> f32 {
    let sign = u32::from(bits >> 15) << 31;
    let exp = u32::from((bits >> 10) & 0x1f);
    let man = u32::from(bits & 0x3ff);
    let value = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: normalise the mantissa.
            let mut e: i32 = -14;
            let mut m = man;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | (((e + 127) as u32) << 23) | ((m & 0x3ff) << 13)
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, _) => sign | 0x7fc0_0000 | (man << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(value)
}

/// f32 to IEEE 754 binary16 bits, rounding to nearest even.
pub fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let man = bits & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rest = m & ((1 << shift) - 1);
        let mut h = m >> shift;
        if rest > half || (rest == half && h & 1 == 1) {
            h += 1;
        }
        return sign | h as u16;
    }
    let rest = man & 0x1fff;
    let mut h = ((e as u32) << 10) | (man >> 13);
    if rest > 0x1000 || (rest == 0x1000 && h & 1 == 1) {
        h += 1;
    }
    sign | h as u16
}

/// The most bytes an `.npy` header may take.
const MAX_NPY_HEADER: usize = 64 << 10;

/// Decodes one NumPy `.npy` array (format versions 1–3, C order, little-endian or
/// byte-order-free element types `f4 f2 f8 i1 i4 i8 u1 b1`) into a tensor named `name`.
/// The header is bounded and the element count is checked against the bytes present
/// before anything is allocated for them.
pub fn from_npy(name: &str, bytes: &[u8]) -> Result<Tensor, String> {
    let rest = bytes
        .strip_prefix(b"\x93NUMPY")
        .ok_or("not a .npy array (no \\x93NUMPY magic)")?;
    let (&major, rest) = rest.split_first().ok_or("truncated header")?;
    let (_minor, rest) = rest.split_first().ok_or("truncated header")?;
    let (len, rest) = match major {
        1 => {
            let b = rest.get(..2).ok_or("truncated header")?;
            (usize::from(u16::from_le_bytes([b[0], b[1]])), &rest[2..])
        }
        2 | 3 => {
            let b = rest.get(..4).ok_or("truncated header")?;
            let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            (
                usize::try_from(n).map_err(|_| "header too long")?,
                &rest[4..],
            )
        }
        v => return Err(format!(".npy format version {v} is not supported")),
    };
    if len > MAX_NPY_HEADER {
        return Err(format!("header of {len} bytes (at most {MAX_NPY_HEADER})"));
    }
    let header = rest.get(..len).ok_or("truncated header")?;
    let data = &rest[len..];
    let header = std::str::from_utf8(header).map_err(|_| "header is not text")?;
    let field = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}'"))? + key.len() + 2;
        let after = header[at..].trim_start().strip_prefix(':')?.trim_start();
        Some(after)
    };
    let descr = field("descr")
        .and_then(|v| v.strip_prefix('\''))
        .and_then(|v| v.split('\'').next())
        .ok_or("header has no 'descr'")?;
    if field("fortran_order").is_some_and(|v| v.starts_with("True")) {
        return Err("Fortran-ordered arrays are not supported; save it C-ordered".into());
    }
    let shape_text = field("shape")
        .and_then(|v| v.strip_prefix('('))
        .and_then(|v| v.split(')').next())
        .ok_or("header has no 'shape'")?;
    let shape: Vec<u64> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| d.trim_end_matches('L').parse::<u64>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("shape ({shape_text}) is not a list of sizes"))?;
    let dtype = match descr {
        "<f4" => DType::F32,
        "<f2" => DType::F16,
        "<f8" => DType::F64,
        "|i1" | "<i1" => DType::I8,
        "<i4" => DType::I32,
        "<i8" => DType::I64,
        "|u1" | "<u1" => DType::U8,
        "|b1" => DType::Bool,
        other => {
            return Err(format!(
                "element type '{other}' is not supported (little-endian f4, f2, f8, i1, i4, i8, u1, b1 are)"
            ));
        }
    };
    let n = elements(&shape).ok_or("shape overflows")?;
    let size = TensorData::element_size(dtype).map_err(|e| e.to_string())?;
    let want = n.checked_mul(size).ok_or("shape overflows")?;
    if data.len() != want {
        return Err(format!(
            "shape {shape:?} of {descr} needs {want} bytes, the array has {}",
            data.len()
        ));
    }
    let data = TensorData::from_le_bytes(dtype, data).map_err(|e| e.to_string())?;
    Ok(Tensor {
        name: name.to_string(),
        shape,
        data,
    })
}

/// Encodes a tensor as a NumPy `.npy` array (version 1, C order, little-endian).
pub fn to_npy(t: &Tensor) -> Vec<u8> {
    let descr = match t.dtype() {
        DType::F32 => "<f4",
        DType::F16 => "<f2",
        DType::F64 => "<f8",
        DType::I8 => "|i1",
        DType::I32 => "<i4",
        DType::I64 => "<i8",
        DType::U8 => "|u1",
        _ => "|b1",
    };
    let dims: Vec<String> = t.shape.iter().map(u64::to_string).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + length (2) + header + newline, padded to 64.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&t.data.to_le_bytes());
    out
}

/// A tensor as CBOR carries it (see the module documentation).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    name: String,
    shape: Vec<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data: Option<Vec<f32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dtype: Option<DType>,
    #[serde(default, with = "serde_bytes", skip_serializing_if = "Option::is_none")]
    bytes: Option<Vec<u8>>,
}

impl From<Tensor> for Wire {
    fn from(t: Tensor) -> Wire {
        match t.data {
            TensorData::F32(data) => Wire {
                name: t.name,
                shape: t.shape,
                data: Some(data),
                dtype: None,
                bytes: None,
            },
            other => Wire {
                name: t.name,
                shape: t.shape,
                data: None,
                dtype: Some(other.dtype()),
                bytes: Some(other.to_le_bytes()),
            },
        }
    }
}

impl TryFrom<Wire> for Tensor {
    type Error = String;

    fn try_from(w: Wire) -> Result<Tensor, String> {
        let data = match (w.data, w.dtype, w.bytes) {
            (Some(data), None | Some(DType::F32), None) => TensorData::F32(data),
            (None, Some(dtype), Some(bytes)) => {
                TensorData::from_le_bytes(dtype, &bytes).map_err(|e| e.to_string())?
            }
            _ => {
                return Err(format!(
                    "tensor `{}` needs `data` (f32) or `dtype` with `bytes`",
                    w.name
                ));
            }
        };
        Ok(Tensor {
            name: w.name,
            shape: w.shape,
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_round_trips_every_value() {
        for bits in 0..=u16::MAX {
            let x = f16_to_f32(bits);
            if x.is_nan() {
                assert!(f16_to_f32(f32_to_f16(x)).is_nan());
            } else {
                assert_eq!(f32_to_f16(x), bits, "{bits:#06x} = {x}");
            }
        }
        assert_eq!(f32_to_f16(1.0), 0x3c00);
        assert_eq!(f32_to_f16(65520.0), 0x7c00, "rounds to infinity");
        assert_eq!(f32_to_f16(1.0 + 1.0 / 4096.0), 0x3c00, "ties to even");
    }
}
