//! CPU index ops, concat and cross-entropy against the reference: random shapes, dims, dtypes
//! (every dtype for the copying ops; u32 and i64 indices), strided inputs (transposed, permuted,
//! narrowed, broadcast), the parallel paths (big outputs), and the error messages.

use moeba_kernels::{ops, reference::index as reference};
use moeba_tensor::{DType, Device, Tensor};
use proptest::prelude::*;

const CPU: Device = Device::Cpu;
const DTYPES: [DType; 6] = [DType::F32, DType::F64, DType::BF16, DType::F16, DType::I64, DType::U32];

/// Values of shape `dims` and dtype `dtype` (integers: small, from N(3, 4²)), laid out as:
/// 0 contiguous, 1 every dim reversed through `permute`, 2 narrowed in the last dim,
/// 3 the last two dims transposed.
fn make(seed: u64, dims: &[usize], dtype: DType, layout: u8) -> Tensor {
    let r = dims.len();
    let gen = |d: Vec<usize>| {
        let (mean, std) = if dtype.is_int() { (3.0, 4.0) } else { (0.0, 1.0) };
        Tensor::randn(seed, d, mean, std, DType::F64, &CPU).unwrap().to_dtype(dtype).unwrap()
    };
    let t = match layout % 4 {
        1 if r >= 2 => {
            let d: Vec<usize> = dims.iter().rev().copied().collect();
            gen(d).permute(&(0..r).rev().collect::<Vec<_>>()).unwrap()
        }
        2 if r >= 1 => {
            let mut d = dims.to_vec();
            d[r - 1] += 2;
            gen(d).narrow(r - 1, 1, dims[r - 1]).unwrap()
        }
        3 if r >= 2 => {
            let mut d = dims.to_vec();
            d.swap(r - 2, r - 1);
            gen(d).t().unwrap()
        }
        _ => gen(dims.to_vec()),
    };
    assert_eq!(t.dims(), dims);
    t
}

/// Deterministic pseudo-random integers in `0..bound` (bound > 0).
fn ints(seed: u64, count: usize, bound: usize) -> Vec<i64> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..count)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) % bound as u64) as i64
        })
        .collect()
}

/// An index tensor of shape `dims` holding `vals`, as u32 or i64, optionally a strided view.
fn index_tensor(vals: Vec<i64>, dims: &[usize], u32_: bool, strided: bool) -> Tensor {
    let t = if strided && !dims.is_empty() {
        // Interleave with junk along a new last dim, then take column 0: stride 2.
        let mut v = Vec::with_capacity(vals.len() * 2);
        for x in &vals {
            v.extend([*x, 9999]);
        }
        let mut d = dims.to_vec();
        d.push(2);
        let r = d.len();
        Tensor::from_vec(v, d, &CPU).unwrap().narrow(r - 1, 0, 1).unwrap().squeeze(r - 1).unwrap()
    } else {
        Tensor::from_vec(vals, dims.to_vec(), &CPU).unwrap()
    };
    if u32_ {
        t.to_dtype(DType::U32).unwrap()
    } else {
        t
    }
}

fn assert_same(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    assert_eq!(got.dtype(), want.dtype(), "{what}: dtype");
    assert!(got.is_contiguous(), "{what}: output must be contiguous");
    assert_eq!(got.to_vec_f64().unwrap(), want.to_vec_f64().unwrap(), "{what}: values");
}

fn assert_close(got: &Tensor, want: &Tensor, rtol: f64, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    for (i, (g, w)) in got.to_vec_f64().unwrap().iter().zip(want.to_vec_f64().unwrap()).enumerate() {
        assert!((g - w).abs() <= rtol * (1.0 + w.abs()), "{what}: element {i}: got {g}, want {w}");
    }
}

fn dims_strategy() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..5, 1..=4)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn index_select_matches_reference(dims in dims_strategy(), dim in 0usize..4, nids in 0usize..7,
                                      dt in 0usize..6, layout in 0u8..4, u32_ in any::<bool>(),
                                      strided in any::<bool>(), seed in 0u64..1000) {
        let dim = dim % dims.len();
        let x = make(seed, &dims, DTYPES[dt], layout);
        let ids = index_tensor(ints(seed, nids, dims[dim]), &[nids], u32_, strided);
        let got = ops::index_select(&x, dim, &ids).unwrap();
        assert_same(&got, &reference::index_select(&x, dim, &ids).unwrap(), "index_select");
    }

    #[test]
    fn gather_matches_reference(dims in dims_strategy(), dim in 0usize..4, along in 1usize..5,
                                shrink in prop::collection::vec(0usize..3, 4), dt in 0usize..6,
                                layout in 0u8..4, u32_ in any::<bool>(), strided in any::<bool>(),
                                seed in 0u64..1000) {
        let dim = dim % dims.len();
        let idims: Vec<usize> = dims.iter().enumerate()
            .map(|(d, &s)| if d == dim { along } else { s.saturating_sub(shrink[d]).max(1) })
            .collect();
        let x = make(seed, &dims, DTYPES[dt], layout);
        let count = idims.iter().product();
        let idx = index_tensor(ints(seed + 1, count, dims[dim]), &idims, u32_, strided);
        let got = ops::gather(&x, dim, &idx).unwrap();
        assert_same(&got, &reference::gather(&x, dim, &idx).unwrap(), "gather");
    }

    #[test]
    fn scatter_add_matches_reference(dims in dims_strategy(), dim in 0usize..4, along in 1usize..6,
                                     shrink in prop::collection::vec(0usize..3, 4), dt in 0usize..6,
                                     lx in 0u8..4, ls in 0u8..4, u32_ in any::<bool>(),
                                     seed in 0u64..1000) {
        let dim = dim % dims.len();
        let dtype = DTYPES[dt];
        let idims: Vec<usize> = dims.iter().enumerate()
            .map(|(d, &s)| if d == dim { along } else { s.saturating_sub(shrink[d]).max(1) })
            .collect();
        let x = make(seed, &dims, dtype, lx);
        let src = make(seed + 2, &idims, dtype, ls);
        let count = idims.iter().product();
        let idx = index_tensor(ints(seed + 1, count, dims[dim]), &idims, u32_, false);
        let got = ops::scatter_add(&x, dim, &idx, &src).unwrap();
        let want = reference::scatter_add(&x, dim, &idx, &src).unwrap();
        assert_eq!(got.dtype(), dtype);
        match dtype {
            DType::I64 | DType::U32 => assert_same(&got, &want, "scatter_add"),
            DType::BF16 => assert_close(&got, &want, 1e-2, "scatter_add"),
            DType::F16 => assert_close(&got, &want, 2e-3, "scatter_add"),
            _ => assert_close(&got, &want, 1e-5, "scatter_add"),
        }
    }

    #[test]
    fn where_cond_matches_reference(dims in prop::collection::vec(1usize..5, 1..=4),
                                    ones in prop::collection::vec(0u8..4, 12), cdt in 0usize..6,
                                    dt in 0usize..6, layouts in prop::collection::vec(0u8..4, 3),
                                    seed in 0u64..1000) {
        // Each operand: some dims set to 1 (broadcast), and maybe the leading dim dropped.
        let shape_of = |w: usize| -> Vec<usize> {
            let mut d: Vec<usize> = dims.iter().enumerate()
                .map(|(i, &s)| if ones[(w * 4 + i) % 12] == 0 { 1 } else { s })
                .collect();
            if ones[w] == 3 && d.len() > 1 {
                d.remove(0);
            }
            d
        };
        let cond = make(seed, &shape_of(0), DTYPES[cdt], layouts[0]);
        let a = make(seed + 1, &shape_of(1), DTYPES[dt], layouts[1]);
        let b = make(seed + 2, &shape_of(2), DTYPES[dt], layouts[2]);
        let got = ops::where_cond(&cond, &a, &b).unwrap();
        assert_same(&got, &reference::where_cond(&cond, &a, &b).unwrap(), "where_cond");
    }

    #[test]
    fn concat_matches_reference(dims in dims_strategy(), dim in 0usize..4,
                                sizes in prop::collection::vec(0usize..4, 1..4), dt in 0usize..6,
                                layouts in prop::collection::vec(0u8..4, 3), seed in 0u64..1000) {
        let dim = dim % dims.len();
        let xs: Vec<Tensor> = sizes.iter().enumerate().map(|(i, &s)| {
            let mut d = dims.clone();
            d[dim] = s;
            make(seed + i as u64, &d, DTYPES[dt], layouts[i])
        }).collect();
        let refs: Vec<&Tensor> = xs.iter().collect();
        let got = ops::concat(&refs, dim).unwrap();
        assert_same(&got, &reference::concat(&refs, dim).unwrap(), "concat");
    }

    #[test]
    fn cross_entropy_matches_reference(n in 1usize..20, v in 1usize..40, ignore in 0u8..3,
                                       f64_ in any::<bool>(), transposed in any::<bool>(),
                                       u32_ in any::<bool>(), g in -2.0f64..2.0, seed in 0u64..1000) {
        let dt = if f64_ { DType::F64 } else { DType::F32 };
        let logits = make(seed, &[n, v], dt, if transposed { 3 } else { 0 });
        let mut t = ints(seed, n, v);
        // ignore: 0 none; 1 the usual -100 on some rows; 2 class 0 is ignored.
        let ignore_index = match ignore {
            0 => None,
            1 => {
                for (i, x) in t.iter_mut().enumerate() {
                    if i % 3 == 1 { *x = -100; }
                }
                Some(-100)
            }
            _ => Some(0),
        };
        if u32_ && ignore == 1 {
            // u32 cannot hold -100: use a class past the vocab as the ignore marker instead.
            for x in t.iter_mut() { if *x == -100 { *x = v as i64 + 5; } }
        }
        let ignore_index = if u32_ && ignore == 1 { Some(v as i64 + 5) } else { ignore_index };
        let targets = index_tensor(t, &[n], u32_, false);
        let rtol = if f64_ { 1e-12 } else { 2e-5 };
        let loss = ops::cross_entropy(&logits, &targets, ignore_index).unwrap();
        assert_eq!(loss.rank(), 0);
        assert_eq!(loss.dtype(), dt);
        assert_close(&loss, &reference::cross_entropy(&logits, &targets, ignore_index).unwrap(), rtol, "loss");
        let grad = Tensor::full(g, (), dt, &CPU).unwrap();
        let dx = ops::cross_entropy_backward(&logits, &targets, ignore_index, &grad).unwrap();
        assert_eq!(dx.dtype(), dt);
        let want = reference::cross_entropy_backward(&logits, &targets, ignore_index, g).unwrap();
        assert_close(&dx, &want, rtol, "cross_entropy_backward");
    }
}

/// Outputs big enough for the parallel paths (and `embedding` on top of index_select).
#[test]
fn parallel_paths() {
    let x = make(1, &[300, 257], DType::F32, 1);
    let ids = index_tensor(ints(2, 400, 300), &[400], false, false);
    assert_same(
        &ops::index_select(&x, 0, &ids).unwrap(),
        &reference::index_select(&x, 0, &ids).unwrap(),
        "is",
    );
    let ids = index_tensor(ints(3, 300, 257), &[300], true, true);
    assert_same(
        &ops::index_select(&x, 1, &ids).unwrap(),
        &reference::index_select(&x, 1, &ids).unwrap(),
        "is1",
    );
    let idx = index_tensor(ints(4, 300 * 257, 300), &[300, 257], true, false);
    assert_same(&ops::gather(&x, 0, &idx).unwrap(), &reference::gather(&x, 0, &idx).unwrap(), "gather");
    let cond = make(5, &[300, 1], DType::U32, 0);
    let b = make(6, &[257], DType::F32, 0);
    assert_same(
        &ops::where_cond(&cond, &x, &b).unwrap(),
        &reference::where_cond(&cond, &x, &b).unwrap(),
        "where",
    );
    for dim in [0, 1] {
        let y = make(7, &[300, 257], DType::F32, 0);
        let z = make(8, &[300, 257], DType::F32, 2);
        let xs = [&x, &y, &z];
        assert_same(&ops::concat(&xs, dim).unwrap(), &reference::concat(&xs, dim).unwrap(), "concat");
    }
    let flat = [&make(9, &[70000], DType::I64, 0), &make(10, &[5], DType::I64, 0)];
    assert_same(&ops::concat(&flat, 0).unwrap(), &reference::concat(&flat, 0).unwrap(), "concat flat");
    let t = index_tensor(ints(11, 300, 257), &[300], false, false);
    let l = ops::cross_entropy(&x, &t, None).unwrap();
    assert_close(&l, &reference::cross_entropy(&x, &t, None).unwrap(), 1e-5, "ce");
    let g = Tensor::full(0.5, (), DType::F32, &CPU).unwrap();
    let dx = ops::cross_entropy_backward(&x, &t, None, &g).unwrap();
    assert_close(&dx, &reference::cross_entropy_backward(&x, &t, None, 0.5).unwrap(), 1e-5, "ce bwd");
    let table = make(12, &[50, 8], DType::BF16, 0);
    let tok = index_tensor(ints(13, 12, 50), &[3, 4], true, false);
    let e = ops::embedding(&table, &tok).unwrap();
    assert_eq!(e.dims(), &[3, 4, 8]);
    let flat_tok = tok.flatten_all().unwrap();
    assert_same(&e.reshape((12, 8)).unwrap(), &reference::index_select(&table, 0, &flat_tok).unwrap(), "emb");
}

#[test]
fn scatter_add_accumulates_duplicates_in_order() {
    let x = Tensor::zeros((3, 2), DType::F32, &CPU).unwrap();
    let idx = Tensor::from_vec(vec![0i64, 2, 0, 0, 2, 1], (3, 2), &CPU).unwrap();
    let src = Tensor::from_vec(vec![1f32, 2., 3., 4., 5., 6.], (3, 2), &CPU).unwrap();
    let out = ops::scatter_add(&x, 0, &idx, &src).unwrap();
    assert_eq!(out.to_vec::<f32>().unwrap(), vec![4., 4., 0., 6., 5., 2.]);
}

#[test]
fn empty_and_edge_shapes() {
    let x = make(1, &[3, 0, 2], DType::F32, 0);
    let ids = index_tensor(vec![2, 0], &[2], false, false);
    assert_eq!(ops::index_select(&x, 0, &ids).unwrap().dims(), &[2, 0, 2]);
    let none = index_tensor(vec![], &[0], true, false);
    assert_eq!(ops::index_select(&x, 2, &none).unwrap().dims(), &[3, 0, 0]);
    let a = make(2, &[2, 0], DType::I64, 0);
    let b = make(3, &[2, 3], DType::I64, 0);
    assert_same(&ops::concat(&[&a, &b], 1).unwrap(), &b, "concat with empty");
    // Scalars in where_cond broadcast to everything.
    let c = Tensor::from_vec(vec![1u32, 0, 5], 3, &CPU).unwrap();
    let fill = Tensor::full(-1.0, (), DType::F64, &CPU).unwrap();
    let y = make(4, &[2, 3], DType::F64, 0);
    let out = ops::where_cond(&c, &fill, &y).unwrap();
    let yv = y.to_vec_f64().unwrap();
    assert_eq!(out.to_vec_f64().unwrap(), vec![-1.0, yv[1], -1.0, -1.0, yv[4], -1.0]);
    // NaN is nonzero: true.
    let c = Tensor::from_vec(vec![f32::NAN, 0.0, -0.0], 3, &CPU).unwrap();
    let a = Tensor::ones(3, DType::F32, &CPU).unwrap();
    let z = Tensor::zeros(3, DType::F32, &CPU).unwrap();
    assert_eq!(ops::where_cond(&c, &a, &z).unwrap().to_vec::<f32>().unwrap(), vec![1.0, 0.0, 0.0]);
    // masked_fill on top of where_cond.
    let m = Tensor::from_vec(vec![1u32, 0], (2, 1), &CPU).unwrap();
    let filled = ops::masked_fill(&y, &m, 7.0).unwrap();
    assert_eq!(filled.to_vec_f64().unwrap()[..3], [7.0, 7.0, 7.0]);
    assert_eq!(filled.to_vec_f64().unwrap()[3..], yv[3..]);
    // stack on top of concat.
    let s = ops::stack(&[&y, &y], 1).unwrap();
    assert_eq!(s.dims(), &[2, 2, 3]);
}

#[test]
fn cross_entropy_edge_cases() {
    // Large logits: stable (no overflow), equal to the shifted problem.
    let big = Tensor::from_vec(vec![1000f32, 0., -1000., 999.], (2, 2), &CPU).unwrap();
    let t = Tensor::from_vec(vec![1u32, 0], 2, &CPU).unwrap();
    let l = ops::cross_entropy(&big, &t, None).unwrap().to_scalar::<f32>().unwrap();
    assert!(l.is_finite());
    assert!((l - (1000.0 + 1999.0) / 2.0).abs() < 1e-2, "{l}");
    // Every row ignored: loss 0, gradient 0.
    let t = Tensor::from_vec(vec![-100i64, -100], 2, &CPU).unwrap();
    let l = ops::cross_entropy(&big, &t, Some(-100)).unwrap();
    assert_eq!(l.to_scalar::<f32>().unwrap(), 0.0);
    let g = Tensor::full(1.0, (), DType::F32, &CPU).unwrap();
    let dx = ops::cross_entropy_backward(&big, &t, Some(-100), &g).unwrap();
    assert!(dx.to_vec::<f32>().unwrap().iter().all(|&v| v == 0.0));
    // Half types compute in f32 and keep their dtype.
    for dt in [DType::BF16, DType::F16] {
        let x = make(1, &[5, 11], dt, 0);
        let t = index_tensor(ints(2, 5, 11), &[5], false, false);
        let l = ops::cross_entropy(&x, &t, None).unwrap();
        assert_eq!(l.dtype(), dt);
        assert_close(&l, &reference::cross_entropy(&x, &t, None).unwrap(), 1e-2, "half ce");
        let g = Tensor::full(1.0, (), dt, &CPU).unwrap();
        let dx = ops::cross_entropy_backward(&x, &t, None, &g).unwrap();
        assert_eq!(dx.dtype(), dt);
        assert_close(&dx, &reference::cross_entropy_backward(&x, &t, None, 1.0).unwrap(), 1e-2, "half bwd");
    }
}

#[test]
fn errors_name_the_culprit() {
    let x = make(1, &[4, 3], DType::F32, 0);
    let ids = Tensor::from_vec(vec![1i64, 7], 2, &CPU).unwrap();
    let e = ops::index_select(&x, 0, &ids).unwrap_err().to_string();
    assert!(e.contains("index_select") && e.contains('7') && e.contains("size 4"), "{e}");
    let ids = Tensor::from_vec(vec![-1i64], 1, &CPU).unwrap();
    let e = ops::index_select(&x, 1, &ids).unwrap_err().to_string();
    assert!(e.contains("-1") && e.contains("size 3"), "{e}");
    let ids = Tensor::from_vec(vec![3u32], 1, &CPU).unwrap();
    let e = ops::index_select(&x, 1, &ids).unwrap_err().to_string();
    assert!(e.contains("index 3") && e.contains("size 3"), "{e}");
    let f = Tensor::zeros(2, DType::F32, &CPU).unwrap();
    assert!(ops::index_select(&x, 0, &f).unwrap_err().to_string().contains("u32 or i64"));

    let idx = Tensor::from_vec(vec![0i64, 5, 1, 2], (2, 2), &CPU).unwrap();
    let e = ops::gather(&x, 1, &idx).unwrap_err().to_string();
    assert!(e.contains("gather") && e.contains("index 5") && e.contains("size 3"), "{e}");
    let idx3 = Tensor::from_vec(vec![0i64; 3], (1, 1, 3), &CPU).unwrap();
    let e = ops::gather(&x, 1, &idx3).unwrap_err().to_string();
    assert!(e.contains("gather") && e.contains("[1, 1, 3]"), "{e}");
    let wide = Tensor::zeros((2, 4), DType::I64, &CPU).unwrap();
    assert!(ops::gather(&x, 0, &wide).is_err(), "idx wider than x along a non-gather dim");

    let src = Tensor::ones((2, 2), DType::F32, &CPU).unwrap();
    let e = ops::scatter_add(&x, 1, &idx, &src).unwrap_err().to_string();
    assert!(e.contains("scatter_add") && e.contains("index 5"), "{e}");
    let src3 = Tensor::ones((2, 3), DType::F32, &CPU).unwrap();
    assert!(ops::scatter_add(&x, 1, &idx, &src3).is_err());

    let logits = make(2, &[3, 5], DType::F32, 0);
    let t = Tensor::from_vec(vec![1i64, 2, 9], 3, &CPU).unwrap();
    let e = ops::cross_entropy(&logits, &t, None).unwrap_err().to_string();
    assert!(e.contains("cross_entropy") && e.contains("row 2") && e.contains('9'), "{e}");
    let t = Tensor::from_vec(vec![-3i64, 2, 1], 3, &CPU).unwrap();
    let e = ops::cross_entropy(&logits, &t, Some(-100)).unwrap_err().to_string();
    assert!(e.contains("row 0") && e.contains("-3"), "{e}");
    let g = Tensor::full(1.0, (), DType::F32, &CPU).unwrap();
    let e = ops::cross_entropy_backward(&logits, &t, None, &g).unwrap_err().to_string();
    assert!(e.contains("cross_entropy_backward") && e.contains("row 0"), "{e}");
    let short = Tensor::from_vec(vec![1i64, 2], 2, &CPU).unwrap();
    assert!(ops::cross_entropy(&logits, &short, None).is_err());
    assert!(ops::cross_entropy_backward(&logits, &short, None, &g).is_err());
    let g2 = Tensor::ones(2, DType::F32, &CPU).unwrap();
    let ok_t = Tensor::from_vec(vec![1i64, 2, 3], 3, &CPU).unwrap();
    assert!(ops::cross_entropy_backward(&logits, &ok_t, None, &g2).is_err());

    let a = make(3, &[2, 3], DType::F32, 0);
    let b = make(4, &[3, 3], DType::F32, 0);
    let e = ops::concat(&[&a, &b], 1).unwrap_err().to_string();
    assert!(e.contains("concat") && e.contains("[2, 3]") && e.contains("[3, 3]"), "{e}");
    let c = make(5, &[2, 3], DType::F64, 0);
    assert!(ops::concat(&[&a, &c], 0).is_err());
    assert!(ops::concat(&[], 0).is_err());
    let cond = Tensor::ones(4, DType::U32, &CPU).unwrap();
    let e = ops::where_cond(&cond, &a, &a).unwrap_err().to_string();
    assert!(e.contains("where_cond"), "{e}");
}
