//! The fused SSD node: gradient checks against central differences (both outputs, every input,
//! with and without the optional inputs and seq_idx), and one node on the tape.

use moeba_autograd::fused::ssd::{ssd, SsdInputs};
use moeba_autograd::{check_gradients, GradCheckOptions, Var};
use moeba_tensor::{DType, Device, Tensor};

fn t(seed: u64, dims: &[usize], lo: f64, hi: f64) -> Tensor {
    Tensor::rand(seed, dims.to_vec(), lo, hi, DType::F64, &Device::Cpu).unwrap()
}

/// Inputs: x, dt, a, b, c, d, dt_bias, initial_state.
fn inputs(b: usize, l: usize, h: usize, p: usize, g: usize, n: usize, d_hp: bool) -> Vec<Tensor> {
    vec![
        t(1, &[b, l, h, p], -1.0, 1.0),
        t(2, &[b, l, h], -1.0, 0.5),
        t(3, &[h], -1.5, -0.3),
        t(4, &[b, l, g, n], -1.0, 1.0),
        t(5, &[b, l, g, n], -1.0, 1.0),
        if d_hp { t(6, &[h, p], 0.5, 1.5) } else { t(6, &[h], 0.5, 1.5) },
        t(7, &[h], -0.5, 0.5),
        t(8, &[b, h, p, n], -1.0, 1.0),
    ]
}

fn check(ins: &[Tensor], seq: Option<&Tensor>, chunk: usize, output: usize, full: bool) {
    let f = |v: &[Var]| {
        let (y, fin) = ssd(&SsdInputs {
            x: &v[0],
            dt: &v[1],
            a: &v[2],
            b: &v[3],
            c: &v[4],
            d: if full { Some(&v[5]) } else { None },
            dt_bias: if full { Some(&v[6]) } else { None },
            initial_state: if full { Some(&v[7]) } else { None },
            dt_softplus: true,
            seq_idx: seq,
            chunk_size: chunk,
        })?;
        Ok(if output == 0 { y } else { fin })
    };
    let opts = GradCheckOptions::default().with_tolerances(1e-7, 1e-5);
    let report = check_gradients(f, ins, &opts).unwrap();
    for (i, r) in report.inputs.iter().enumerate().take(if full { 8 } else { 5 }) {
        assert!(r.had_gradient, "input {i} got no gradient");
    }
}

#[test]
fn gradcheck_y_and_final_state_all_inputs() {
    let ins = inputs(2, 7, 4, 3, 2, 3, false);
    for chunk in [3, 16] {
        check(&ins, None, chunk, 0, true);
        check(&ins, None, chunk, 1, true);
    }
}

#[test]
fn gradcheck_d_per_channel_and_seq_idx() {
    let ins = inputs(1, 9, 2, 2, 1, 3, true);
    let seq = Tensor::from_vec(vec![0u32, 0, 0, 1, 1, 2, 2, 2, 2], (1, 9), &Device::Cpu).unwrap();
    check(&ins, Some(&seq), 4, 0, true);
    check(&ins, Some(&seq), 4, 1, true);
}

#[test]
fn gradcheck_without_optional_inputs() {
    let ins = inputs(1, 5, 2, 2, 2, 2, false);
    check(&ins[..5], None, 2, 0, false);
}

#[test]
fn one_node_on_the_tape() {
    let ins = inputs(1, 5, 2, 2, 1, 3, false);
    let v: Vec<Var> = ins.into_iter().map(Var::param).collect();
    let (y, fin) = ssd(&SsdInputs {
        x: &v[0],
        dt: &v[1],
        a: &v[2],
        b: &v[3],
        c: &v[4],
        d: Some(&v[5]),
        dt_bias: Some(&v[6]),
        initial_state: None,
        dt_softplus: true,
        seq_idx: None,
        chunk_size: 2,
    })
    .unwrap();
    assert_eq!(y.op_name(), Some("ssd"));
    assert_eq!(fin.op_name(), Some("ssd"));
    // Only the final state carries a gradient: the backward still reaches every input.
    let grads = fin.sum_all().unwrap().backward().unwrap();
    for (i, x) in v.iter().enumerate().take(7) {
        assert!(grads.get(x).is_some(), "input {i} has no gradient");
    }
}
