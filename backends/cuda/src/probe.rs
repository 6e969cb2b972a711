//! Presence checks for the CUDA libraries, done before cudarc touches them (cudarc panics
//! on a missing library or symbol).

use moe_engine::{Error, Result};

fn missing(lib: &str, hint: &str) -> Error {
    Error::backend("cuda", format!("{lib} could not be loaded: {hint}"))
}

/// `Ok(())` when the CUDA driver library (libcuda) can be loaded.
pub fn driver_status() -> Result<()> {
    // SAFETY: only tries to open the library with libloading; nothing is called.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(missing(
            "the CUDA driver (libcuda.so)",
            "no NVIDIA driver on this machine, or it is not on the loader path",
        ))
    }
}

/// `Ok(())` when NVRTC (libnvrtc) can be loaded.
pub fn nvrtc_status() -> Result<()> {
    // SAFETY: only tries to open the library with libloading; nothing is called.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(missing(
            "NVRTC (libnvrtc.so.12)",
            "install a CUDA 12 toolkit or `pip install nvidia-cuda-nvrtc-cu12` and put its lib/ folder on LD_LIBRARY_PATH",
        ))
    }
}

/// `Ok(())` when cuBLAS (libcublas) can be loaded.
pub fn cublas_status() -> Result<()> {
    // SAFETY: only tries to open the library with libloading; nothing is called.
    if unsafe { cudarc::cublas::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(missing(
            "cuBLAS (libcublas.so.12)",
            "install a CUDA 12 toolkit or `pip install nvidia-cublas-cu12` and put its lib/ folder on LD_LIBRARY_PATH",
        ))
    }
}
