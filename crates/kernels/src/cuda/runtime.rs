//! The embedded fatbin, the per-device cache of its loaded module, kernel handles and cuBLAS
//! handle, and the helpers every launcher uses (operand pointers, output allocation, dim
//! coalescing, launch configuration).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{sys, CudaFunction, CudaModule, LaunchConfig};
use moeba_tensor::cuda::{cuda_err, CudaDevice, CudaStorage};
use moeba_tensor::{DType, Device, Error, Layout, Result, Shape, Storage, Tensor};

use super::ffi::MOEBA_MAX_DIMS;

/// Every kernel of `kernels/*.cu`, compiled by moeba-build into one fatbin for the architectures
/// in `MOEBA_CUDA_ARCHS`.
pub static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/moeba_kernels.fatbin"));

/// The magic number at the start of a fatbin (little-endian `0xBA55ED50`).
pub const FATBIN_MAGIC: u32 = 0xBA55_ED50;

/// Checks that `bytes` starts with the fatbin magic.
pub fn check_fatbin(bytes: &[u8]) -> Result<()> {
    let magic = bytes.get(..4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    if magic != Some(FATBIN_MAGIC) {
        return Err(Error::Cuda(format!(
            "the embedded kernels are not a fatbin (magic {magic:08x?}, expected {FATBIN_MAGIC:08x}); \
             HINT: rebuild moeba-kernels with `--features cuda`"
        )));
    }
    Ok(())
}

/// What moeba keeps per GPU: the loaded module, the kernels looked up so far, the SM count and a
/// cuBLAS handle bound to the device's stream (created on first matmul).
pub struct DeviceKernels {
    device: CudaDevice,
    module: Arc<CudaModule>,
    funcs: Mutex<HashMap<String, CudaFunction>>,
    sm_count: u32,
    blas: Mutex<Option<Arc<CudaBlas>>>,
}

fn cache() -> &'static Mutex<HashMap<usize, Arc<DeviceKernels>>> {
    static CACHE: OnceLock<Mutex<HashMap<usize, Arc<DeviceKernels>>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The kernels of `dev`, loading the fatbin into its context on first use.
pub fn kernels(dev: &CudaDevice) -> Result<Arc<DeviceKernels>> {
    let mut map = cache().lock().map_err(|_| Error::Cuda("kernel cache poisoned".into()))?;
    if let Some(k) = map.get(&dev.ordinal()) {
        return Ok(k.clone());
    }
    check_fatbin(FATBIN)?;
    let module =
        dev.context().load_module(cudarc::nvrtc::Ptx::from_binary(FATBIN.to_vec())).map_err(|e| {
            cuda_err(
                "cuModuleLoadData (moeba kernels fatbin; HINT: a GPU newer than the built \
                 architectures needs MOEBA_CUDA_ARCHS to include its sm_XY or a compute_XY PTX)",
                e,
            )
        })?;
    let sm_count = dev
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| cuda_err("cuDeviceGetAttribute(MULTIPROCESSOR_COUNT)", e))?
        .max(1) as u32;
    let k = Arc::new(DeviceKernels {
        device: dev.clone(),
        module,
        funcs: Mutex::new(HashMap::new()),
        sm_count,
        blas: Mutex::new(None),
    });
    map.insert(dev.ordinal(), k.clone());
    Ok(k)
}

impl DeviceKernels {
    /// The kernel called `name` (looked up once, then cached).
    pub fn func(&self, name: &str) -> Result<CudaFunction> {
        let mut funcs = self.funcs.lock().map_err(|_| Error::Cuda("kernel table poisoned".into()))?;
        if let Some(f) = funcs.get(name) {
            return Ok(f.clone());
        }
        let f = self
            .module
            .load_function(name)
            .map_err(|e| cuda_err(&format!("cuModuleGetFunction({name})"), e))?;
        funcs.insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// Which code the driver picked for kernel `name`: the `major * 10 + minor` of the SASS it
    /// runs (90 = the sm_90a SASS on an H100), or of the PTX it JIT-compiled.
    pub fn binary_version(&self, name: &str) -> Result<i32> {
        self.func(name)?
            .get_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_BINARY_VERSION)
            .map_err(|e| cuda_err(&format!("cuFuncGetAttribute({name}, BINARY_VERSION)"), e))
    }

    /// The number of streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// The device these kernels are loaded on.
    pub fn device(&self) -> &CudaDevice {
        &self.device
    }

    /// The cuBLAS handle of this device (bound to its stream), created on first use. Errors
    /// clearly when libcublas cannot be loaded.
    pub fn blas(&self) -> Result<Arc<CudaBlas>> {
        let mut b = self.blas.lock().map_err(|_| Error::Cuda("cuBLAS handle poisoned".into()))?;
        if let Some(h) = b.as_ref() {
            return Ok(h.clone());
        }
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::Cuda(
                "matmul needs cuBLAS, and libcublas.so could not be loaded; HINT: install the CUDA \
                 runtime libraries (e.g. `pip install nvidia-cublas`) and put them on LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let h =
            Arc::new(CudaBlas::new(self.device.stream().clone()).map_err(|e| cuda_err("cublasCreate", e))?);
        *b = Some(h.clone());
        Ok(h)
    }

    /// A 1-d launch of `threads`-thread blocks covering `work` items with a grid-stride loop:
    /// at most `blocks_per_sm` blocks per SM (enough to fill the GPU, few enough to amortise).
    pub fn grid_1d(&self, work: usize, threads: u32, blocks_per_sm: u32) -> LaunchConfig {
        let want = work.div_ceil(threads as usize).max(1);
        let cap = (self.sm_count * blocks_per_sm).max(1) as usize;
        LaunchConfig {
            grid_dim: (want.min(cap) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// The CUDA storage and device of a tensor, or an error naming `op`.
pub fn parts<'a>(op: &'static str, t: &'a Tensor) -> Result<(&'a CudaStorage, &'a CudaDevice)> {
    match (t.storage(), t.device()) {
        (Storage::Cuda(s), Device::Cuda(d)) => Ok((s, d)),
        _ => Err(Error::DeviceMismatch { op, lhs: "cuda".into(), rhs: t.device().to_string() }),
    }
}

/// The device address of a tensor's first logical element (storage base + layout offset).
pub fn ptr(t: &Tensor) -> Result<u64> {
    let (s, _) = parts("ptr", t)?;
    Ok(s.device_ptr() + (t.layout().offset() * t.dtype().size_in_bytes()) as u64)
}

/// Whether freshly allocated outputs are filled with 0xFF bytes (NaN for floats, all-ones for
/// integers) before the kernel writes them: in debug builds, or with `MOEBA_CUDA_POISON=1`. A
/// kernel that misses an element then shows up in the tests.
pub fn poison_outputs() -> bool {
    static POISON: OnceLock<bool> = OnceLock::new();
    *POISON.get_or_init(|| {
        cfg!(debug_assertions) || std::env::var("MOEBA_CUDA_POISON").is_ok_and(|v| v != "0" && !v.is_empty())
    })
}

/// A new contiguous output tensor of `shape` on `dev` (poisoned, see [`poison_outputs`]).
pub fn alloc_out(dev: &CudaDevice, shape: impl Into<Shape>, dtype: DType) -> Result<Tensor> {
    let shape = shape.into();
    let s = dev.alloc(shape.elem_count(), dtype)?;
    if poison_outputs() {
        dev.memset_bytes(&s, 0xFF)?;
    }
    Tensor::from_storage(Storage::Cuda(s), Layout::contiguous(shape), Device::Cuda(dev.clone()))
}

/// Element counts from which strided operands are made contiguous before an elementwise kernel
/// runs: those kernels compute strided offsets with 32-bit index math.
pub const WIDE: usize = 1 << 31;

/// `t` as is when it is contiguous or smaller than [`WIDE`], else a contiguous copy (the copy
/// kernel has a 64-bit path).
pub fn narrow_index(t: &Tensor) -> Result<Tensor> {
    if t.elem_count() >= WIDE && !t.is_contiguous() {
        super::copy::contiguous(t)
    } else {
        Ok(t.clone())
    }
}

/// The kernel-name suffix of a float dtype (`f32`, `f64`, `bf16`, `f16`).
pub fn float_suffix(op: &'static str, dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::F64 => Ok("f64"),
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        d => Err(Error::UnsupportedDType { op, dtype: d, hint: "; expected f32, f64, bf16 or f16".into() }),
    }
}

/// An iteration space after merging dims: `dims`, and per operand its strides over them.
#[derive(Debug, Clone, PartialEq)]
pub struct Coalesced {
    /// Sizes, outermost first (size-1 dims dropped, mergeable neighbours merged).
    pub dims: Vec<usize>,
    /// One stride vector per operand, each as long as `dims`.
    pub strides: Vec<Vec<usize>>,
}

/// Merges the dims of `dims` that every operand walks alike (`stride[d] == stride[d+1] *
/// dims[d+1]` for all operands) and drops size-1 dims; the element order is unchanged.
pub fn coalesce(dims: &[usize], strides: &[&[usize]]) -> Coalesced {
    let mut out_dims: Vec<usize> = Vec::new();
    let mut out_strides: Vec<Vec<usize>> = vec![Vec::new(); strides.len()];
    for d in 0..dims.len() {
        if dims[d] == 1 {
            continue;
        }
        let mergeable = !out_dims.is_empty()
            && strides.iter().zip(&out_strides).all(|(s, o)| *o.last().unwrap_or(&0) == s[d] * dims[d]);
        if mergeable {
            let last = out_dims.len() - 1;
            out_dims[last] *= dims[d];
            for (s, o) in strides.iter().zip(out_strides.iter_mut()) {
                o[last] = s[d];
            }
        } else {
            out_dims.push(dims[d]);
            for (s, o) in strides.iter().zip(out_strides.iter_mut()) {
                o.push(s[d]);
            }
        }
    }
    Coalesced { dims: out_dims, strides: out_strides }
}

/// Copies `v` into a fixed array of `MOEBA_MAX_DIMS` i64 (the rest zero), or errors naming `op`
/// when there are too many dims.
pub fn fixed(op: &'static str, shape: &Shape, v: &[usize]) -> Result<[i64; MOEBA_MAX_DIMS as usize]> {
    let mut a = [0i64; MOEBA_MAX_DIMS as usize];
    if v.len() > a.len() {
        return Err(Error::bad_shape(
            op,
            shape,
            format!(
                "this strided layout needs {} dims after merging, the CUDA kernels take at most {}; \
                 HINT: make the tensor contiguous first",
                v.len(),
                MOEBA_MAX_DIMS
            ),
        ));
    }
    for (a, &x) in a.iter_mut().zip(v) {
        *a = x as i64;
    }
    Ok(a)
}

/// Launches `name` with `args` pushed in order, turning a failure into an error naming it.
macro_rules! launch {
    ($k:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        use cudarc::driver::PushKernelArg as _;
        let name: &str = $name;
        let f = $k.func(name)?;
        let stream = $k.device().stream().clone();
        let mut b = stream.launch_builder(&f);
        $( b.arg($arg); )+
        // SAFETY: the argument list matches the kernel's signature in kernels/*.cu (parameter
        // struct by value, then device pointers as u64), and every pointer refers to a live
        // buffer of the right size whose free is queued after this launch on the same stream.
        unsafe { b.launch($cfg) }
            .map(|_| ())
            .map_err(|e| moeba_tensor::cuda::cuda_err(&format!("cuLaunchKernel({name})"), e))
    }};
}
pub(crate) use launch;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalescing() {
        // Contiguous (2, 3, 4): one dim.
        let c = coalesce(&[2, 3, 4], &[&[12, 4, 1]]);
        assert_eq!(c.dims, vec![24]);
        assert_eq!(c.strides, vec![vec![1]]);
        // A transposed operand blocks merging of the dims it reorders.
        let c = coalesce(&[2, 3, 4], &[&[12, 4, 1], &[1, 2, 6]]);
        assert_eq!(c.dims, vec![2, 3, 4]);
        // Dims that both operands walk alike merge even when one of them has gaps.
        let c = coalesce(&[2, 3, 4], &[&[12, 4, 1], &[1, 8, 2]]);
        assert_eq!(c.dims, vec![2, 12]);
        assert_eq!(c.strides[1], vec![1, 2]);
        // A broadcast operand (stride 0 on the middle dim) keeps its dims apart.
        let c = coalesce(&[5, 3, 4], &[&[12, 4, 1], &[4, 0, 1]]);
        assert_eq!(c.dims, vec![5, 3, 4]);
        assert_eq!(c.strides[1], vec![4, 0, 1]);
        let c = coalesce(&[1, 1], &[&[7, 3]]);
        assert!(c.dims.is_empty());
    }

    #[test]
    fn magic() {
        assert!(check_fatbin(&[0x50, 0xED, 0x55, 0xBA, 0]).is_ok());
        assert!(check_fatbin(b"\x7fELF").is_err());
        assert!(check_fatbin(&[]).is_err());
        check_fatbin(FATBIN).unwrap();
    }
}
