//! Gradient checks of the fused Mamba-1 ops (selective scan, causal conv1d) against central
//! differences, in f64 on small shapes: every input, both scan outputs, seq_idx restarts.

use moeba_autograd::fused::conv1d::causal_conv1d;
use moeba_autograd::fused::selective_scan::{selective_scan, ScanInputs};
use moeba_autograd::{check_gradients, GradCheckOptions, Var};
use moeba_tensor::{DType, Device, Tensor};

fn rand(seed: u64, shape: &[usize], lo: f64, hi: f64) -> Tensor {
    Tensor::rand(seed, shape.to_vec(), lo, hi, DType::F64, &Device::Cpu).unwrap()
}

fn seq_ids(b: usize, l: usize, cut: usize) -> Tensor {
    let ids: Vec<i64> = (0..b * l).map(|i| i64::from(i % l >= cut)).collect();
    Tensor::from_vec(ids, (b, l), &Device::Cpu).unwrap()
}

#[test]
fn selective_scan_gradcheck_every_input_and_both_outputs() {
    let (b, d, l, n, g) = (2, 4, 6, 3, 2);
    let inputs = vec![
        rand(1, &[b, d, l], -1.0, 1.0),    // u
        rand(2, &[b, d, l], -2.0, 1.0),    // delta
        rand(3, &[d, n], -1.5, -0.2),      // a
        rand(4, &[b, g, n, l], -1.0, 1.0), // b
        rand(5, &[b, g, n, l], -1.0, 1.0), // c
        rand(6, &[d], 0.5, 1.5),           // d
        rand(7, &[b, d, l], -2.0, 2.0),    // z
        rand(8, &[d], -1.0, 0.5),          // delta_bias
        rand(9, &[b, d, n], -1.0, 1.0),    // initial_state
    ];
    for seq in [None, Some(seq_ids(b, l, 4))] {
        for which in 0..2 {
            let report = check_gradients(
                |v: &[Var]| {
                    let (out, last) = selective_scan(&ScanInputs {
                        u: &v[0],
                        delta: &v[1],
                        a: &v[2],
                        b: &v[3],
                        c: &v[4],
                        d: Some(&v[5]),
                        z: Some(&v[6]),
                        delta_bias: Some(&v[7]),
                        delta_softplus: true,
                        initial_state: Some(&v[8]),
                        seq_idx: seq.as_ref(),
                    })?;
                    // Both outputs together, or the state alone (the state-passing backward).
                    if which == 0 {
                        out.sum_all()?.add(&last.mul(&last)?.sum_all()?)?.add(&out.mul(&out)?.sum_all()?)
                    } else {
                        Ok(last)
                    }
                },
                &inputs,
                &GradCheckOptions::default(),
            )
            .unwrap();
            assert!(report.inputs.iter().all(|r| r.had_gradient), "{report:?}");
        }
    }
}

#[test]
fn selective_scan_gradcheck_without_optionals_and_softplus() {
    let (b, d, l, n) = (1, 3, 5, 2);
    let inputs = vec![
        rand(11, &[b, d, l], -1.0, 1.0),
        rand(12, &[b, d, l], 0.1, 0.6),
        rand(13, &[d, n], -1.5, -0.2),
        rand(14, &[b, 1, n, l], -1.0, 1.0),
        rand(15, &[b, 1, n, l], -1.0, 1.0),
    ];
    check_gradients(
        |v: &[Var]| {
            let (out, _) = selective_scan(&ScanInputs {
                u: &v[0],
                delta: &v[1],
                a: &v[2],
                b: &v[3],
                c: &v[4],
                d: None,
                z: None,
                delta_bias: None,
                delta_softplus: false,
                initial_state: None,
                seq_idx: None,
            })?;
            Ok(out)
        },
        &inputs,
        &GradCheckOptions::default(),
    )
    .unwrap();
}

#[test]
fn causal_conv1d_gradcheck() {
    let (b, d, l, k) = (2, 3, 7, 4);
    let inputs =
        vec![rand(21, &[b, d, l], -2.0, 2.0), rand(22, &[d, k], -1.0, 1.0), rand(23, &[d], -1.0, 1.0)];
    for seq in [None, Some(seq_ids(b, l, 3))] {
        for silu in [false, true] {
            for channel_last in [false, true] {
                check_gradients(
                    |v: &[Var]| {
                        // A channel-last view of x exercises the (b, l, d) kernel.
                        let x = if channel_last {
                            v[0].transpose(1, 2)?.contiguous()?.transpose(1, 2)?
                        } else {
                            v[0].clone()
                        };
                        causal_conv1d(&x, &v[1], Some(&v[2]), silu, seq.as_ref())
                    },
                    &inputs,
                    &GradCheckOptions::default(),
                )
                .unwrap();
            }
        }
    }
    // Without a bias.
    check_gradients(
        |v: &[Var]| causal_conv1d(&v[0], &v[1], None, true, None),
        &inputs[..2],
        &GradCheckOptions::default(),
    )
    .unwrap();
}
