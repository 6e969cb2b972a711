//! Half-precision weight storage: rounding, packing two halves per u32 word (the even
//! element in the low half, as the shaders unpack them), and the split of large weight
//! stacks into parts that fit a storage binding.

use moe_engine::{DType, Error, Result};

/// Storage bytes of `v` in `dtype`, padded to whole u32 words.
pub(crate) fn encode(v: &[f32], dtype: DType) -> Result<Vec<u8>> {
    let mut bytes: Vec<u8> = match dtype {
        DType::F16 | DType::BF16 => bytemuck::cast_slice(&dtype.half_bits(v)?).to_vec(),
        _ => bytemuck::cast_slice(v).to_vec(),
    };
    bytes.resize(bytes.len().max(4).next_multiple_of(4), 0);
    Ok(bytes)
}

/// The first `len` values of storage bytes in `dtype`, as f32.
pub(crate) fn decode(bytes: &[u8], len: usize, dtype: DType) -> Result<Vec<f32>> {
    match dtype {
        DType::F16 | DType::BF16 => {
            let bits: Vec<u16> = bytes.chunks_exact(2).take(len).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
            dtype.from_half_bits(&bits)
        }
        _ => Ok(bytes.chunks_exact(4).take(len).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()),
    }
}

/// Column blocks of the matrix-product tiles: a part that splits one expert's columns
/// takes a multiple of this many when it can, so every tile of the part is full width
/// (the shader starts its column blocks at each part's first column, so any width works).
const COLUMN_ALIGN: usize = 64;

/// Splits a `[g, n, k]` stack of `elem`-byte values into parts of at most `max` bytes:
/// `(g0, g1, c0, c1)` = experts `g0..g1`, columns `c0..c1`. Whole experts per part when
/// one fits, else column ranges of one expert (multiples of 64 columns).
pub(crate) fn split(g: usize, n: usize, k: usize, elem: u64, max: u64) -> Result<Vec<(usize, usize, usize, usize)>> {
    let words = |elems: u64| (elems * elem).next_multiple_of(4).max(4);
    let (gu, nu, ku) = (g as u64, n as u64, k as u64);
    if words(gu * nu * ku) <= max || g == 0 || n == 0 {
        return Ok(vec![(0, g.max(1), 0, n)]);
    }
    if words(nu * ku) <= max {
        let per = ((max / 4 * 4) / (nu * ku * elem).max(1)).max(1) as usize;
        return Ok((0..g).step_by(per).map(|g0| (g0, (g0 + per).min(g), 0, n)).collect());
    }
    let fit = (max / (ku * elem).max(1)) as usize;
    let cols = if fit >= COLUMN_ALIGN { fit / COLUMN_ALIGN * COLUMN_ALIGN } else { fit };
    if cols == 0 {
        return Err(Error::Unsupported {
            backend: "wgpu".into(),
            what: format!("one weight row of {k} values is larger than a storage binding ({max} bytes)"),
        });
    }
    let mut out = Vec::new();
    for e in 0..g {
        for c0 in (0..n).step_by(cols) {
            out.push((e, e + 1, c0, (c0 + cols).min(n)));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_stack_in_order() {
        for (g, n, k, elem, max) in
            [(8, 100, 30, 4, 1 << 30), (8, 100, 30, 4, 30_000), (3, 300, 30, 2, 10_000), (1, 130, 7, 4, 2000)]
        {
            let parts = split(g, n, k, elem, max).unwrap();
            let mut next = 0;
            for &(g0, g1, c0, c1) in &parts {
                let start = (g0 * n + c0) * k;
                assert_eq!(start, next, "parts are consecutive");
                let len = if g1 - g0 > 1 || c1 - c0 == n { (g1 - g0) * n * k } else { (c1 - c0) * k };
                assert!((len as u64 * elem) <= max.max(4), "part of {len} values over {max} bytes");
                next = start + len;
            }
            assert_eq!(next, g * n * k);
        }
        assert!(split(1, 64, 1000, 4, 100).is_err());
        assert_eq!(split(1, 130, 7, 4, 28 * 10).unwrap().len(), 13);
    }

    #[test]
    fn halves_round_trip() {
        let v = [1.0f32, -2.5, 3.140625, 65504.0, 1e-3];
        for d in [DType::F16, DType::BF16] {
            let back = decode(&encode(&v, d).unwrap(), v.len(), d).unwrap();
            for (a, b) in v.iter().zip(&back) {
                assert_eq!(d.round(*a), *b);
            }
        }
    }
}
