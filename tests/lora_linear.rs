//! The LoRA layer's forward and backward (crates/loraga-core/src/lora_linear.rs) by every path,
//! against an f64 reference of the math: Y = X Wᵀ + s (X Aᵀ) Bᵀ, dX = dY W + s (dY B) A,
//! dA = s (dY B)ᵀ X, dB = s dYᵀ (X Aᵀ); and the in-place accumulation G += alpha dYᵀ X.
//!
//! GPU outputs start as NaN (preallocated outputs filled with NaN, the paths' temporaries
//! poisoned through `poison_outputs`), so an element no kernel wrote fails the check.

use loraga_core::cpu::CpuStorage;
use loraga_core::cpu::gemm::gemm_f64;
use loraga_core::cuda::ops::poison_outputs;
use loraga_core::cuda::{CudaDevice, lora_dy};
use loraga_core::gemm::{Gemm, GemmDims};
use loraga_core::lora_linear::{self as lora, Forward, Grads, Lora, LoraPath};
use loraga_core::testing::{randn, rel_error};
use loraga_core::{DType, Device, Tensor};
use rand::SeedableRng;

struct Case {
    x: Tensor,
    w: Tensor,
    a: Tensor,
    b: Tensor,
    dy: Tensor,
    scale: f32,
    y: Vec<f64>,
    dx: Vec<f64>,
    da: Vec<f64>,
    db: Vec<f64>,
}

fn mm(g: Gemm, m: usize, n: usize, k: usize, a: &[f64], b: &[f64], scale: f64) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    gemm_f64(&Gemm { alpha: scale as f32, ..g }, GemmDims { m, n, k }, a, b, &mut c);
    c
}

fn add(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// A normal tensor of `dims` (std `std`) in `dtype`, and its values as f64 (after the dtype's
/// rounding), for the references.
fn random(rng: &mut impl rand::Rng, dims: [usize; 2], std: f32, dtype: DType, dev: &Device) -> (Tensor, Vec<f64>) {
    let v: Vec<f32> = randn(rng, dims[0] * dims[1]).into_iter().map(|x| x * std).collect();
    let s = CpuStorage::from_f32_vec(dtype, v);
    let wide: Vec<f64> = s.to_f32_vec().into_iter().map(f64::from).collect();
    (Tensor::from_cpu(s, dims.into(), dev).unwrap(), wide)
}

fn case(rng: &mut impl rand::Rng, (m, k, n, r): (usize, usize, usize, usize), dtype: DType, dev: &Device) -> Case {
    let mut t = |rows: usize, cols: usize, std: f32| random(rng, [rows, cols], std, dtype, dev);
    let (x, x64) = t(m, k, 1.0);
    let (w, w64) = t(n, k, 0.05);
    let (a, a64) = t(r, k, 0.05);
    let (b, b64) = t(n, r, 0.05);
    let (dy, dy64) = t(m, n, 1.0);
    let s = 2.0f64;
    let nt = Gemm { trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0, deterministic: false };
    let nn = Gemm { trans_b: false, ..nt };
    let tn = Gemm { trans_a: true, trans_b: false, ..nt };
    let u = mm(nt, m, r, k, &x64, &a64, 1.0); // X Aᵀ
    let y = add(&mm(nt, m, n, k, &x64, &w64, 1.0), &mm(nt, m, n, r, &u, &b64, s));
    let v = mm(nn, m, r, n, &dy64, &b64, 1.0); // dY B
    let dx = add(&mm(nn, m, k, n, &dy64, &w64, 1.0), &mm(nn, m, k, r, &v, &a64, s));
    let da = mm(tn, r, k, m, &v, &x64, s);
    let db = mm(tn, n, r, m, &dy64, &u, s);
    Case { x, w, a, b, dy, scale: s as f32, y, dx, da, db }
}

/// Runs one path into NaN-filled outputs and compares all four results with the reference.
fn check(path: LoraPath, c: &Case, bound: f64, what: &str) {
    let l = Lora { w: &c.w, a: &c.a, b: &c.b, scale: c.scale };
    let (dev, dt) = (c.x.device(), c.x.dtype());
    let (m, k, n, r) = (c.x.dims()[0], c.x.dims()[1], c.w.dims()[0], c.a.dims()[0]);
    let nan = |rows: usize, cols: usize, dtype: DType| Tensor::full([rows, cols], dtype, f32::NAN, &dev).unwrap();
    let mut f = Forward { y: nan(m, n, dt), u: nan(m, r, dt) };
    lora::forward_into(path, &l, &c.x, &mut f).unwrap();
    let mut g = Grads { dx: nan(m, k, dt), da: nan(r, k, DType::F32), db: nan(n, r, DType::F32) };
    let mut v = nan(m, r, dt);
    lora::backward_into(path, &l, &c.x, &f.u, &c.dy, &mut v, &mut g).unwrap();
    for (name, out, reference) in [("Y", &f.y, &c.y), ("dX", &g.dx, &c.dx), ("dA", &g.da, &c.da), ("dB", &g.db, &c.db)]
    {
        let err = rel_error(&out.to_f32_vec().unwrap(), reference);
        assert!(err <= bound, "{} {what} {name}: rel. error {err:.2e} > {bound:.0e}", path.name());
    }
}

#[test]
fn cpu_lora_matches_f64_reference() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    for shape in [(70, 96, 80, 8), (33, 17, 50, 3), (128, 64, 64, 64)] {
        let c = case(&mut rng, shape, DType::F32, &Device::Cpu);
        for path in LoraPath::ALL {
            check(path, &c, 1e-5, &format!("{shape:?}"));
        }
    }
}

#[test]
fn bad_shapes_dtypes_and_ranks_are_clear_errors() {
    let dev = Device::Cpu;
    let z = |r: usize, c: usize| Tensor::zeros([r, c], DType::F32, &dev).unwrap();
    let (x, w, a, b) = (z(4, 8), z(6, 8), z(2, 8), z(6, 2));
    let l = Lora { w: &w, a: &a, b: &b, scale: 1.0 };
    let err = |r: loraga_core::Result<()>| r.unwrap_err().to_string();
    let fwd = |l: &Lora, x: &Tensor| lora::forward(LoraPath::Fused, l, x).map(|_| ());

    let bad_b = z(5, 2);
    let e = err(fwd(&Lora { b: &bad_b, ..l }, &x));
    assert!(e.contains("B is [5, 2], expected [6, 2]"), "{e}");
    let bad_a = z(2, 7);
    let e = err(fwd(&Lora { a: &bad_a, ..l }, &x));
    assert!(e.contains("A is [2, 7]"), "{e}");
    let (big_a, big_b) = (z(7, 8), z(6, 7));
    let e = err(fwd(&Lora { a: &big_a, b: &big_b, ..l }, &x));
    assert!(e.contains("rank r = 7 must be in 1..=min(K, N) = 6"), "{e}");
    let x16 = Tensor::zeros([4, 8], DType::BF16, &dev).unwrap();
    let e = err(fwd(&l, &x16));
    assert!(e.contains("X is bf16 but W is f32"), "{e}");
    let x3 = Tensor::zeros([4, 8, 1], DType::F32, &dev).unwrap();
    let e = err(fwd(&l, &x3));
    assert!(e.contains("X must be a matrix"), "{e}");

    // Preallocated outputs and the backward's inputs are named when they do not fit.
    let mut f = Forward { y: z(4, 5), u: z(4, 2) };
    let e = err(lora::forward_into(LoraPath::Fused, &l, &x, &mut f));
    assert!(e.contains("Y is [4, 5] f32, expected [4, 6] f32"), "{e}");
    let f = lora::forward(LoraPath::Fused, &l, &x).unwrap();
    let e = err(lora::backward(LoraPath::Fused, &l, &x, &f.u, &z(4, 5)).map(|_| ()));
    assert!(e.contains("dY is [4, 5] f32, expected [4, 6] f32"), "{e}");
    let e = err(lora::backward(LoraPath::Fused, &l, &x, &z(3, 2), &z(4, 6)).map(|_| ()));
    assert!(e.contains("U is [3, 2] f32, expected [4, 2] f32"), "{e}");
    let mut grads = Grads { dx: z(4, 8), da: Tensor::zeros([2, 8], DType::BF16, &dev).unwrap(), db: z(6, 2) };
    let e = err(lora::backward_into(LoraPath::Fused, &l, &x, &f.u, &z(4, 6), &mut z(4, 2), &mut grads));
    assert!(e.contains("dA is [2, 8] bf16, expected [2, 8] f32"), "{e}");

    let mut g16 = Tensor::zeros([6, 8], DType::BF16, &dev).unwrap();
    let e = err(lora::accumulate_weight_grad(LoraPath::Fused, &mut g16, &z(4, 6), &x, 1.0));
    assert!(e.contains("G must be f32"), "{e}");
    let e = err(lora::accumulate_weight_grad(LoraPath::Fused, &mut z(6, 7), &z(4, 6), &x, 1.0));
    assert!(e.contains("G must be [6, 8], got [6, 7]"), "{e}");
    let e = err(lora::accumulate_weight_grad(LoraPath::Fused, &mut z(6, 8), &z(5, 6), &x, 1.0));
    assert!(e.contains("dY is [5, 6] and X [4, 8]"), "{e}");
    let dy16 = Tensor::zeros([4, 6], DType::BF16, &dev).unwrap();
    let e = err(lora::accumulate_weight_grad(LoraPath::Fused, &mut z(6, 8), &dy16, &x, 1.0));
    assert!(e.contains("dY is bf16 but X is f32"), "{e}");
}

fn gpu() -> Device {
    Device::Cuda(CudaDevice::new(0).expect("this test needs a CUDA GPU"))
}

/// Ranks 1..256 (multiples of 8 take the engine's two-source GEMMs on sm_90a, the others the
/// cuBLAS fallback), ragged M, K and N, bf16 and f32 operands, every path.
#[test]
#[ignore = "needs a CUDA GPU"]
fn every_path_and_rank_matches_f64_reference_on_the_gpu() {
    let dev = gpu();
    poison_outputs(true);
    let mut rng = rand::rngs::StdRng::seed_from_u64(22);
    let shapes = [
        (77, 96, 40, 1),
        (100, 64, 72, 3),
        (517, 136, 72, 8),
        (131, 203, 96, 8),
        (131, 200, 90, 13),
        (300, 512, 264, 16),
        (257, 264, 520, 64),
        (200, 256, 320, 128),
        (190, 300, 264, 256),
        (64, 256, 256, 256),
    ];
    for (dtype, bound) in [(DType::BF16, 5e-3), (DType::F32, 1e-5)] {
        for shape in shapes {
            let c = case(&mut rng, shape, dtype, &dev);
            for path in LoraPath::ALL {
                check(path, &c, bound, &format!("{dtype} {shape:?}"));
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn weight_gradient_accumulates_in_place_on_the_gpu() {
    let dev = gpu();
    poison_outputs(true);
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    for (dtype, (m, n, k)) in
        [(DType::BF16, (384, 264, 520)), (DType::BF16, (77, 90, 203)), (DType::F32, (130, 72, 96))]
    {
        for path in LoraPath::ALL {
            let mut g = Tensor::full([n, k], DType::F32, 0.0, &dev).unwrap();
            let mut reference = vec![0.0f64; n * k];
            for _ in 0..3 {
                let c = case(&mut rng, (m, k, n, 1), dtype, &dev);
                lora::accumulate_weight_grad(path, &mut g, &c.dy, &c.x, 0.25).unwrap();
                let dy64: Vec<f64> = c.dy.to_f32_vec().unwrap().into_iter().map(f64::from).collect();
                let x64: Vec<f64> = c.x.to_f32_vec().unwrap().into_iter().map(f64::from).collect();
                let tn = Gemm { trans_a: true, trans_b: false, alpha: 0.25, beta: 1.0, deterministic: false };
                gemm_f64(&tn, GemmDims { m: n, n: k, k: m }, &dy64, &x64, &mut reference);
            }
            let err = rel_error(&g.to_f32_vec().unwrap(), &reference);
            assert!(err <= 1e-5, "{} {dtype} {m}x{n}x{k}: rel. error {err:.2e}", path.name());
        }
    }
}

/// A tensor on the wrong device is an error naming it, on every path.
#[test]
#[ignore = "needs a CUDA GPU"]
fn mixed_devices_are_clear_errors_on_the_gpu() {
    let dev = gpu();
    let mut rng = rand::rngs::StdRng::seed_from_u64(24);
    let c = case(&mut rng, (16, 32, 24, 8), DType::BF16, &dev);
    let b_cpu = c.b.to_device(&Device::Cpu).unwrap();
    for path in LoraPath::ALL {
        let l = Lora { w: &c.w, a: &c.a, b: &b_cpu, scale: 1.0 };
        let e = lora::forward(path, &l, &c.x).err().unwrap().to_string();
        assert!(e.contains("B on cpu"), "{}: {e}", path.name());
        let l = Lora { w: &c.w, a: &c.a, b: &c.b, scale: 1.0 };
        let f = lora::forward(path, &l, &c.x).unwrap();
        let dy_cpu = c.dy.to_device(&Device::Cpu).unwrap();
        let e = lora::backward(path, &l, &c.x, &f.u, &dy_cpu).err().unwrap().to_string();
        assert!(e.contains("dY on cpu"), "{}: {e}", path.name());
    }
}

/// V' = s dY B and dB = dYᵀ U' by the one-pass kernel (`cuda::lora_dy`) against f64, on shapes
/// that cut dY into many regions (so both split sums run), with ragged edges and r from 8 to 32;
/// a rerun gives the same bits.
#[test]
#[ignore = "needs a CUDA GPU"]
fn one_pass_dy_products_match_f64_and_rerun_bit_identically() {
    let dev = gpu();
    let Device::Cuda(cuda_dev) = &dev else { unreachable!("gpu() is a CUDA device") };
    let mut rng = rand::rngs::StdRng::seed_from_u64(25);
    for (m, n, r) in [(1, 8, 8), (131, 96, 16), (1100, 2056, 24), (3000, 1544, 32), (2053, 4104, 8), (4096, 11008, 16)]
    {
        assert!(lora_dy::takes(cuda_dev, DType::BF16, m, n, r), "{m}x{n} r={r}");
        let mut t = |rows: usize, cols: usize, std: f32| random(&mut rng, [rows, cols], std, DType::BF16, &dev);
        let ((dy, dy64), (b, b64), (u, u64)) = (t(m, n, 1.0), t(n, r, 0.05), t(m, r, 0.5));
        let s = 2.0f32;
        let nn = Gemm { trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0, deterministic: false };
        let v_ref = mm(nn, m, r, n, &dy64, &b64, s as f64);
        let db_ref = mm(Gemm { trans_a: true, ..nn }, n, r, m, &dy64, &u64, 1.0);
        let run = || {
            let mut v = Tensor::full([m, r], DType::BF16, f32::NAN, &dev).unwrap();
            let mut db = Tensor::full([n, r], DType::F32, f32::NAN, &dev).unwrap();
            let dy = dy.cuda_storage("test", "dY").unwrap();
            let (b, u) = (b.cuda_storage("test", "B").unwrap(), u.cuda_storage("test", "U'").unwrap());
            let (vs, dbs) = (v.cuda_storage_mut("test", "V'").unwrap(), db.cuda_storage_mut("test", "dB").unwrap());
            lora_dy::run(dy, b, u, (m, n, r), s, vs, dbs).unwrap();
            (v.to_f32_vec().unwrap(), db.to_f32_vec().unwrap())
        };
        let (v, db) = run();
        // V' is stored in bf16 (a rounding of up to 2⁻⁹); dB is an f32 sum of exact products.
        let (ev, edb) = (rel_error(&v, &v_ref), rel_error(&db, &db_ref));
        assert!(ev <= 4e-3, "{m}x{n} r={r}: V' rel. error {ev:.2e}");
        assert!(edb <= 2e-5, "{m}x{n} r={r}: dB rel. error {edb:.2e}");
        let (v2, db2) = run();
        let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same(&v, &v2) && same(&db, &db2), "{m}x{n} r={r}: a rerun differs");
    }
    // Buffers that do not match the shape, and ranks the kernel does not take, are errors.
    let t = |rows: usize, cols: usize, dtype: DType| Tensor::zeros([rows, cols], dtype, &dev).unwrap();
    let (dy, b, u) = (t(64, 128, DType::BF16), t(128, 16, DType::BF16), t(64, 16, DType::BF16));
    let (mut v, mut db) = (t(64, 16, DType::BF16), t(100, 16, DType::F32));
    let (dy, b, u) = (
        dy.cuda_storage("test", "dY").unwrap(),
        b.cuda_storage("test", "B").unwrap(),
        u.cuda_storage("test", "U'").unwrap(),
    );
    let (vs, dbs) = (v.cuda_storage_mut("test", "V'").unwrap(), db.cuda_storage_mut("test", "dB").unwrap());
    let e = lora_dy::run(dy, b, u, (64, 128, 16), 1.0, vs, dbs).unwrap_err().to_string();
    assert!(e.contains("dB holds 1600 elements, expected 2048"), "{e}");
    let e = lora_dy::run(dy, b, u, (64, 128, 40), 1.0, vs, dbs).unwrap_err().to_string();
    assert!(e.contains("r ≤ 32"), "{e}");
}
