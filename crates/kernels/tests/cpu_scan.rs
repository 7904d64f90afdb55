//! The selective scan (Mamba-1 S6) against the fixtures and the plain reference: forward,
//! backward, every SIMD path, strided/channel-last views, seq_idx restarts, the decoding step,
//! determinism across thread counts, argument errors.

mod cpu_common;

use std::collections::HashMap;
use std::path::PathBuf;

use cpu_common::for_each_path;
use moeba_kernels::ops::{self, SelectiveScanArgs, SelectiveScanGrads, SelectiveStateUpdateArgs};
use moeba_kernels::reference;
use moeba_tensor::{DType, Device, Result, Tensor};
use proptest::prelude::*;

fn fixture(name: &str) -> Option<HashMap<String, Tensor>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/ops").join(name);
    match std::fs::read(&path) {
        Ok(bytes) => Some(moeba_tensor::safetensors_io::deserialize(&bytes, &Device::Cpu).unwrap()),
        Err(_) => {
            eprintln!("skipping: fixture {} not found (../shared beside the repository)", path.display());
            None
        }
    }
}

/// max |a - b| / max(max |b|, 1e-30).
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let (a, b) = (a.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max) / scale
}

/// A `(b, d, l)` tensor laid out channel-last: the transposed view of `(b, l, d)` memory.
fn channel_last(t: &Tensor) -> Tensor {
    t.transpose(1, 2).unwrap().contiguous().unwrap().transpose(1, 2).unwrap()
}

/// Owned inputs of one scan.
struct Case {
    u: Tensor,
    delta: Tensor,
    a: Tensor,
    b: Tensor,
    c: Tensor,
    d: Option<Tensor>,
    z: Option<Tensor>,
    bias: Option<Tensor>,
    h0: Option<Tensor>,
    seq: Option<Tensor>,
    softplus: bool,
}

impl Case {
    fn args(&self) -> SelectiveScanArgs<'_> {
        SelectiveScanArgs {
            u: &self.u,
            delta: &self.delta,
            a: &self.a,
            b: &self.b,
            c: &self.c,
            d: self.d.as_ref(),
            z: self.z.as_ref(),
            delta_bias: self.bias.as_ref(),
            delta_softplus: self.softplus,
            initial_state: self.h0.as_ref(),
            seq_idx: self.seq.as_ref(),
        }
    }

    /// Every float input converted with `f` (dtype casts, layout changes).
    fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> Case {
        Case {
            u: f(&self.u),
            delta: f(&self.delta),
            a: f(&self.a),
            b: f(&self.b),
            c: f(&self.c),
            d: self.d.as_ref().map(&f),
            z: self.z.as_ref().map(&f),
            bias: self.bias.as_ref().map(&f),
            h0: self.h0.as_ref().map(&f),
            seq: self.seq.clone(),
            softplus: self.softplus,
        }
    }
}

fn fixture_case(f: &HashMap<String, Tensor>) -> Case {
    Case {
        u: f["u"].clone(),
        delta: f["delta"].clone(),
        a: f["A"].clone(),
        b: f["B"].unsqueeze(1).unwrap(),
        c: f["C"].unsqueeze(1).unwrap(),
        d: Some(f["D"].clone()),
        z: Some(f["z"].clone()),
        bias: Some(f["delta_bias"].clone()),
        h0: None,
        seq: None,
        softplus: true,
    }
}

fn check_grads(g: &SelectiveScanGrads, f: &HashMap<String, Tensor>, prefix: &str, tol: f64, what: &str) {
    let pairs: [(&str, &Tensor); 8] = [
        ("u", &g.u),
        ("delta", &g.delta),
        ("A", &g.a),
        ("B", &g.b.squeeze(1).unwrap()),
        ("C", &g.c.squeeze(1).unwrap()),
        ("D", g.d.as_ref().unwrap()),
        ("z", g.z.as_ref().unwrap()),
        ("delta_bias", g.delta_bias.as_ref().unwrap()),
    ];
    for (name, got) in pairs {
        let want = &f[&format!("{prefix}{name}")];
        let e = rel(got, want);
        assert!(e <= tol, "{what}: {prefix}{name} rel err {e:e} > {tol:e}");
    }
}

#[test]
fn scan_matches_fixtures_f64_and_f32_every_path_and_layout() {
    for name in ["selective_scan.safetensors", "selective_scan_long.safetensors"] {
        let Some(f) = fixture(name) else { return };
        for_each_path(|path| {
            for dtype in [DType::F64, DType::F32] {
                for cl in [false, true] {
                    let what = format!("{name} {dtype} {} channel_last={cl}", path.name());
                    let case = fixture_case(&f).map(|t| {
                        let t = t.to_dtype(dtype).unwrap();
                        if cl && t.rank() == 3 && t.dims()[2] == f["u"].dims()[2] {
                            channel_last(&t)
                        } else {
                            t
                        }
                    });
                    let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
                    let out = ops::selective_scan(&case.args()).unwrap();
                    assert!(rel(&out.out, &f["out"]) <= tol, "{what}: out {:e}", rel(&out.out, &f["out"]));
                    assert!(rel(&out.last_state, &f["last_state"]) <= tol, "{what}: last_state");
                    let go = f["grad_out"].to_dtype(dtype).unwrap();
                    let g = ops::selective_scan_backward(&case.args(), &out, &go, None).unwrap();
                    check_grads(&g, &f, "grad_", tol, &what);
                    let zero = go.zeros_like().unwrap();
                    let gls = f["grad_last_state"].to_dtype(dtype).unwrap();
                    let g = ops::selective_scan_backward(&case.args(), &out, &zero, Some(&gls)).unwrap();
                    check_grads(&g, &f, "gradS_", tol, &what);
                }
            }
        });
    }
}

/// A random case: `b, d, l, n, g`, which optionals are present, softplus, seq_idx.
#[derive(Debug, Clone)]
struct Spec {
    b: usize,
    d: usize,
    l: usize,
    n: usize,
    g: usize,
    opts: [bool; 5],
    softplus: bool,
    seq: bool,
    layout: u8,
    seed: u64,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        1usize..=2,
        prop_oneof![1usize..=4, 5usize..=20],
        prop_oneof![3 => 1usize..=20, 1 => 120usize..=300],
        1usize..=9,
        1usize..=3,
        prop::array::uniform5(any::<bool>()),
        any::<bool>(),
        any::<bool>(),
        0u8..3,
        any::<u64>(),
    )
        .prop_map(|(b, dg, l, n, g, opts, softplus, seq, layout, seed)| Spec {
            b,
            d: dg * g,
            l,
            n,
            g,
            opts,
            softplus,
            seq,
            layout,
            seed,
        })
}

fn make_case(s: &Spec, dtype: DType) -> Result<Case> {
    let dev = Device::Cpu;
    let r = |i: u64, shape: &[usize], lo: f64, hi: f64| {
        Tensor::rand(s.seed ^ i, shape.to_vec(), lo, hi, dtype, &dev)
    };
    let (b, d, l, n, g) = (s.b, s.d, s.l, s.n, s.g);
    let seq = if s.seq {
        // Document ids: a few random boundaries per row.
        let mut rng = moeba_tensor::Rng::new(s.seed);
        let mut ids = Vec::with_capacity(b * l);
        for _ in 0..b {
            let mut id = 0i64;
            for _ in 0..l {
                if rng.below(7) == 0 {
                    id += 1;
                }
                ids.push(id);
            }
        }
        Some(Tensor::from_vec(ids, (b, l), &dev)?)
    } else {
        None
    };
    let delta = if s.softplus { r(2, &[b, d, l], -3.0, 1.0)? } else { r(2, &[b, d, l], 0.0, 0.5)? };
    let case = Case {
        u: r(1, &[b, d, l], -1.0, 1.0)?,
        delta,
        a: r(3, &[d, n], -2.0, -0.1)?,
        b: r(4, &[b, g, n, l], -1.0, 1.0)?,
        c: r(5, &[b, g, n, l], -1.0, 1.0)?,
        d: s.opts[0].then(|| r(6, &[d], 0.5, 1.5)).transpose()?,
        z: s.opts[1].then(|| r(7, &[b, d, l], -2.0, 2.0)).transpose()?,
        // Without softplus, dt = delta + bias must stay positive (else the state grows without bound).
        bias: s.opts[2]
            .then(|| if s.softplus { r(8, &[d], -1.0, 0.5) } else { r(8, &[d], 0.0, 0.5) })
            .transpose()?,
        h0: s.opts[3].then(|| r(9, &[b, d, n], -1.0, 1.0)).transpose()?,
        seq,
        softplus: s.softplus,
    };
    Ok(match s.layout {
        // channel-last u, delta, z (as the Mamba block passes them)
        1 => case.map(|t| if t.rank() == 3 && t.dims() == [b, d, l] { channel_last(t) } else { t.clone() }),
        // every input a narrowed view of a larger tensor
        2 => case.map(|t| {
            let mut dims = t.dims().to_vec();
            *dims.last_mut().unwrap() += 2;
            let big = Tensor::rand(s.seed ^ 99, dims, -1.0, 1.0, dtype, &dev).unwrap();
            let last = t.rank() - 1;
            let base =
                ops::concat(&[&big.narrow(last, 0, 1).unwrap(), t, &big.narrow(last, 0, 1).unwrap()], last)
                    .unwrap();
            base.narrow(last, 1, t.dims()[last]).unwrap()
        }),
        _ => case,
    })
}

fn compare(s: &Spec, dtype: DType) {
    compare_case(&make_case(s, dtype).unwrap(), s, dtype);
}

fn compare_case(case: &Case, s: &Spec, dtype: DType) {
    let args = case.args();
    let tol = if dtype == DType::F64 { 1e-10 } else { 1e-4 };
    let out = ops::selective_scan(&args).unwrap();
    let (want_out, want_last) = reference::selective_scan::selective_scan(&args).unwrap();
    assert!(rel(&out.out, &want_out) <= tol, "{s:?} {dtype}: out {:e}", rel(&out.out, &want_out));
    assert!(rel(&out.last_state, &want_last) <= tol, "{s:?} {dtype}: last_state");
    let go = Tensor::rand(s.seed ^ 11, (s.b, s.d, s.l), -1.0, 1.0, dtype, &Device::Cpu).unwrap();
    let gls = Tensor::rand(s.seed ^ 12, (s.b, s.d, s.n), -1.0, 1.0, dtype, &Device::Cpu).unwrap();
    let gls = s.opts[4].then_some(&gls);
    let got = ops::selective_scan_backward(&args, &out, &go, gls).unwrap();
    let want = reference::selective_scan::selective_scan_backward(&args, &go, gls).unwrap();
    let pairs = [
        ("u", Some(&got.u), Some(&want.u)),
        ("delta", Some(&got.delta), Some(&want.delta)),
        ("a", Some(&got.a), Some(&want.a)),
        ("b", Some(&got.b), Some(&want.b)),
        ("c", Some(&got.c), Some(&want.c)),
        ("d", got.d.as_ref(), want.d.as_ref()),
        ("z", got.z.as_ref(), want.z.as_ref()),
        ("delta_bias", got.delta_bias.as_ref(), want.delta_bias.as_ref()),
        ("initial_state", got.initial_state.as_ref(), want.initial_state.as_ref()),
    ];
    for (name, g, w) in pairs {
        match (g, w) {
            (Some(g), Some(w)) => {
                assert_eq!(g.dtype(), dtype, "{name} dtype");
                let e = rel(g, w);
                assert!(e <= tol, "{s:?} {dtype}: grad {name} rel err {e:e}");
            }
            (None, None) => {}
            _ => panic!("{s:?}: grad {name} presence differs"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn scan_matches_reference_f64(s in spec()) {
        compare(&s, DType::F64);
    }

    #[test]
    fn scan_matches_reference_f32_every_path(s in spec()) {
        for_each_path(|_| compare(&s, DType::F32));
    }
}

#[test]
fn decays_below_the_f32_range_match_the_reference() {
    // Half of the A entries are so negative that dt·A·log2e < -126 (the fast kernels then clamp
    // the exponent); every SIMD path, both layouts, forward and backward.
    for (layout, n, seed) in [(0u8, 16, 3u64), (1, 16, 4), (1, 5, 5), (0, 12, 6)] {
        let s = Spec {
            b: 2,
            d: 19,
            l: 150,
            n,
            g: 1,
            opts: [true, true, true, true, true],
            softplus: true,
            seq: false,
            layout,
            seed,
        };
        for_each_path(|_| {
            let mut case = make_case(&s, DType::F32).unwrap();
            let a: Vec<f32> = case
                .a
                .to_vec_f64()
                .unwrap()
                .iter()
                .enumerate()
                .map(|(i, &v)| if i % 2 == 0 { -400.0 } else { v as f32 })
                .collect();
            case.a = Tensor::from_vec(a, (s.d, n), &Device::Cpu).unwrap();
            compare_case(&case, &s, DType::F32);
        });
    }
}

#[test]
fn scan_bf16_computes_in_f32() {
    let s = Spec {
        b: 1,
        d: 10,
        l: 9,
        n: 4,
        g: 2,
        opts: [true; 5],
        softplus: true,
        seq: false,
        layout: 0,
        seed: 5,
    };
    let case = make_case(&s, DType::F32).unwrap();
    let bf = case.map(|t| t.to_dtype(DType::BF16).unwrap());
    let back = bf.map(|t| t.to_dtype(DType::F32).unwrap());
    let got = ops::selective_scan(&bf.args()).unwrap();
    assert_eq!(got.out.dtype(), DType::BF16);
    let want = ops::selective_scan(&back.args()).unwrap();
    assert!(rel(&got.out, &want.out) < 1e-2);
}

#[test]
fn state_update_equals_scan_step_by_step() {
    for dtype in [DType::F64, DType::F32] {
        let s = Spec {
            b: 2,
            d: 12,
            l: 7,
            n: 5,
            g: 3,
            opts: [true; 5],
            softplus: true,
            seq: false,
            layout: 0,
            seed: 9,
        };
        let case = make_case(&s, dtype).unwrap();
        let full = ops::selective_scan(&case.args()).unwrap();
        let mut state = case.h0.clone().unwrap();
        for t in 0..s.l {
            let col = |x: &Tensor| x.narrow(x.rank() - 1, t, 1).unwrap().squeeze(x.rank() - 1).unwrap();
            let (u, delta, z, b, c) =
                (col(&case.u), col(&case.delta), col(case.z.as_ref().unwrap()), col(&case.b), col(&case.c));
            let (out, next) = ops::selective_state_update(&SelectiveStateUpdateArgs {
                state: &state,
                u: &u,
                delta: &delta,
                a: &case.a,
                b: &b,
                c: &c,
                d: case.d.as_ref(),
                z: Some(&z),
                delta_bias: case.bias.as_ref(),
                delta_softplus: true,
            })
            .unwrap();
            let want = full.out.narrow(2, t, 1).unwrap().squeeze(2).unwrap();
            assert!(rel(&out, &want) < 1e-5, "{dtype} step {t}");
            state = next;
        }
        assert!(rel(&state, &full.last_state) < 1e-5, "{dtype} last state");
    }
}

#[test]
fn packed_documents_equal_separate_scans() {
    // Two documents in one row == two independent scans (the second from a zero state).
    let s = Spec {
        b: 1,
        d: 9,
        l: 150,
        n: 6,
        g: 1,
        opts: [true, true, true, false, false],
        softplus: true,
        seq: false,
        layout: 0,
        seed: 21,
    };
    let case = make_case(&s, DType::F64).unwrap();
    let split = 61;
    let ids: Vec<u32> = (0..s.l).map(|t| u32::from(t >= split)).collect();
    let mut packed = case.map(|t| t.clone());
    packed.seq = Some(Tensor::from_vec(ids, (1, s.l), &Device::Cpu).unwrap());
    let got = ops::selective_scan(&packed.args()).unwrap();
    for (start, len) in [(0, split), (split, s.l - split)] {
        let part =
            case.map(|t| if t.rank() >= 3 { t.narrow(t.rank() - 1, start, len).unwrap() } else { t.clone() });
        let want = ops::selective_scan(&part.args()).unwrap();
        assert!(rel(&got.out.narrow(2, start, len).unwrap(), &want.out) < 1e-12, "document at {start}");
        if start == split {
            assert!(rel(&got.last_state, &want.last_state) < 1e-12);
        }
    }
}

#[test]
fn backward_is_bit_identical_across_thread_counts() {
    let s = Spec {
        b: 2,
        d: 84,
        l: 300,
        n: 8,
        g: 2,
        opts: [true; 5],
        softplus: true,
        seq: true,
        layout: 1,
        seed: 33,
    };
    let case = make_case(&s, DType::F32).unwrap();
    let go = Tensor::rand(3, (s.b, s.d, s.l), -1.0, 1.0, DType::F32, &Device::Cpu).unwrap();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let out = ops::selective_scan(&case.args()).unwrap();
            let g = ops::selective_scan_backward(&case.args(), &out, &go, None).unwrap();
            let mut v = out.out.to_vec_f64().unwrap();
            for t in [&g.u, &g.delta, &g.a, &g.b, &g.c, g.d.as_ref().unwrap(), g.z.as_ref().unwrap()] {
                v.extend(t.to_vec_f64().unwrap());
            }
            v.extend(g.delta_bias.as_ref().unwrap().to_vec_f64().unwrap());
            v.extend(g.initial_state.as_ref().unwrap().to_vec_f64().unwrap());
            v
        })
    };
    // Under the path lock: another test switching the SIMD path mid-comparison would change results.
    for_each_path(|path| {
        let one = run(1);
        for _ in 0..2 {
            let two = run(2);
            assert!(
                one.iter().zip(&two).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{}: results differ across threads",
                path.name()
            );
        }
    });
}

#[test]
fn bad_arguments_are_errors_naming_them() {
    let s = Spec {
        b: 1,
        d: 6,
        l: 5,
        n: 3,
        g: 2,
        opts: [true; 5],
        softplus: true,
        seq: false,
        layout: 0,
        seed: 1,
    };
    let case = make_case(&s, DType::F32).unwrap();
    let msg = |r: Result<ops::SelectiveScanOutput>| r.err().map(|e| e.to_string()).unwrap_or_default();
    // g does not divide d
    let b4 = Tensor::zeros((1, 4, 3, 5), DType::F32, &Device::Cpu).unwrap();
    let m = msg(ops::selective_scan(&SelectiveScanArgs { b: &b4, c: &b4, ..case.args() }));
    assert!(m.contains("`b`") && m.contains("divide"), "{m}");
    // mismatched delta
    let bad = Tensor::zeros((1, 6, 4), DType::F32, &Device::Cpu).unwrap();
    let m = msg(ops::selective_scan(&SelectiveScanArgs { delta: &bad, ..case.args() }));
    assert!(m.contains("`delta`"), "{m}");
    // wrong A
    let a = Tensor::zeros((5, 3), DType::F32, &Device::Cpu).unwrap();
    let m = msg(ops::selective_scan(&SelectiveScanArgs { a: &a, ..case.args() }));
    assert!(m.contains("`a`"), "{m}");
    // non-finite delta
    let mut v = case.delta.to_vec::<f32>().unwrap();
    v[7] = f32::NAN;
    let nan = Tensor::from_vec(v, (1, 6, 5), &Device::Cpu).unwrap();
    let m = msg(ops::selective_scan(&SelectiveScanArgs { delta: &nan, ..case.args() }));
    assert!(m.contains("`delta`") && m.contains("non-finite"), "{m}");
    // dtype mismatch
    let z64 = case.z.as_ref().unwrap().to_dtype(DType::F64).unwrap();
    assert!(ops::selective_scan(&SelectiveScanArgs { z: Some(&z64), ..case.args() }).is_err());
    // seq_idx of the wrong shape
    let seq = Tensor::zeros((1, 4), DType::I64, &Device::Cpu).unwrap();
    let m = msg(ops::selective_scan(&SelectiveScanArgs { seq_idx: Some(&seq), ..case.args() }));
    assert!(m.contains("`seq_idx`"), "{m}");
}
