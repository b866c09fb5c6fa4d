//! The agent's resident memory, and handing freed memory back to the system.

/// Resident memory of this process (`VmRSS`), bytes; None where /proc is unavailable.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Returns memory freed by the allocator to the system. glibc's malloc keeps freed
/// blocks in each thread's arena, so after a burst of large requests (a detector's
/// 6 MB inputs on every worker) the process would keep its peak; `malloc_trim` gives
/// the free pages back. A no-op with other C libraries, whose allocators return memory
/// themselves or offer no such call.
#[allow(unsafe_code)]
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: malloc_trim takes a byte count, has no preconditions and is
        // thread-safe; it only releases free memory.
        unsafe {
            malloc_trim(0);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn resident_memory_is_read_and_trimming_is_harmless() {
        let before = super::resident_bytes().expect("VmRSS on Linux");
        assert!(before > 0);
        let big = vec![1u8; 64 << 20];
        assert_eq!(big[12345], 1);
        drop(big);
        super::trim();
        assert!(super::resident_bytes().expect("VmRSS") > 0);
    }
}
