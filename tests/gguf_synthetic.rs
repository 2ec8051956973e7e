//! The GGUF reader against tiny files written here, by a minimal writer that shares no code with
//! the reader: metadata of every value type, every tensor type we dequantise (checked against a
//! per-element transcription of ggml's block formulas), and each kind of malformed file.

use std::path::{Path, PathBuf};

use half::f16;
use loraga_core::io::{GgmlType, GgufFile, GgufValue, quant};

mod common;
use common::gguf_writer::{TensorSpec, gguf_bytes, tensor};
use rand::{Rng, SeedableRng, rngs::StdRng};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn rng() -> (StdRng, u64) {
    let seed: u64 = rand::rng().random();
    (StdRng::seed_from_u64(seed), seed)
}

// ---- an independent reading of the block formats ---------------------------------------------

/// IEEE half bits → value, by the definition (not through the `half` crate the reader uses).
fn half_value(lo: u8, hi: u8) -> f64 {
    let bits = u16::from_le_bytes([lo, hi]);
    let sign = if bits >> 15 == 1 { -1.0 } else { 1.0 };
    let (exp, man) = ((bits >> 10) & 0x1f, (bits & 0x3ff) as f64);
    assert!(exp != 0x1f, "test data holds no inf/NaN scales");
    if exp == 0 { sign * man * 2f64.powi(-24) } else { sign * (1.0 + man / 1024.0) * 2f64.powi(exp as i32 - 15) }
}

/// Element `e` of a tensor of type `ty` stored in `data`, one element at a time.
fn element(ty: GgmlType, data: &[u8], e: usize) -> f64 {
    let (block, j) = (e / 32, e % 32);
    match ty {
        GgmlType::F32 => f32::from_le_bytes(data[4 * e..4 * e + 4].try_into().unwrap()) as f64,
        GgmlType::F16 => half_value(data[2 * e], data[2 * e + 1]),
        GgmlType::BF16 => f32::from_bits(u32::from_le_bytes([0, 0, data[2 * e], data[2 * e + 1]])) as f64,
        GgmlType::Q8_0 => {
            let b = &data[34 * block..];
            half_value(b[0], b[1]) * (b[2 + j] as i8) as f64
        }
        GgmlType::Q4_0 => {
            let b = &data[18 * block..];
            let byte = b[2 + j % 16];
            let q = if j < 16 { byte & 0xf } else { byte >> 4 };
            half_value(b[0], b[1]) * (q as f64 - 8.0)
        }
        GgmlType::Q4_1 => {
            let b = &data[20 * block..];
            let byte = b[4 + j % 16];
            let q = if j < 16 { byte & 0xf } else { byte >> 4 };
            half_value(b[0], b[1]) * q as f64 + half_value(b[2], b[3])
        }
        t => panic!("no reference for {t}"),
    }
}

/// Random bytes for `n` elements of `ty`: random scales (finite halves) and random quants.
fn random_data(rng: &mut StdRng, ty: GgmlType, n: usize) -> Vec<u8> {
    let half = |rng: &mut StdRng| f16::from_f32(rng.random_range(-2.0f32..2.0)).to_bits().to_le_bytes();
    let mut out = Vec::new();
    match ty {
        GgmlType::F32 => (0..n).for_each(|_| out.extend(rng.random_range(-3.0f32..3.0).to_le_bytes())),
        GgmlType::F16 | GgmlType::BF16 if ty == GgmlType::F16 => (0..n).for_each(|_| out.extend(half(rng))),
        GgmlType::BF16 => (0..n)
            .for_each(|_| out.extend(half::bf16::from_f32(rng.random_range(-3.0f32..3.0)).to_bits().to_le_bytes())),
        _ => {
            let (n_scales, n_quants) = match ty {
                GgmlType::Q8_0 => (1, 32),
                GgmlType::Q4_0 => (1, 16),
                GgmlType::Q4_1 => (2, 16),
                t => panic!("no generator for {t}"),
            };
            for _ in 0..n / 32 {
                (0..n_scales).for_each(|_| out.extend(half(rng)));
                (0..n_quants).for_each(|_| out.push(rng.random()));
            }
        }
    }
    out
}

// ---- tests -------------------------------------------------------------------------------------

#[test]
fn metadata_of_every_value_type_round_trips() {
    let (mut rng, seed) = rng();
    let mut kvs: Vec<(&str, GgufValue)> = vec![
        ("general.architecture", GgufValue::String("llama".into())),
        ("general.alignment", GgufValue::U32(64)),
        ("t.u8", GgufValue::U8(rng.random())),
        ("t.i8", GgufValue::I8(rng.random())),
        ("t.u16", GgufValue::U16(rng.random())),
        ("t.i16", GgufValue::I16(rng.random())),
        ("t.u32", GgufValue::U32(rng.random())),
        ("t.i32", GgufValue::I32(rng.random())),
        ("t.f32", GgufValue::F32(rng.random_range(-1e6..1e6))),
        ("t.bool", GgufValue::Bool(rng.random())),
        ("t.string", GgufValue::String("héllo ▁wörld Ġ".into())),
        ("t.empty_string", GgufValue::String(String::new())),
        ("t.u64", GgufValue::U64(rng.random())),
        ("t.i64", GgufValue::I64(rng.random())),
        ("t.f64", GgufValue::F64(rng.random_range(-1e9..1e9))),
        ("t.empty_array", GgufValue::Array(vec![])),
    ];
    let tokens: Vec<GgufValue> =
        (0..300).map(|i| GgufValue::String(format!("tok{i}_{}", rng.random::<u16>()))).collect();
    kvs.push(("tokenizer.ggml.tokens", GgufValue::Array(tokens)));
    kvs.push(("t.f32s", GgufValue::Array((0..17).map(|_| GgufValue::F32(rng.random())).collect())));
    kvs.push(("t.i32s", GgufValue::Array((0..9).map(|_| GgufValue::I32(rng.random())).collect())));
    let nested = (0..3).map(|i| GgufValue::Array((0..i + 1).map(|_| GgufValue::U16(rng.random())).collect()));
    kvs.push(("t.nested", GgufValue::Array(nested.collect())));

    let dir = tempfile::tempdir().unwrap();
    for version in [2, 3] {
        let data = random_data(&mut rng, GgmlType::F32, 8);
        let path = write(
            dir.path(),
            &format!("meta_v{version}.gguf"),
            &gguf_bytes(version, &kvs, &[tensor("w", &[8], GgmlType::F32, data)]),
        );
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.version(), version);
        assert_eq!(f.alignment(), 64);
        let read: Vec<(&str, &GgufValue)> = f.metadata().iter().collect();
        let want: Vec<(&str, &GgufValue)> = kvs.iter().map(|(k, v)| (*k, v)).collect();
        assert_eq!(read, want, "seed {seed}");

        let m = f.metadata();
        let GgufValue::U32(u) = kvs[6].1 else { unreachable!() };
        assert_eq!(m.get_u32("t.u32").unwrap(), u);
        assert_eq!(m.get_u64("t.u8").unwrap(), kvs[2].1.as_i128().unwrap() as u64);
        assert_eq!(m.get_str("t.string").unwrap(), "héllo ▁wörld Ġ");
        assert_eq!(m.get_str_array("tokenizer.ggml.tokens").unwrap().len(), 300);
        assert_eq!(m.get_f32_array("t.f32s").unwrap().len(), 17);
        assert_eq!(m.get_i64_array("t.i32s").unwrap().len(), 9);
        let name = path.display().to_string();
        for (e, want) in [
            (m.get_u32("nope").unwrap_err(), "metadata key 'nope' is missing"),
            (m.get_f32("t.string").unwrap_err(), "'t.string' is string, expected f32"),
            (m.get_str_array("t.f32s").unwrap_err(), "'t.f32s'[0] is f32, expected string"),
            (m.get_u32("t.u64").unwrap_err(), "does not fit in u32"),
        ] {
            let e = e.to_string();
            assert!(e.contains(want) && e.contains(&name), "{e}");
        }
    }
}

#[test]
fn dequantises_every_supported_type() {
    let (mut rng, seed) = rng();
    let dir = tempfile::tempdir().unwrap();
    // ne = [64, 3, 2]: rows of 64 (two blocks), 3 rows, 2 matrices → PyTorch shape [2, 3, 64].
    let ne = [64u64, 3, 2];
    let n = 64 * 3 * 2;
    let types = GgmlType::DEQUANTIZABLE;
    let specs: Vec<TensorSpec> =
        types.iter().map(|&ty| tensor(&format!("w.{ty}"), &ne, ty, random_data(&mut rng, ty, n))).collect();
    let path = write(dir.path(), "types.gguf", &gguf_bytes(3, &[], &specs));
    let f = GgufFile::open(&path).unwrap();
    for spec in &specs {
        let ty = GgmlType(spec.ty);
        assert_eq!(f.tensor_info(&spec.name).unwrap().ggml_type, ty);
        assert_eq!(f.tensor_bytes(&spec.name).unwrap(), &spec.data[..]);
        let (shape, got) = f.tensor_f32(&spec.name).unwrap();
        assert_eq!(shape, vec![2, 3, 64]);
        for (e, &g) in got.iter().enumerate() {
            let want = element(ty, &spec.data, e);
            // One f32 rounding apart at most (Q4_1 rounds q·d before adding m).
            assert!(
                (g as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{ty} element {e}: {g} vs {want} (seed {seed})"
            );
        }
        assert!(got.iter().any(|&v| v != 0.0), "{ty}: all zeros (seed {seed})");
    }
    let t = f.tensor("w.Q4_1", loraga_core::DType::BF16, &loraga_core::Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[2, 3, 64]);
}

#[test]
fn quantised_tensors_read_back_within_their_bounds() {
    let (mut rng, seed) = rng();
    let x = loraga_core::testing::randn(&mut rng, 32 * 16);
    let dir = tempfile::tempdir().unwrap();
    let specs = vec![
        tensor("q8", &[128, 4], GgmlType::Q8_0, quant::quantize_q8_0(&x).unwrap()),
        tensor("q4_0", &[128, 4], GgmlType::Q4_0, quant::quantize_q4_0(&x).unwrap()),
        tensor("q4_1", &[128, 4], GgmlType::Q4_1, quant::quantize_q4_1(&x).unwrap()),
    ];
    let path = write(dir.path(), "rt.gguf", &gguf_bytes(3, &[], &specs));
    let f = GgufFile::open(&path).unwrap();
    // Relative RMS error: about 1/(2·sqrt(3)·127/3) for 8 bits, ~15x that for 4 bits.
    for (name, bound) in [("q8", 0.02), ("q4_0", 0.2), ("q4_1", 0.15)] {
        let (_, y) = f.tensor_f32(name).unwrap();
        let reference: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let err = loraga_core::testing::rel_error(&y, &reference);
        assert!(err < bound && err > 0.0, "{name}: relative error {err} (seed {seed})");
    }
}

/// Asserts `r` failed with a message that contains the file's path and each of `parts`.
fn assert_err<T: std::fmt::Debug>(r: loraga_core::Result<T>, path: &Path, parts: &[&str]) {
    let e = r.unwrap_err().to_string();
    assert!(e.contains(&path.display().to_string()), "error does not name the file: {e}");
    for p in parts {
        assert!(e.contains(p), "error lacks {p:?}: {e}");
    }
}

#[test]
fn malformed_files_give_errors_naming_file_and_tensor() {
    let (mut rng, _) = rng();
    let dir = tempfile::tempdir().unwrap();
    let kvs = [("general.name", GgufValue::String("tiny".into()))];
    let good =
        gguf_bytes(3, &kvs, &[tensor("blk.0.w", &[32, 2], GgmlType::Q4_1, random_data(&mut rng, GgmlType::Q4_1, 64))]);
    let open = |name: &str, bytes: &[u8]| {
        let p = write(dir.path(), name, bytes);
        (GgufFile::open(&p), p)
    };
    assert!(open("good.gguf", &good).0.is_ok());

    let mut bad = good.clone();
    bad[..4].copy_from_slice(b"GGML");
    let (r, p) = open("magic.gguf", &bad);
    assert_err(r, &p, &["bad magic", "not a GGUF file"]);

    for (v, msg) in
        [(1u32, "GGUF v1 is not supported"), (7, "unknown GGUF version 7"), (3u32.swap_bytes(), "big-endian")]
    {
        let mut bad = good.clone();
        bad[4..8].copy_from_slice(&v.to_le_bytes());
        let (r, p) = open("version.gguf", &bad);
        assert_err(r, &p, &[msg]);
    }

    // Cut inside the metadata value, inside the tensor info, and inside the tensor data.
    let (r, p) = open("cut_meta.gguf", &good[..24 + 8 + 12 + 4 + 8 + 2]);
    assert_err(r, &p, &["metadata key 'general.name'", "truncated"]);
    let info_at = good.windows(7).position(|w| w == b"blk.0.w").unwrap();
    let (r, p) = open("cut_info.gguf", &good[..info_at + 10]);
    assert_err(r, &p, &["tensor 'blk.0.w'", "truncated"]);
    let (r, p) = open("cut_data.gguf", &good[..good.len() - 1]);
    assert_err(r, &p, &["tensor 'blk.0.w'", "runs past the end of the file"]);
    let (r, p) = open("tiny.gguf", b"GGUF\x03\0\0");
    assert_err(r, &p, &["truncated"]);

    // Tensor whose offset points far past the end; and dimensions whose product overflows.
    let offset_at = info_at + 7 + 4 + 16 + 4;
    let mut bad = good.clone();
    bad[offset_at..offset_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let (r, p) = open("past_eof.gguf", &bad);
    assert_err(r, &p, &["tensor 'blk.0.w'", "runs past the end of the file"]);
    let mut bad = good.clone();
    bad[offset_at..offset_at + 8].copy_from_slice(&u64::MAX.to_le_bytes()); // also misaligned
    let (r, p) = open("offset_max.gguf", &bad);
    assert_err(r, &p, &["tensor 'blk.0.w'"]);
    let mut bad = good.clone();
    bad[info_at + 7..info_at + 11].copy_from_slice(&5u32.to_le_bytes());
    let (r, p) = open("dims.gguf", &bad);
    assert_err(r, &p, &["tensor 'blk.0.w'", "has 5 dimensions (at most 4)"]);
    let ne_at = info_at + 7 + 4;
    let mut bad = good.clone();
    bad[ne_at + 8..ne_at + 16].copy_from_slice(&(u64::MAX / 16).to_le_bytes());
    let (r, p) = open("overflow.gguf", &bad);
    assert_err(r, &p, &["tensor 'blk.0.w'", "overflow"]);

    // Unsupported types open (metadata stays readable) but refuse to dequantise, by name.
    let q4k = tensor("blk.0.k", &[256], GgmlType(12), random_data(&mut rng, GgmlType::Q8_0, 160)[..144].to_vec());
    let unknown = tensor("blk.0.u", &[4], GgmlType(99), vec![1; 16]);
    let (r, p) = open("unsupported.gguf", &gguf_bytes(3, &kvs, &[q4k, unknown]));
    let f = r.unwrap();
    assert_err(f.tensor_f32("blk.0.k"), &p, &["tensor 'blk.0.k'", "Q4_K", "cannot dequantise"]);
    assert_err(f.tensor_f32("blk.0.u"), &p, &["tensor 'blk.0.u'", "unknown ggml type 99"]);
    assert_err(f.tensor_bytes("blk.0.u"), &p, &["tensor 'blk.0.u'", "unknown ggml type 99"]);
    assert_err(f.tensor_f32("missing"), &p, &["no tensor named 'missing'"]);

    // Rows that do not fill a block, duplicate names and keys, bad alignment, bad bool.
    let (r, p) = open("row.gguf", &gguf_bytes(3, &[], &[tensor("odd", &[16, 2], GgmlType::Q8_0, vec![1; 34])]));
    assert_err(r, &p, &["tensor 'odd'", "row length 16 is not a multiple of the Q8_0 block size 32"]);
    let f32s = || tensor("dup", &[2], GgmlType::F32, 1.5f32.to_le_bytes().repeat(2));
    let (r, p) = open("dup.gguf", &gguf_bytes(3, &[], &[f32s(), f32s()]));
    assert_err(r, &p, &["tensor 'dup'", "twice"]);
    let (r, p) = open("dupkey.gguf", &gguf_bytes(3, &[kvs[0].clone(), kvs[0].clone()], &[]));
    assert_err(r, &p, &["'general.name' appears twice"]);
    let (r, p) = open("align.gguf", &gguf_bytes(3, &[("general.alignment", GgufValue::U32(24))], &[]));
    assert_err(r, &p, &["general.alignment must be a power-of-two u32"]);
    let mut bad = gguf_bytes(3, &[("flag", GgufValue::Bool(true))], &[]);
    bad[24 + 8 + 4 + 4] = 2; // header, key length, "flag", value type, then the bool
    let (r, p) = open("bool.gguf", &bad);
    assert_err(r, &p, &["metadata key 'flag'", "bool byte is 2"]);
}
