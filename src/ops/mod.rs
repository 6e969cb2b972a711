//! The op front doors: for every op of the [`Backend`] trait, the spec a caller fills in,
//! the checks its operands must pass, and the checked op (`*Op`) a backend receives.
//!
//! Each `*Op::check` validates the operands once, for every backend: shapes, dtypes, sizes
//! (every product overflow-checked, outputs and the plan's scratch within the backend's
//! largest buffer), index
//! ranges and the values the kernels take as 32-bit integers; it also encodes the op's
//! kernel parameter block ([`crate::kernel_abi`]) once. A checked op can only be made by
//! its `check` (a private field), so a backend that receives one may trust it: the
//! backend does only its own work. The trait's provided methods (`b.linear(...)`,
//! `b.route(...)`, ...) are the front doors that run the checks, call the backend and
//! verify the shapes of what it returned.
//!
//! Tensors whose values index memory are typed so that safe code cannot forge them:
//! [`Routes`] (expert ids), [`Plan`] (compact rows), [`RouteRows`] (the row of every
//! route in a grouped layout), [`Offsets`] (group boundaries), [`DevicePlacement`]
//! (expert slots) and [`BlockTable`] (row blocks) come from the ops that compute them or
//! from host data checked on the way in.

mod cast;
mod dispatch;
mod elementwise;
mod exchange;
mod grad;
mod matmul;
mod noise;
mod optim;
mod plan;
mod route;
mod route_check;
mod stats;

pub use cast::CastWeightOp;
pub(crate) use dispatch::unit_weights;
pub use dispatch::{CombineOp, PassRowsOp, PermuteOp, PermuteScaledOp, RouteRows};
pub use elementwise::{ElementwiseKind, ElementwiseOp};
pub use exchange::{BlockTable, Bucket, BucketOp, BucketParts, DevicePlacement, RegroupOp};
pub use grad::{
    ActGradKind, ActGradOp, AuxGrad, CombineGrad, CombineGradOp, GatedAddGrad, GatedAddGradOp, LinearDxOp, MixGrad,
    MixGradOp, RouteGradOp, RouteGradSpec, SumRowsOp, WeightGrad, WeightGradOp,
};
pub use matmul::{GroupedLinearOp, GroupedMlpOp, LinearOp, MatDims, MlpOutput, MlpWeights, Offsets};
pub use noise::NoiseOp;
pub use optim::{OptimStepOp, StepKind, StepOut, StepRule, SumSquaresOp};
pub use plan::{deepspeed_capacity, CapacityRule, KeepPolicy, Plan, PlanOp, PlanParts, PlanSpec, StaticCapacity};
pub use route::{Choice, GroupScore, Normalize, RouteOp, RouteSpec, Routes, RoutesParts, ScoreFn};
pub use route_check::{route_status, status_word, PendingRouteCheck, RouteChecks};
pub use stats::RouterStatsOp;

use crate::device::Device;
use crate::device_tensor::{DeviceBuffer, DeviceTensor};
use crate::error::{human_bytes, Error, Result};
use crate::tensor::{nbytes, DType};

/// Errors unless `t` holds f32 values; returns its shape.
pub(crate) fn f32_tensor<'t, Buf: DeviceBuffer>(name: &str, t: &'t DeviceTensor<Buf>) -> Result<&'t [usize]> {
    t.expect_dtype(name, DType::F32)?;
    Ok(t.shape())
}

/// The dimensions of an f32 matrix, or an error naming it.
pub(crate) fn f32_matrix<Buf: DeviceBuffer>(name: &str, t: &DeviceTensor<Buf>) -> Result<(usize, usize)> {
    let dims = t.dims2(name)?;
    t.expect_dtype(name, DType::F32)?;
    Ok(dims)
}

/// The dimensions of a matrix of f32 or i32 values (what transports move), or an error.
pub(crate) fn f32_or_i32_matrix<Buf: DeviceBuffer>(name: &str, t: &DeviceTensor<Buf>) -> Result<(usize, usize)> {
    let dims = t.dims2(name)?;
    if !matches!(t.dtype(), DType::F32 | DType::I32) {
        return Err(Error::dtype(name, "f32 or i32", t.dtype()));
    }
    Ok(dims)
}

/// Errors unless `t` is an f32 tensor of exactly `shape`.
pub(crate) fn f32_shaped<Buf: DeviceBuffer>(name: &str, t: &DeviceTensor<Buf>, shape: &[usize]) -> Result<()> {
    t.expect_shape(name, shape)?;
    t.expect_dtype(name, DType::F32)
}

/// Errors unless `t` is an i32 tensor of exactly `shape`.
pub(crate) fn i32_shaped<Buf: DeviceBuffer>(name: &str, t: &DeviceTensor<Buf>, shape: &[usize]) -> Result<()> {
    t.expect_shape(name, shape)?;
    t.expect_dtype(name, DType::I32)
}

/// `v` as the u32 a kernel parameter holds, or an error naming what it counts.
pub(crate) fn to_u32(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::too_large(what, v.to_string(), "the kernels' 32-bit sizes (4294967295)"))
}

/// `v` as an i32 index range (rows, slots, counts are i32 tensors), or an error.
pub(crate) fn fits_i32(what: &str, v: usize) -> Result<()> {
    if v > i32::MAX as usize {
        return Err(Error::too_large(what, v.to_string(), "the i32 indices of the plan (2147483647)"));
    }
    Ok(())
}

/// Checks that an output of `shape` in `dtype` can be sized and fits the backend's
/// largest buffer; returns its element count.
pub(crate) fn output<B: Device>(b: &B, name: &str, shape: &[usize], dtype: DType) -> Result<usize> {
    let bytes = nbytes(name, shape, dtype)?;
    let max = b.capabilities().max_buffer_bytes;
    if bytes > max {
        return Err(Error::too_large(
            format!("output `{name}` of shape {shape:?}"),
            human_bytes(bytes),
            format!("the largest buffer backend {} allocates ({})", b.name(), human_bytes(max)),
        ));
    }
    Ok(shape.iter().product())
}

pub(crate) use crate::device::returned;
