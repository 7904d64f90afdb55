//! The chunked SSD (Mamba-2) against the fixtures and the plain recurrence: forward, backward,
//! the decoding step, seq_idx restarts, determinism across thread counts, argument errors.

mod cpu_common;

use std::collections::HashMap;
use std::path::PathBuf;

use cpu_common::{make, view, View};
use moeba_kernels::ops::{self, SsdArgs, SsdGrads, SsdStepArgs};
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
    a.iter().zip(&b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn grads_pairs<'a>(g: &'a SsdGrads, r: &'a SsdGrads) -> Vec<(&'static str, &'a Tensor, &'a Tensor)> {
    let mut v = vec![
        ("x", &g.x, &r.x),
        ("dt", &g.dt, &r.dt),
        ("a", &g.a, &r.a),
        ("b", &g.b, &r.b),
        ("c", &g.c, &r.c),
    ];
    for (name, x, y) in [
        ("d", &g.d, &r.d),
        ("dt_bias", &g.dt_bias, &r.dt_bias),
        ("initial_state", &g.initial_state, &r.initial_state),
    ] {
        match (x, y) {
            (Some(x), Some(y)) => v.push((name, x, y)),
            (None, None) => {}
            _ => panic!("gradient {name} present on one side only"),
        }
    }
    v
}

fn check_fixture(name: &str) {
    let Some(f) = fixture(name) else { return };
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-5)] {
        let t = |k: &str| f[k].to_dtype(dtype).unwrap();
        let (x, dt, a, b, c, d, bias) = (t("x"), t("dt"), t("A"), t("B"), t("C"), t("D"), t("dt_bias"));
        for chunk in [1, 8, 16, 64] {
            let args = SsdArgs {
                x: &x,
                dt: &dt,
                a: &a,
                b: &b,
                c: &c,
                d: Some(&d),
                dt_bias: Some(&bias),
                dt_softplus: true,
                initial_state: None,
                seq_idx: None,
                chunk_size: chunk,
            };
            let out = ops::ssd(&args).unwrap();
            assert_eq!(out.y.dtype(), dtype);
            let e = rel(&out.y, &f["y"]);
            assert!(e <= tol, "{name} {dtype} chunk {chunk}: y rel err {e:e}");
            let e = rel(&out.final_state, &f["final_state"]);
            assert!(e <= tol, "{name} {dtype} chunk {chunk}: final_state rel err {e:e}");

            let gy = t("grad_y");
            let g = ops::ssd_backward(&args, &out.saved, &gy, None).unwrap();
            let zero = gy.zeros_like().unwrap();
            let gs = ops::ssd_backward(&args, &out.saved, &zero, Some(&t("grad_final_state"))).unwrap();
            for (prefix, gr) in [("grad_", &g), ("gradS_", &gs)] {
                let pairs = [
                    ("x", &gr.x),
                    ("dt", &gr.dt),
                    ("A", &gr.a),
                    ("B", &gr.b),
                    ("C", &gr.c),
                    ("D", gr.d.as_ref().unwrap()),
                    ("dt_bias", gr.dt_bias.as_ref().unwrap()),
                ];
                for (k, v) in pairs {
                    let key = format!("{prefix}{k}");
                    assert_eq!(v.dtype(), dtype);
                    let e = rel(v, &f[&key]);
                    assert!(e <= tol, "{name} {dtype} chunk {chunk}: {key} rel err {e:e}");
                }
            }
        }
    }
}

#[test]
fn ssd_matches_fixture_g2() {
    check_fixture("ssd.safetensors");
}

#[test]
fn ssd_matches_fixture_g1() {
    check_fixture("ssd_g1.safetensors");
}

/// One random SSD problem.
#[derive(Debug, Clone)]
struct Case {
    b: usize,
    l: usize,
    g: usize,
    hpg: usize,
    p: usize,
    n: usize,
    chunk: usize,
    /// 0: no D, 1: D (h), 2: D (h, p).
    d_kind: u8,
    bias: bool,
    softplus: bool,
    init: bool,
    seq: bool,
    xview: View,
    bview: View,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        (
            1usize..=2,
            prop_oneof![1 => Just(0usize), 2 => Just(1usize), 12 => 2usize..=40],
            1usize..=2,
            1usize..=3,
        ),
        (prop_oneof![1 => Just(1usize), 6 => 2usize..=11], 1usize..=10, 1usize..=17, 0u8..3),
        (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>(), view(), view(), any::<u64>()),
    )
        .prop_map(
            |((b, l, g, hpg), (p, n, chunk, d_kind), (bias, softplus, init, seq, xview, bview, seed))| Case {
                b,
                l,
                g,
                hpg,
                p,
                n,
                chunk,
                d_kind,
                bias,
                softplus,
                init,
                seq,
                xview,
                bview,
                seed,
            },
        )
}

/// The tensors of a case, in `dtype`.
struct Inputs {
    x: Tensor,
    dt: Tensor,
    a: Tensor,
    b: Tensor,
    c: Tensor,
    d: Option<Tensor>,
    bias: Option<Tensor>,
    init: Option<Tensor>,
    seq: Option<Tensor>,
    gy: Tensor,
    gfin: Tensor,
}

fn inputs(c: &Case, dtype: DType) -> Result<Inputs> {
    let h = c.g * c.hpg;
    let s = c.seed;
    // dt around 0 so that softplus gives 0.3..1.3; without softplus keep it positive.
    let (dlo, dhi) = if c.softplus { (-1.0, 0.5) } else { (0.05, 1.0) };
    let seq = if c.seq {
        // Documents of random lengths packed in each row.
        let mut v = Vec::with_capacity(c.b * c.l);
        let mut rng = moeba_tensor::Rng::new(s ^ 0xd0c);
        for _ in 0..c.b {
            let mut id = 0i64;
            for t in 0..c.l {
                if t > 0 && rng.below(5) == 0 {
                    id += 1 + rng.below(2) as i64;
                }
                v.push(id);
            }
        }
        Some(Tensor::from_vec(v, (c.b, c.l), &Device::Cpu)?)
    } else {
        None
    };
    Ok(Inputs {
        x: make(s, &[c.b, c.l, h, c.p], dtype, c.xview, -1.0, 1.0)?,
        dt: make(s + 1, &[c.b, c.l, h], dtype, View::Contiguous, dlo, dhi)?,
        a: make(s + 2, &[h], dtype, View::Contiguous, -2.0, -0.2)?,
        b: make(s + 3, &[c.b, c.l, c.g, c.n], dtype, c.bview, -1.0, 1.0)?,
        c: make(s + 4, &[c.b, c.l, c.g, c.n], dtype, View::Permuted, -1.0, 1.0)?,
        d: match c.d_kind {
            0 => None,
            1 => Some(make(s + 5, &[h], dtype, View::Contiguous, 0.5, 1.5)?),
            _ => Some(make(s + 5, &[h, c.p], dtype, View::Narrowed, 0.5, 1.5)?),
        },
        bias: if c.bias { Some(make(s + 6, &[h], dtype, View::Contiguous, -0.5, 0.5)?) } else { None },
        init: if c.init {
            Some(make(s + 7, &[c.b, h, c.p, c.n], dtype, View::Permuted, -1.0, 1.0)?)
        } else {
            None
        },
        seq,
        gy: make(s + 8, &[c.b, c.l, h, c.p], dtype, View::Contiguous, -1.0, 1.0)?,
        gfin: make(s + 9, &[c.b, h, c.p, c.n], dtype, View::Contiguous, -1.0, 1.0)?,
    })
}

fn args<'a>(i: &'a Inputs, c: &Case) -> SsdArgs<'a> {
    SsdArgs {
        x: &i.x,
        dt: &i.dt,
        a: &i.a,
        b: &i.b,
        c: &i.c,
        d: i.d.as_ref(),
        dt_bias: i.bias.as_ref(),
        dt_softplus: c.softplus,
        initial_state: i.init.as_ref(),
        seq_idx: i.seq.as_ref(),
        chunk_size: c.chunk,
    }
}

fn check_case(c: &Case, dtype: DType, tol: f64) -> std::result::Result<(), TestCaseError> {
    let inp = inputs(c, dtype).unwrap();
    let a = args(&inp, c);
    let out = ops::ssd(&a).unwrap();
    let (ry, rfin) = reference::ssd::ssd(&a).unwrap();
    let e = rel(&out.y, &ry);
    prop_assert!(e <= tol, "y rel err {e:e} for {c:?} {dtype}");
    let e = rel(&out.final_state, &rfin);
    prop_assert!(e <= tol, "final_state rel err {e:e} for {c:?} {dtype}");
    let g = ops::ssd_backward(&a, &out.saved, &inp.gy, Some(&inp.gfin)).unwrap();
    let r = reference::ssd::ssd_backward(&a, &inp.gy, Some(&inp.gfin)).unwrap();
    for (name, x, y) in grads_pairs(&g, &r) {
        let e = rel(x, y);
        prop_assert!(e <= tol, "grad {name} rel err {e:e} for {c:?} {dtype}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn chunked_matches_recurrence_f64(c in case()) {
        check_case(&c, DType::F64, 1e-10)?;
    }

    #[test]
    fn chunked_matches_recurrence_f32(c in case()) {
        check_case(&c, DType::F32, 2e-4)?;
    }
}

#[test]
fn bf16_runs_in_f32_and_rounds_once() {
    let c = Case {
        b: 1,
        l: 9,
        g: 1,
        hpg: 2,
        p: 3,
        n: 4,
        chunk: 4,
        d_kind: 1,
        bias: true,
        softplus: true,
        init: false,
        seq: false,
        xview: View::Contiguous,
        bview: View::Contiguous,
        seed: 7,
    };
    let inp = inputs(&c, DType::BF16).unwrap();
    let out = ops::ssd(&args(&inp, &c)).unwrap();
    assert_eq!(out.y.dtype(), DType::BF16);
    let (ry, _) = reference::ssd::ssd(&args(&inp, &c)).unwrap();
    assert!(rel(&out.y, &ry) < 1e-2);
}

/// Stepping token by token with `ssd_state_update` reproduces the chunked forward.
#[test]
fn state_update_steps_equal_forward() {
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        let c = Case {
            b: 2,
            l: 11,
            g: 2,
            hpg: 2,
            p: 5,
            n: 3,
            chunk: 4,
            d_kind: 2,
            bias: true,
            softplus: true,
            init: true,
            seq: false,
            xview: View::Contiguous,
            bview: View::Contiguous,
            seed: 3,
        };
        let inp = inputs(&c, dtype).unwrap();
        let out = ops::ssd(&args(&inp, &c)).unwrap();
        let mut state = inp.init.clone().unwrap();
        for t in 0..c.l {
            let x = inp.x.narrow(1, t, 1).unwrap().squeeze(1).unwrap();
            let dt = inp.dt.narrow(1, t, 1).unwrap().squeeze(1).unwrap();
            let b = inp.b.narrow(1, t, 1).unwrap().squeeze(1).unwrap();
            let cc = inp.c.narrow(1, t, 1).unwrap().squeeze(1).unwrap();
            let step = SsdStepArgs {
                x: &x,
                dt: &dt,
                a: &inp.a,
                b: &b,
                c: &cc,
                d: inp.d.as_ref(),
                dt_bias: inp.bias.as_ref(),
                dt_softplus: true,
                state: &state,
            };
            let (y, s) = ops::ssd_state_update(&step).unwrap();
            let want = out.y.narrow(1, t, 1).unwrap().squeeze(1).unwrap();
            assert!(rel(&y, &want) <= tol, "{dtype} step {t}");
            state = s;
        }
        assert!(rel(&state, &out.final_state) <= tol, "{dtype} final state");
    }
}

/// A packed row equals the documents run one by one.
#[test]
fn seq_idx_equals_separate_documents() {
    let dtype = DType::F64;
    let (h, p, n, l) = (2, 3, 4, 13);
    let x = Tensor::randn(1, (1, l, h, p), 0.0, 1.0, dtype, &Device::Cpu).unwrap();
    let dt = Tensor::randn(2, (1, l, h), 0.0, 0.5, dtype, &Device::Cpu).unwrap();
    let a = Tensor::from_vec(vec![-0.7f64, -1.3], h, &Device::Cpu).unwrap();
    let b = Tensor::randn(3, (1, l, 1, n), 0.0, 1.0, dtype, &Device::Cpu).unwrap();
    let c = Tensor::randn(4, (1, l, 1, n), 0.0, 1.0, dtype, &Device::Cpu).unwrap();
    let cuts = [0usize, 5, 6, 13];
    let seq: Vec<u32> = (0..l).map(|t| cuts.iter().filter(|&&c| c <= t).count() as u32 * 7).collect();
    let seq = Tensor::from_vec(seq, (1, l), &Device::Cpu).unwrap();
    let packed = ops::ssd(&SsdArgs {
        x: &x,
        dt: &dt,
        a: &a,
        b: &b,
        c: &c,
        d: None,
        dt_bias: None,
        dt_softplus: true,
        initial_state: None,
        seq_idx: Some(&seq),
        chunk_size: 4,
    })
    .unwrap();
    for w in cuts.windows(2) {
        let (s, len) = (w[0], w[1] - w[0]);
        let nr = |t: &Tensor| t.narrow(1, s, len).unwrap();
        let (xs, dts, bs, cs) = (nr(&x), nr(&dt), nr(&b), nr(&c));
        let one = ops::ssd(&SsdArgs {
            x: &xs,
            dt: &dts,
            a: &a,
            b: &bs,
            c: &cs,
            d: None,
            dt_bias: None,
            dt_softplus: true,
            initial_state: None,
            seq_idx: None,
            chunk_size: 4,
        })
        .unwrap();
        assert!(rel(&packed.y.narrow(1, s, len).unwrap(), &one.y) < 1e-12, "document at {s}");
        if w[1] == l {
            assert!(rel(&packed.final_state, &one.final_state) < 1e-12);
        }
    }
}

/// Same inputs, 1 or 2 threads: bit-identical outputs and gradients.
#[test]
fn deterministic_across_thread_counts() {
    let c = Case {
        b: 2,
        l: 300,
        g: 2,
        hpg: 2,
        p: 16,
        n: 16,
        chunk: 64,
        d_kind: 1,
        bias: true,
        softplus: true,
        init: true,
        seq: true,
        xview: View::Contiguous,
        bview: View::Contiguous,
        seed: 11,
    };
    let inp = inputs(&c, DType::F32).unwrap();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let a = args(&inp, &c);
            let out = ops::ssd(&a).unwrap();
            let g = ops::ssd_backward(&a, &out.saved, &inp.gy, Some(&inp.gfin)).unwrap();
            let mut all = vec![out.y.to_vec::<f32>().unwrap(), out.final_state.to_vec::<f32>().unwrap()];
            for (_, t, _) in grads_pairs(&g, &g) {
                all.push(t.to_vec::<f32>().unwrap());
            }
            all
        })
    };
    let one = run(1);
    let bits = |v: &Vec<Vec<f32>>| {
        v.iter().map(|x| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>()).collect::<Vec<_>>()
    };
    assert_eq!(bits(&one), bits(&run(2)));
    assert_eq!(bits(&one), bits(&run(2)), "run to run");
}

#[test]
fn bad_arguments_are_errors_naming_them() {
    let dev = Device::Cpu;
    let f = DType::F32;
    let x = Tensor::zeros((1, 4, 4, 2), f, &dev).unwrap();
    let dt = Tensor::zeros((1, 4, 4), f, &dev).unwrap();
    let a = Tensor::zeros(4, f, &dev).unwrap();
    let b = Tensor::zeros((1, 4, 3, 5), f, &dev).unwrap();
    let b1 = Tensor::zeros((1, 4, 1, 5), f, &dev).unwrap();
    let bad_dt = Tensor::full(f64::NAN, (1, 4, 4), f, &dev).unwrap();
    let mk = |x, dt, b, c, chunk| SsdArgs {
        x,
        dt,
        a: &a,
        b,
        c,
        d: None,
        dt_bias: None,
        dt_softplus: true,
        initial_state: None,
        seq_idx: None,
        chunk_size: chunk,
    };
    let msg = |r: Result<ops::SsdOutput>| match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    };
    assert!(msg(ops::ssd(&mk(&x, &dt, &b, &b, 4))).contains("groups"));
    assert!(msg(ops::ssd(&mk(&x, &dt, &b1, &b, 4))).contains("`c`"));
    assert!(msg(ops::ssd(&mk(&x, &bad_dt, &b1, &b1, 4))).contains("`dt`"));
    assert!(msg(ops::ssd(&mk(&x, &dt, &b1, &b1, 0))).contains("chunk_size"));
    assert!(msg(ops::ssd(&mk(&x, &a, &b1, &b1, 4))).contains("`dt`"));
    let x64 = x.to_dtype(DType::F64).unwrap();
    assert!(msg(ops::ssd(&mk(&x64, &dt, &b1, &b1, 4))).contains("dtype"));
}
