//! Memory the host has free, for the checks that refuse a job before it allocates more
//! than there is (an allocator abort or the kernel's OOM killer otherwise ends it).

use crate::error::{human_bytes, Error, Result};

/// Bytes the host can still allocate without swapping: `MemAvailable` of
/// `/proc/meminfo`, where the platform has it.
pub fn host_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Errors naming `what`, the bytes it needs and the host's free memory when `bytes`
/// exceeds what the host has available (no check where the platform does not say).
pub fn check_host(what: &str, bytes: u64) -> Result<()> {
    match host_available() {
        Some(free) if bytes > free => Err(Error::too_large(
            what,
            human_bytes(bytes),
            format!("the {} of memory available on this host", human_bytes(free)),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_huge_request_is_refused_with_both_sizes() {
        if super::host_available().is_none() {
            eprintln!("SKIP a_huge_request_is_refused_with_both_sizes: this platform does not report free memory");
            return;
        }
        let err = super::check_host("a test buffer", u64::MAX).unwrap_err().to_string();
        assert!(err.contains("a test buffer") && err.contains("available on this host"), "{err}");
        super::check_host("a small buffer", 1024).unwrap();
    }
}
