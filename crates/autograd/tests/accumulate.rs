//! Gradient accumulation of variables used more than once: the in-place addition into a
//! gradient buffer the engine owns alone must give the same sums as the plain `ops::add` it
//! replaces, whatever the layouts (contiguous, transposed, broadcast, aliased gradients), in f32
//! and f64.

use moeba_autograd::Var;
use moeba_kernels::ops;
use moeba_tensor::{DType, Device, Tensor};
use proptest::prelude::*;

const CPU: Device = Device::Cpu;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// `L = Σ x⊙c1 + Σ x⊙c2 + Σ xᵀ⊙c3 + Σ (x + x) + Σ x⊙x`: dL/dx = c1 + c2 + c3ᵀ + 2 + 2x.
    #[test]
    fn repeated_uses_sum_exactly(m in 0usize..9, n in 1usize..37, f64_ in any::<bool>(), seed in 0u64..1000) {
        let dt = if f64_ { DType::F64 } else { DType::F32 };
        let x = Tensor::randn(seed, (m, n), 0.0, 1.0, dt, &CPU).unwrap();
        let c1 = Tensor::randn(seed + 1, (m, n), 0.0, 1.0, dt, &CPU).unwrap();
        let c2 = Tensor::randn(seed + 2, n, 0.0, 1.0, dt, &CPU).unwrap();
        let c3 = Tensor::randn(seed + 3, (n, m), 0.0, 1.0, dt, &CPU).unwrap();
        let xv = Var::param(x.clone());
        let terms = [
            xv.mul(&Var::constant(c1.clone())).unwrap(),
            xv.mul(&Var::constant(c2.clone())).unwrap(),
            xv.t().unwrap().mul(&Var::constant(c3.clone())).unwrap().t().unwrap(),
            xv.add(&xv).unwrap(),
            xv.mul(&xv).unwrap(),
        ];
        let mut loss = terms[0].sum_all().unwrap();
        for t in &terms[1..] {
            loss = loss.add(&t.sum_all().unwrap()).unwrap();
        }
        let g = loss.backward().unwrap();
        let got = g.get(&xv).unwrap();
        prop_assert!(got.is_contiguous());
        let two = Tensor::full(2.0, (), dt, &CPU).unwrap();
        let want = ops::add(&ops::add(&c1, &c2).unwrap(), &c3.t().unwrap()).unwrap();
        let want = ops::add(&ops::add(&want, &two).unwrap(), &ops::mul(&x, &two).unwrap()).unwrap();
        let tol = if f64_ { 1e-12 } else { 1e-5 };
        for (a, b) in got.to_vec_f64().unwrap().iter().zip(want.to_vec_f64().unwrap()) {
            prop_assert!((a - b).abs() <= tol * (1.0 + b.abs()), "got {a}, want {b}");
        }
    }
}

/// A gradient the caller still holds (the seed of `backward_with`) is never written in place.
#[test]
fn seed_gradient_is_not_modified() {
    let x = Var::param(Tensor::randn(1, (3, 4), 0.0, 1.0, DType::F32, &CPU).unwrap());
    let y = x.add(&x).unwrap();
    let seed = Tensor::ones((3, 4), DType::F32, &CPU).unwrap();
    let g = y.backward_with(seed.clone()).unwrap();
    assert_eq!(seed.to_vec::<f32>().unwrap(), vec![1.0; 12]);
    assert_eq!(g.get(&x).unwrap().to_vec::<f32>().unwrap(), vec![2.0; 12]);
}
