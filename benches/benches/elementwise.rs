//! f32 elementwise ops through `moeba_kernels::ops`: a chain `silu(a * b + c)` as an unfused MLP
//! gate would run it (three ops, three fresh outputs), and `add` alone, on 1M elements (plus
//! `add` on 16M, beyond the caches). Throughput: elements per second.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moeba_benches::randn;
use moeba_kernels::ops;

const N: usize = 1 << 20;

fn chain(c: &mut Criterion) {
    let mut group = c.benchmark_group("elementwise_f32");
    let (a, b, cc) = (randn(4, &[N]), randn(5, &[N]), randn(6, &[N]));
    let (a, b, cc) = (a.expect("input"), b.expect("input"), cc.expect("input"));
    group.throughput(Throughput::Elements(N as u64));
    group.bench_function(BenchmarkId::new("silu(a*b+c)", N), |bch| {
        bch.iter(|| {
            let ab = ops::mul(&a, &b).expect("mul");
            ops::silu(&ops::add(&ab, &cc).expect("add")).expect("silu")
        })
    });
    for n in [N, 16 * N] {
        let x = randn(7, &[n]).expect("input");
        let y = randn(8, &[n]).expect("input");
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("add", n), &(x, y), |bch, (x, y)| {
            bch.iter(|| ops::add(x, y).expect("add"))
        });
    }
    group.finish();
}

criterion_group!(benches, chain);
criterion_main!(benches);
