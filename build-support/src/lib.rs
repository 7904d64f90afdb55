//! moeba-build: the build-dependency of moeba-kernels behind its `cuda` feature.
//!
//! [`build_kernels`] is what `crates/kernels/build.rs` calls. It
//! - finds `nvcc` ([`find_nvcc`]: `$NVCC`, `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`, then `PATH`),
//! - compiles every `kernels/*.cu` at the repository root into ONE fatbin
//!   (`$OUT_DIR/moeba_kernels.fatbin`) for the architectures in `MOEBA_CUDA_ARCHS`
//!   ([`DEFAULT_ARCHS`] when unset), capturing `-Xptxas -v` (registers, spills) into
//!   `$OUT_DIR/ptxas.log` and warning when a kernel spills,
//! - runs bindgen on `kernels/include/*.h` into `$OUT_DIR/moeba_params.rs`, so the kernel
//!   parameter structs are defined once, in C, and used from Rust,
//! - asks cargo to rerun only when a `.cu`/`.cuh`/`.h` file or one of the environment variables
//!   above changes,
//! - keeps each fatbin (and its ptxas log) in a cache keyed by a digest of the sources, flags and
//!   nvcc (`target/<profile>/moeba-kernel-cache`, or `$MOEBA_KERNEL_CACHE`), so that `cargo build`,
//!   `cargo test` and `cargo clippy`, which run the build script in separate `OUT_DIR`s, compile
//!   the kernels once.
//!
//! The .cu files are compiled as one translation unit (a generated file that `#include`s each of
//! them), because nvcc builds a fatbin from a single source file; `--threads 0` lets nvcc compile
//! the architectures in parallel.
//!
//! Depends on bindgen (which needs libclang at build time). Nothing here runs without `cuda`.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The architectures compiled when `MOEBA_CUDA_ARCHS` is unset: SASS for Ampere (sm_80), Hopper
/// (sm_90a), Blackwell datacenter (sm_100) and consumer (sm_120), plus compute_90 PTX that newer
/// GPUs can JIT.
pub const DEFAULT_ARCHS: &str = "sm_80,sm_90a,sm_100,sm_120,compute_90";

/// The environment variables the build reads (cargo reruns the build script when one changes).
pub const ENV_VARS: [&str; 5] = ["NVCC", "CUDA_HOME", "CUDA_PATH", "MOEBA_CUDA_ARCHS", "MOEBA_KERNEL_CACHE"];

/// The file name of the fatbin in `OUT_DIR`.
pub const FATBIN_NAME: &str = "moeba_kernels.fatbin";

/// The file name of the bindgen output in `OUT_DIR`.
pub const BINDINGS_NAME: &str = "moeba_params.rs";

/// Compiles `<repo>/kernels/*.cu` into `$OUT_DIR/moeba_kernels.fatbin` and generates
/// `$OUT_DIR/moeba_params.rs` from `<repo>/kernels/include/*.h`. Call from a build script whose
/// crate sits two levels below the repository root (`crates/kernels`).
///
/// Panics (the only way a build script can fail) with a message saying what is missing and how
/// to fix it.
pub fn build_kernels() {
    let manifest = PathBuf::from(env_or_panic("CARGO_MANIFEST_DIR"));
    let root = manifest.join("../..");
    let kernels_dir = root.join("kernels");
    let include_dir = kernels_dir.join("include");
    let out_dir = PathBuf::from(env_or_panic("OUT_DIR"));

    for var in ENV_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let cu_files = list_files(&kernels_dir, &["cu"]);
    if cu_files.is_empty() {
        panic!("moeba-build: no .cu file found in {}", kernels_dir.display());
    }
    let headers = list_files(&include_dir, &["h", "cuh"]);
    println!("cargo:rerun-if-changed={}", kernels_dir.display());
    println!("cargo:rerun-if-changed={}", include_dir.display());
    for f in cu_files.iter().chain(&headers) {
        println!("cargo:rerun-if-changed={}", f.display());
    }

    generate_bindings(&include_dir, &headers, &out_dir.join(BINDINGS_NAME));

    let archs = env::var("MOEBA_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.to_string());
    let gencodes = gencode_flags(&archs).unwrap_or_else(|e| panic!("moeba-build: MOEBA_CUDA_ARCHS: {e}"));
    let nvcc = find_nvcc().unwrap_or_else(|e| panic!("{e}"));

    // `cargo build`, `cargo test` and `cargo clippy` each run this script in their own OUT_DIR;
    // a cache keyed by everything that goes into nvcc lets them share one compilation.
    let key = cache_key(&nvcc, &gencodes, &cu_files, &headers);
    let cache = cache_dir(&out_dir);
    let (cached_bin, cached_log) =
        (cache.join(format!("{key}.fatbin")), cache.join(format!("{key}.ptxas.log")));
    if cached_bin.is_file() && cached_log.is_file() {
        let ok = std::fs::copy(&cached_bin, out_dir.join(FATBIN_NAME)).is_ok()
            && std::fs::copy(&cached_log, out_dir.join("ptxas.log")).is_ok();
        if ok {
            warn_spills(&std::fs::read_to_string(out_dir.join("ptxas.log")).unwrap_or_default(), &out_dir);
            return;
        }
    }
    compile_fatbin(&nvcc, &gencodes, &cu_files, &include_dir, &out_dir);
    if std::fs::create_dir_all(&cache).is_ok() {
        // Copy to a temporary name, then rename: concurrent build scripts never see half a file.
        for (src, dst) in [(FATBIN_NAME, &cached_bin), ("ptxas.log", &cached_log)] {
            let tmp = dst.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::copy(out_dir.join(src), &tmp).is_ok() {
                let _ = std::fs::rename(&tmp, dst);
            }
        }
    }
}

/// Where compiled fatbins are kept between build-script runs: `$MOEBA_KERNEL_CACHE`, else
/// `moeba-kernel-cache` in the profile's target dir (`target/debug` for `OUT_DIR =
/// target/debug/build/<pkg>/out`).
fn cache_dir(out_dir: &Path) -> PathBuf {
    if let Some(d) = env::var_os("MOEBA_KERNEL_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    out_dir.ancestors().nth(3).unwrap_or(out_dir).join("moeba-kernel-cache")
}

/// A hex digest of what the fatbin depends on: the sources (names and contents), the nvcc binary
/// (path, size, mtime), the flags and this crate's version.
fn cache_key(nvcc: &Path, gencodes: &[String], cu_files: &[PathBuf], headers: &[PathBuf]) -> String {
    use std::hash::{Hash, Hasher};
    // FNV-1a, 64 bits: stable across Rust versions, unlike DefaultHasher.
    struct Fnv(u64);
    impl Hasher for Fnv {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for &b in bytes {
                self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
            }
        }
    }
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    env!("CARGO_PKG_VERSION").hash(&mut h);
    NVCC_FLAGS.hash(&mut h);
    gencodes.hash(&mut h);
    nvcc.hash(&mut h);
    if let Ok(m) = std::fs::metadata(nvcc) {
        m.len().hash(&mut h);
        m.modified().ok().hash(&mut h);
    }
    for f in cu_files.iter().chain(headers) {
        f.file_name().hash(&mut h);
        std::fs::read(f).unwrap_or_default().hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

/// The nvcc flags besides the `-gencode`s, `-I` and the file names.
const NVCC_FLAGS: [&str; 7] = ["--fatbin", "-O3", "-std=c++17", "--threads", "0", "-Xptxas", "-v"];

fn env_or_panic(var: &str) -> String {
    env::var(var).unwrap_or_else(|_| panic!("moeba-build: ${var} is not set (run from a build script)"))
}

/// The files directly inside `dir` whose extension is one of `exts`, sorted by name.
fn list_files(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file() && p.extension().and_then(|e| e.to_str()).is_some_and(|e| exts.contains(&e))
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

/// Finds nvcc: `$NVCC`, then `$CUDA_HOME/bin/nvcc`, then `$CUDA_PATH/bin/nvcc`, then `nvcc` on
/// `PATH`. The error names all four places and how to get an nvcc without a system toolkit.
pub fn find_nvcc() -> Result<PathBuf, String> {
    let mut tried = Vec::new();
    if let Some(p) = env::var_os("NVCC").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        tried.push(format!("$NVCC={} (not a file)", p.display()));
    } else {
        tried.push("$NVCC (unset)".into());
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        match env::var_os(var).filter(|p| !p.is_empty()) {
            Some(home) => {
                let p = PathBuf::from(home).join("bin").join(nvcc_exe());
                if p.is_file() {
                    return Ok(p);
                }
                tried.push(format!("${var}/bin/nvcc = {} (not found)", p.display()));
            }
            None => tried.push(format!("${var}/bin/nvcc (${var} unset)")),
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let p = dir.join(nvcc_exe());
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    tried.push("nvcc on $PATH (not found)".into());
    Err(format!(
        "moeba-build: the `cuda` feature needs nvcc, and none was found. Looked at: {}.\n\
         HINT: set NVCC=/path/to/nvcc or CUDA_HOME=/path/to/cuda; without a system CUDA toolkit, \
         `python3 -m venv v && v/bin/pip install nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 \
         nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85` and \
         CUDA_HOME=v/lib/python3.*/site-packages/nvidia/cu13 (see .ci/cuda-check.sh); \
         or build without `--features cuda`.",
        tried.join("; ")
    ))
}

fn nvcc_exe() -> &'static str {
    if cfg!(windows) {
        "nvcc.exe"
    } else {
        "nvcc"
    }
}

/// Turns a comma-separated architecture list (`sm_80,sm_90a,compute_90`) into nvcc `-gencode`
/// arguments: `sm_XY` gives SASS (`arch=compute_XY,code=sm_XY`), `compute_XY` gives PTX
/// (`arch=compute_XY,code=compute_XY`).
pub fn gencode_flags(archs: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for a in archs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let (kind, num) = if let Some(n) = a.strip_prefix("sm_") {
            ("sm", n)
        } else if let Some(n) = a.strip_prefix("compute_") {
            ("compute", n)
        } else {
            return Err(format!("`{a}` is neither sm_XY nor compute_XY (e.g. sm_80,sm_90a,compute_90)"));
        };
        let valid = num.len() >= 2
            && num.chars().take_while(|c| c.is_ascii_digit()).count() >= 2
            && num.chars().skip_while(|c| c.is_ascii_digit()).all(|c| c == 'a' || c == 'f');
        if !valid {
            return Err(format!("`{a}`: bad architecture number (e.g. sm_80, sm_90a, compute_90)"));
        }
        out.push("-gencode".to_string());
        out.push(format!("arch=compute_{num},code={kind}_{num}"));
    }
    if out.is_empty() {
        return Err(format!("`{archs}` names no architecture (e.g. sm_80,sm_90a,compute_90)"));
    }
    Ok(out)
}

fn compile_fatbin(
    nvcc: &Path,
    gencodes: &[String],
    cu_files: &[PathBuf],
    include_dir: &Path,
    out_dir: &Path,
) {
    // One translation unit: nvcc makes a fatbin from exactly one source file.
    let mut unity = String::from("// Generated by moeba-build: every kernels/*.cu, one translation unit.\n");
    for f in cu_files {
        let abs = f.canonicalize().unwrap_or_else(|_| f.clone());
        let _ = writeln!(unity, "#include \"{}\"", abs.display());
    }
    let unity_path = out_dir.join("moeba_kernels_all.cu");
    std::fs::write(&unity_path, unity)
        .unwrap_or_else(|e| panic!("moeba-build: cannot write {}: {e}", unity_path.display()));

    let fatbin = out_dir.join(FATBIN_NAME);
    let mut cmd = Command::new(nvcc);
    cmd.args(gencodes).args(NVCC_FLAGS).arg("-I").arg(include_dir).arg("-o").arg(&fatbin).arg(&unity_path);
    let start = std::time::Instant::now();
    let output = cmd.output().unwrap_or_else(|e| panic!("moeba-build: cannot run {}: {e}", nvcc.display()));
    let secs = start.elapsed().as_secs_f64();
    // ptxas -v writes its resource report on stderr, with the compiler's warnings.
    let log = format!(
        "# {:?}\n# {secs:.1}s\n{}{}",
        cmd,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let log_path = out_dir.join("ptxas.log");
    let _ = std::fs::write(&log_path, &log);
    if !output.status.success() {
        panic!(
            "moeba-build: nvcc failed ({}) compiling the CUDA kernels; full log in {}:\n{}",
            output.status,
            log_path.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    warn_spills(&log, out_dir);
}

/// Prints a cargo warning listing the kernels whose `ptxas -v` report shows spills.
fn warn_spills(log: &str, out_dir: &Path) {
    let spills = spill_lines(log);
    if !spills.is_empty() {
        println!(
            "cargo:warning=moeba-build: {} kernel(s) spill registers (details in {}):",
            spills.len(),
            out_dir.join("ptxas.log").display()
        );
        for s in spills.iter().take(10) {
            println!("cargo:warning=  {s}");
        }
    }
}

/// From `ptxas -v` output, one line per kernel that reports a nonzero spill, as
/// `function (arch): N bytes spill stores, M bytes spill loads`.
pub fn spill_lines(log: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in log.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            let rest = &line[i + "Compiling entry function '".len()..];
            current = rest.replace("' for '", " (").replace('\'', ")");
        } else if line.contains("bytes spill stores") {
            let nums: Vec<u64> = line
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .filter_map(|s| s.parse().ok())
                .collect();
            // "N bytes stack frame, S bytes spill stores, L bytes spill loads"
            if nums.len() >= 3 && (nums[1] > 0 || nums[2] > 0) {
                out.push(format!(
                    "{}: {} bytes spill stores, {} bytes spill loads",
                    current.trim(),
                    nums[1],
                    nums[2]
                ));
            }
        }
    }
    out
}

fn generate_bindings(include_dir: &Path, headers: &[PathBuf], out: &Path) {
    let mut builder = bindgen::Builder::default()
        .clang_arg(format!("-I{}", include_dir.display()))
        .use_core()
        .derive_default(true)
        .derive_debug(true)
        .derive_copy(true)
        .layout_tests(false)
        .generate_comments(true)
        .allowlist_type("[A-Z][A-Za-z]*Params")
        .allowlist_var("MOEBA_.*");
    let mut n = 0;
    for h in headers.iter().filter(|h| h.extension().is_some_and(|e| e == "h")) {
        builder = builder.header(h.display().to_string());
        n += 1;
    }
    if n == 0 {
        panic!("moeba-build: no .h header in {} for bindgen", include_dir.display());
    }
    let bindings = builder.generate().unwrap_or_else(|e| {
        panic!(
            "moeba-build: bindgen failed on {}: {e}\nHINT: bindgen needs libclang; on Debian/Ubuntu \
             `apt-get install -y libclang-dev`, or set LIBCLANG_PATH",
            include_dir.display()
        )
    });
    bindings
        .write_to_file(out)
        .unwrap_or_else(|e| panic!("moeba-build: cannot write {}: {e}", out.display()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gencodes() {
        let g = gencode_flags("sm_80, sm_90a,compute_90").unwrap();
        assert_eq!(
            g,
            vec![
                "-gencode",
                "arch=compute_80,code=sm_80",
                "-gencode",
                "arch=compute_90a,code=sm_90a",
                "-gencode",
                "arch=compute_90,code=compute_90"
            ]
        );
        assert!(gencode_flags("").is_err());
        assert!(gencode_flags("sm80").is_err());
        assert!(gencode_flags("sm_x0").is_err());
        assert_eq!(gencode_flags(DEFAULT_ARCHS).unwrap().len(), 10);
    }

    #[test]
    fn spills() {
        let log = "ptxas info    : Compiling entry function 'k1' for 'sm_80'\n\
                   ptxas info    : Function properties for k1\n\
                   \x20   0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
                   ptxas info    : Compiling entry function 'k2' for 'sm_90a'\n\
                   \x20   8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n";
        assert_eq!(spill_lines(log), vec!["k2 (sm_90a): 4 bytes spill stores, 12 bytes spill loads"]);
    }
}
