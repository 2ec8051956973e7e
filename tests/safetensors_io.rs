//! safetensors: the atomic writer and the single-file and sharded reader, with random tensors,
//! a hand-written F16 file, and the failures a user will meet (missing shard, missing tensor,
//! truncated file, unsupported dtype).

use std::path::Path;

use half::{bf16, f16};
use loraga_core::io::{SafetensorsCheckpoint, save_safetensors};
use loraga_core::testing::randn;
use loraga_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng, rngs::StdRng};

fn rng() -> (StdRng, u64) {
    let seed: u64 = rand::rng().random();
    (StdRng::seed_from_u64(seed), seed)
}

/// A safetensors file by hand: the 8-byte header length, the JSON header, the data.
fn raw_safetensors(tensors: &[(&str, &str, &[usize], Vec<u8>)]) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut data: Vec<u8> = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let (start, end) = (data.len(), data.len() + bytes.len());
        entries.push(format!(r#""{name}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{start},{end}]}}"#));
        data.extend(bytes);
    }
    let header = format!("{{{}}}", entries.join(","));
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

fn assert_err<T>(r: loraga_core::Result<T>, parts: &[&str]) {
    let e = match r {
        Ok(_) => panic!("expected an error containing {parts:?}"),
        Err(e) => e.to_string(),
    };
    for p in parts {
        assert!(e.contains(p), "error lacks {p:?}: {e}");
    }
}

#[test]
fn writes_and_reads_back_f32_and_bf16() {
    let (mut rng, seed) = rng();
    let dir = tempfile::tempdir().unwrap();
    let a_vals = randn(&mut rng, 6 * 7);
    let b_vals: Vec<bf16> = randn(&mut rng, 5).into_iter().map(bf16::from_f32).collect();
    let a = Tensor::from_vec(a_vals.clone(), [6, 7], &Device::Cpu).unwrap();
    let b = Tensor::from_vec(b_vals.clone(), [5], &Device::Cpu).unwrap();
    let path = dir.path().join("adapter.safetensors");
    save_safetensors(&path, &[("lora_A", &a), ("lora_B", &b)], None).unwrap();
    // Overwriting goes through the same rename, and leaves no temporary file behind.
    save_safetensors(&path, &[("lora_A", &a), ("lora_B", &b)], None).unwrap();
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(files, vec!["adapter.safetensors"]);

    let ck = SafetensorsCheckpoint::open(&path).unwrap();
    assert_eq!(ck.names().collect::<Vec<_>>(), vec!["lora_A", "lora_B"]);
    let ra = ck.tensor("lora_A", DType::F32, &Device::Cpu).unwrap();
    assert_eq!(ra.dims(), &[6, 7]);
    assert_eq!(ra.to_vec::<f32>().unwrap(), a_vals, "seed {seed}");
    assert_eq!(ck.tensor("lora_B", DType::BF16, &Device::Cpu).unwrap().to_vec::<bf16>().unwrap(), b_vals);
    let widened: Vec<f32> = b_vals.iter().map(|x| x.to_f32()).collect();
    assert_eq!(ck.tensor("lora_B", DType::F32, &Device::Cpu).unwrap().to_vec::<f32>().unwrap(), widened);
    let narrowed: Vec<bf16> = a_vals.iter().map(|&x| bf16::from_f32(x)).collect();
    assert_eq!(ck.tensor("lora_A", DType::BF16, &Device::Cpu).unwrap().to_vec::<bf16>().unwrap(), narrowed);
    assert_err(ck.tensor("lora_C", DType::F32, &Device::Cpu), &["adapter.safetensors", "no tensor named 'lora_C'"]);
}

#[test]
fn reads_f16_and_rejects_other_dtypes() {
    let (mut rng, _) = rng();
    let dir = tempfile::tempdir().unwrap();
    let vals: Vec<f16> = randn(&mut rng, 12).into_iter().map(f16::from_f32).collect();
    let bytes = raw_safetensors(&[
        ("h", "F16", &[3, 4], vals.iter().flat_map(|x| x.to_le_bytes()).collect()),
        ("ids", "I32", &[2], vec![1, 0, 0, 0, 2, 0, 0, 0]),
    ]);
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    // A directory holding model.safetensors opens too.
    let ck = SafetensorsCheckpoint::open(dir.path()).unwrap();
    let h = ck.tensor("h", DType::F32, &Device::Cpu).unwrap();
    assert_eq!(h.dims(), &[3, 4]);
    assert_eq!(h.to_vec::<f32>().unwrap(), vals.iter().map(|x| x.to_f32()).collect::<Vec<_>>());
    assert_err(ck.tensor("ids", DType::F32, &Device::Cpu), &["model.safetensors", "tensor 'ids' is I32"]);

    // Truncated by one byte: the header no longer matches the file.
    std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
    assert_err(SafetensorsCheckpoint::open(&path), &["model.safetensors", "truncated"]);
    std::fs::write(&path, &bytes[..5]).unwrap();
    assert_err(SafetensorsCheckpoint::open(&path), &["model.safetensors", "not a valid safetensors file"]);
}

fn write_index(dir: &Path, map: &[(&str, &str)]) {
    let entries: Vec<String> = map.iter().map(|(t, f)| format!(r#""{t}": "{f}""#)).collect();
    let json = format!(r#"{{"metadata": {{"total_size": 0}}, "weight_map": {{{}}}}}"#, entries.join(", "));
    std::fs::write(dir.join("model.safetensors.index.json"), json).unwrap();
}

#[test]
fn sharded_checkpoints() {
    let (mut rng, seed) = rng();
    let dir = tempfile::tempdir().unwrap();
    let (x, y, z) = (randn(&mut rng, 8), randn(&mut rng, 3), randn(&mut rng, 4));
    let t = |v: &[f32]| Tensor::from_vec(v.to_vec(), [v.len()], &Device::Cpu).unwrap();
    let (tx, ty, tz) = (t(&x), t(&y), t(&z));
    save_safetensors(dir.path().join("model-00001-of-00002.safetensors"), &[("a.x", &tx), ("a.y", &ty)], None).unwrap();
    save_safetensors(dir.path().join("model-00002-of-00002.safetensors"), &[("b.z", &tz)], None).unwrap();
    write_index(
        dir.path(),
        &[
            ("a.x", "model-00001-of-00002.safetensors"),
            ("a.y", "model-00001-of-00002.safetensors"),
            ("b.z", "model-00002-of-00002.safetensors"),
        ],
    );
    let ck = SafetensorsCheckpoint::open(dir.path()).unwrap();
    assert_eq!(ck.names().collect::<Vec<_>>(), vec!["a.x", "a.y", "b.z"]);
    for (name, want) in [("a.x", &x), ("a.y", &y), ("b.z", &z)] {
        assert_eq!(&ck.tensor(name, DType::F32, &Device::Cpu).unwrap().to_vec::<f32>().unwrap(), want, "seed {seed}");
    }
    assert_err(
        ck.tensor("nope", DType::F32, &Device::Cpu),
        &["model.safetensors.index.json", "no tensor named 'nope'"],
    );

    write_index(
        dir.path(),
        &[("a.x", "model-00001-of-00002.safetensors"), ("c.w", "model-00003-of-00003.safetensors")],
    );
    assert_err(
        SafetensorsCheckpoint::open(dir.path()),
        &["model.safetensors.index.json", "model-00003-of-00003.safetensors", "missing", "'c.w'"],
    );
    write_index(dir.path(), &[("b.q", "model-00002-of-00002.safetensors")]);
    assert_err(
        SafetensorsCheckpoint::open(dir.path()),
        &["model-00002-of-00002.safetensors", "tensor 'b.q'", "not in it"],
    );
    std::fs::write(dir.path().join("model.safetensors.index.json"), "{\"weight_map\": 3}").unwrap();
    assert_err(SafetensorsCheckpoint::open(dir.path()), &["model.safetensors.index.json", "weight_map"]);
}
