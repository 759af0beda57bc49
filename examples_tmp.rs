fn main() {
    use half::slice::HalfFloatSliceExt;
    let src: Vec<half::f16> = (0..4096).map(|i| half::f16::from_f32(i as f32 * 0.01)).collect();
    let mut dst = vec![0f32; 4096];
    let t = std::time::Instant::now();
    for _ in 0..10000 { src.convert_to_f32_slice(&mut dst); std::hint::black_box(&dst); }
    let ns = t.elapsed().as_nanos() as f64 / (10000.0 * 4096.0);
    println!("f16->f32: {ns:.3} ns/elem");
}
