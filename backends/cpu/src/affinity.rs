//! Pinning the pool's threads to the CPUs the process may run on, one thread per CPU,
//! when the pool covers them all.
//!
//! Why: rayon's workers sleep between ops, and Linux wakes a sleeping worker on the CPU
//! it last ran on or beside its waker, so early in a run both workers of the 2-core dev
//! VM often queue on one CPU and run an op's halves one after the other while the other
//! CPU idles (measured: the first ~30 decode forwards after loading ran both experts'
//! tiles in turn on one CPU, 2.3 ms a forward instead of 1.2 ms; the balancer leaves a
//! task that just ran where it is). PyTorch's OpenMP threads spin between ops instead,
//! so they keep their CPUs. A pinned worker always wakes on its own CPU.

/// The CPUs this process may run on, in order, where the platform says (Linux).
pub(crate) fn allowed_cpus() -> Option<Vec<usize>> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `set` is a plain bit set that sched_getaffinity fills; pid 0 is this thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return None;
            }
            Some((0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect())
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Pins the calling thread to `cpu`; false where the platform refused or has no such call.
pub(crate) fn pin_current(cpu: usize) -> bool {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: as above; the set names one CPU that `allowed_cpus` listed.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = cpu;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn a_thread_pins_to_an_allowed_cpu() {
        let cpus = allowed_cpus().expect("Linux reports the affinity mask");
        assert!(!cpus.is_empty());
        let last = *cpus.last().unwrap();
        // A thread of its own, so the test runner's thread keeps its mask.
        let mask = std::thread::spawn(move || {
            assert!(pin_current(last));
            allowed_cpus().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(mask, vec![last]);
    }
}
