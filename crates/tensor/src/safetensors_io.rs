//! Reading and writing safetensors payloads (bytes in memory; files are the trainer's business).
//! Used for checkpoints and to read the test fixtures in every crate.

use std::collections::HashMap;

use crate::{DType, Device, Error, Result, Tensor};
use safetensors::tensor::{Dtype as StDtype, TensorView};

fn to_st(dtype: DType) -> StDtype {
    match dtype {
        DType::F32 => StDtype::F32,
        DType::F64 => StDtype::F64,
        DType::BF16 => StDtype::BF16,
        DType::F16 => StDtype::F16,
        DType::I64 => StDtype::I64,
        DType::U32 => StDtype::U32,
    }
}

fn from_st(name: &str, dtype: StDtype) -> Result<DType> {
    Ok(match dtype {
        StDtype::F32 => DType::F32,
        StDtype::F64 => DType::F64,
        StDtype::BF16 => DType::BF16,
        StDtype::F16 => DType::F16,
        StDtype::I64 => DType::I64,
        StDtype::U32 => DType::U32,
        other => {
            return Err(Error::invalid(
                "safetensors",
                "dtype",
                format!("tensor `{name}` has dtype {other:?}, which moeba does not load"),
            ))
        }
    })
}

/// Serializes named tensors (any device, any layout) into safetensors bytes.
pub fn serialize(
    tensors: Vec<(String, Tensor)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let data: Vec<(String, DType, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, t)| Ok((n, t.dtype(), t.dims().to_vec(), t.to_bytes()?)))
        .collect::<Result<_>>()?;
    let views = data
        .iter()
        .map(|(n, dt, shape, bytes)| {
            TensorView::new(to_st(*dt), shape.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Msg(format!("safetensors: tensor `{n}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, metadata).map_err(|e| Error::Msg(format!("safetensors: {e}")))
}

/// Parses safetensors bytes into named tensors on `device`. A truncated or corrupt payload is an
/// error saying so.
pub fn deserialize(bytes: &[u8], device: &Device) -> Result<HashMap<String, Tensor>> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
        Error::Msg(format!(
            "safetensors: cannot parse ({} bytes): {e}; the file may be truncated",
            bytes.len()
        ))
    })?;
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let dtype = from_st(&name, view.dtype())?;
            let t = Tensor::from_bytes(view.data(), dtype, view.shape().to_vec(), device)?;
            Ok((name, t))
        })
        .collect()
}
