//! Host memory standing in for device memory.

/// A cpu "device" buffer.
#[derive(Clone, Debug)]
pub enum CpuBuffer {
    /// f32 elements, row-major in the tensor's logical shape.
    F32(Vec<f32>),
    /// i32 elements.
    I32(Vec<i32>),
    /// A weight matrix `[N, K]` or stack `[G, N, K]` stored with each matrix transposed to
    /// `[K, N]`: the gemm kernels stream the weight with unit stride along N, which is
    /// markedly faster when few rows reach each expert (see docs/BENCHMARKS.md). `n` and
    /// `k` are the matrices' logical sizes, so a reshaped handle cannot be read wrongly.
    WeightT {
        /// The transposed matrices.
        data: Vec<f32>,
        /// Rows N of each logical matrix.
        n: usize,
        /// Columns K of each logical matrix.
        k: usize,
    },
}

impl moe_engine::DeviceBuffer for CpuBuffer {
    fn bytes(&self) -> u64 {
        let elems = match self {
            CpuBuffer::F32(v) | CpuBuffer::WeightT { data: v, .. } => v.len(),
            CpuBuffer::I32(v) => v.len(),
        };
        elems as u64 * 4
    }
}

/// Transposes every `[n, k]` matrix of a stack to `[k, n]`.
pub(crate) fn transpose_stack(v: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    let mat = n * k;
    if mat == 0 {
        return out;
    }
    for (src, dst) in v.chunks_exact(mat).zip(out.chunks_exact_mut(mat)) {
        for i in 0..n {
            for j in 0..k {
                dst[j * n + i] = src[i * k + j];
            }
        }
    }
    out
}
