//! A minimal GGUF writer for tests, sharing no code with the reader it tests.

use loraga_core::io::{GgmlType, GgufValue};

pub fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

pub fn type_id(v: &GgufValue) -> u32 {
    match v {
        GgufValue::U8(_) => 0,
        GgufValue::I8(_) => 1,
        GgufValue::U16(_) => 2,
        GgufValue::I16(_) => 3,
        GgufValue::U32(_) => 4,
        GgufValue::I32(_) => 5,
        GgufValue::F32(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::String(_) => 8,
        GgufValue::Array(_) => 9,
        GgufValue::U64(_) => 10,
        GgufValue::I64(_) => 11,
        GgufValue::F64(_) => 12,
    }
}

pub fn put_value(b: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => b.push(*x),
        GgufValue::I8(x) => b.extend(x.to_le_bytes()),
        GgufValue::U16(x) => b.extend(x.to_le_bytes()),
        GgufValue::I16(x) => b.extend(x.to_le_bytes()),
        GgufValue::U32(x) => b.extend(x.to_le_bytes()),
        GgufValue::I32(x) => b.extend(x.to_le_bytes()),
        GgufValue::F32(x) => b.extend(x.to_le_bytes()),
        GgufValue::Bool(x) => b.push(*x as u8),
        GgufValue::String(s) => put_str(b, s),
        GgufValue::Array(items) => {
            // An empty array still needs an element type; u8 will do.
            b.extend(items.first().map_or(0, type_id).to_le_bytes());
            b.extend((items.len() as u64).to_le_bytes());
            items.iter().for_each(|i| put_value(b, i));
        }
        GgufValue::U64(x) => b.extend(x.to_le_bytes()),
        GgufValue::I64(x) => b.extend(x.to_le_bytes()),
        GgufValue::F64(x) => b.extend(x.to_le_bytes()),
    }
}

pub struct TensorSpec {
    pub name: String,
    pub ne: Vec<u64>,
    pub ty: u32,
    pub data: Vec<u8>,
}

pub fn tensor(name: &str, ne: &[u64], ty: GgmlType, data: Vec<u8>) -> TensorSpec {
    TensorSpec { name: name.into(), ne: ne.to_vec(), ty: ty.0, data }
}

/// A GGUF file image. Tensors are placed one after the other at `alignment` boundaries, which
/// is 32 unless a `general.alignment` u32 is among `kvs`.
pub fn gguf_bytes(version: u32, kvs: &[(&str, GgufValue)], tensors: &[TensorSpec]) -> Vec<u8> {
    let alignment = kvs
        .iter()
        .find_map(|(k, v)| match (k, v) {
            (&"general.alignment", GgufValue::U32(a)) => Some(*a as usize),
            _ => None,
        })
        .unwrap_or(32);
    let mut b = b"GGUF".to_vec();
    b.extend(version.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        put_str(&mut b, k);
        b.extend(type_id(v).to_le_bytes());
        put_value(&mut b, v);
    }
    let mut offset = 0usize;
    let mut offsets = Vec::new();
    for t in tensors {
        put_str(&mut b, &t.name);
        b.extend((t.ne.len() as u32).to_le_bytes());
        t.ne.iter().for_each(|d| b.extend(d.to_le_bytes()));
        b.extend(t.ty.to_le_bytes());
        b.extend((offset as u64).to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.data.len()).div_ceil(alignment) * alignment;
    }
    let data_start = b.len().div_ceil(alignment) * alignment;
    b.resize(data_start, 0);
    for (t, off) in tensors.iter().zip(offsets) {
        b.resize(data_start + off, 0);
        b.extend(&t.data);
    }
    b
}
