//! The CUDA [`Backend`]: device memory through cudarc, one stream, the kernels of
//! `kernels/*.cu` compiled by NVRTC for the device's architecture on first use. Each op
//! family's launcher lives in its own module (`matmul`, `elementwise`, `routing`, `noise`,
//! `exchange`, and `grad` for the backward and the optimizer);
//! this file maps the trait onto them and moves data to and from the host.
//!
//! Everything is enqueued on one stream; `download` and `synchronize` wait. Like the wgpu
//! backend, the route kernel flags non-finite inputs on the device and the next download
//! reports them, so a layer forward has no host synchronisation inside it: no copy to or
//! from the host, no stream wait, group sizes stay on the device.
//!
//! Not yet verified on a GPU (none was lent while this was written): the golden and
//! parity tests run it whenever a driver is present and skip with a message otherwise.

use crate::device::{derr, CudaBackend, CudaBuffer, T};
use moe_engine::backend::Backend;
use moe_engine::device::{Capabilities, Device, UploadOp, WeightUploadOp};
use moe_engine::ops::{
    ActGradOp, BucketOp, BucketParts, CastWeightOp, CombineGrad, CombineGradOp, CombineOp, ElementwiseOp, GatedAddGrad,
    GatedAddGradOp, GroupedLinearOp, GroupedMlpOp, LinearDxOp, LinearOp, MixGrad, MixGradOp, MlpOutput, NoiseOp,
    OptimStepOp, PassRowsOp, PermuteOp, PermuteScaledOp, PlanOp, PlanParts, RegroupOp, RouteGradOp, RouteOp,
    RouterStatsOp, RoutesParts, StepOut, SumRowsOp, SumSquaresOp, WeightGrad, WeightGradOp,
};
use moe_engine::tensor::HostData;
use moe_engine::{DType, HostTensor, Result};

impl Device for CudaBackend {
    type Buffer = CudaBuffer;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn capabilities(&self) -> &Capabilities {
        self.caps()
    }

    fn available_memory(&self) -> Option<u64> {
        self.ctx.mem_get_info().ok().map(|(free, _)| free as u64)
    }

    fn run_upload(&self, op: &UploadOp<'_>) -> Result<T> {
        let t = op.tensor;
        let (buf, dtype) = match t.data() {
            HostData::F32(v) => (CudaBuffer::F32(self.htod(v)?), DType::F32),
            HostData::I32(v) => (CudaBuffer::I32(self.htod(v)?), DType::I32),
        };
        T::from_parts(buf, t.shape().to_vec(), dtype)
    }

    fn run_upload_weight(&self, op: &WeightUploadOp<'_>) -> Result<T> {
        let v = op.tensor.as_f32("weight")?;
        let buf = match op.dtype {
            DType::F32 => CudaBuffer::F32(self.htod(v)?),
            d => CudaBuffer::Half(self.htod(&d.half_bits(v)?)?),
        };
        T::from_parts(buf, op.tensor.shape().to_vec(), op.dtype)
    }

    fn run_download(&self, t: &T) -> Result<HostTensor> {
        self.settle_checks()?;
        let n = t.numel();
        match t.buffer() {
            CudaBuffer::F32(s) => HostTensor::f32(t.shape(), self.stream.clone_dtoh(&s.slice(..n)).map_err(derr)?),
            CudaBuffer::I32(s) => HostTensor::i32(t.shape(), self.stream.clone_dtoh(&s.slice(..n)).map_err(derr)?),
            CudaBuffer::Half(s) => {
                let bits = self.stream.clone_dtoh(&s.slice(..n)).map_err(derr)?;
                HostTensor::f32(t.shape(), t.dtype().from_half_bits(&bits)?)
            }
        }
    }

    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(derr)?;
        self.settle_checks()
    }
}

impl Backend for CudaBackend {
    fn run_linear(&self, op: &LinearOp<'_, Self>) -> Result<T> {
        self.linear(op)
    }

    fn run_grouped_linear(&self, op: &GroupedLinearOp<'_, Self>) -> Result<T> {
        self.grouped(op)
    }

    fn run_grouped_mlp(&self, op: &GroupedMlpOp<'_, Self>) -> Result<MlpOutput<Self>> {
        self.grouped_mlp(op)
    }

    fn run_elementwise(&self, op: &ElementwiseOp<'_, Self>) -> Result<T> {
        self.elementwise(op)
    }

    fn run_route(&self, op: &RouteOp<'_, Self>) -> Result<RoutesParts<Self>> {
        self.route(op)
    }

    fn run_plan(&self, op: &PlanOp<'_, Self>) -> Result<PlanParts<Self>> {
        self.plan(op)
    }

    fn run_permute(&self, op: &PermuteOp<'_, Self>) -> Result<T> {
        self.permute(op)
    }

    fn run_combine(&self, op: &CombineOp<'_, Self>) -> Result<T> {
        self.combine(op)
    }

    fn run_permute_scaled(&self, op: &PermuteScaledOp<'_, Self>) -> Result<T> {
        self.permute_scaled(op)
    }

    fn run_pass_rows(&self, op: &PassRowsOp<'_, Self>) -> Result<T> {
        self.pass_rows(op)
    }

    fn run_bucket(&self, op: &BucketOp<'_, Self>) -> Result<BucketParts<Self>> {
        self.bucket(op)
    }

    fn run_regroup(&self, op: &RegroupOp<'_, Self>) -> Result<T> {
        self.regroup(op)
    }

    fn run_router_stats(&self, op: &RouterStatsOp<'_, Self>) -> Result<T> {
        self.router_stats(op)
    }

    fn run_noise(&self, op: &NoiseOp) -> Result<T> {
        self.noise(op)
    }

    fn run_linear_dx(&self, op: &LinearDxOp<'_, Self>) -> Result<T> {
        self.linear_dx(op)
    }

    fn run_weight_grad(&self, op: &WeightGradOp<'_, Self>) -> Result<WeightGrad<Self>> {
        self.weight_grad(op)
    }

    fn run_act_grad(&self, op: &ActGradOp<'_, Self>) -> Result<T> {
        self.act_grad(op)
    }

    fn run_sum_rows(&self, op: &SumRowsOp<'_, Self>) -> Result<T> {
        self.sum_rows(op)
    }

    fn run_combine_grad(&self, op: &CombineGradOp<'_, Self>) -> Result<CombineGrad<Self>> {
        self.combine_grad(op)
    }

    fn run_route_grad(&self, op: &RouteGradOp<'_, Self>) -> Result<T> {
        self.route_grad(op)
    }

    fn run_mix_grad(&self, op: &MixGradOp<'_, Self>) -> Result<MixGrad<Self>> {
        self.mix_grad(op)
    }

    fn run_gated_add_grad(&self, op: &GatedAddGradOp<'_, Self>) -> Result<GatedAddGrad<Self>> {
        self.gated_add_grad(op)
    }

    fn run_optim_step(&self, op: &OptimStepOp<'_, Self>) -> Result<StepOut<Self>> {
        self.optim_step(op)
    }

    fn run_sum_squares(&self, op: &SumSquaresOp<'_, Self>) -> Result<T> {
        self.sum_squares(op)
    }

    fn run_cast_weight(&self, op: &CastWeightOp<'_, Self>) -> Result<T> {
        self.cast_weight(op)
    }
}
