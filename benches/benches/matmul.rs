//! f32 matrix products `(n, n) @ (n, n)` through `moeba_kernels::ops::matmul`, for n = 256, 512,
//! 1024. Throughput is in FLOPs (criterion prints it as elements/s: read "Gelem/s" as GFLOP/s).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moeba_benches::{matmul_flops, randn};
use moeba_kernels::ops;

fn matmul(c: &mut Criterion) {
    let mut group = c.benchmark_group("matmul_f32");
    for n in [256usize, 512, 1024] {
        let a = randn(1, &[n, n]).expect("random input");
        let b = randn(2, &[n, n]).expect("random input");
        group.throughput(Throughput::Elements(matmul_flops(n, n, n)));
        if n >= 1024 {
            group.sample_size(10);
        }
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("{n}x{n}x{n}")),
            &(a, b),
            |bch, (a, b)| bch.iter(|| ops::matmul(a, b).expect("matmul")),
        );
    }
    group.finish();
}

criterion_group!(benches, matmul);
criterion_main!(benches);
