//! ggml's tensor element types, and dequantisation to f32 of the ones we read.
//!
//! Block layouts, as ggml's `ggml-common.h` / `dequantize_row_*` in `ggml-quants.c` define them
//! (all little-endian, one block after the other, 32 elements per block):
//!
//! - Q8_0 (34 bytes): f16 scale `d`, then 32 × i8 `q`; element j = `q[j]·d`.
//! - Q4_0 (18 bytes): f16 `d`, then 16 bytes of nibbles; byte j holds element j in its low nibble
//!   and element j+16 in its high nibble; value = (q − 8)·d.
//! - Q4_1 (20 bytes): f16 `d`, f16 `m`, then 16 bytes of nibbles laid out as in Q4_0;
//!   value = q·d + m.
//!
//! The quantisers here are simple round-to-nearest references, used to build test data and,
//! later, to write GGUF files; they are not bit-exact copies of ggml's.

use half::f16;

use crate::error::{Error, Result};

/// A ggml tensor type, by the id GGUF stores. Unknown ids are kept (so a file holding types we
/// cannot dequantise still opens and its metadata is readable) and named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const BF16: GgmlType = GgmlType(30);

    /// The types [`dequantize`] handles.
    pub const DEQUANTIZABLE: [GgmlType; 6] =
        [GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1];

    /// ggml's name for the type (`Q4_K`), or None for an id we do not know.
    pub fn name(self) -> Option<&'static str> {
        self.info().map(|(name, _)| name)
    }

    /// (elements per block, bytes per block), for the types whose size we know. Byte sizes let
    /// the reader check every tensor's extent against the file, even one it cannot dequantise.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        self.info().and_then(|(_, layout)| layout)
    }

    pub fn can_dequantize(self) -> bool {
        Self::DEQUANTIZABLE.contains(&self)
    }

    /// Bytes that `n` elements take, or None if the layout is unknown, `n` is not a whole number
    /// of blocks, or the size overflows.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        let (block, size) = self.block_layout()?;
        if !n.is_multiple_of(block) {
            return None;
        }
        (n / block).checked_mul(size)
    }

    fn info(self) -> Option<(&'static str, Option<(usize, usize)>)> {
        // ids 4, 5 and 31-33 were removed from ggml; ids past 39 are newer than this table.
        Some(match self.0 {
            0 => ("F32", Some((1, 4))),
            1 => ("F16", Some((1, 2))),
            2 => ("Q4_0", Some((32, 18))),
            3 => ("Q4_1", Some((32, 20))),
            6 => ("Q5_0", Some((32, 22))),
            7 => ("Q5_1", Some((32, 24))),
            8 => ("Q8_0", Some((32, 34))),
            9 => ("Q8_1", Some((32, 36))),
            10 => ("Q2_K", Some((256, 84))),
            11 => ("Q3_K", Some((256, 110))),
            12 => ("Q4_K", Some((256, 144))),
            13 => ("Q5_K", Some((256, 176))),
            14 => ("Q6_K", Some((256, 210))),
            15 => ("Q8_K", Some((256, 292))),
            16 => ("IQ2_XXS", None),
            17 => ("IQ2_XS", None),
            18 => ("IQ3_XXS", None),
            19 => ("IQ1_S", None),
            20 => ("IQ4_NL", None),
            21 => ("IQ3_S", None),
            22 => ("IQ2_S", None),
            23 => ("IQ4_XS", None),
            24 => ("I8", Some((1, 1))),
            25 => ("I16", Some((1, 2))),
            26 => ("I32", Some((1, 4))),
            27 => ("I64", Some((1, 8))),
            28 => ("F64", Some((1, 8))),
            29 => ("IQ1_M", None),
            30 => ("BF16", Some((1, 2))),
            34 => ("TQ1_0", None),
            35 => ("TQ2_0", None),
            39 => ("MXFP4", None),
            _ => return None,
        })
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "unknown ggml type {}", self.0),
        }
    }
}

/// Block size of every quantised type we read.
pub const QK: usize = 32;

/// Dequantises `bytes`, which must hold exactly `out.len()` elements of type `ty`, into `out`.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    if !ty.can_dequantize() {
        return Err(Error::InvalidArgument(format!("cannot dequantise {ty}")));
    }
    if ty.bytes_for(out.len()) != Some(bytes.len()) {
        return Err(Error::InvalidArgument(format!(
            "{} bytes of {ty} do not hold {} elements",
            bytes.len(),
            out.len()
        )));
    }
    match ty {
        GgmlType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16_at(b, 0);
            }
        }
        GgmlType::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                // bf16 is the top half of an f32.
                *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        GgmlType::Q8_0 => {
            for (blk, o) in bytes.chunks_exact(34).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(blk, 0);
                for (o, &q) in o.iter_mut().zip(&blk[2..]) {
                    *o = (q as i8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_0 => {
            for (blk, o) in bytes.chunks_exact(18).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(blk, 0);
                let (lo, hi) = o.split_at_mut(QK / 2);
                for (j, &q) in blk[2..].iter().enumerate() {
                    lo[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
                    hi[j] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (blk, o) in bytes.chunks_exact(20).zip(out.chunks_exact_mut(QK)) {
                let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                let (lo, hi) = o.split_at_mut(QK / 2);
                for (j, &q) in blk[4..].iter().enumerate() {
                    lo[j] = (q & 0x0f) as f32 * d + m;
                    hi[j] = (q >> 4) as f32 * d + m;
                }
            }
        }
        _ => unreachable!("can_dequantize() listed {ty}"),
    }
    Ok(())
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

fn check_blocks(x: &[f32], what: &str) -> Result<()> {
    if !x.len().is_multiple_of(QK) {
        return Err(Error::InvalidArgument(format!(
            "{what}: {} elements are not a whole number of {QK}-blocks",
            x.len()
        )));
    }
    Ok(())
}

/// Q8_0 by round-to-nearest with the scale rounded to f16 first, so the stored scale is the one
/// the quantised values were computed with.
pub fn quantize_q8_0(x: &[f32]) -> Result<Vec<u8>> {
    check_blocks(x, "quantize_q8_0")?;
    let mut out = Vec::with_capacity(x.len() / QK * 34);
    for blk in x.chunks_exact(QK) {
        let amax = blk.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = f16::from_f32(amax / 127.0);
        let id = if d.to_f32() != 0.0 { 1.0 / d.to_f32() } else { 0.0 };
        out.extend(d.to_bits().to_le_bytes());
        out.extend(blk.iter().map(|v| (v * id).round().clamp(-127.0, 127.0) as i8 as u8));
    }
    Ok(out)
}

/// Q4_0 as ggml chooses its scale: d = (the value of largest magnitude) / −8, so that value maps
/// exactly to q = 0 and its negation clips at q = 15 (an error of up to |d| there).
pub fn quantize_q4_0(x: &[f32]) -> Result<Vec<u8>> {
    check_blocks(x, "quantize_q4_0")?;
    let mut out = Vec::with_capacity(x.len() / QK * 18);
    for blk in x.chunks_exact(QK) {
        let max = blk.iter().fold(0.0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
        let d = f16::from_f32(max / -8.0);
        let id = if d.to_f32() != 0.0 { 1.0 / d.to_f32() } else { 0.0 };
        let q = |v: f32| ((v * id).round() + 8.0).clamp(0.0, 15.0) as u8;
        out.extend(d.to_bits().to_le_bytes());
        out.extend((0..QK / 2).map(|j| q(blk[j]) | (q(blk[j + QK / 2]) << 4)));
    }
    Ok(out)
}

/// Q4_1: m = the block's minimum, d = (max − min) / 15, both rounded to f16 before quantising.
pub fn quantize_q4_1(x: &[f32]) -> Result<Vec<u8>> {
    check_blocks(x, "quantize_q4_1")?;
    let mut out = Vec::with_capacity(x.len() / QK * 20);
    for blk in x.chunks_exact(QK) {
        let (min, max) = blk.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let (d, m) = (f16::from_f32((max - min) / 15.0), f16::from_f32(min));
        let id = if d.to_f32() != 0.0 { 1.0 / d.to_f32() } else { 0.0 };
        let q = |v: f32| ((v - m.to_f32()) * id).round().clamp(0.0, 15.0) as u8;
        out.extend(d.to_bits().to_le_bytes());
        out.extend(m.to_bits().to_le_bytes());
        out.extend((0..QK / 2).map(|j| q(blk[j]) | (q(blk[j + QK / 2]) << 4)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::randn;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_bits().to_le_bytes()
    }

    /// Hand-built blocks whose values are worked out on paper, not by any formula in this file.
    #[test]
    fn hand_built_blocks() {
        let mut q4_1 = Vec::new();
        q4_1.extend(h(0.5));
        q4_1.extend(h(-1.0));
        q4_1.extend([0x2f; 16]); // low nibble 15, high nibble 2
        let mut out = [f32::NAN; 32];
        dequantize(GgmlType::Q4_1, &q4_1, &mut out).unwrap();
        assert!(out[..16].iter().all(|&v| v == 6.5), "{out:?}"); // 15·0.5 − 1
        assert!(out[16..].iter().all(|&v| v == 0.0), "{out:?}"); // 2·0.5 − 1

        let mut q4_0 = Vec::new();
        q4_0.extend(h(0.25));
        q4_0.extend([0x0c; 16]); // low 12, high 0
        dequantize(GgmlType::Q4_0, &q4_0, &mut out).unwrap();
        assert!(out[..16].iter().all(|&v| v == 1.0) && out[16..].iter().all(|&v| v == -2.0), "{out:?}");

        let mut q8_0 = Vec::new();
        q8_0.extend(h(2.0));
        q8_0.extend((0..32).map(|i| (i as i8 - 16) as u8));
        dequantize(GgmlType::Q8_0, &q8_0, &mut out).unwrap();
        assert_eq!(out.to_vec(), (0..32).map(|i| (i - 16) as f32 * 2.0).collect::<Vec<_>>());

        let mut bf = [f32::NAN; 2];
        dequantize(GgmlType::BF16, &[0x80, 0x3f, 0x40, 0xc0], &mut bf).unwrap();
        assert_eq!(bf, [1.0, -3.0]);
    }

    #[test]
    fn rejects_wrong_sizes_and_types() {
        let mut out = [0.0f32; 32];
        let e = dequantize(GgmlType::Q4_1, &[0u8; 19], &mut out).unwrap_err();
        assert!(e.to_string().contains("19 bytes of Q4_1 do not hold 32 elements"), "{e}");
        let e = dequantize(GgmlType(12), &[0u8; 144], &mut out).unwrap_err();
        assert!(e.to_string().contains("cannot dequantise Q4_K"), "{e}");
        assert_eq!(GgmlType(99).to_string(), "unknown ggml type 99");
        assert!(quantize_q8_0(&[1.0; 31]).is_err());
    }

    /// quantise → dequantise stays within the error each format promises, block by block.
    #[test]
    fn round_trip_error_bounds() {
        let seed: u64 = rand::rng().random();
        let mut rng = StdRng::seed_from_u64(seed);
        let n = QK * 64;
        let mut x = randn(&mut rng, n);
        // One block with an offset, so Q4_1's minimum is far from zero.
        x[..QK].iter_mut().for_each(|v| *v += 5.0);
        let mut y = vec![f32::NAN; n];
        for (ty, bytes) in [
            (GgmlType::Q8_0, quantize_q8_0(&x).unwrap()),
            (GgmlType::Q4_0, quantize_q4_0(&x).unwrap()),
            (GgmlType::Q4_1, quantize_q4_1(&x).unwrap()),
        ] {
            dequantize(ty, &bytes, &mut y).unwrap();
            let block_bytes = bytes.len() / (n / QK);
            for (b, (xb, yb)) in x.chunks(QK).zip(y.chunks(QK)).enumerate() {
                let blk = &bytes[b * block_bytes..];
                let d = f16_at(blk, 0).abs();
                // Rounding to nearest costs d/2; rounding d (and m) to f16, a relative 2^-11,
                // can push the extreme element past the clamp by up to |q_max|·2^-11·d more.
                let ulp = 1.0 / 2048.0;
                let bound = match ty {
                    GgmlType::Q8_0 => d * (0.5 + 127.0 * ulp),
                    GgmlType::Q4_0 => d * (1.0 + 8.0 * ulp), // the clipped end, see quantize_q4_0
                    _ => d * (0.5 + 15.0 * ulp) + f16_at(blk, 2).abs() * ulp,
                } * 1.001
                    + 1e-6;
                let err = xb.iter().zip(yb).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(err <= bound, "{ty} block {b}: max error {err} > bound {bound} (seed {seed})");
                assert!(d > 0.0, "{ty} block {b}: zero scale for random data (seed {seed})");
            }
        }
    }
}
