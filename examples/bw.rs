fn main() {
    let n = 100_000_000usize / 8;
    let v: Vec<u64> = (0..n as u64).collect();
    for threads in [1, 2] {
        let t = std::time::Instant::now();
        let reps = 10;
        let mut tot = 0u64;
        for _ in 0..reps {
            tot = tot.wrapping_add(std::thread::scope(|s| {
                let hs: Vec<_> = v
                    .chunks(n / threads)
                    .map(|c| s.spawn(move || c.iter().fold(0u64, |a, &b| a ^ b)))
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().unwrap())
                    .fold(0, |a, b| a ^ b)
            }));
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "{threads} threads: {:.1} GB/s ({tot})",
            (reps * n * 8) as f64 / s / 1e9
        );
    }
}
