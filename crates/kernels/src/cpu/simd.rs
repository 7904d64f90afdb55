//! Run-time SIMD selection (AVX-512, AVX2+FMA, NEON, portable fallback) and the f32 hot loops.
//!
//! # Paths
//!
//! [`Path`] names one instruction set. The best one the CPU supports is detected once
//! (`is_x86_feature_detected!` on x86-64; NEON is baseline on aarch64) and becomes the active
//! path, unless the environment variable `MOEBA_SIMD` (`scalar`, `avx2`, `avx512`, `neon`) asks
//! for a lower one; a request above what the CPU supports falls back to the best supported path,
//! and an unknown value is ignored. [`set_path`] changes the active path at run time (tests use it
//! to check every path the machine can run; benches report [`active_path`]).
//!
//! # Kernels
//!
//! Every kernel is written once, generically over the small [`Vf32`] vector trait, and
//! instantiated inside a `#[target_feature]` function per path ([`dispatch`]). `f32` itself
//! implements the trait with one lane: it is the portable fallback. Kernels never read or write
//! past their slices: the tails of maps and binary ops go through a padded stack vector (so an
//! element's result does not depend on where a chunk starts), reduction tails through `f32`.
//!
//! `exp` is the Cephes `expf` scheme: `x = k ln2 + r` with `k = round(x log2 e)` and
//! `|r| <= ln2/2` (ln 2 split in two for an exact reduction), a degree-7 polynomial for `e^r`,
//! and `2^k` applied as two exact power-of-two products so that results in the subnormal range
//! and up to `f32::MAX` are right. Error: about 1 ulp over the whole range; `exp(x)` is `+inf`
//! above ~88.72, `0` below ~-103.9, NaN for NaN. `sigmoid`, `silu`, `gelu` (tanh form, written
//! as `x · σ(2u)`, which equals `0.5 x (1 + tanh u)`) and softmax use it.
//!
//! `max`/`min` propagate NaN (as torch's `maximum`, `relu`, `clamp` and reductions do).
//!
//! Sums ([`sum_f32`], [`exp_sub_sum_f32`]) add blocks of [`SUM_BLOCK`] = 128 elements in f32
//! with 4 (SIMD) accumulators, so at most 32 sequential f32 additions per lane on any path, and
//! add the block totals in f64: the error stays near f32 rounding of the result even for
//! millions of terms (plain f32 accumulation drifts by ~1e-3 relative at 10^6 terms).

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use crate::ops::BinaryOp;
use moeba_tensor::{Error, Result};

// ------------------------------------------------------------------------------ path selection

/// One SIMD instruction set the f32 kernels can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Path {
    /// Portable scalar code (every target).
    Scalar,
    /// aarch64 Advanced SIMD (4 lanes).
    Neon,
    /// x86-64 AVX2 with FMA (8 lanes).
    Avx2,
    /// x86-64 AVX-512F (16 lanes).
    Avx512,
}

impl Path {
    /// The name reported by [`active_path`]: `"scalar"`, `"neon"`, `"avx2+fma"` or `"avx512"`.
    pub fn name(self) -> &'static str {
        match self {
            Path::Scalar => "scalar",
            Path::Neon => "neon",
            Path::Avx2 => "avx2+fma",
            Path::Avx512 => "avx512",
        }
    }

    /// Parses the values accepted by `MOEBA_SIMD` (case-insensitive; `avx2+fma` is also accepted).
    pub fn parse(s: &str) -> Option<Path> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" | "none" | "off" => Some(Path::Scalar),
            "neon" => Some(Path::Neon),
            "avx2" | "avx2+fma" => Some(Path::Avx2),
            "avx512" | "avx512f" | "avx-512" => Some(Path::Avx512),
            _ => None,
        }
    }

    fn code(self) -> u8 {
        match self {
            Path::Scalar => 1,
            Path::Neon => 2,
            Path::Avx2 => 3,
            Path::Avx512 => 4,
        }
    }

    fn from_code(c: u8) -> Option<Path> {
        match c {
            1 => Some(Path::Scalar),
            2 => Some(Path::Neon),
            3 => Some(Path::Avx2),
            4 => Some(Path::Avx512),
            _ => None,
        }
    }
}

/// The best path this CPU supports (detected once).
pub fn detected_path() -> Path {
    static DETECTED: OnceLock<Path> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Path::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Path::Avx2;
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("neon") {
                return Path::Neon;
            }
        }
        Path::Scalar
    })
}

/// Whether this CPU can run `path`.
pub fn is_supported(path: Path) -> bool {
    let best = detected_path();
    match path {
        Path::Scalar => true,
        Path::Neon => best == Path::Neon,
        Path::Avx2 => matches!(best, Path::Avx2 | Path::Avx512),
        Path::Avx512 => best == Path::Avx512,
    }
}

/// Every path this CPU can run, lowest first (always starts with [`Path::Scalar`]).
pub fn available_paths() -> Vec<Path> {
    [Path::Scalar, Path::Neon, Path::Avx2, Path::Avx512].into_iter().filter(|&p| is_supported(p)).collect()
}

static ACTIVE: AtomicU8 = AtomicU8::new(0);

/// The path the kernels run on now: the detected one, lowered by `MOEBA_SIMD` or [`set_path`].
pub fn path() -> Path {
    if let Some(p) = Path::from_code(ACTIVE.load(Ordering::Relaxed)) {
        return p;
    }
    let best = detected_path();
    let p = match std::env::var("MOEBA_SIMD").ok().as_deref().and_then(Path::parse) {
        Some(req) if is_supported(req) => req,
        // Asked for more than the CPU has (or another architecture's path): the best we have.
        Some(_) | None => best,
    };
    // Another thread may have called `set_path` meanwhile: keep its choice.
    match ACTIVE.compare_exchange(0, p.code(), Ordering::Relaxed, Ordering::Relaxed) {
        Ok(_) => p,
        Err(c) => Path::from_code(c).unwrap_or(p),
    }
}

/// The active path's name: `"avx512"`, `"avx2+fma"`, `"neon"` or `"scalar"` (for bench reports).
pub fn active_path() -> &'static str {
    path().name()
}

/// Makes `p` the active path for the whole process and returns the previous one.
/// Errors (naming the path) when this CPU cannot run it. Meant for tests and benchmarks.
pub fn set_path(p: Path) -> Result<Path> {
    if !is_supported(p) {
        return Err(Error::Unsupported {
            op: "simd::set_path",
            msg: format!("this CPU cannot run the {} path (best: {})", p.name(), detected_path().name()),
        });
    }
    let prev = path();
    ACTIVE.store(p.code(), Ordering::Relaxed);
    Ok(prev)
}

// ------------------------------------------------------------------------------ the vector trait

/// A vector of f32 lanes. `f32` is the one-lane (portable) implementation.
///
/// # Safety
/// Implementations for SIMD types may only be used inside code compiled with their target
/// features enabled (see [`dispatch`]); `load`/`store` take raw pointers valid for `LANES` lanes.
/// Every method is `unsafe` for those two reasons only (the section applies to each of them).
#[allow(clippy::missing_safety_doc)]
pub unsafe trait Vf32: Copy {
    /// Number of f32 lanes.
    const LANES: usize;
    /// Every lane set to `x`.
    unsafe fn splat(x: f32) -> Self;
    /// Unaligned load of `LANES` values.
    unsafe fn load(p: *const f32) -> Self;
    /// Unaligned store of `LANES` values.
    unsafe fn store(self, p: *mut f32);
    /// Lanewise `self + b`.
    unsafe fn add(self, b: Self) -> Self;
    /// Lanewise `self - b`.
    unsafe fn sub(self, b: Self) -> Self;
    /// Lanewise `self * b`.
    unsafe fn mul(self, b: Self) -> Self;
    /// Lanewise `self / b`.
    unsafe fn div(self, b: Self) -> Self;
    /// Lanewise `self * b + c` (fused where the path has FMA).
    unsafe fn fma(self, b: Self, c: Self) -> Self;
    /// Lanewise maximum: `self` if `self > b` or `self` is NaN, else `b` (NaN propagates).
    unsafe fn max(self, b: Self) -> Self;
    /// Lanewise minimum: `self` if `self < b` or `self` is NaN, else `b` (NaN propagates).
    unsafe fn min(self, b: Self) -> Self;
    /// Lanewise square root.
    unsafe fn sqrt(self) -> Self;
    /// Lanewise absolute value.
    unsafe fn abs(self) -> Self;
    /// Lanewise negation.
    unsafe fn neg(self) -> Self;
    /// Lanewise round to nearest, ties to even.
    unsafe fn round(self) -> Self;
    /// `2^self` for integral lanes in `[-126, 127]` (built from the exponent bits).
    unsafe fn pow2i(self) -> Self;

    /// Non-temporal store of `LANES` values to `p`, which must be aligned to `LANES * 4` bytes
    /// (a plain store where the path has none). Follow a run of them with [`Vf32::fence`].
    #[inline(always)]
    unsafe fn stream(self, p: *mut f32) {
        unsafe { self.store(p) }
    }
    /// Orders earlier non-temporal stores before later stores (`sfence`; no-op elsewhere).
    #[inline(always)]
    unsafe fn fence() {}

    /// The lanes as an array (first `LANES` entries).
    #[inline(always)]
    unsafe fn lanes(self) -> [f32; 16] {
        let mut buf = [0f32; 16];
        unsafe { self.store(buf.as_mut_ptr()) };
        buf
    }
    /// Sum of the lanes.
    #[inline(always)]
    unsafe fn hsum(self) -> f32 {
        let b = unsafe { self.lanes() };
        b[..Self::LANES].iter().sum()
    }
    /// NaN-propagating maximum of the lanes.
    #[inline(always)]
    unsafe fn hmax(self) -> f32 {
        let b = unsafe { self.lanes() };
        b[1..Self::LANES].iter().fold(b[0], |m, &v| max1(m, v))
    }
    /// NaN-propagating minimum of the lanes.
    #[inline(always)]
    unsafe fn hmin(self) -> f32 {
        let b = unsafe { self.lanes() };
        b[1..Self::LANES].iter().fold(b[0], |m, &v| min1(m, v))
    }
}

#[inline(always)]
fn max1(a: f32, b: f32) -> f32 {
    if a > b || a.is_nan() {
        a
    } else {
        b
    }
}

#[inline(always)]
fn min1(a: f32, b: f32) -> f32 {
    if a < b || a.is_nan() {
        a
    } else {
        b
    }
}

unsafe impl Vf32 for f32 {
    const LANES: usize = 1;
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        x
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        unsafe { p.read() }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        unsafe { p.write(self) }
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        self + b
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        self - b
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        self * b
    }
    #[inline(always)]
    unsafe fn div(self, b: Self) -> Self {
        self / b
    }
    #[inline(always)]
    unsafe fn fma(self, b: Self, c: Self) -> Self {
        // Not `mul_add`: without hardware FMA that is a slow libm call.
        self * b + c
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        max1(self, b)
    }
    #[inline(always)]
    unsafe fn min(self, b: Self) -> Self {
        min1(self, b)
    }
    #[inline(always)]
    unsafe fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    unsafe fn abs(self) -> Self {
        f32::abs(self)
    }
    #[inline(always)]
    unsafe fn neg(self) -> Self {
        -self
    }
    #[inline(always)]
    unsafe fn round(self) -> Self {
        self.round_ties_even()
    }
    #[inline(always)]
    unsafe fn pow2i(self) -> Self {
        f32::from_bits(((self as i32 + 127) as u32) << 23)
    }
}

// Value intrinsics are safe to call where their feature is part of the build's baseline (e.g.
// `-C target-cpu=native`, or NEON on aarch64): the `unsafe` blocks are then unused.
#[cfg(target_arch = "x86_64")]
#[allow(unused_unsafe)]
mod x86 {
    use super::Vf32;
    use std::arch::x86_64::*;

    /// 8 lanes of AVX2 (+FMA).
    #[derive(Clone, Copy)]
    pub struct Avx2(__m256);

    unsafe impl Vf32 for Avx2 {
        const LANES: usize = 8;
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            Avx2(unsafe { _mm256_set1_ps(x) })
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Avx2(unsafe { _mm256_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm256_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn add(self, b: Self) -> Self {
            Avx2(unsafe { _mm256_add_ps(self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn sub(self, b: Self) -> Self {
            Avx2(unsafe { _mm256_sub_ps(self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn mul(self, b: Self) -> Self {
            Avx2(unsafe { _mm256_mul_ps(self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn div(self, b: Self) -> Self {
            Avx2(unsafe { _mm256_div_ps(self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn fma(self, b: Self, c: Self) -> Self {
            Avx2(unsafe { _mm256_fmadd_ps(self.0, b.0, c.0) })
        }
        #[inline(always)]
        unsafe fn max(self, b: Self) -> Self {
            // maxps gives (a > b) ? a : b; put a back where a is NaN.
            unsafe {
                let m = _mm256_max_ps(self.0, b.0);
                Avx2(_mm256_blendv_ps(m, self.0, _mm256_cmp_ps::<_CMP_UNORD_Q>(self.0, self.0)))
            }
        }
        #[inline(always)]
        unsafe fn min(self, b: Self) -> Self {
            unsafe {
                let m = _mm256_min_ps(self.0, b.0);
                Avx2(_mm256_blendv_ps(m, self.0, _mm256_cmp_ps::<_CMP_UNORD_Q>(self.0, self.0)))
            }
        }
        #[inline(always)]
        unsafe fn sqrt(self) -> Self {
            Avx2(unsafe { _mm256_sqrt_ps(self.0) })
        }
        #[inline(always)]
        unsafe fn abs(self) -> Self {
            Avx2(unsafe { _mm256_andnot_ps(_mm256_set1_ps(-0.0), self.0) })
        }
        #[inline(always)]
        unsafe fn neg(self) -> Self {
            Avx2(unsafe { _mm256_xor_ps(_mm256_set1_ps(-0.0), self.0) })
        }
        #[inline(always)]
        unsafe fn round(self) -> Self {
            Avx2(unsafe { _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self.0) })
        }
        #[inline(always)]
        unsafe fn pow2i(self) -> Self {
            unsafe {
                let i = _mm256_add_epi32(_mm256_cvtps_epi32(self.0), _mm256_set1_epi32(127));
                Avx2(_mm256_castsi256_ps(_mm256_slli_epi32::<23>(i)))
            }
        }
        #[inline(always)]
        unsafe fn stream(self, p: *mut f32) {
            unsafe { _mm256_stream_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn fence() {
            unsafe { _mm_sfence() }
        }
    }

    /// 16 lanes of AVX-512F.
    #[derive(Clone, Copy)]
    pub struct Avx512(__m512);

    // The AVX-512 intrinsics and the `avx512f` target feature are stable since Rust 1.89 (above
    // the workspace's declared MSRV of 1.85): building this path needs rustc >= 1.89.
    #[allow(clippy::incompatible_msrv)]
    unsafe impl Vf32 for Avx512 {
        const LANES: usize = 16;
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            Avx512(unsafe { _mm512_set1_ps(x) })
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Avx512(unsafe { _mm512_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm512_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn add(self, b: Self) -> Self {
            Avx512(unsafe { _mm512_add_ps(self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn sub(self, b: Self) -> Self {
            Avx512(unsafe { _mm512_sub_ps(self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn mul(self, b: Self) -> Self {
            Avx512(unsafe { _mm512_mul_ps(self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn div(self, b: Self) -> Self {
            Avx512(unsafe { _mm512_div_ps(self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn fma(self, b: Self, c: Self) -> Self {
            Avx512(unsafe { _mm512_fmadd_ps(self.0, b.0, c.0) })
        }
        #[inline(always)]
        unsafe fn max(self, b: Self) -> Self {
            unsafe {
                let m = _mm512_max_ps(self.0, b.0);
                let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(self.0, self.0);
                Avx512(_mm512_mask_blend_ps(nan, m, self.0))
            }
        }
        #[inline(always)]
        unsafe fn min(self, b: Self) -> Self {
            unsafe {
                let m = _mm512_min_ps(self.0, b.0);
                let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(self.0, self.0);
                Avx512(_mm512_mask_blend_ps(nan, m, self.0))
            }
        }
        #[inline(always)]
        unsafe fn sqrt(self) -> Self {
            Avx512(unsafe { _mm512_sqrt_ps(self.0) })
        }
        #[inline(always)]
        unsafe fn abs(self) -> Self {
            Avx512(unsafe { _mm512_abs_ps(self.0) })
        }
        #[inline(always)]
        unsafe fn neg(self) -> Self {
            unsafe {
                let bits = _mm512_xor_si512(_mm512_castps_si512(self.0), _mm512_set1_epi32(i32::MIN));
                Avx512(_mm512_castsi512_ps(bits))
            }
        }
        #[inline(always)]
        unsafe fn round(self) -> Self {
            Avx512(unsafe {
                _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self.0)
            })
        }
        #[inline(always)]
        unsafe fn pow2i(self) -> Self {
            unsafe {
                let i = _mm512_add_epi32(_mm512_cvtps_epi32(self.0), _mm512_set1_epi32(127));
                Avx512(_mm512_castsi512_ps(_mm512_slli_epi32::<23>(i)))
            }
        }
        #[inline(always)]
        unsafe fn stream(self, p: *mut f32) {
            unsafe { _mm512_stream_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn fence() {
            unsafe { _mm_sfence() }
        }
    }
}

#[cfg(target_arch = "aarch64")]
#[allow(unused_unsafe)]
mod arm {
    use super::Vf32;
    use std::arch::aarch64::*;

    /// 4 lanes of NEON.
    #[derive(Clone, Copy)]
    pub struct Neon(float32x4_t);

    unsafe impl Vf32 for Neon {
        const LANES: usize = 4;
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            Neon(unsafe { vdupq_n_f32(x) })
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Neon(unsafe { vld1q_f32(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { vst1q_f32(p, self.0) }
        }
        #[inline(always)]
        unsafe fn add(self, b: Self) -> Self {
            Neon(unsafe { vaddq_f32(self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn sub(self, b: Self) -> Self {
            Neon(unsafe { vsubq_f32(self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn mul(self, b: Self) -> Self {
            Neon(unsafe { vmulq_f32(self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn div(self, b: Self) -> Self {
            Neon(unsafe { vdivq_f32(self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn fma(self, b: Self, c: Self) -> Self {
            // vfmaq_f32(acc, x, y) = acc + x * y
            Neon(unsafe { vfmaq_f32(c.0, self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn max(self, b: Self) -> Self {
            // FMAX returns NaN when either input is NaN.
            Neon(unsafe { vmaxq_f32(self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn min(self, b: Self) -> Self {
            Neon(unsafe { vminq_f32(self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn sqrt(self) -> Self {
            Neon(unsafe { vsqrtq_f32(self.0) })
        }
        #[inline(always)]
        unsafe fn abs(self) -> Self {
            Neon(unsafe { vabsq_f32(self.0) })
        }
        #[inline(always)]
        unsafe fn neg(self) -> Self {
            Neon(unsafe { vnegq_f32(self.0) })
        }
        #[inline(always)]
        unsafe fn round(self) -> Self {
            Neon(unsafe { vrndnq_f32(self.0) })
        }
        #[inline(always)]
        unsafe fn pow2i(self) -> Self {
            unsafe {
                let i = vaddq_s32(vcvtnq_s32_f32(self.0), vdupq_n_s32(127));
                Neon(vreinterpretq_f32_s32(vshlq_n_s32::<23>(i)))
            }
        }
    }
}

// ------------------------------------------------------------------------------ dispatch

/// A kernel written generically over [`Vf32`]; [`dispatch`] runs it on the active path.
pub trait Kernel {
    /// What the kernel returns.
    type Output;
    /// Runs the kernel with vector type `V`.
    ///
    /// # Safety
    /// `V` must be usable on this CPU, and the kernel's own pointer contracts must hold.
    unsafe fn run<V: Vf32>(self) -> Self::Output;
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<K: Kernel>(k: K) -> K::Output {
    unsafe { k.run::<x86::Avx2>() }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::incompatible_msrv)]
unsafe fn run_avx512<K: Kernel>(k: K) -> K::Output {
    unsafe { k.run::<x86::Avx512>() }
}

#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn run_neon<K: Kernel>(k: K) -> K::Output {
    unsafe { k.run::<arm::Neon>() }
}

/// Runs `k` on the active [`path`] (paths are only ever set to ones the CPU supports).
///
/// # Safety
/// The kernel's own pointer contracts must hold.
pub unsafe fn dispatch<K: Kernel>(k: K) -> K::Output {
    match path() {
        #[cfg(target_arch = "x86_64")]
        Path::Avx512 => unsafe { run_avx512(k) },
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => unsafe { run_avx2(k) },
        #[cfg(target_arch = "aarch64")]
        Path::Neon => unsafe { run_neon(k) },
        _ => unsafe { k.run::<f32>() },
    }
}

// ------------------------------------------------------------------------------ math

const LOG2E: f32 = std::f32::consts::LOG2_E;
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
/// `2·√(2/π)` and `2·√(2/π)·0.044715`: gelu = x σ(x (A + B x²)).
const GELU_A: f32 = (2.0 * SQRT_2_OVER_PI) as f32;
const GELU_B: f32 = (2.0 * SQRT_2_OVER_PI * 0.044715) as f32;

/// `e^x` (see the module docs for the method and its accuracy).
///
/// # Safety
/// As every [`Vf32`] method: only inside code running on a path that supports `V`.
#[inline(always)]
pub unsafe fn exp<V: Vf32>(x: V) -> V {
    unsafe {
        let x = x.max(V::splat(-104.0)).min(V::splat(89.0));
        let k = x.mul(V::splat(LOG2E)).round();
        // r = x - k ln2, ln2 = 0.693359375 - 2.12194440e-4 (the first part exact in few bits).
        let r = k.fma(V::splat(-0.693_359_4), x);
        let r = k.fma(V::splat(2.121_944_4e-4), r);
        let mut p = V::splat(1.987_569_1e-4);
        p = p.fma(r, V::splat(1.398_2e-3));
        p = p.fma(r, V::splat(8.333_452e-3));
        p = p.fma(r, V::splat(4.166_579_6e-2));
        p = p.fma(r, V::splat(0.166_666_65));
        p = p.fma(r, V::splat(0.5));
        let y = p.fma(r.mul(r), r.add(V::splat(1.0)));
        // 2^k = 2^k1 · 2^k2 with both factors normal: k1 in [-126, 127], k2 = k - k1 in [-24, 1].
        let k1 = k.max(V::splat(-126.0)).min(V::splat(127.0));
        let k2 = k.sub(k1);
        y.mul(k1.pow2i()).mul(k2.pow2i())
    }
}

/// `1 / (1 + e^-x)`.
///
/// # Safety
/// As every [`Vf32`] method: only inside code running on a path that supports `V`.
#[inline(always)]
pub unsafe fn sigmoid<V: Vf32>(x: V) -> V {
    unsafe { V::splat(1.0).div(V::splat(1.0).add(exp(x.neg()))) }
}

/// `x / (1 + e^-x)`.
///
/// # Safety
/// As every [`Vf32`] method: only inside code running on a path that supports `V`.
#[inline(always)]
pub unsafe fn silu<V: Vf32>(x: V) -> V {
    unsafe { x.div(V::splat(1.0).add(exp(x.neg()))) }
}

/// GELU (tanh approximation) as `x σ(2u)`, `u = √(2/π)(x + 0.044715 x³)`.
///
/// # Safety
/// As every [`Vf32`] method: only inside code running on a path that supports `V`.
#[inline(always)]
pub unsafe fn gelu<V: Vf32>(x: V) -> V {
    unsafe {
        let t = x.mul(x.mul(x).fma(V::splat(GELU_B), V::splat(GELU_A)));
        x.div(V::splat(1.0).add(exp(t.neg())))
    }
}

// ------------------------------------------------------------------------------ maps

/// An f32 elementwise map with a SIMD kernel (the unary ops without one use scalar code).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MapOp {
    /// `-x`
    Neg,
    /// `|x|`
    Abs,
    /// `max(x, 0)` (NaN stays NaN)
    Relu,
    /// `x²`
    Sqr,
    /// `√x`
    Sqrt,
    /// `1/x`
    Recip,
    /// `e^x`
    Exp,
    /// `σ(x)`
    Sigmoid,
    /// `x σ(x)`
    Silu,
    /// GELU, tanh approximation
    Gelu,
    /// `x * mul + add` (one FMA)
    Affine {
        /// factor
        mul: f32,
        /// offset
        add: f32,
    },
    /// `min(max(x, lo), hi)` (NaN stays NaN)
    Clamp {
        /// lower bound
        lo: f32,
        /// upper bound
        hi: f32,
    },
}

impl MapOp {
    #[inline(always)]
    unsafe fn apply<V: Vf32>(self, x: V) -> V {
        unsafe {
            match self {
                MapOp::Neg => x.neg(),
                MapOp::Abs => x.abs(),
                MapOp::Relu => x.max(V::splat(0.0)),
                MapOp::Sqr => x.mul(x),
                MapOp::Sqrt => x.sqrt(),
                MapOp::Recip => V::splat(1.0).div(x),
                MapOp::Exp => exp(x),
                MapOp::Sigmoid => sigmoid(x),
                MapOp::Silu => silu(x),
                MapOp::Gelu => gelu(x),
                MapOp::Affine { mul, add } => x.fma(V::splat(mul), V::splat(add)),
                MapOp::Clamp { lo, hi } => x.max(V::splat(lo)).min(V::splat(hi)),
            }
        }
    }
}

/// `out[i] = op(x[i])` for `n` elements; `out` may equal `x` (in place). No closures here:
/// everything must inline into the `#[target_feature]` caller, so the op is a value that is a
/// constant after inlining.
#[inline(always)]
unsafe fn map_body<V: Vf32, const NT: bool>(op: MapOp, x: *const f32, out: *mut f32, n: usize) {
    let l = V::LANES;
    let mut i = 0;
    unsafe {
        if NT {
            let pro = stream_prologue::<V>(out, n);
            map_part::<V>(op, x, out, pro);
            i = pro;
            while i + 2 * l <= n {
                let a = V::load(x.add(i));
                let b = V::load(x.add(i + l));
                op.apply(a).stream(out.add(i));
                op.apply(b).stream(out.add(i + l));
                i += 2 * l;
            }
            V::fence();
        }
        while i + 2 * l <= n {
            let a = V::load(x.add(i));
            let b = V::load(x.add(i + l));
            op.apply(a).store(out.add(i));
            op.apply(b).store(out.add(i + l));
            i += 2 * l;
        }
        while i + l <= n {
            op.apply(V::load(x.add(i))).store(out.add(i));
            i += l;
        }
        map_part::<V>(op, x.add(i), out.add(i), n - i);
    }
}

/// `m < LANES` elements of [`map_body`] through a padded vector, so that every element, wherever
/// it falls (body, prologue, tail), gets bit-identical results from the same vector code.
#[inline(always)]
unsafe fn map_part<V: Vf32>(op: MapOp, x: *const f32, out: *mut f32, m: usize) {
    if m == 0 {
        return;
    }
    let mut t = [0f32; 16];
    unsafe {
        std::ptr::copy_nonoverlapping(x, t.as_mut_ptr(), m);
        op.apply(V::load(t.as_ptr())).store(t.as_mut_ptr());
        std::ptr::copy_nonoverlapping(t.as_ptr(), out, m);
    }
}

struct MapK {
    op: MapOp,
    x: *const f32,
    out: *mut f32,
    n: usize,
    stream: bool,
}

impl Kernel for MapK {
    type Output = ();
    #[inline(always)]
    unsafe fn run<V: Vf32>(self) {
        let MapK { op, x, out, n, stream } = self;
        // One loop per op (the op is a constant inside each arm, so `apply` folds to its case).
        macro_rules! go {
            ($nt:literal; $($v:ident),*) => {
                match op {
                    $(MapOp::$v => unsafe { map_body::<V, $nt>(MapOp::$v, x, out, n) },)*
                    MapOp::Affine { mul, add } => unsafe {
                        map_body::<V, $nt>(MapOp::Affine { mul, add }, x, out, n)
                    },
                    MapOp::Clamp { lo, hi } => unsafe { map_body::<V, $nt>(MapOp::Clamp { lo, hi }, x, out, n) },
                }
            };
        }
        if stream {
            go!(true; Neg, Abs, Relu, Sqr, Sqrt, Recip, Exp, Sigmoid, Silu, Gelu)
        } else {
            go!(false; Neg, Abs, Relu, Sqr, Sqrt, Recip, Exp, Sigmoid, Silu, Gelu)
        }
    }
}

/// `out[i] = op(x[i])`.
///
/// # Panics
/// If `x` and `out` differ in length (a caller bug, never user input).
pub fn map_f32(op: MapOp, x: &[f32], out: &mut [MaybeUninit<f32>]) {
    assert_eq!(x.len(), out.len(), "simd::map_f32: length mismatch");
    // SAFETY: both pointers are valid for `n` elements; `out` is written before being read.
    unsafe { dispatch(MapK { op, x: x.as_ptr(), out: out.as_mut_ptr().cast(), n: x.len(), stream: false }) }
}

/// [`map_f32`] with non-temporal stores (see [`binary_f32_stream`]). Same results.
///
/// # Panics
/// If `x` and `out` differ in length.
pub fn map_f32_stream(op: MapOp, x: &[f32], out: &mut [MaybeUninit<f32>]) {
    assert_eq!(x.len(), out.len(), "simd::map_f32_stream: length mismatch");
    // SAFETY: as in `map_f32`; streaming stores are aligned by the kernel's prologue.
    unsafe { dispatch(MapK { op, x: x.as_ptr(), out: out.as_mut_ptr().cast(), n: x.len(), stream: true }) }
}

/// `x[i] = op(x[i])` in place.
pub fn map_inplace_f32(op: MapOp, x: &mut [f32]) {
    let p = x.as_mut_ptr();
    // SAFETY: one pointer, valid for `n` elements; each element is read before it is written.
    unsafe { dispatch(MapK { op, x: p, out: p, n: x.len(), stream: false }) }
}

// ------------------------------------------------------------------------------ binary

/// One operand of a binary kernel: a slice, or one value repeated (a broadcast scalar).
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a, T> {
    /// One value per output element.
    Slice(&'a [T]),
    /// The same value for every output element.
    Scalar(T),
}

#[inline(always)]
unsafe fn bin<V: Vf32>(op: BinaryOp, a: V, b: V) -> V {
    unsafe {
        match op {
            BinaryOp::Add => a.add(b),
            BinaryOp::Sub => a.sub(b),
            BinaryOp::Mul => a.mul(b),
            BinaryOp::Div => a.div(b),
            BinaryOp::Maximum => a.max(b),
            BinaryOp::Minimum => a.min(b),
        }
    }
}

/// Where an operand comes from: a pointer advanced with the output, or a fixed value.
#[derive(Clone, Copy)]
enum Src {
    Ptr(*const f32),
    Val(f32),
}

#[inline(always)]
unsafe fn load_src<V: Vf32>(s: Src, i: usize) -> V {
    unsafe {
        match s {
            Src::Ptr(p) => V::load(p.add(i)),
            Src::Val(v) => V::splat(v),
        }
    }
}

/// Scalar elements to process before `out + i` is aligned for [`Vf32::stream`] (capped at `n`).
#[inline(always)]
fn stream_prologue<V: Vf32>(out: *mut f32, n: usize) -> usize {
    let align = V::LANES * 4;
    let mis = (out as usize) % align;
    if mis == 0 || !mis.is_multiple_of(4) {
        // Aligned already, or not even f32-aligned (cannot happen for a `*mut f32`).
        return 0;
    }
    ((align - mis) / 4).min(n)
}

#[inline(always)]
unsafe fn bin_body<V: Vf32, const NT: bool>(op: BinaryOp, a: Src, b: Src, out: *mut f32, n: usize) {
    let l = V::LANES;
    let mut i = 0;
    unsafe {
        if NT {
            let pro = stream_prologue::<V>(out, n);
            bin_part::<V>(op, a, b, 0, out, pro);
            i = pro;
            while i + 2 * l <= n {
                let x0 = bin(op, load_src::<V>(a, i), load_src::<V>(b, i));
                let x1 = bin(op, load_src::<V>(a, i + l), load_src::<V>(b, i + l));
                x0.stream(out.add(i));
                x1.stream(out.add(i + l));
                i += 2 * l;
            }
            V::fence();
        }
        while i + 2 * l <= n {
            let x0 = bin(op, load_src::<V>(a, i), load_src::<V>(b, i));
            let x1 = bin(op, load_src::<V>(a, i + l), load_src::<V>(b, i + l));
            x0.store(out.add(i));
            x1.store(out.add(i + l));
            i += 2 * l;
        }
        while i + l <= n {
            bin(op, load_src::<V>(a, i), load_src::<V>(b, i)).store(out.add(i));
            i += l;
        }
        bin_part::<V>(op, a, b, i, out.add(i), n - i);
    }
}

/// Operand `s` at `i..i + m` (`m < LANES`) as a vector padded with ones.
#[inline(always)]
unsafe fn pad<V: Vf32>(s: Src, i: usize, m: usize) -> V {
    match s {
        Src::Ptr(p) => {
            let mut t = [1f32; 16];
            unsafe {
                std::ptr::copy_nonoverlapping(p.add(i), t.as_mut_ptr(), m);
                V::load(t.as_ptr())
            }
        }
        Src::Val(v) => unsafe { V::splat(v) },
    }
}

/// `m < LANES` elements of [`bin_body`] from index `i`, through padded vectors (see [`map_part`]).
#[inline(always)]
unsafe fn bin_part<V: Vf32>(op: BinaryOp, a: Src, b: Src, i: usize, out: *mut f32, m: usize) {
    if m == 0 {
        return;
    }
    let mut t = [0f32; 16];
    unsafe {
        bin(op, pad::<V>(a, i, m), pad::<V>(b, i, m)).store(t.as_mut_ptr());
        std::ptr::copy_nonoverlapping(t.as_ptr(), out, m);
    }
}

struct BinK {
    op: BinaryOp,
    a: Src,
    b: Src,
    out: *mut f32,
    n: usize,
    stream: bool,
}

impl Kernel for BinK {
    type Output = ();
    #[inline(always)]
    unsafe fn run<V: Vf32>(self) {
        let BinK { op, a, b, out, n, stream } = self;
        // One loop per (op, operand kinds) so the hot loop has no branches.
        macro_rules! by_src {
            ($op:expr) => {
                match (a, b, stream) {
                    (Src::Ptr(pa), Src::Ptr(pb), true) => unsafe {
                        bin_body::<V, true>($op, Src::Ptr(pa), Src::Ptr(pb), out, n)
                    },
                    (Src::Ptr(pa), Src::Ptr(pb), false) => unsafe {
                        bin_body::<V, false>($op, Src::Ptr(pa), Src::Ptr(pb), out, n)
                    },
                    (Src::Ptr(pa), Src::Val(vb), _) => unsafe {
                        bin_body::<V, false>($op, Src::Ptr(pa), Src::Val(vb), out, n)
                    },
                    (Src::Val(va), Src::Ptr(pb), _) => unsafe {
                        bin_body::<V, false>($op, Src::Val(va), Src::Ptr(pb), out, n)
                    },
                    (Src::Val(va), Src::Val(vb), _) => unsafe {
                        bin_body::<V, false>($op, Src::Val(va), Src::Val(vb), out, n)
                    },
                }
            };
        }
        match op {
            BinaryOp::Add => by_src!(BinaryOp::Add),
            BinaryOp::Sub => by_src!(BinaryOp::Sub),
            BinaryOp::Mul => by_src!(BinaryOp::Mul),
            BinaryOp::Div => by_src!(BinaryOp::Div),
            BinaryOp::Maximum => by_src!(BinaryOp::Maximum),
            BinaryOp::Minimum => by_src!(BinaryOp::Minimum),
        }
    }
}

fn src(a: &Arg<'_, f32>, n: usize) -> Src {
    match *a {
        Arg::Slice(s) => {
            assert_eq!(s.len(), n, "simd::binary_f32: length mismatch");
            Src::Ptr(s.as_ptr())
        }
        Arg::Scalar(v) => Src::Val(v),
    }
}

/// `out[i] = a[i] op b[i]`, where either side may be a repeated scalar.
///
/// # Panics
/// If a slice operand's length differs from `out`'s (a caller bug, never user input).
pub fn binary_f32(op: BinaryOp, a: Arg<'_, f32>, b: Arg<'_, f32>, out: &mut [MaybeUninit<f32>]) {
    let n = out.len();
    let (a, b) = (src(&a, n), src(&b, n));
    // SAFETY: slice operands hold `n` elements (checked); `out` holds `n`.
    unsafe { dispatch(BinK { op, a, b, out: out.as_mut_ptr().cast(), n, stream: false }) }
}

/// [`binary_f32`] with non-temporal (streaming) stores when both operands are slices: for
/// outputs far larger than the caches, it saves the read-for-ownership of every output line
/// (an add then moves 12 bytes per element instead of 16). Same results as [`binary_f32`].
pub fn binary_f32_stream(op: BinaryOp, a: Arg<'_, f32>, b: Arg<'_, f32>, out: &mut [MaybeUninit<f32>]) {
    let n = out.len();
    let (a, b) = (src(&a, n), src(&b, n));
    // SAFETY: as in `binary_f32`; streaming stores are aligned by the kernel's prologue.
    unsafe { dispatch(BinK { op, a, b, out: out.as_mut_ptr().cast(), n, stream: true }) }
}

/// Output size from which the elementwise ops write with [`binary_f32_stream`]
/// / [`map_f32_stream`]: well above the last-level cache a core can use.
pub const STREAM_MIN_BYTES: usize = 16 << 20;

/// `acc[i] = acc[i] op b[i]` in place.
///
/// # Panics
/// If `b` is a slice of another length than `acc`.
pub fn binary_assign_f32(op: BinaryOp, acc: &mut [f32], b: Arg<'_, f32>) {
    let n = acc.len();
    let b = src(&b, n);
    let p = acc.as_mut_ptr();
    // SAFETY: `p` valid for `n` reads and writes, each element read before written; `b` holds `n`.
    unsafe { dispatch(BinK { op, a: Src::Ptr(p), b, out: p, n, stream: false }) }
}

struct AxpyK {
    alpha: f32,
    x: *const f32,
    y: *mut f32,
    n: usize,
}

impl Kernel for AxpyK {
    type Output = ();
    #[inline(always)]
    unsafe fn run<V: Vf32>(self) {
        let AxpyK { alpha, x, y, n } = self;
        let l = V::LANES;
        let mut i = 0;
        unsafe {
            let va = V::splat(alpha);
            while i + l <= n {
                V::load(x.add(i)).fma(va, V::load(y.add(i))).store(y.add(i));
                i += l;
            }
            while i < n {
                y.add(i).write(x.add(i).read().fma(alpha, y.add(i).read()));
                i += 1;
            }
        }
    }
}

/// `y[i] += alpha * x[i]` (one FMA per element).
///
/// # Panics
/// If `x` and `y` differ in length.
pub fn axpy_f32(alpha: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "simd::axpy_f32: length mismatch");
    // SAFETY: both valid for `n` elements; `x` and `y` cannot overlap (shared vs exclusive borrow).
    unsafe { dispatch(AxpyK { alpha, x: x.as_ptr(), y: y.as_mut_ptr(), n: x.len() }) }
}

// ------------------------------------------------------------------------------ reductions

/// Block length of the f32 partial sums (see the module docs).
pub const SUM_BLOCK: usize = 128;

#[derive(Clone, Copy)]
enum RowRed {
    Sum,
    Max,
    Min,
}

struct RowK {
    kind: RowRed,
    x: *const f32,
    n: usize,
}

#[inline(always)]
unsafe fn red<W: Vf32>(kind: RowRed, a: W, b: W) -> W {
    unsafe {
        match kind {
            RowRed::Sum => a.add(b),
            RowRed::Max => a.max(b),
            RowRed::Min => a.min(b),
        }
    }
}

/// Folds `n` values with `kind` (4 vector accumulators); `kind` is a constant after inlining.
#[inline(always)]
unsafe fn fold_body<V: Vf32>(kind: RowRed, x: *const f32, n: usize) -> f32 {
    let l = V::LANES;
    let init = match kind {
        RowRed::Sum => 0.0,
        RowRed::Max => f32::NEG_INFINITY,
        RowRed::Min => f32::INFINITY,
    };
    let mut i = 0;
    unsafe {
        let (mut a0, mut a1, mut a2, mut a3) =
            (V::splat(init), V::splat(init), V::splat(init), V::splat(init));
        while i + 4 * l <= n {
            a0 = red(kind, a0, V::load(x.add(i)));
            a1 = red(kind, a1, V::load(x.add(i + l)));
            a2 = red(kind, a2, V::load(x.add(i + 2 * l)));
            a3 = red(kind, a3, V::load(x.add(i + 3 * l)));
            i += 4 * l;
        }
        while i + l <= n {
            a0 = red(kind, a0, V::load(x.add(i)));
            i += l;
        }
        let v = red(kind, red(kind, a0, a1), red(kind, a2, a3));
        let mut r = match kind {
            RowRed::Sum => v.hsum(),
            RowRed::Max => v.hmax(),
            RowRed::Min => v.hmin(),
        };
        while i < n {
            r = red::<f32>(kind, r, x.add(i).read());
            i += 1;
        }
        r
    }
}

impl Kernel for RowK {
    type Output = f64;
    #[inline(always)]
    unsafe fn run<V: Vf32>(self) -> f64 {
        let RowK { kind, x, n } = self;
        unsafe {
            match kind {
                RowRed::Sum => {
                    let mut total = 0f64;
                    let mut s = 0;
                    while s < n {
                        let len = SUM_BLOCK.min(n - s);
                        let part = fold_body::<V>(RowRed::Sum, x.add(s), len);
                        total += part as f64;
                        s += len;
                    }
                    total
                }
                RowRed::Max => fold_body::<V>(RowRed::Max, x, n) as f64,
                RowRed::Min => fold_body::<V>(RowRed::Min, x, n) as f64,
            }
        }
    }
}

/// Sum of `x`, accumulated as described in the module docs (f32 blocks, f64 total).
pub fn sum_f32(x: &[f32]) -> f64 {
    // SAFETY: `x` valid for `n` reads.
    unsafe { dispatch(RowK { kind: RowRed::Sum, x: x.as_ptr(), n: x.len() }) }
}

/// Maximum of `x` (NaN if any element is NaN; `-inf` when empty).
pub fn max_f32(x: &[f32]) -> f32 {
    // SAFETY: `x` valid for `n` reads.
    unsafe { dispatch(RowK { kind: RowRed::Max, x: x.as_ptr(), n: x.len() }) as f32 }
}

/// Minimum of `x` (NaN if any element is NaN; `+inf` when empty).
pub fn min_f32(x: &[f32]) -> f32 {
    // SAFETY: `x` valid for `n` reads.
    unsafe { dispatch(RowK { kind: RowRed::Min, x: x.as_ptr(), n: x.len() }) as f32 }
}

struct ExpSumK {
    x: *const f32,
    shift: f32,
    out: *mut f32,
    n: usize,
}

impl Kernel for ExpSumK {
    type Output = f64;
    #[inline(always)]
    unsafe fn run<V: Vf32>(self) -> f64 {
        let ExpSumK { x, shift, out, n } = self;
        let l = V::LANES;
        let mut total = 0f64;
        let mut s = 0;
        unsafe {
            let vs = V::splat(shift);
            while s < n {
                let end = (s + SUM_BLOCK).min(n);
                let mut i = s;
                let (mut a0, mut a1) = (V::splat(0.0), V::splat(0.0));
                while i + 2 * l <= end {
                    let e0 = exp(V::load(x.add(i)).sub(vs));
                    let e1 = exp(V::load(x.add(i + l)).sub(vs));
                    e0.store(out.add(i));
                    e1.store(out.add(i + l));
                    a0 = a0.add(e0);
                    a1 = a1.add(e1);
                    i += 2 * l;
                }
                while i + l <= end {
                    let e0 = exp(V::load(x.add(i)).sub(vs));
                    e0.store(out.add(i));
                    a0 = a0.add(e0);
                    i += l;
                }
                let mut part = a0.add(a1).hsum();
                if i < end {
                    // The tail through a padded vector (same results as the body).
                    let m = end - i;
                    let mut t = [0f32; 16];
                    std::ptr::copy_nonoverlapping(x.add(i), t.as_mut_ptr(), m);
                    exp(V::load(t.as_ptr()).sub(vs)).store(t.as_mut_ptr());
                    std::ptr::copy_nonoverlapping(t.as_ptr(), out.add(i), m);
                    part += t[..m].iter().sum::<f32>();
                }
                total += part as f64;
                s = end;
            }
        }
        total
    }
}

/// `out[i] = e^(x[i] - shift)`, returning `Σ out[i]` (the softmax inner loop).
///
/// # Panics
/// If `x` and `out` differ in length.
pub fn exp_sub_sum_f32(x: &[f32], shift: f32, out: &mut [MaybeUninit<f32>]) -> f64 {
    assert_eq!(x.len(), out.len(), "simd::exp_sub_sum_f32: length mismatch");
    // SAFETY: both valid for `n` elements.
    unsafe { dispatch(ExpSumK { x: x.as_ptr(), shift, out: out.as_mut_ptr().cast(), n: x.len() }) }
}

/// [`exp_sub_sum_f32`] in place: `x[i] = e^(x[i] - shift)`, returning the sum.
pub fn exp_sub_sum_inplace_f32(x: &mut [f32], shift: f32) -> f64 {
    let p = x.as_mut_ptr();
    // SAFETY: one pointer valid for `n` elements, each read before written.
    unsafe { dispatch(ExpSumK { x: p, shift, out: p, n: x.len() }) }
}

/// Views a fully written `MaybeUninit` slice as initialised.
///
/// # Safety
/// Every element of `s` must have been written.
pub unsafe fn assume_init_mut<T>(s: &mut [MaybeUninit<T>]) -> &mut [T] {
    // SAFETY: `MaybeUninit<T>` has `T`'s layout; the caller guarantees initialisation.
    unsafe { &mut *(s as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// Views an initialised slice as `MaybeUninit` (to pass it where an output buffer is expected).
///
/// Caution: hand the result only to the kernels of this module (they write initialised values
/// only); writing `MaybeUninit::uninit()` through it would leave `s` uninitialised. Prefer the
/// `*_into_f32` variants, which take initialised buffers directly.
pub fn as_uninit_mut<T: Copy>(s: &mut [T]) -> &mut [MaybeUninit<T>] {
    // SAFETY: same layout; see the caution above.
    unsafe { &mut *(s as *mut [T] as *mut [MaybeUninit<T>]) }
}

/// [`map_f32`] into an initialised buffer.
pub fn map_into_f32(op: MapOp, x: &[f32], out: &mut [f32]) {
    map_f32(op, x, as_uninit_mut(out))
}

/// [`binary_f32`] into an initialised buffer.
pub fn binary_into_f32(op: BinaryOp, a: Arg<'_, f32>, b: Arg<'_, f32>, out: &mut [f32]) {
    binary_f32(op, a, b, as_uninit_mut(out))
}

/// [`exp_sub_sum_f32`] into an initialised buffer.
pub fn exp_sub_sum_into_f32(x: &[f32], shift: f32, out: &mut [f32]) -> f64 {
    exp_sub_sum_f32(x, shift, as_uninit_mut(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The path is process-wide: tests that switch it run one at a time.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn lock() -> std::sync::MutexGuard<'static, ()> {
        LOCK.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The streaming variants give the same results as the plain ones for every alignment and
    /// length (prologue, vector body and tail), on every path.
    #[test]
    fn streaming_stores_match_plain() {
        let x: Vec<f32> = (0..300).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let y: Vec<f32> = (0..300).map(|i| 0.5 + (i as f32 * 0.11).cos().abs()).collect();
        let _guard = lock();
        let prev = path();
        for p in available_paths() {
            set_path(p).unwrap();
            for off in 0..5 {
                for len in [0, 1, 7, 8, 15, 16, 17, 33, 64, 100, 250] {
                    let (a, b) = (&x[off..off + len], &y[off..off + len]);
                    let mut buf = vec![MaybeUninit::new(0f32); 300];
                    let mut want = vec![MaybeUninit::new(0f32); len];
                    for op in BinaryOp::ALL {
                        binary_f32(op, Arg::Slice(a), Arg::Slice(b), &mut want);
                        let out = &mut buf[off..off + len];
                        binary_f32_stream(op, Arg::Slice(a), Arg::Slice(b), out);
                        let (g, w) =
                            unsafe { (assume_init_mut(out).to_vec(), assume_init_mut(&mut want).to_vec()) };
                        assert_eq!(g, w, "{} {:?} off {off} len {len}", p.name(), op);
                    }
                    for op in [MapOp::Exp, MapOp::Silu, MapOp::Affine { mul: 2.0, add: -1.0 }] {
                        map_f32(op, a, &mut want);
                        let out = &mut buf[off..off + len];
                        map_f32_stream(op, a, out);
                        let (g, w) =
                            unsafe { (assume_init_mut(out).to_vec(), assume_init_mut(&mut want).to_vec()) };
                        assert_eq!(g, w, "{} {:?} off {off} len {len}", p.name(), op);
                    }
                }
            }
        }
        set_path(prev).unwrap();
    }

    #[test]
    fn axpy_and_reductions_every_path() {
        let x: Vec<f32> = (0..203).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let _guard = lock();
        let prev = path();
        for p in available_paths() {
            set_path(p).unwrap();
            for len in [0, 1, 9, 31, 203] {
                let mut y: Vec<f32> = (0..len).map(|i| i as f32 * 0.5).collect();
                axpy_f32(-1.5, &x[..len], &mut y);
                for (i, &v) in y.iter().enumerate() {
                    let want = i as f64 * 0.5 - 1.5 * x[i] as f64;
                    assert!((v as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "{} axpy {i}", p.name());
                }
                let s = sum_f32(&x[..len]);
                let want: f64 = x[..len].iter().map(|&v| v as f64).sum();
                assert!((s - want).abs() <= 1e-5, "{} sum {len}: {s} vs {want}", p.name());
                let fold = |f: fn(f32, f32) -> f32, init| x[..len].iter().fold(init, |a, &b| f(a, b));
                assert_eq!(max_f32(&x[..len]), fold(f32::max, f32::NEG_INFINITY), "{} max", p.name());
                assert_eq!(min_f32(&x[..len]), fold(f32::min, f32::INFINITY), "{} min", p.name());
            }
        }
        set_path(prev).unwrap();
    }

    #[test]
    fn exp_ulp_every_path() {
        let mut xs: Vec<f32> = (-2400..=2029).map(|i| i as f32 * 0.0437).collect();
        xs.extend([88.7, 88.72, -87.3, -100.0, -103.0, 0.0, -0.0, 1e-8, -1e-8]);
        let _guard = lock();
        let prev = path();
        for p in available_paths() {
            set_path(p).unwrap();
            let mut out = vec![MaybeUninit::new(0f32); xs.len()];
            map_f32(MapOp::Exp, &xs, &mut out);
            for (&x, o) in xs.iter().zip(&out) {
                let got = unsafe { o.assume_init() } as f64;
                let want = (x as f64).exp();
                // One ulp of the f32 result (the subnormal spacing below the normal range).
                let w = (want as f32).max(f32::MIN_POSITIVE);
                let ulp = (f32::from_bits(w.to_bits() + 1) - w) as f64;
                assert!((got - want).abs() <= 2.0 * ulp, "{} x={x}: {got} vs {want}", p.name());
            }
            let mut special =
                [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 89.0, -110.0].map(MaybeUninit::new);
            let inp = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 89.0, -110.0];
            map_f32(MapOp::Exp, &inp, &mut special);
            let s = special.map(|v| unsafe { v.assume_init() });
            assert!(s[0].is_nan() && s[1] == f32::INFINITY && s[2] == 0.0, "{} {s:?}", p.name());
            assert!(s[3] == f32::INFINITY && s[4] == 0.0, "{} {s:?}", p.name());
        }
        set_path(prev).unwrap();
    }
}
