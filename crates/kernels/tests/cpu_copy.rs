//! `ops::contiguous` on the CPU (parallel over the outermost dim above the threshold) equals the
//! element-by-element walk of the layout, for every dtype and for views large and small.

use moeba_kernels::ops;
use moeba_tensor::{DType, Device, Rng, Tensor};
use proptest::prelude::*;

fn walk(t: &Tensor, base: &Tensor) -> Vec<f64> {
    let src = base.to_vec_f64().unwrap();
    t.layout().strided_index().map(|i| src[i]).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn strided_copies_match_the_walk(
        a in 1usize..40, b in 1usize..300, c in 1usize..40, seed in any::<u64>(), dt in 0usize..4,
    ) {
        let dtype = [DType::F32, DType::F64, DType::BF16, DType::I64][dt];
        let base = Tensor::arange(0, (a * b * c) as i64, DType::F64, &Device::Cpu).unwrap()
            .to_dtype(dtype).unwrap().reshape((a, b, c)).unwrap();
        let mut rng = Rng::new(seed);
        let views = [
            base.transpose(0, 2).unwrap(),
            base.permute(&[1, 0, 2]).unwrap(),
            base.narrow(1, rng.below(b as u64) as usize, 1).unwrap().transpose(1, 2).unwrap(),
            base.narrow(2, 0, c.div_ceil(2)).unwrap(),
            base.unsqueeze(0).unwrap().broadcast_as((3, a, b, c)).unwrap().transpose(1, 3).unwrap(),
        ];
        for v in &views {
            let out = ops::contiguous(v).unwrap();
            prop_assert!(out.is_contiguous());
            prop_assert_eq!(out.dtype(), dtype);
            prop_assert_eq!(out.to_vec_f64().unwrap(), walk(v, &base));
        }
    }
}
