//! The CUDA side of `cargo xtask bench` (the `cuda` feature): opening device 0, waiting for it,
//! its name, and its ceiling, the device-to-device copy bandwidth.
//!
//! Kernels are timed with a synchronised wall clock over samples of many calls (see
//! [`super::timing`]); the copy ceiling with CUDA events around repeated `cuMemcpyDtoD` of one
//! large buffer. Variants run through `moeba_kernels::ops`, which dispatch on the inputs' device;
//! outputs are validated against the same host reference as on the CPU.

use anyhow::{bail, Context, Result};
use cudarc::driver::sys::CUevent_flags;
use moeba_tensor::cuda::CudaDevice;
use moeba_tensor::Device;

/// CUDA device 0, or an error saying why it cannot be opened.
pub fn open() -> Result<Device> {
    Device::cuda(0).context("--device cuda: cannot open CUDA device 0")
}

fn cuda(device: &Device) -> Result<&CudaDevice> {
    match device {
        Device::Cuda(d) => Ok(d),
        Device::Cpu => bail!("expected a CUDA device, got the CPU"),
    }
}

/// Waits for all work queued on `device`.
pub fn sync(device: &Device) -> Result<()> {
    Ok(cuda(device)?.synchronize()?)
}

/// The GPU's name and compute capability, e.g. `NVIDIA H100 80GB HBM3 (sm_90)`.
pub fn describe(device: &Device) -> String {
    let Ok(d) = cuda(device) else { return device.to_string() };
    let name = d.name().unwrap_or_else(|e| format!("unknown GPU ({e})"));
    match d.compute_capability() {
        Ok((major, minor)) => format!("{name} (sm_{major}{minor})"),
        Err(_) => name,
    }
}

/// Device copy bandwidth in GB/s (bytes read + written per second): `cuMemcpyDtoD` of a
/// `bytes`-byte buffer, timed with CUDA events over 10 copies after a warm-up, best of 3.
pub fn copy_bandwidth(device: &Device, bytes: usize) -> Result<f64> {
    let d = cuda(device)?;
    let stream = d.stream();
    let n = (bytes / 4).max(1);
    let src =
        stream.alloc_zeros::<u32>(n).map_err(|e| anyhow::anyhow!("cuMemAlloc of {bytes} bytes: {e:?}"))?;
    let mut dst =
        stream.alloc_zeros::<u32>(n).map_err(|e| anyhow::anyhow!("cuMemAlloc of {bytes} bytes: {e:?}"))?;
    let copy = |dst: &mut cudarc::driver::CudaSlice<u32>| {
        stream.memcpy_dtod(&src, dst).map_err(|e| anyhow::anyhow!("cuMemcpyDtoD: {e:?}"))
    };
    copy(&mut dst)?;
    d.synchronize()?;
    const COPIES: usize = 10;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let event = || {
            stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| anyhow::anyhow!("cuEventRecord: {e:?}"))
        };
        let start = event()?;
        for _ in 0..COPIES {
            copy(&mut dst)?;
        }
        let end = event()?;
        let ms = start.elapsed_ms(&end).map_err(|e| anyhow::anyhow!("cuEventElapsedTime: {e:?}"))?;
        best = best.min(f64::from(ms) / 1e3 / COPIES as f64);
    }
    if !best.is_finite() || best <= 0.0 {
        bail!("device copy took no measurable time");
    }
    Ok((2 * n * 4) as f64 / best / 1e9)
}
