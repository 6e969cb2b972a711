//! Matrix products on the device. Dense ones (`linear`) go to cuBLAS: SGEMM for f32
//! weights (the exact path) and `cublasGemmEx` on tensor cores for f16/bf16 weights
//! (activations cast to the weights' type, f32 accumulation). Grouped expert products use
//! kernels/matmul_tc.cu (mma.sync tensor cores) for f16/bf16 weights on sm_80 and later and
//! kernels/matmul.cu (f32 SIMT) otherwise: cuBLAS's grouped GEMM needs the group sizes on
//! the host, which would put a synchronisation inside every forward.

use crate::device::{derr, CudaBackend, CudaBuffer, Param, T};
use crate::launch;
use cudarc::cublas::{sys as blas_sys, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{DevicePtr, DevicePtrMut, PushKernelArg};
use moe_engine::kernel_abi::{tile_list_words, CastParams, MatmulParams};
use moe_engine::ops::{CastWeightOp, GroupedLinearOp, GroupedMlpOp, LinearOp, MlpOutput, Offsets};
use moe_engine::{DType, Error, ExpertKind, Result};

/// The cuBLAS call for out [r, n] = x [r, k] · w [n, k]ᵀ on row-major buffers, with no
/// copies: cuBLAS is column-major, and a row-major [r, n] buffer is the column-major n × r
/// matrix outᵀ = w · xᵀ. So C (m = n, n = r, ldc = n) = op(A) · op(B) with A = the weight
/// buffer read as column-major k × n (lda = k) and transposed, B = the input buffer read as
/// column-major k × r (ldb = k) as is. Sizes over i32 are an error.
pub(crate) fn linear_gemm(r: usize, n: usize, k: usize, beta: f32) -> Result<GemmConfig<f32>> {
    let dim = |v: usize, what: &str| {
        i32::try_from(v)
            .map_err(|_| Error::unsupported("cuda", format!("linear: {what} = {v} (cuBLAS takes 32-bit sizes)")))
    };
    let (m32, n32, k32) = (dim(n, "out features")?, dim(r, "rows")?, dim(k, "in features")?);
    Ok(GemmConfig {
        transa: blas_sys::cublasOperation_t::CUBLAS_OP_T,
        transb: blas_sys::cublasOperation_t::CUBLAS_OP_N,
        m: m32,
        n: n32,
        k: k32,
        alpha: 1.0,
        lda: k32,
        ldb: k32,
        beta,
        ldc: m32,
    })
}

impl CudaBackend {
    /// Runs the grouped kernel of `params` (plain, or GLU with its epilogue) on `x` with
    /// weights `w`; returns the output `[rows, cols]` and, for GLU with `keep_pre`, the
    /// pre-activation `[rows, n]`.
    pub(crate) fn grouped_launch(
        &self,
        x: &T,
        offsets: &Offsets<Self>,
        w: &T,
        bias: Option<&T>,
        params: &MatmulParams,
    ) -> Result<(T, Option<T>)> {
        let (r, n) = (params.rows as usize, params.n as usize);
        let cols = if params.glu == 1 { n / 2 } else { n };
        let mut tiles = self.zeros::<i32>(tile_list_words(params.max_tiles as usize))?;
        let tm = self.function("matmul.cu", "tile_map")?;
        let offs = Self::i32s(offsets.tensor(), "offsets")?;
        // SAFETY: matches kernels/matmul.cu tile_map(offsets, tiles, MatmulParams); the tile
        // list holds 1 + 3·max_tiles words and tile_map writes at most that many.
        unsafe {
            self.stream
                .launch_builder(&tm)
                .arg(offs)
                .arg(&mut tiles)
                .arg(&Param(*params))
                .launch(launch::tile_map().config())
        }
        .map_err(derr)?;
        let mut out = self.zeros::<f32>(r * cols)?;
        let keep_pre = params.glu == 1 && params.keep_pre == 1;
        let mut pre = if keep_pre { Some(self.zeros::<f32>(r * n)?) } else { None };
        let (family, name, geometry) = launch::grouped(params, self.tensor_cores);
        let func = self.function(family, name)?;
        let xs = Self::f32s(x, "grouped input")?;
        let null = 0u64;
        let mut args = self.stream.launch_builder(&func);
        args.arg(xs);
        match w.buffer() {
            CudaBuffer::F32(s) => args.arg(s),
            CudaBuffer::Half(s) => args.arg(s),
            CudaBuffer::I32(_) => return Err(Error::Internal("expert weights stored as i32".into())),
        };
        match bias {
            Some(b) => args.arg(Self::f32s(b, "expert biases")?),
            None => args.arg(&null),
        };
        args.arg(&tiles).arg(&mut out);
        match pre.as_mut() {
            Some(p) => args.arg(p),
            None => args.arg(&null),
        };
        let p = Param(*params);
        args.arg(&p);
        // SAFETY: matches kernels/matmul.cu grouped and kernels/matmul_tc.cu grouped_tc_*
        // (x, w, bias, tiles, out, pre, MatmulParams); buffers hold [r, k], [G, n, k],
        // [G, n] (when has_bias), [r, cols] and [r, n] (when keep_pre), as the checked op
        // sized them.
        unsafe { args.launch(geometry.config()) }.map_err(derr)?;
        Ok((Self::out(&[r, cols], out)?, pre.map(|p| Self::out(&[r, n], p)).transpose()?))
    }

    pub(crate) fn linear(&self, op: &LinearOp<'_, Self>) -> Result<T> {
        match &self.blas {
            Some(blas) if op.w.dtype() == DType::F32 || self.tensor_cores => self.blas_linear(blas, op),
            _ => {
                // Without cuBLAS: one group over every row.
                let offsets = Offsets::from_host(self, &[0, op.dims.rows as i32])?;
                Ok(self.grouped_launch(op.x, &offsets, op.w, op.bias, &op.params)?.0)
            }
        }
    }

    pub(crate) fn grouped(&self, op: &GroupedLinearOp<'_, Self>) -> Result<T> {
        Ok(self.grouped_launch(op.x, op.offsets, op.w, op.bias, &op.params)?.0)
    }

    /// GLU experts: the first product with the activation fused in, then the second;
    /// other kinds compose the primitives.
    pub(crate) fn grouped_mlp(&self, op: &GroupedMlpOp<'_, Self>) -> Result<MlpOutput<Self>> {
        let w = op.weights;
        if !matches!(w.kind, ExpertKind::Glu { .. }) {
            return moe_engine::Backend::grouped_mlp_unfused(self, op);
        }
        let (h, pre) = self.grouped_launch(op.xp, op.offsets, w.w_in, w.b_in, &op.params)?;
        let w_out = w.w_out.ok_or_else(|| Error::Internal("checked GLU experts without w_out".into()))?;
        let y = moe_engine::Backend::grouped_linear(self, &h, op.offsets, w_out, w.b_out)?;
        Ok(MlpOutput { pre, y })
    }

    /// `cast_weight`: f32 a device copy; f16/bf16 the 16-bit patterns by
    /// kernels/matmul_tc.cu `cast_weight` (the `half` crate's rounding, NaN included), in
    /// the layout `run_upload_weight` makes.
    pub(crate) fn cast_weight(&self, op: &CastWeightOp<'_, Self>) -> Result<T> {
        let n = op.x.numel();
        let x = Self::f32s(op.x, "cast_weight input")?;
        let buf = match op.dtype {
            DType::F32 => {
                let mut out = self.zeros::<f32>(n)?;
                if n > 0 {
                    self.stream.memcpy_dtod(&x.slice(..n), &mut out).map_err(derr)?;
                }
                CudaBuffer::F32(out)
            }
            _ => {
                let mut out = self.zeros::<u16>(n)?;
                if n > 0 {
                    let f = self.function("matmul_tc.cu", "cast_weight")?;
                    let p = Param(op.params);
                    // SAFETY: matches kernels/matmul_tc.cu cast_weight(x bits, out, CastParams):
                    // x holds n f32 values (read as their bits), out n 16-bit values.
                    unsafe {
                        self.stream
                            .launch_builder(&f)
                            .arg(x)
                            .arg(&mut out)
                            .arg(&p)
                            .launch(launch::per_element(n).config())
                    }
                    .map_err(derr)?;
                }
                CudaBuffer::Half(out)
            }
        };
        T::from_parts(buf, op.x.shape().to_vec(), op.dtype)
    }

    /// out [r, n] = x [r, k] · w [n, k]ᵀ (+ bias) through cuBLAS, in the layout of
    /// [`linear_gemm`]. The bias is written into out first and accumulated onto (beta = 1).
    fn blas_linear(&self, blas: &CudaBlas, op: &LinearOp<'_, Self>) -> Result<T> {
        let (r, n, k) = (op.dims.rows, op.dims.n, op.dims.k);
        let mut out = self.zeros::<f32>(r * n)?;
        if r == 0 || n == 0 {
            return Self::out(&[r, n], out);
        }
        if let Some(b) = op.bias {
            let f = self.function("matmul_tc.cu", "fill_rows")?;
            let p = Param(CastParams { n: (r * n) as u64, cols: n as u32, bf16: 0 });
            // SAFETY: matches kernels/matmul_tc.cu fill_rows(bias, out, CastParams): bias
            // holds n values, out r·n.
            unsafe {
                self.stream
                    .launch_builder(&f)
                    .arg(Self::f32s(b, "linear bias")?)
                    .arg(&mut out)
                    .arg(&p)
                    .launch(launch::per_element(r * n).config())
            }
            .map_err(derr)?;
        }
        let beta = if op.bias.is_some() { 1.0f32 } else { 0.0 };
        let cfg = linear_gemm(r, n, k, beta)?;
        let xs = Self::f32s(op.x, "linear input")?;
        match op.w.buffer() {
            CudaBuffer::F32(ws) => {
                // SAFETY: w holds n·k, x r·k and out r·n f32 values, as the sizes say.
                unsafe { blas.gemm(cfg, ws, xs, &mut out) }.map_err(derr)?;
            }
            CudaBuffer::Half(ws) => {
                let bf16 = op.w.dtype() == DType::BF16;
                let mut xh = self.zeros::<u16>(r * k)?;
                let f = self.function("matmul_tc.cu", "to_half")?;
                let p = Param(CastParams { n: (r * k) as u64, cols: 0, bf16: bf16 as u32 });
                // SAFETY: matches kernels/matmul_tc.cu to_half(x, out, CastParams); both hold r·k.
                unsafe {
                    self.stream
                        .launch_builder(&f)
                        .arg(xs)
                        .arg(&mut xh)
                        .arg(&p)
                        .launch(launch::per_element(r * k).config())
                }
                .map_err(derr)?;
                let ty =
                    if bf16 { blas_sys::cudaDataType_t::CUDA_R_16BF } else { blas_sys::cudaDataType_t::CUDA_R_16F };
                let (a, _ra) = ws.device_ptr(&self.stream);
                let (b, _rb) = xh.device_ptr(&self.stream);
                let (c, _rc) = out.device_ptr_mut(&self.stream);
                // SAFETY: as the f32 case, with A and B as 16-bit values of `ty`, C f32 and
                // f32 scalars for CUBLAS_COMPUTE_32F; the guards keep the buffers' stream
                // order until the call is enqueued.
                unsafe {
                    cudarc::cublas::result::gemm_ex(
                        *blas.handle(),
                        cfg.transa,
                        cfg.transb,
                        cfg.m,
                        cfg.n,
                        cfg.k,
                        (&cfg.alpha as *const f32).cast(),
                        a as *const _,
                        ty,
                        cfg.lda,
                        b as *const _,
                        ty,
                        cfg.ldb,
                        (&cfg.beta as *const f32).cast(),
                        c as *mut _,
                        blas_sys::cudaDataType_t::CUDA_R_32F,
                        cfg.ldc,
                        blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                }
                .map_err(derr)?;
            }
            CudaBuffer::I32(_) => return Err(Error::Internal("linear weight stored as i32".into())),
        }
        Self::out(&[r, n], out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GEMM as the BLAS reference defines it (column-major, leading dimensions, op = N or
    /// T): C = alpha · op(A) · op(B) + beta · C.
    fn reference_gemm(cfg: &GemmConfig<f32>, a: &[f32], b: &[f32], c: &mut [f32]) {
        let t = |op| op == blas_sys::cublasOperation_t::CUBLAS_OP_T;
        let (m, n, k) = (cfg.m as usize, cfg.n as usize, cfg.k as usize);
        let (lda, ldb, ldc) = (cfg.lda as usize, cfg.ldb as usize, cfg.ldc as usize);
        for j in 0..n {
            for i in 0..m {
                let mut s = 0.0f32;
                for l in 0..k {
                    let av = if t(cfg.transa) { a[l + i * lda] } else { a[i + l * lda] };
                    let bv = if t(cfg.transb) { b[j + l * ldb] } else { b[l + j * ldb] };
                    s += av * bv;
                }
                c[i + j * ldc] = cfg.alpha * s + cfg.beta * c[i + j * ldc];
            }
        }
    }

    #[test]
    fn the_cublas_call_computes_row_major_x_times_w_transposed() {
        let (r, n, k) = (5, 3, 4);
        let x: Vec<f32> = (0..r * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.91).cos()).collect();
        let bias = [0.5f32, -1.0, 2.0];
        let mut out: Vec<f32> = (0..r * n).map(|i| bias[i % n]).collect();
        reference_gemm(&linear_gemm(r, n, k, 1.0).expect("sizes"), &w, &x, &mut out);
        for row in 0..r {
            for col in 0..n {
                let want: f32 = (0..k).map(|l| x[row * k + l] * w[col * k + l]).sum::<f32>() + bias[col];
                approx::assert_relative_eq!(out[row * n + col], want, max_relative = 1e-6);
            }
        }
    }

    #[test]
    fn sizes_beyond_cublas_are_an_error_naming_the_dimension() {
        let err = linear_gemm(1 << 31, 8, 8, 0.0).expect_err("too many rows");
        assert!(err.to_string().contains("rows"), "{err}");
    }
}
