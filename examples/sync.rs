fn main() {
    let pool = candle_core::utils::barrier_pool();
    for _ in 0..1000 {
        pool.execute_chunked(4, |_| {});
    }
    let n = 20000;
    let t = std::time::Instant::now();
    for _ in 0..n {
        pool.execute_chunked(4, |r| {
            std::hint::black_box(r);
        });
    }
    println!(
        "{:.2} us per execute",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
}
