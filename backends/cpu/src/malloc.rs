//! The process's allocator told to keep freed memory for reuse (glibc's malloc; a no-op
//! elsewhere).
//!
//! Why: every op's output is a new `Vec`, and at T = 512 a forward allocates and frees
//! tens of MB. Left at its defaults, glibc hands freed heap tops and large chunks back to
//! the kernel, so the next forward writes fresh pages: a page fault each, and on VMs that
//! back guest memory lazily the first touch of each line at about half speed besides
//! (`buffer::read_once`). Measured (`moe bench layer --iters 5`, alternated with
//! `MOE_MALLOC=default`): the Mixtral shape at T = 512 in bf16 took 27.5 / 27.2 ms a
//! forward against 38.0 / 35.4 ms, DeepSeek-V2-Lite's 137 against 151 ms; the gemm-bound
//! f32 rows did not move.

/// Largest mmap threshold glibc accepts on 64-bit (`HEAP_MAX_SIZE / 2`): chunks up to it
/// come from the heap, where freed memory can be reused.
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Freed memory at the top of the heap kept, not trimmed, up to this (bytes).
const TRIM_THRESHOLD: i32 = i32::MAX;
/// Extra memory the heap grows by each time, so growth is rare.
const TOP_PAD: i32 = 256 << 20;

/// Sets glibc's malloc to keep freed memory for reuse by later forwards: call once, early,
/// from a binary that runs the cpu backend (the `moe` command does). Process-wide, which is
/// why a library does not do it on its own. Returns whether the allocator took the
/// settings (false off glibc).
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets the allocator's parameters; it is called before threads
        // allocate heavily, and takes plain integers.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
                && libc::mallopt(libc::M_TOP_PAD, TOP_PAD) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    /// glibc refuses an mmap threshold above `HEAP_MAX_SIZE / 2`; the settings must be ones
    /// it takes, or the call would silently change nothing.
    #[test]
    fn glibc_takes_the_settings() {
        assert!(super::retain_freed_memory());
    }
}
