//! Host memory standing in for device memory.

use half::{bf16, f16};

/// The 16-bit float formats the cpu stores weights in (bits kept as `u16`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Half {
    /// IEEE binary16.
    F16,
    /// bfloat16: the top half of an f32.
    Bf16,
}

impl Half {
    /// The tensor dtype of this format.
    pub fn dtype(self) -> moe_engine::DType {
        match self {
            Half::F16 => moe_engine::DType::F16,
            Half::Bf16 => moe_engine::DType::BF16,
        }
    }

    /// The format of a half dtype.
    pub(crate) fn of(d: moe_engine::DType) -> Option<Half> {
        match d {
            moe_engine::DType::F16 => Some(Half::F16),
            moe_engine::DType::BF16 => Some(Half::Bf16),
            _ => None,
        }
    }

    /// Widens `src` into `dst` (the same length): exact, both formats being subsets of f32.
    pub(crate) fn decode_into(self, src: &[u16], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        // The `half` crate converts with the cpu's own instructions where it has them (F16C).
        match self {
            Half::F16 => bytemuck_cast::<f16>(src).convert_to_f32_slice(dst),
            Half::Bf16 => bytemuck_cast::<bf16>(src).convert_to_f32_slice(dst),
        }
    }
}

/// `u16` bits viewed as a 16-bit float type of the same layout.
fn bytemuck_cast<H: bytemuck::Pod>(v: &[u16]) -> &[H] {
    bytemuck::cast_slice(v)
}

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
    /// A weight stored in a 16-bit format, each matrix transposed to `[K, N]` as
    /// [`CpuBuffer::WeightT`]: half the bytes to hold and to stream; the products widen
    /// it to f32 as they read it and accumulate in f32.
    WeightHalf {
        /// The transposed matrices' bits.
        data: Vec<u16>,
        /// Their format.
        half: Half,
        /// Rows N of each logical matrix.
        n: usize,
        /// Columns K of each logical matrix.
        k: usize,
    },
    /// A bf16 weight stored as the AMX tile kernels read it (`crate::amx::Layout`): each
    /// matrix as 16-column tiles, contiguous over K in pairs, loaded with no copy. Chosen
    /// at upload where the cpu runs those kernels.
    WeightTiles {
        /// The tiles' bf16 bits.
        data: Vec<u16>,
        /// Rows N of each logical matrix.
        n: usize,
        /// Columns K of each logical matrix.
        k: usize,
    },
}

impl moe_engine::DeviceBuffer for CpuBuffer {
    fn bytes(&self) -> u64 {
        match self {
            CpuBuffer::F32(v) | CpuBuffer::WeightT { data: v, .. } => v.len() as u64 * 4,
            CpuBuffer::I32(v) => v.len() as u64 * 4,
            CpuBuffer::WeightHalf { data, .. } | CpuBuffer::WeightTiles { data, .. } => data.len() as u64 * 2,
        }
    }
}

/// Transposes every `[n, k]` matrix of a stack to `[k, n]`.
pub(crate) fn transpose_stack<E: Copy + Default>(v: &[E], n: usize, k: usize) -> Vec<E> {
    let mut out = vec![E::default(); v.len()];
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

/// Reads one byte of every cache line of `data` once, right after it was written.
///
/// Why: on a virtual machine whose host backs guest memory lazily (the Firecracker VMs
/// this project is measured on), the first read of each line after it was written runs at
/// about half the bandwidth of later reads: a 34.6 MB f32 expert took 4.9 ms the first time
/// it was streamed and 2.9 ms after. Left to the forwards, a decode layer over 64 experts
/// ran its first ~60 forwards at half speed. Reading the stored weights once at load moves
/// that cost there, where it is a fraction of the conversion that just wrote them; on
/// other machines the pass costs one read of the weights.
pub(crate) fn read_once<E: bytemuck::Pod>(data: &[E]) {
    let bytes: &[u8] = bytemuck::cast_slice(data);
    let lines = bytes.chunks(64).fold(0u8, |acc, line| acc ^ line[0]);
    std::hint::black_box(lines);
}
