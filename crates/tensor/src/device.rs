//! [`Device`]: where a tensor's storage lives.

/// Where a tensor lives and where its ops run.
#[derive(Clone, Debug, Default)]
pub enum Device {
    /// Host memory; ops run on the CPU (rayon, SIMD picked at run time).
    #[default]
    Cpu,
    /// A CUDA GPU (with the `cuda` feature): its context and the stream ops are queued on.
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaDevice),
}

impl Device {
    /// Whether this is the CPU.
    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }

    /// Whether this is a CUDA device.
    pub fn is_cuda(&self) -> bool {
        !self.is_cpu()
    }

    /// Whether two handles name the same device (same kind and ordinal).
    pub fn same_device(&self, other: &Device) -> bool {
        match (self, other) {
            (Device::Cpu, Device::Cpu) => true,
            #[cfg(feature = "cuda")]
            (Device::Cuda(a), Device::Cuda(b)) => a.ordinal() == b.ordinal(),
            #[cfg(feature = "cuda")]
            _ => false,
        }
    }

    /// The CUDA device with this ordinal. Errors clearly when the build has no `cuda` feature,
    /// when no driver is installed, or when there is no such GPU.
    pub fn cuda(ordinal: usize) -> crate::Result<Device> {
        #[cfg(feature = "cuda")]
        {
            crate::cuda::CudaDevice::new(ordinal).map(Device::Cuda)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = ordinal;
            Err(crate::Error::Unsupported {
                op: "Device::cuda",
                msg: "moeba was built without CUDA; HINT: rebuild with `--features cuda`".into(),
            })
        }
    }

    /// CUDA device 0 if one can be opened, else the CPU.
    pub fn cuda_if_available() -> Device {
        Device::cuda(0).unwrap_or(Device::Cpu)
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => write!(f, "cuda:{}", d.ordinal()),
        }
    }
}
