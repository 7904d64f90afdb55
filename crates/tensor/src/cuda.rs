//! CUDA storage and devices (the `cuda` feature), through cudarc with dynamic loading.
//!
//! Building needs no CUDA library: `libcuda` is `dlopen`ed on first use. [`CudaDevice::new`]
//! checks that the driver library is present first and turns its absence (or a missing GPU) into
//! an [`Error::Cuda`] rather than the panic cudarc would raise.
//!
//! One [`CudaDevice`] exists per GPU ordinal (later `new` calls return the same handle): it holds
//! the primary context and ONE stream on which every copy, kernel and cuBLAS call of that device
//! is queued, so work on a device is ordered by construction. Because of that single stream,
//! cudarc's per-buffer event tracking (meant for multi-stream use) is turned off: code that adds
//! another stream must synchronise it with [`CudaDevice::stream`] itself.
//!
//! bf16 and f16 buffers are held as `u16` on the device (the same bits), so that no extra cudarc
//! feature is needed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use half::{bf16, f16};

use crate::{CpuStorage, DType, Error, Result};

/// Turns a cudarc error into [`Error::Cuda`] naming the call that failed.
pub fn cuda_err(call: &str, e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("{call} failed: {e:?}"))
}

/// Whether the CUDA driver library (`libcuda.so`) can be loaded. Never panics.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// A CUDA GPU: its primary context and the stream moeba queues all of its work on.
/// Cheap to clone (two `Arc`s).
#[derive(Clone)]
pub struct CudaDevice {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaDevice({})", self.ordinal)
    }
}

fn devices() -> &'static Mutex<HashMap<usize, CudaDevice>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, CudaDevice>>> = OnceLock::new();
    DEVICES.get_or_init(|| Mutex::new(HashMap::new()))
}

impl CudaDevice {
    /// Opens GPU `ordinal` (or returns the handle opened before). Errors, never panics, when the
    /// driver library is missing, no GPU is present, or `ordinal` is out of range.
    pub fn new(ordinal: usize) -> Result<CudaDevice> {
        let mut map =
            devices().lock().map_err(|_| Error::Cuda("CudaDevice::new: device table poisoned".into()))?;
        if let Some(d) = map.get(&ordinal) {
            return Ok(d.clone());
        }
        if !driver_present() {
            return Err(Error::Cuda(
                "no CUDA driver: libcuda.so could not be loaded; HINT: install the NVIDIA driver \
                 (or run on a machine with a GPU), or use Device::Cpu"
                    .into(),
            ));
        }
        let count = CudaContext::device_count().map_err(|e| cuda_err("cuDeviceGetCount", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::Cuda(format!(
                "CudaDevice::new: no CUDA device with ordinal {ordinal} ({count} device(s) found)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err("cuDevicePrimaryCtxRetain", e))?;
        // SAFETY: moeba queues every operation of this device on the one stream created below,
        // so buffers need no cross-stream events (see the module docs).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| cuda_err("cuStreamCreate", e))?;
        let dev = CudaDevice { ordinal, ctx, stream };
        map.insert(ordinal, dev.clone());
        Ok(dev)
    }

    /// The GPU's ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The cudarc context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every operation on this device is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits until all queued work on this device has finished (and reports its errors).
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| cuda_err("cuStreamSynchronize", e))
    }

    /// The device's name (e.g. "NVIDIA H100 80GB HBM3").
    pub fn name(&self) -> Result<String> {
        self.ctx.name().map_err(|e| cuda_err("cuDeviceGetName", e))
    }

    /// The compute capability `(major, minor)`.
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        self.ctx.compute_capability().map_err(|e| cuda_err("cuDeviceGetAttribute(compute capability)", e))
    }

    /// An uninitialised buffer of `len` elements of `dtype` (at least one: the driver refuses
    /// empty allocations). Every element must be written before it is read (kernels allocate
    /// their outputs with this).
    pub fn alloc(&self, len: usize, dtype: DType) -> Result<CudaStorage> {
        // SAFETY: the buffer is uninitialised; callers write it before reading (documented).
        unsafe {
            Ok(match dtype {
                DType::F32 => CudaStorage::F32(self.raw_alloc(len)?),
                DType::F64 => CudaStorage::F64(self.raw_alloc(len)?),
                DType::BF16 => CudaStorage::BF16(self.raw_alloc(len)?),
                DType::F16 => CudaStorage::F16(self.raw_alloc(len)?),
                DType::I64 => CudaStorage::I64(self.raw_alloc(len)?),
                DType::U32 => CudaStorage::U32(self.raw_alloc(len)?),
            })
        }
    }

    /// Allocates `max(len, 1)` elements: a zero-byte allocation is an error for the driver, so an
    /// empty buffer holds one unused element.
    unsafe fn raw_alloc<T: cudarc::driver::DeviceRepr>(&self, len: usize) -> Result<CudaSlice<T>> {
        // SAFETY: forwarded to the caller.
        unsafe { self.stream.alloc::<T>(len.max(1)) }.map_err(|e| cuda_err("cuMemAllocAsync", e))
    }

    /// Makes this device's context current on the calling thread (raw driver calls need it).
    pub fn bind_to_thread(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| cuda_err("cuCtxSetCurrent", e))
    }

    /// Sets every byte of `s` to `byte` (queued on the stream).
    pub fn memset_bytes(&self, s: &CudaStorage, byte: u8) -> Result<()> {
        let n = s.len() * s.dtype().size_in_bytes();
        if n == 0 {
            return Ok(());
        }
        self.bind_to_thread()?;
        let ptr = s.device_ptr();
        // SAFETY: `ptr` points at `n` bytes owned by `s`, which outlives the queued memset
        // (frees are queued on the same stream).
        unsafe { cudarc::driver::result::memset_d8_async(ptr, byte, n, self.stream.cu_stream()) }
            .map_err(|e| cuda_err("cuMemsetD8Async", e))
    }

    /// `len` elements of `dtype`, all equal to `value` (converted like [`CpuStorage::full`]).
    pub fn full(&self, value: f64, len: usize, dtype: DType) -> Result<CudaStorage> {
        let host = CpuStorage::full(value, len.min(1), dtype);
        let s = self.alloc(len, dtype)?;
        if len == 0 {
            return Ok(s);
        }
        let bytes = host.as_bytes();
        self.bind_to_thread()?;
        let stream = self.stream.cu_stream();
        let ptr = s.device_ptr();
        // SAFETY: `ptr` holds `len` elements of the dtype's size; the memsets are queued on the
        // device's stream, before any use of `s`.
        let r = unsafe {
            if bytes.iter().all(|&b| b == bytes[0]) {
                cudarc::driver::result::memset_d8_async(ptr, bytes[0], len * bytes.len(), stream)
            } else if bytes.len() == 4 {
                let v = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                cudarc::driver::sys::cuMemsetD32Async(ptr, v, len, stream).result()
            } else if bytes.len() == 2 {
                let v = u16::from_le_bytes([bytes[0], bytes[1]]);
                cudarc::driver::sys::cuMemsetD16Async(ptr, v, len, stream).result()
            } else {
                // 8-byte values with distinct bytes: copy from the host.
                return self.htod(&CpuStorage::full(value, len, dtype));
            }
        };
        r.map_err(|e| cuda_err("cuMemsetAsync", e))?;
        Ok(s)
    }

    /// Copies host storage to a new device buffer.
    pub fn htod(&self, host: &CpuStorage) -> Result<CudaStorage> {
        if host.is_empty() {
            return self.alloc(0, host.dtype());
        }
        fn up<T: cudarc::driver::DeviceRepr>(s: &Arc<CudaStream>, v: &[T]) -> Result<CudaSlice<T>> {
            s.clone_htod(v).map_err(|e| cuda_err("cuMemcpyHtoDAsync", e))
        }
        let s = &self.stream;
        Ok(match host {
            CpuStorage::F32(v) => CudaStorage::F32(up(s, v)?),
            CpuStorage::F64(v) => CudaStorage::F64(up(s, v)?),
            CpuStorage::BF16(v) => CudaStorage::BF16(up(s, bytemuck::cast_slice::<bf16, u16>(v))?),
            CpuStorage::F16(v) => CudaStorage::F16(up(s, bytemuck::cast_slice::<f16, u16>(v))?),
            CpuStorage::I64(v) => CudaStorage::I64(up(s, v)?),
            CpuStorage::U32(v) => CudaStorage::U32(up(s, v)?),
        })
    }
}

/// A device buffer, typed by its dtype. bf16 and f16 hold their bits as `u16`.
#[derive(Debug)]
pub enum CudaStorage {
    /// f32 elements.
    F32(CudaSlice<f32>),
    /// f64 elements.
    F64(CudaSlice<f64>),
    /// bf16 elements (their bits).
    BF16(CudaSlice<u16>),
    /// f16 elements (their bits).
    F16(CudaSlice<u16>),
    /// i64 elements.
    I64(CudaSlice<i64>),
    /// u32 elements.
    U32(CudaSlice<u32>),
}

impl CudaStorage {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            CudaStorage::F32(_) => DType::F32,
            CudaStorage::F64(_) => DType::F64,
            CudaStorage::BF16(_) => DType::BF16,
            CudaStorage::F16(_) => DType::F16,
            CudaStorage::I64(_) => DType::I64,
            CudaStorage::U32(_) => DType::U32,
        }
    }

    /// Number of elements held (1 for a buffer allocated empty, see [`CudaDevice::alloc`]).
    pub fn len(&self) -> usize {
        match self {
            CudaStorage::F32(s) => s.len(),
            CudaStorage::F64(s) => s.len(),
            CudaStorage::BF16(s) | CudaStorage::F16(s) => s.len(),
            CudaStorage::I64(s) => s.len(),
            CudaStorage::U32(s) => s.len(),
        }
    }

    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The buffer's device address (of element 0). For kernel arguments: add
    /// `offset * dtype.size_in_bytes()` for a view's first element.
    pub fn device_ptr(&self) -> u64 {
        fn p<T>(s: &CudaSlice<T>) -> u64 {
            let (ptr, _sync) = s.device_ptr(s.stream());
            ptr
        }
        match self {
            CudaStorage::F32(s) => p(s),
            CudaStorage::F64(s) => p(s),
            CudaStorage::BF16(s) | CudaStorage::F16(s) => p(s),
            CudaStorage::I64(s) => p(s),
            CudaStorage::U32(s) => p(s),
        }
    }

    /// Copies the whole buffer to the host (waits for the queued work that writes it).
    pub fn dtoh(&self) -> Result<CpuStorage> {
        fn down<T: cudarc::driver::DeviceRepr>(s: &CudaSlice<T>) -> Result<Vec<T>> {
            s.stream().clone_dtoh(s).map_err(|e| cuda_err("cuMemcpyDtoHAsync", e))
        }
        fn halves<T: bytemuck::Pod>(v: Vec<u16>) -> Vec<T> {
            bytemuck::allocation::cast_vec(v)
        }
        let out = match self {
            CudaStorage::F32(s) => CpuStorage::F32(down(s)?),
            CudaStorage::F64(s) => CpuStorage::F64(down(s)?),
            CudaStorage::BF16(s) => CpuStorage::BF16(halves(down(s)?)),
            CudaStorage::F16(s) => CpuStorage::F16(halves(down(s)?)),
            CudaStorage::I64(s) => CpuStorage::I64(down(s)?),
            CudaStorage::U32(s) => CpuStorage::U32(down(s)?),
        };
        // A dtoh copy into pageable memory returns once done; also surface earlier kernel errors.
        self.stream().synchronize().map_err(|e| cuda_err("cuStreamSynchronize", e))?;
        Ok(out)
    }

    fn stream(&self) -> &Arc<CudaStream> {
        match self {
            CudaStorage::F32(s) => s.stream(),
            CudaStorage::F64(s) => s.stream(),
            CudaStorage::BF16(s) | CudaStorage::F16(s) => s.stream(),
            CudaStorage::I64(s) => s.stream(),
            CudaStorage::U32(s) => s.stream(),
        }
    }
}
