//! Process memory as the memory alarm sees it: resident size and the
//! watermark; and the disk alarm's limit.

use crate::config::Config;

/// Resident set size of this process in bytes (0 where /proc is unavailable).
pub fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

/// Give the heap memory freed so far back to the system. glibc's allocator
/// keeps freed small blocks for reuse, so after a large transient read (a
/// quorum queue's backlog read back to serve it or to write a snapshot:
/// hundreds of thousands of bodies allocated, then freed) the process would
/// keep its peak as resident memory (measured: 1.26 GB resident after a
/// 500 MB backlog was loaded and paged out again, 115 MB once trimmed).
/// Walks the heap: call it on a blocking thread, after large frees only.
/// A no-op where the allocator is not glibc's.
pub fn give_back_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers and only releases free memory
    // at the allocator's own discretion; safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Physical memory in bytes (0 where /proc is unavailable).
pub fn total_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

/// The high watermark from the configuration: absolute bytes, else the fraction
/// of physical memory (RabbitMQ's `vm_memory_high_watermark`, default 0.4).
pub fn watermark_bytes(config: &Config) -> u64 {
    if config.memory_high_watermark_bytes != 0 {
        return config.memory_high_watermark_bytes;
    }
    (total_bytes() as f64 * config.vm_memory_high_watermark.clamp(0.0, 1.0)) as u64
}

/// The disk alarm's limit from the configuration: `disk_free_limit_relative`
/// times physical memory when set, else `disk_free_limit` bytes (RabbitMQ's
/// `disk_free_limit.relative` / `.absolute`, default 50 MB).
pub fn disk_limit_bytes(config: &Config) -> u64 {
    if config.disk_free_limit_relative > 0.0 {
        return (total_bytes() as f64 * config.disk_free_limit_relative) as u64;
    }
    config.disk_free_limit
}

/// Bytes free for unprivileged users on the file system holding `path`.
pub fn disk_free(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` is writable memory of the
    // right type; statvfs only writes into it, and we read it only on success.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_free_of_the_temp_dir() {
        assert!(disk_free(&std::env::temp_dir()).is_some_and(|b| b > 0));
        assert_eq!(disk_free(std::path::Path::new("/no/such/dir")), None);
    }
}
