//! f32 softmax over the last dim of `(rows, cols)` matrices through `moeba_kernels::ops::softmax`.
//! Throughput is the minimum traffic: one read and one write of every element.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moeba_benches::randn;
use moeba_kernels::ops;

fn softmax(c: &mut Criterion) {
    let mut group = c.benchmark_group("softmax_f32");
    for (rows, cols) in [(1024usize, 1024usize), (4096, 4096), (256, 32000)] {
        let x = randn(3, &[rows, cols]).expect("random input");
        group.throughput(Throughput::Bytes((rows * cols * 8) as u64));
        group.bench_with_input(BenchmarkId::from_parameter(format!("{rows}x{cols}")), &x, |b, x| {
            b.iter(|| ops::softmax(x, 1).expect("softmax"))
        });
    }
    group.finish();
}

criterion_group!(benches, softmax);
criterion_main!(benches);
