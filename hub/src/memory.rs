//! How the hub process asks glibc's allocator for memory, tuned for many idle connections.
//!
//! Every agent connection holds a few buffers that the HTTP/2 library sizes for bulk transfer and allocates up front:
//! a 16 KiB write buffer and an 8 KiB read buffer. A control channel that carries a few small messages a minute
//! only ever writes the first few hundred bytes of them. Served from glibc's heap, such a buffer usually lands in
//! memory that earlier allocations (the TLS handshakes of the registration storm) already touched, so all of it is
//! resident; served from its own anonymous mapping, only the pages actually written are. Measured (BENCHMARKS.md,
//! "Where the bytes go"): hub RSS per connected agent at 10,000 agents 43.8 → 38.4 KiB, the same release binary
//! with glibc's default threshold and with this one.
//!
//! The cost: an allocation of [`MMAP_THRESHOLD`] or more that glibc cannot serve from free heap space is a
//! `mmap`/`munmap` pair whose pages fault in fresh. Hub CPU at 10,000 agents was the same within noise. The
//! worst case is an image download whose every 16 KiB TLS record buffer gets mapped: 18 µs for map, fill and
//! unmap against 2 µs from the heap, ~10 % of a core per 100 MB/s served (measured alone, not end to end).
//! Mapped allocations count against the kernel's `vm.max_map_count` (neighbouring ones merge: 172 mappings at
//! 19,000 agents); [`tune_allocator`] keeps a quarter of it for everything else.
//!
//! An operator who sets glibc's own knobs (`MALLOC_MMAP_THRESHOLD_`, or `GLIBC_TUNABLES` naming
//! `glibc.malloc.mmap_threshold`) keeps them: the hub then changes nothing.

/// Allocations of this many bytes or more get their own mapping (the HTTP/2 per-connection buffers are 8 and 16 KiB).
pub const MMAP_THRESHOLD: usize = 8 * 1024;

/// What [`tune_allocator`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tuning {
    /// Allocations of `threshold` bytes or more are mapped on their own, at most `max_mappings` at once.
    Mapped {
        /// Bytes.
        threshold: usize,
        /// Mapped allocations open at once; past it glibc serves large allocations from its heap again.
        max_mappings: usize,
    },
    /// Left as it was: the operator set glibc's mmap threshold.
    OperatorSet,
    /// Not a glibc build, or glibc refused the setting.
    Unavailable,
}

/// The most mapped allocations to allow when the kernel allows `max_map_count` mappings: three quarters, the rest
/// kept for thread stacks, libraries and files.
pub fn max_mappings(max_map_count: usize) -> usize {
    max_map_count / 4 * 3
}

/// Whether the environment already sets glibc's mmap threshold.
fn operator_set(env: &dyn Fn(&str) -> Option<String>) -> bool {
    env("MALLOC_MMAP_THRESHOLD_").is_some()
        || env("GLIBC_TUNABLES").is_some_and(|t| t.contains("glibc.malloc.mmap_threshold"))
}

/// Sets glibc's mmap threshold to [`MMAP_THRESHOLD`] for this process (call it early, before the runtime starts).
pub fn tune_allocator() -> Tuning {
    if operator_set(&|k| std::env::var(k).ok()) {
        return Tuning::OperatorSet;
    }
    let max_map_count = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(65_530);
    set(MMAP_THRESHOLD, max_mappings(max_map_count))
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set(threshold: usize, max_mappings: usize) -> Tuning {
    let (Ok(t), Ok(m)) = (i32::try_from(threshold), i32::try_from(max_mappings.min(i32::MAX as usize))) else {
        return Tuning::Unavailable;
    };
    #[allow(unsafe_code)]
    // SAFETY: mallopt only changes glibc's allocator parameters; it takes two integers and touches no memory of
    // ours. Both settings are documented in mallopt(3) and may be changed while the process allocates.
    let ok = unsafe { libc::mallopt(libc::M_MMAP_MAX, m) == 1 && libc::mallopt(libc::M_MMAP_THRESHOLD, t) == 1 };
    if ok { Tuning::Mapped { threshold, max_mappings } } else { Tuning::Unavailable }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set(_threshold: usize, _max_mappings: usize) -> Tuning {
    Tuning::Unavailable
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operators_own_glibc_setting_is_kept() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert!(operator_set(&env(&[("MALLOC_MMAP_THRESHOLD_", "65536")])));
        assert!(operator_set(&env(&[("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=4096")])));
        assert!(!operator_set(&env(&[("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")])));
        assert!(!operator_set(&env(&[])));
    }

    #[test]
    fn a_quarter_of_the_kernels_mappings_is_left_for_the_rest() {
        assert_eq!(max_mappings(65_530), 49_146);
        assert_eq!(max_mappings(1_048_576), 786_432);
    }

    /// Bytes glibc holds in mapped (not heap) allocations now.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn mapped_bytes() -> usize {
        #[allow(unsafe_code)]
        // SAFETY: mallinfo2 reads glibc's allocator statistics into a struct it returns by value.
        unsafe { libc::mallinfo2() }.hblkhd
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_takes_the_setting_and_maps_a_connection_sized_buffer_on_its_own() {
        // nextest runs each test in its own process, so this changes no other test's allocator. glibc maps a
        // request on its own only when its heap cannot serve it without growing, so ask for more than the heap
        // keeps spare (128 KiB by default) in connection-sized buffers.
        assert_eq!(set(MMAP_THRESHOLD, 49_146), Tuning::Mapped { threshold: MMAP_THRESHOLD, max_mappings: 49_146 });
        let before = mapped_bytes();
        let mapped: Vec<Vec<u8>> = (0..64).map(|_| Vec::with_capacity(16 * 1024)).collect();
        let grew = mapped_bytes() - before;
        assert!(grew >= 32 * 16 * 1024, "only {grew} bytes of 64 16 KiB buffers were mapped on their own");
        let before = mapped_bytes();
        let small: Vec<Vec<u8>> = (0..64).map(|_| Vec::with_capacity(MMAP_THRESHOLD / 2)).collect();
        assert_eq!(mapped_bytes(), before, "4 KiB buffers were mapped too");
        drop((mapped, small));
    }
}
