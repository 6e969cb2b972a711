//! Matrix products on the cpu through the `gemm` crate: plain and grouped by expert
//! offsets over compact rows (no padding to capacity).

use crate::{f32s, i32s, tf32, weight_data, T};
use gemm::Parallelism;
use moe_engine::{Error, Result};
use rayon::prelude::*;

/// Work (multiply-adds) below which one product runs on one thread: splitting smaller
/// products costs more in synchronisation than it saves.
const SERIAL_WORK: usize = 1 << 20;

/// Below this much work per expert (multiply-adds), many experts run one per thread
/// rather than each product splitting over all threads: measured on the fine-grained
/// bench shape (64 experts of ~48 rows, 1024 x 1024): 100 ms against 125 ms split.
const GROUP_PARALLEL_WORK: usize = 1 << 27;

/// `dst [m, n] (+)= lhs [m, kk] · w [n, kk]ᵀ` with row-major operands; `w_t` says `w` is
/// stored transposed, `[kk, n]`.
///
/// The slices are exactly `m·n`, `m·kk` and `n·kk` long, so every strided access the gemm
/// kernel makes is in bounds.
#[allow(clippy::too_many_arguments)]
fn gemm_xwt(
    dst: &mut [f32],
    lhs: &[f32],
    (w, w_t): (&[f32], bool),
    m: usize,
    n: usize,
    kk: usize,
    accumulate: bool,
    par: Parallelism,
) {
    debug_assert!(dst.len() == m * n && lhs.len() == m * kk && w.len() == n * kk);
    if m == 0 || n == 0 {
        return;
    }
    if kk == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    // rhs is the [kk, n] matrix wᵀ: column stride / row stride of its storage.
    let (rhs_cs, rhs_rs) = if w_t { (1, n as isize) } else { (kk as isize, 1) };
    // SAFETY: the lengths match the shapes (checked above in debug, and by the callers'
    // shape checks), strides describe row-major [m, n], [m, kk] and wᵀ as stored; dst does
    // not alias the inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            kk,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            1,
            kk as isize,
            w.as_ptr(),
            rhs_cs,
            rhs_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

fn par_for(work: usize, threads: usize) -> Parallelism {
    if threads > 1 && work >= SERIAL_WORK {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

fn fill_bias(out: &mut [f32], bias: Option<&[f32]>, n: usize) {
    if let Some(b) = bias {
        for row in out.chunks_mut(n) {
            row.copy_from_slice(b);
        }
    }
}

pub(crate) fn linear(x: &T, w: &T, bias: Option<&T>, threads: usize) -> Result<T> {
    let (r, kk) = x.dims2("linear input")?;
    let (n, wk) = w.dims2("linear weight")?;
    if wk != kk {
        return Err(Error::shape("linear weight", format!("[out, {kk}]"), w.shape()));
    }
    let b = match bias {
        Some(b) => {
            if b.shape() != [n] {
                return Err(Error::shape("linear bias", format!("[{n}]"), b.shape()));
            }
            Some(f32s(b, "linear bias")?)
        }
        None => None,
    };
    let mut out = vec![0f32; r * n];
    fill_bias(&mut out, b, n);
    gemm_xwt(
        &mut out,
        f32s(x, "linear input")?,
        weight_data(w, "linear weight")?,
        r,
        n,
        kk,
        b.is_some(),
        par_for(r * n * kk, threads),
    );
    Ok(tf32(&[r, n], out))
}

pub(crate) fn grouped_linear(x: &T, offsets: &T, w: &T, bias: Option<&T>, threads: usize) -> Result<T> {
    let (r, kk) = x.dims2("grouped input")?;
    let (g, n, wk) = w.dims3("expert weights")?;
    if wk != kk {
        return Err(Error::shape("expert weights", format!("[experts, out, {kk}]"), w.shape()));
    }
    if offsets.shape() != [g + 1] {
        return Err(Error::shape("offsets", format!("[{}]", g + 1), offsets.shape()));
    }
    let off = i32s(offsets, "offsets")?;
    if off[0] != 0 || off.windows(2).any(|p| p[1] < p[0]) || off[g] as usize > r {
        return Err(Error::Invalid(format!("offsets {off:?} are not a non-decreasing prefix sum within {r} rows")));
    }
    let b = match bias {
        Some(b) => {
            if b.shape() != [g, n] {
                return Err(Error::shape("expert biases", format!("[{g}, {n}]"), b.shape()));
            }
            Some(f32s(b, "expert biases")?)
        }
        None => None,
    };
    let xs = f32s(x, "grouped input")?;
    let (ws, w_t) = weight_data(w, "expert weights")?;
    let mut out = vec![0f32; r * n];
    // Split the output into each group's rows.
    let mut parts: Vec<(usize, &mut [f32])> = Vec::with_capacity(g);
    let mut rest = &mut out[..off[g] as usize * n];
    for e in 0..g {
        let rows = (off[e + 1] - off[e]) as usize;
        let (head, tail) = rest.split_at_mut(rows * n);
        if rows > 0 {
            parts.push((e, head));
        }
        rest = tail;
    }
    let run = |(e, dst): (usize, &mut [f32]), par: Parallelism| {
        let rows = dst.len() / n.max(1);
        let start = off[e] as usize;
        let be = b.map(|b| &b[e * n..(e + 1) * n]);
        fill_bias(dst, be, n);
        gemm_xwt(
            dst,
            &xs[start * kk..(start + rows) * kk],
            (&ws[e * n * kk..(e + 1) * n * kk], w_t),
            rows,
            n,
            kk,
            be.is_some(),
            par,
        );
    };
    // Many small groups (fine-grained experts, decode): one group per thread. Few large
    // groups: each product uses every thread.
    let work_per_group = off[g] as usize * n * kk / parts.len().max(1);
    if parts.len() >= 2 * threads && work_per_group < GROUP_PARALLEL_WORK {
        parts.into_par_iter().for_each(|p| run(p, Parallelism::None));
    } else {
        for p in parts {
            let work = p.1.len() * kk;
            run(p, par_for(work, threads));
        }
    }
    Ok(tf32(&[r, n], out))
}
