//! Process memory as the memory alarm sees it: resident size and the watermark.

use crate::config::Config;

/// Resident set size of this process in bytes (0 where /proc is unavailable).
pub fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * 4096)
        .unwrap_or(0)
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
