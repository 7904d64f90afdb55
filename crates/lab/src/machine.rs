//! [`MachineInfo`]: what a lab ran on (CPU model, cores, threads, SIMD path, versions), recorded in
//! every results.json so that figures from different machines are never compared blindly.

use serde::Serialize;

/// The machine and software a lab ran on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MachineInfo {
    /// CPU model name (`/proc/cpuinfo`), or `unknown`.
    pub cpu_model: String,
    /// Logical cores the OS reports.
    pub logical_cores: usize,
    /// Threads rayon uses (`RAYON_NUM_THREADS` or the core count).
    pub rayon_threads: usize,
    /// The CPU SIMD path moeba's kernels picked (`avx512`, `avx2+fma`, `neon`, `scalar`).
    pub simd_path: String,
    /// `std::env::consts::OS` / `ARCH`.
    pub os_arch: String,
    /// moeba's version.
    pub moeba_version: String,
}

impl MachineInfo {
    /// Collects the current machine's description.
    pub fn collect() -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        MachineInfo {
            cpu_model,
            logical_cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            rayon_threads: rayon::current_num_threads(),
            simd_path: moeba_kernels::cpu::simd::active_path().to_string(),
            os_arch: format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
            moeba_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    /// One line for a report's setup section.
    pub fn summary(&self) -> String {
        format!(
            "{} ({} logical cores, {} rayon threads, SIMD path {}, {})",
            self.cpu_model, self.logical_cores, self.rayon_threads, self.simd_path, self.os_arch
        )
    }
}
