//! Decoders for the quantized weight formats of published MoE checkpoints, widened to f32:
//!
//! - **FP8 E4M3 with block scales** (DeepSeek-V3 and every `quant_method: "fp8"` checkpoint):
//!   `X.weight` holds float8_e4m3fn codes of the full `[out, in]` matrix and
//!   `X.weight_scale_inv` an f32 (or bf16) grid `[ceil(out/B0), ceil(in/B1)]`, with
//!   `B = quantization_config.weight_block_size`. `W[r, c] = f32(q[r, c]) · scale_inv[r / B0,
//!   c / B1]`, the product in f32 (despite its name the scale multiplies). The last block of a
//!   row or column may be partial: DeepSeek's own rule (its README_WEIGHTS: blocks padded for
//!   the scale, the padding dropped), which is why the block comes from the configuration and
//!   is never inferred from the grid as transformers 5.23's `Fp8Dequantize` does (that raises
//!   on a partial block and picks a wrong block silently when the grid happens to divide).
//! - **MXFP4** (gpt-oss, `quant_method: "mxfp4"`): `P_blocks` uint8 `[E, R, G, 16]` (32 FP4
//!   E2M1 values per block, two per byte, the even element in the low nibble) and `P_scales`
//!   uint8 `[E, R, G]` (E8M0: `2^(s − 127)`). The dequantized `[E, R, G·32]` is transposed on
//!   its last two axes to `[E, G·32, R]`, the layout transformers holds in memory
//!   (`convert_moe_packed_tensors`).
//!
//! Every decoded value is exact in f32 (FP8 codes and FP4 × power-of-two scales are), and
//! the FP8 product is one f32 rounding, as in the reference. The functions here work on bytes
//! and shapes and say what is wrong in a [`DecodeError`]; [`super::Checkpoint`] adds the file
//! and tensor names.

use crate::error::{Error, Result};
use serde_json::Value;

/// A quantized-weights decoding failure, in words (the index and value where one is bad).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(
    /// What is wrong, in words.
    pub String,
);

/// How a checkpoint's weights are quantized: `config.json`'s `quantization_config`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantization {
    /// `quant_method: "fp8"`: F8_E4M3 weights with `*_scale_inv` block scales of
    /// `block = weight_block_size` (`[rows, columns]` of the `[out, in]` matrix).
    Fp8 {
        /// Rows and columns of one scale block.
        block: [usize; 2],
    },
    /// `quant_method: "mxfp4"`: `*_blocks` / `*_scales` pairs of FP4 values with E8M0 scales.
    Mxfp4,
}

impl Quantization {
    /// Reads `quantization_config` from a model's `config.json` value: `None` when there is
    /// none; an error naming the field when its method is one this engine does not decode
    /// or an FP8 configuration lacks a usable `weight_block_size`.
    pub fn from_config(config: &Value) -> Result<Option<Self>> {
        let Some(q) = config.get("quantization_config").filter(|q| !q.is_null()) else { return Ok(None) };
        let method = q.get("quant_method").and_then(Value::as_str).ok_or_else(|| {
            Error::config("quantization_config.quant_method", format!("missing or not a string (got {q})"))
        })?;
        match method {
            "fp8" => {
                let field = "quantization_config.weight_block_size";
                let b = q.get("weight_block_size").ok_or_else(|| {
                    Error::config(field, "missing: per-block FP8 scales need the block size (e.g. [128, 128])")
                })?;
                let block: [usize; 2] = serde_json::from_value(b.clone())
                    .map_err(|e| Error::config(field, format!("must be two positive integers: {e} (got {b})")))?;
                if block.contains(&0) {
                    return Err(Error::config(field, format!("must be positive, got {block:?}")));
                }
                Ok(Some(Quantization::Fp8 { block }))
            }
            "mxfp4" => Ok(Some(Quantization::Mxfp4)),
            other => Err(Error::config(
                "quantization_config.quant_method",
                format!("`{other}` is not a format this engine decodes (fp8, mxfp4)"),
            )),
        }
    }
}

/// The f32 value of a float8_e4m3fn code: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa
/// bits, no infinities, `S.1111.111` NaN, exponent 0 subnormal (`m/8 · 2^-6`).
pub fn f8_e4m3(code: u8) -> f32 {
    let sign = ((code & 0x80) as u32) << 24;
    let (e, m) = ((code >> 3) & 0x0F, (code & 0x07) as u32);
    if e == 0x0F && m == 0x07 {
        return f32::NAN;
    }
    if e == 0 {
        // m · 2^-9: exact in f32 (a small integer times a power of two).
        let mag = m as f32 * (1.0 / 512.0);
        return f32::from_bits(mag.to_bits() | sign);
    }
    // Rebias 7 → 127 and move the 3 mantissa bits to the top of f32's 23.
    f32::from_bits(sign | ((e as u32 + 120) << 23) | (m << 20))
}

/// The FP4 E2M1 values by code (bit 3 sign, bits 2–1 exponent, bit 0 mantissa), as
/// transformers' `FP4_VALUES`.
pub const FP4_E2M1: [f32; 16] =
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// The f32 value `2^(s − 127)` of an E8M0 scale byte; NaN for 255 (E8M0's NaN).
pub fn e8m0(s: u8) -> f32 {
    match s {
        255 => f32::NAN,
        // 2^-127 is below f32's normal range: the subnormal with only bit 22 set.
        0 => f32::from_bits(1 << 22),
        s => f32::from_bits((s as u32) << 23),
    }
}

/// Splits `shape` into (leading element count, rows, columns), for matrices with optional
/// leading (expert) axes.
fn matrix_dims(shape: &[usize]) -> Option<(usize, usize, usize)> {
    match shape {
        [lead @ .., r, c] => Some((lead.iter().try_fold(1usize, |n, &d| n.checked_mul(d))?, *r, *c)),
        _ => None,
    }
}

/// The shape of the `*_scale_inv` grid of an FP8 weight of `shape` (`[..., out, in]`) with
/// blocks of `block`: `[..., ceil(out/B0), ceil(in/B1)]`.
pub fn fp8_scale_shape(shape: &[usize], block: [usize; 2]) -> Result<Vec<usize>, DecodeError> {
    if shape.len() < 2 {
        return Err(DecodeError(format!("an FP8 block-scaled weight is a matrix [.., out, in], got shape {shape:?}")));
    }
    if block.contains(&0) {
        return Err(DecodeError(format!("block size {block:?} must be positive")));
    }
    let n = shape.len();
    let mut s = shape.to_vec();
    s[n - 2] = shape[n - 2].div_ceil(block[0]);
    s[n - 1] = shape[n - 1].div_ceil(block[1]);
    Ok(s)
}

/// Dequantizes an FP8 E4M3 weight `q` of `shape` (`[..., out, in]`, row-major codes) with its
/// `scale` grid of `scale_shape` and blocks of `block`: `W[.., r, c] = f32(q[.., r, c]) ·
/// scale[.., r / B0, c / B1]`. Errors on a scale grid of another shape, a NaN code (naming
/// its index) or a non-finite scale.
pub fn dequant_fp8(
    q: &[u8],
    shape: &[usize],
    scale: &[f32],
    scale_shape: &[usize],
    block: [usize; 2],
) -> Result<Vec<f32>, DecodeError> {
    let want = fp8_scale_shape(shape, block)?;
    if scale_shape != want.as_slice() {
        return Err(DecodeError(format!(
            "scale grid has shape {scale_shape:?}; a weight of shape {shape:?} with blocks {block:?} needs {want:?}"
        )));
    }
    let (lead, rows, cols) = matrix_dims(shape).ok_or_else(|| DecodeError(format!("shape {shape:?}")))?;
    let (srows, scols) = (want[want.len() - 2], want[want.len() - 1]);
    let n = lead.checked_mul(rows).and_then(|x| x.checked_mul(cols));
    if n != Some(q.len()) || lead.checked_mul(srows).and_then(|x| x.checked_mul(scols)) != Some(scale.len()) {
        return Err(DecodeError(format!(
            "{} codes and {} scales do not fill shapes {shape:?} and {scale_shape:?}",
            q.len(),
            scale.len()
        )));
    }
    if let Some(i) = scale.iter().position(|s| !s.is_finite()) {
        return Err(DecodeError(format!("scale at flat index {i} is {} (not finite)", scale[i])));
    }
    let mut out = Vec::with_capacity(q.len());
    for l in 0..lead {
        for r in 0..rows {
            let srow = &scale[(l * srows + r / block[0]) * scols..][..scols];
            let qrow = &q[(l * rows + r) * cols..][..cols];
            for (c, &code) in qrow.iter().enumerate() {
                let v = f8_e4m3(code);
                if v.is_nan() {
                    let mut index: Vec<usize> = crate::tensor::unravel(l, &shape[..shape.len() - 2]);
                    index.extend([r, c]);
                    return Err(DecodeError(format!("F8_E4M3 code {code:#04x} (NaN) at index {index:?}")));
                }
                out.push(v * srow[c / block[1]]);
            }
        }
    }
    Ok(out)
}

/// The dequantized shape `[E, G·32, R]` of an MXFP4 pair with `blocks_shape` `[E, R, G, 16]`
/// and `scales_shape` `[E, R, G]`; errors when they do not pair up.
pub fn mxfp4_shape(blocks_shape: &[usize], scales_shape: &[usize]) -> Result<Vec<usize>, DecodeError> {
    match (blocks_shape, scales_shape) {
        ([e, r, g, 16], [se, sr, sg]) if (se, sr, sg) == (e, r, g) => {
            let k = g.checked_mul(32).ok_or_else(|| DecodeError(format!("{g} blocks of 32 overflow a word")))?;
            Ok(vec![*e, k, *r])
        }
        ([e, r, g, 16], _) => Err(DecodeError(format!(
            "scales have shape {scales_shape:?}; blocks of shape {blocks_shape:?} need [{e}, {r}, {g}]"
        ))),
        _ => Err(DecodeError(format!(
            "MXFP4 blocks must have shape [experts, rows, blocks, 16] (16 bytes = 32 FP4 values), got {blocks_shape:?}"
        ))),
    }
}

/// Dequantizes an MXFP4 pair into `[E, G·32, R]` (see the module docs): element `32g + 2j`
/// of row `r` is `FP4[low nibble of byte j of block g]`, element `32g + 2j + 1` the high
/// nibble's, times `2^(scale − 127)`; then the last two axes are swapped. Errors on a
/// scale byte 255 (E8M0 NaN) or a value past f32's range, naming its index.
pub fn dequant_mxfp4(
    blocks: &[u8],
    blocks_shape: &[usize],
    scales: &[u8],
    scales_shape: &[usize],
) -> Result<Vec<f32>, DecodeError> {
    let out_shape = mxfp4_shape(blocks_shape, scales_shape)?;
    let (e, k, r) = (out_shape[0], out_shape[1], out_shape[2]);
    let g = scales_shape[2];
    let n = e.checked_mul(r).and_then(|x| x.checked_mul(g));
    if n.and_then(|x| x.checked_mul(16)) != Some(blocks.len()) || n != Some(scales.len()) {
        return Err(DecodeError(format!(
            "{} block bytes and {} scale bytes do not fill shapes {blocks_shape:?} and {scales_shape:?}",
            blocks.len(),
            scales.len()
        )));
    }
    let mut out = vec![0f32; e * k * r];
    for ei in 0..e {
        for ri in 0..r {
            for gi in 0..g {
                let at = (ei * r + ri) * g + gi;
                let scale = e8m0(scales[at]);
                if scale.is_nan() {
                    return Err(DecodeError(format!("scale byte 255 (E8M0 NaN) at index [{ei}, {ri}, {gi}]")));
                }
                for (j, &byte) in blocks[at * 16..(at + 1) * 16].iter().enumerate() {
                    for (half, code) in [(0, byte & 0x0F), (1, byte >> 4)] {
                        let v = FP4_E2M1[code as usize] * scale;
                        let col = 32 * gi + 2 * j + half;
                        if !v.is_finite() {
                            return Err(DecodeError(format!(
                                "value {} · 2^({} − 127) at index [{ei}, {ri}, {col}] overflows f32",
                                FP4_E2M1[code as usize], scales[at]
                            )));
                        }
                        // Transposed: [e, col, row].
                        out[(ei * k + col) * r + ri] = v;
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    //! The decoders against transformers' own dequantizers: the fixture
    //! tests/fixtures/quant/quant.safetensors was written by gen_quant_fixtures.py beside it
    //! (torch 2.15, transformers 5.23), whose docstring says how each `*/expect` was made.

    use super::*;
    use safetensors::{Dtype, SafeTensors};

    const FIXTURE: &[u8] = include_bytes!("../../tests/fixtures/quant/quant.safetensors");

    fn fixture() -> SafeTensors<'static> {
        SafeTensors::deserialize(FIXTURE).expect("fixture parses")
    }

    /// Raw bytes and shape of a fixture tensor of dtype `dt`.
    fn raw<'a>(st: &SafeTensors<'a>, name: &str, dt: Dtype) -> (&'a [u8], Vec<usize>) {
        let v = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(v.dtype(), dt, "{name}");
        (v.data(), v.shape().to_vec())
    }

    fn f32s(st: &SafeTensors<'_>, name: &str) -> (Vec<f32>, Vec<usize>) {
        let (b, s) = raw(st, name, Dtype::F32);
        (b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(), s)
    }

    /// Bitwise equality (NaN equal to NaN, -0 apart from +0): the decoders are exact.
    fn assert_bits(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let same = g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan());
            assert!(same, "{what}[{i}]: got {g:e} ({:#010x}), want {w:e} ({:#010x})", g.to_bits(), w.to_bits());
        }
    }

    #[test]
    fn every_f8_e4m3_code_decodes_as_torch_does() {
        let st = fixture();
        let (codes, _) = raw(&st, "f8/codes", Dtype::U8);
        let (want, _) = f32s(&st, "f8/decoded");
        let got: Vec<f32> = codes.iter().map(|&c| f8_e4m3(c)).collect();
        assert_bits(&got, &want, "f8_e4m3");
        // The format's landmarks, which the fixture holds too.
        assert_eq!((f8_e4m3(0x7E), f8_e4m3(0x01), f8_e4m3(0x08)), (448.0, 2f32.powi(-9), 2f32.powi(-6)));
        assert!(f8_e4m3(0x7F).is_nan() && f8_e4m3(0xFF).is_nan());
        assert_eq!(f8_e4m3(0x80).to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn fp8_block_dequant_matches_transformers() {
        let st = fixture();
        for (case, block, scale_dt) in [
            ("fp8_even_f32", [2, 5], Dtype::F32),
            ("fp8_batched", [2, 2], Dtype::F32),
            ("fp8_bf16_scale", [2, 2], Dtype::BF16),
            // DeepSeek's rule with partial last blocks (transformers refuses this one).
            ("fp8_partial", [2, 4], Dtype::F32),
        ] {
            let (q, shape) = raw(&st, &format!("{case}/q"), Dtype::F8_E4M3);
            let (sb, sshape) = raw(&st, &format!("{case}/scale"), scale_dt);
            let scale: Vec<f32> = match scale_dt {
                Dtype::BF16 => sb.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
                _ => sb.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            };
            let (want, wshape) = f32s(&st, &format!("{case}/expect"));
            assert_eq!(wshape, shape, "{case}");
            let got = dequant_fp8(q, &shape, &scale, &sshape, block).unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_bits(&got, &want, case);
        }
    }

    #[test]
    fn fp8_errors_name_what_is_wrong() {
        // A NaN code, by index.
        let q = [0x38u8, 0x7F, 0x00, 0x00];
        let err = dequant_fp8(&q, &[2, 2], &[1.0], &[1, 1], [2, 2]).unwrap_err();
        assert!(err.0.contains("[0, 1]") && err.0.contains("NaN"), "{err}");
        // A scale grid of the wrong shape: the block size, not the grid, decides.
        let err = dequant_fp8(&[0; 4], &[2, 2], &[1.0, 1.0], &[2, 1], [2, 2]).unwrap_err();
        assert!(err.0.contains("[1, 1]"), "{err}");
        // Not a matrix.
        assert!(dequant_fp8(&[0; 4], &[4], &[1.0], &[1], [2, 2]).is_err());
        // A non-finite scale.
        assert!(dequant_fp8(&[0; 4], &[2, 2], &[f32::INFINITY], &[1, 1], [2, 2]).unwrap_err().0.contains("inf"));
    }

    #[test]
    fn mxfp4_dequant_matches_transformers() {
        let st = fixture();
        let (blocks, bshape) = raw(&st, "mxfp4/blocks", Dtype::U8);
        let (scales, sshape) = raw(&st, "mxfp4/scales", Dtype::U8);
        let (want, wshape) = f32s(&st, "mxfp4/expect");
        assert_eq!(mxfp4_shape(&bshape, &sshape).unwrap(), wshape);
        let got = dequant_mxfp4(blocks, &bshape, scales, &sshape).unwrap();
        assert_bits(&got, &want, "mxfp4");
    }

    #[test]
    fn mxfp4_errors_name_what_is_wrong() {
        let blocks = [0x21u8; 16];
        // Byte 0x21: element 0 = FP4[1] = 0.5 (low nibble), element 1 = FP4[2] = 1.0.
        let v = dequant_mxfp4(&blocks, &[1, 1, 1, 16], &[127], &[1, 1, 1]).unwrap();
        assert_eq!((v.len(), v[0], v[1]), (32, 0.5, 1.0));
        let err = dequant_mxfp4(&blocks, &[1, 1, 1, 16], &[255], &[1, 1, 1]).unwrap_err();
        assert!(err.0.contains("255") && err.0.contains("[0, 0, 0]"), "{err}");
        let err = dequant_mxfp4(&blocks, &[1, 1, 1, 16], &[127], &[1, 2, 1]).unwrap_err();
        assert!(err.0.contains("[1, 1, 1]"), "{err}");
        assert!(mxfp4_shape(&[1, 1, 1, 8], &[1, 1, 1]).is_err());
        // 6 · 2^127 is past f32's range.
        let err = dequant_mxfp4(&[0x77; 16], &[1, 1, 1, 16], &[254], &[1, 1, 1]).unwrap_err();
        assert!(err.0.contains("overflows"), "{err}");
        // The smallest scale is the subnormal 2^-127, exactly.
        assert_eq!(e8m0(0), 2f32.powi(-127));
        assert_eq!(e8m0(127), 1.0);
    }

    #[test]
    fn quantization_config_is_read_or_refused() {
        use serde_json::json;
        assert_eq!(Quantization::from_config(&json!({"hidden_size": 8})).unwrap(), None);
        let fp8 = json!({"quantization_config": {"quant_method": "fp8", "weight_block_size": [16, 32]}});
        assert_eq!(Quantization::from_config(&fp8).unwrap(), Some(Quantization::Fp8 { block: [16, 32] }));
        let mx = json!({"quantization_config": {"quant_method": "mxfp4"}});
        assert_eq!(Quantization::from_config(&mx).unwrap(), Some(Quantization::Mxfp4));
        for (bad, field) in [
            (json!({"quantization_config": {"quant_method": "fp8"}}), "weight_block_size"),
            (json!({"quantization_config": {"quant_method": "fp8", "weight_block_size": [0, 4]}}), "weight_block_size"),
            (json!({"quantization_config": {"quant_method": "gptq"}}), "quant_method"),
            (json!({"quantization_config": {"bits": 4}}), "quant_method"),
        ] {
            match Quantization::from_config(&bad) {
                Err(Error::Config { field: f, .. }) => assert!(f.ends_with(field), "{f}"),
                other => panic!("{bad}: expected a config error, got {other:?}"),
            }
        }
    }
}
