//! Host memory standing in for device memory.

/// A cpu "device" buffer.
#[derive(Clone, Debug)]
pub enum CpuBuffer {
    /// f32 elements.
    F32(Vec<f32>),
    /// i32 elements.
    I32(Vec<i32>),
}
