//! Matrix products: dense (`linear`), grouped by expert offsets (`grouped_linear`), and
//! the whole expert MLP over grouped rows (`grouped_mlp`).

use super::{f32_matrix, f32_shaped, fits_i32, output, to_u32};
use crate::device::{Device, Tensor};
use crate::error::{Error, Result};
use crate::expert::ExpertKind;
use crate::kernel_abi::{tile_grid, MatmulParams, TILE};
use crate::tensor::{DType, HostTensor};

/// Rows R, output columns N and inner size K of a product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatDims {
    /// Rows of the input and the output.
    pub rows: usize,
    /// Output columns.
    pub n: usize,
    /// Inner size.
    pub k: usize,
}

/// Group boundaries of a grouped product: `[G + 1]` i32 on the device, a non-decreasing
/// prefix sum from 0, whose last value is at most [`Offsets::bound`]. Made by the plan op
/// (the compact expert-major layout) or from host values checked on the way in, so a
/// kernel that walks the groups never leaves its rows.
///
/// The last [`Offsets::tail`] groups may be marked as a tail ([`Offsets::with_tail`]):
/// groups with no weights (LongCat-Flash's zero-compute experts, which return their input).
/// The grouped ops (`grouped_linear`, `grouped_mlp`, grouped `linear_dx`, `weight_grad`)
/// then take a weight stack of `G − tail` experts, compute only those groups' rows and
/// leave the tail's rows zero, for `Backend::pass_rows` to fill.
pub struct Offsets<B: Device> {
    tensor: Tensor<B>,
    bound: usize,
    tail: usize,
}

impl<B: Device> Clone for Offsets<B> {
    fn clone(&self) -> Self {
        Offsets { tensor: self.tensor.clone(), bound: self.bound, tail: self.tail }
    }
}

impl<B: Device> Offsets<B> {
    /// Checks host offsets (`[G + 1]`, from 0, non-decreasing, within i32) and uploads them.
    pub fn from_host(b: &B, offsets: &[i32]) -> Result<Self> {
        Self::check_values(offsets, None)?;
        let bound = *offsets.last().unwrap_or(&0) as usize;
        let t = HostTensor::i32(&[offsets.len()], offsets.to_vec())?;
        Ok(Offsets { tensor: b.upload(&t)?, bound, tail: 0 })
    }

    /// Offsets the plan computed: `tensor` `[E + 1]`, its last value at most `bound` (S·k).
    pub(crate) fn from_plan(tensor: Tensor<B>, bound: usize) -> Self {
        Offsets { tensor, bound, tail: 0 }
    }

    /// The same offsets with their last `z` groups marked as a tail of weightless groups
    /// (replacing any earlier mark): the grouped ops then take `groups() − z` experts'
    /// weights and leave the tail's rows zero. A plan over E real and Z identity experts
    /// gives offsets `[E + Z + 1]`; `with_tail(Z)` runs its E-expert stack. No weight
    /// stack fits a `z` above the groups, so the ops that take such offsets refuse them.
    pub fn with_tail(&self, z: usize) -> Offsets<B> {
        Offsets { tensor: self.tensor.clone(), bound: self.bound, tail: z }
    }

    /// Checks offsets values: at least one, the first 0, non-decreasing, and (with
    /// `rows`) the last at most `rows`. The cpu backend, which reads them on the host,
    /// runs this on what it is given too.
    pub fn check_values(offsets: &[i32], rows: Option<usize>) -> Result<()> {
        let bad = |msg: String| Err(Error::Precondition(format!("group offsets {offsets:?}: {msg}")));
        match offsets.first() {
            None => return bad("at least one value (0) is needed".into()),
            Some(&f) if f != 0 => return bad("the first must be 0".into()),
            _ => {}
        }
        if let Some(i) = offsets.windows(2).position(|w| w[1] < w[0]) {
            return bad(format!("value {} follows the larger {}", offsets[i + 1], offsets[i]));
        }
        if let Some(r) = rows {
            if *offsets.last().unwrap_or(&0) as usize > r {
                return bad(format!("the last exceeds the {r} rows"));
            }
        }
        Ok(())
    }

    /// The device tensor `[G + 1]`.
    pub fn tensor(&self) -> &Tensor<B> {
        &self.tensor
    }

    /// Groups G, the tail included.
    pub fn groups(&self) -> usize {
        self.tensor.numel().saturating_sub(1)
    }

    /// Groups of the tail (0 unless marked by [`Offsets::with_tail`]).
    pub fn tail(&self) -> usize {
        self.tail
    }

    /// Checks that these offsets group rows for a weight stack of `experts` matrices:
    /// exactly `experts + tail` groups, so `[experts + tail + 1]` i32.
    pub(crate) fn check_experts(&self, experts: usize) -> Result<()> {
        let want = experts.checked_add(self.tail).and_then(|g| g.checked_add(1));
        if self.tensor.dtype() != DType::I32 || Some(self.tensor.numel()) != want || self.tensor.shape().len() != 1 {
            let what = match (self.tail, want) {
                (0, Some(n)) => format!("[{n}] i32 (one group per expert, + 1)"),
                (z, Some(n)) => format!("[{n}] i32 ({experts} expert groups, then the {z} tail groups, + 1)"),
                (z, None) => format!("{experts} expert groups and {z} tail groups (too many)"),
            };
            return Err(Error::shape("offsets", what, self.tensor.shape()));
        }
        Ok(())
    }

    /// An upper bound of the last offset: the rows the groups cover at most.
    pub fn bound(&self) -> usize {
        self.bound
    }
}

/// The kernels' storage code of a weight dtype: 0 f32, 1 f16, 2 bf16.
pub(super) fn weight_code(name: &str, d: DType) -> Result<u32> {
    match d {
        DType::F32 => Ok(0),
        DType::F16 => Ok(1),
        DType::BF16 => Ok(2),
        DType::I32 => Err(Error::dtype(name, "f32, f16 or bf16 weights", d)),
    }
}

/// Errors unless `rows × cols` elements fit the kernels' 32-bit element indices.
pub(super) fn elements_u32(what: &str, rows: usize, cols: usize) -> Result<u32> {
    let n = crate::tensor::mul_size(what, rows, cols)?;
    to_u32(&format!("{what} elements"), n)
}

/// Checks `bias` against `shape` when given.
fn bias_of<Buf: crate::device_tensor::DeviceBuffer>(
    name: &str,
    bias: Option<&crate::device_tensor::DeviceTensor<Buf>>,
    shape: &[usize],
) -> Result<u32> {
    match bias {
        Some(t) => f32_shaped(name, t, shape).map(|_| 1),
        None => Ok(0),
    }
}

fn params(d: MatDims, groups: usize, has_bias: u32, wdtype: u32, tiles: usize) -> Result<MatmulParams> {
    let (_, y_stride) = tile_grid(1, tiles);
    Ok(MatmulParams {
        rows: to_u32("product rows", d.rows)?,
        n: to_u32("product columns", d.n)?,
        k: to_u32("product inner size", d.k)?,
        groups: to_u32("expert groups", groups)?,
        has_bias,
        max_tiles: to_u32("product tiles", tiles)?,
        y_stride,
        wdtype,
        g0: 0,
        g1: groups as u32,
        c0: 0,
        c1: d.n as u32,
        ..Default::default()
    })
}

/// `x [R, K] · w [N, K]ᵀ (+ bias [N])` → `[R, N]`, checked.
#[non_exhaustive]
pub struct LinearOp<'a, B: Device> {
    /// Input rows, f32.
    pub x: &'a Tensor<B>,
    /// Weight `[N, K]` (f32, f16 or bf16 storage).
    pub w: &'a Tensor<B>,
    /// Bias `[N]`, f32.
    pub bias: Option<&'a Tensor<B>>,
    /// Sizes.
    pub dims: MatDims,
    /// Kernel parameters (one group; `max_tiles` counts the row blocks).
    pub params: MatmulParams,
}

impl<'a, B: Device> LinearOp<'a, B> {
    /// Checks the operands.
    pub fn check(b: &B, x: &'a Tensor<B>, w: &'a Tensor<B>, bias: Option<&'a Tensor<B>>) -> Result<Self> {
        let (rows, k) = f32_matrix("linear input", x)?;
        let (n, wk) = w.dims2("linear weight")?;
        if wk != k {
            return Err(Error::shape("linear weight", format!("[out, {k}]"), w.shape()));
        }
        let wdtype = weight_code("linear weight", w.dtype())?;
        let has_bias = bias_of("linear bias", bias, &[n])?;
        output(b, "linear output", &[rows, n], DType::F32)?;
        // Backends may run a dense product as one group of i32 offsets.
        fits_i32("linear input rows", rows)?;
        let dims = MatDims { rows, n, k };
        let params = params(dims, 1, has_bias, wdtype, rows.div_ceil(TILE))?;
        Ok(LinearOp { x, w, bias, dims, params })
    }

    /// Output shape `[R, N]`.
    pub fn out_shape(&self) -> [usize; 2] {
        [self.dims.rows, self.dims.n]
    }
}

/// The grouped product: rows `offsets[g]..offsets[g + 1]` of `x [R, K]` times
/// `w[g] [N, K]ᵀ` (+ `bias[g]`); rows past the last expert group (the offsets' tail
/// included) are zero. Checked.
#[non_exhaustive]
pub struct GroupedLinearOp<'a, B: Device> {
    /// Input rows, f32.
    pub x: &'a Tensor<B>,
    /// Group boundaries.
    pub offsets: &'a Offsets<B>,
    /// Weight stack `[G, N, K]`.
    pub w: &'a Tensor<B>,
    /// Biases `[G, N]`, f32.
    pub bias: Option<&'a Tensor<B>>,
    /// Sizes.
    pub dims: MatDims,
    /// Expert groups G (the weight stack's; the offsets may add a tail).
    pub groups: usize,
    /// Kernel parameters (plain product; `max_tiles` = ceil(R / 64) + G).
    pub params: MatmulParams,
}

impl<'a, B: Device> GroupedLinearOp<'a, B> {
    /// Checks the operands.
    pub fn check(
        b: &B,
        x: &'a Tensor<B>,
        offsets: &'a Offsets<B>,
        w: &'a Tensor<B>,
        bias: Option<&'a Tensor<B>>,
    ) -> Result<Self> {
        let (rows, k) = f32_matrix("grouped input", x)?;
        let (groups, n, wk) = w.dims3("expert weights")?;
        if wk != k {
            return Err(Error::shape("expert weights", format!("[experts, out, {k}]"), w.shape()));
        }
        let wdtype = weight_code("expert weights", w.dtype())?;
        offsets.check_experts(groups)?;
        if offsets.bound() > rows {
            return Err(Error::shape(
                "grouped input",
                format!("at least the {} rows the groups cover", offsets.bound()),
                x.shape(),
            ));
        }
        fits_i32("grouped input rows", rows)?;
        let has_bias = bias_of("expert biases", bias, &[groups, n])?;
        output(b, "grouped output", &[rows, n], DType::F32)?;
        let dims = MatDims { rows, n, k };
        let tiles = rows.div_ceil(TILE) + groups;
        let params = params(dims, groups, has_bias, wdtype, tiles)?;
        Ok(GroupedLinearOp { x, offsets, w, bias, dims, groups, params })
    }

    /// Output shape `[R, N]`.
    pub fn out_shape(&self) -> [usize; 2] {
        [self.dims.rows, self.dims.n]
    }
}

/// An expert stack's weights as `Backend::grouped_mlp` takes them: `w_in [G, N, K]`
/// (for GLU experts `N = 2I`, gate rows first, then up), `w_out [G, K', I]`.
pub struct MlpWeights<'a, B: Device> {
    /// Linear, MLP or GLU, with its activation.
    pub kind: ExpertKind,
    /// First projection.
    pub w_in: &'a Tensor<B>,
    /// Bias of the first projection, `[G, N]`.
    pub b_in: Option<&'a Tensor<B>>,
    /// Second projection (absent for linear experts).
    pub w_out: Option<&'a Tensor<B>>,
    /// Bias of the second projection, `[G, K']`.
    pub b_out: Option<&'a Tensor<B>>,
}

/// Output of `Backend::grouped_mlp`.
pub struct MlpOutput<B: Device> {
    /// Output of the first projection before the activation (`[R, N]`), when asked for:
    /// what a backward pass of the activation needs. Never present for linear experts.
    pub pre: Option<Tensor<B>>,
    /// The expert outputs `[R, K']`.
    pub y: Tensor<B>,
}

/// The whole expert MLP over grouped rows, checked: `w_out · act(w_in · x)` (GLU:
/// `w_out · (act(gate) · up)`, clamped as the kind's `GluClamp` says), with biases.
#[non_exhaustive]
pub struct GroupedMlpOp<'a, B: Device> {
    /// Compact expert-major input rows `[R, K]`.
    pub xp: &'a Tensor<B>,
    /// Group boundaries.
    pub offsets: &'a Offsets<B>,
    /// The weights.
    pub weights: &'a MlpWeights<'a, B>,
    /// Keep the first product's output (pre-activation) for a backward pass.
    pub keep_pre: bool,
    /// Sizes of the first product (`n` = N, 2I for GLU).
    pub first: MatDims,
    /// Intermediate width I (N, or N / 2 for GLU).
    pub inner: usize,
    /// Output width K'.
    pub out_cols: usize,
    /// Kernel parameters of the first product, with the GLU epilogue (and its clamp) for
    /// GLU experts.
    pub params: MatmulParams,
}

impl<'a, B: Device> GroupedMlpOp<'a, B> {
    /// Checks the operands and the weights against the expert kind.
    pub fn check(
        b: &B,
        xp: &'a Tensor<B>,
        offsets: &'a Offsets<B>,
        weights: &'a MlpWeights<'a, B>,
        keep_pre: bool,
    ) -> Result<Self> {
        let first = GroupedLinearOp::check(b, xp, offsets, weights.w_in, weights.b_in)?;
        let (g, n) = (first.groups, first.dims.n);
        let mut params = first.params;
        let (inner, out_cols) = match weights.kind {
            ExpertKind::Linear => {
                if weights.w_out.is_some() || weights.b_out.is_some() {
                    return Err(Error::Misuse("linear experts have no second projection (w_out, b_out)".into()));
                }
                (n, n)
            }
            kind => {
                kind.check()?;
                let inner = if let ExpertKind::Glu { activation, clamp } = kind {
                    if n % 2 != 0 {
                        return Err(Error::shape(
                            "GLU expert weights",
                            "[experts, 2·ffn, hidden] (gate rows, then up)",
                            weights.w_in.shape(),
                        ));
                    }
                    params.glu = 1;
                    params.act = activation.kernel_code();
                    params.keep_pre = keep_pre as u32;
                    if let Some(c) = clamp {
                        params.clamp = 1;
                        params.limit = c.limit;
                        params.alpha = c.alpha;
                        params.up_offset = c.up_offset;
                    }
                    n / 2
                } else {
                    n
                };
                let w_out = weights.w_out.ok_or_else(|| Error::MissingTensor("w_out (output projection)".into()))?;
                let (og, out_cols, oi) = w_out.dims3("w_out")?;
                if og != g || oi != inner {
                    return Err(Error::shape("w_out", format!("[{g}, out, {inner}]"), w_out.shape()));
                }
                weight_code("w_out", w_out.dtype())?;
                bias_of("b_out", weights.b_out, &[g, out_cols])?;
                output(b, "expert intermediate", &[first.dims.rows, n], DType::F32)?;
                output(b, "expert output", &[first.dims.rows, out_cols], DType::F32)?;
                (inner, out_cols)
            }
        };
        Ok(GroupedMlpOp { xp, offsets, weights, keep_pre, first: first.dims, inner, out_cols, params })
    }
}
