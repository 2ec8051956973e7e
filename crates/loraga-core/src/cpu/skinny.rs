//! `C = alpha A B^T + beta C` for an A of a few rows (the tokens of a decode step) and B stored
//! [n, k] (a weight), on f32 slices:
//!
//!   C[i, j] = alpha * sum_t A[i, t] B[j, t] + beta * C[i, j],   A [m, k], B [n, k], C [m, n]
//!
//! One pass over B: each of its rows is dotted with every row of A while it is in cache. faer's
//! general GEMM packs B first, which for a handful of rows costs more than the product itself
//! (B is read twice and written once; a decode step is bound by reading the weights).
//!
//! A dot product keeps 16 partial sums (lanes) that are added at the end, so the compiler
//! vectorises it; the order of operations, and so the result, is the same with or without AVX2.

use rayon::prelude::*;

/// Up to this many rows of A take this path.
pub const MAX_ROWS: usize = 16;
const LANES: usize = 16;
/// Rows of B per parallel task.
const BLOCK: usize = 32;

/// The product above; slices are exactly [m * k], [n * k] and [m * n] long.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nt(m: usize, n: usize, k: usize, alpha: f32, beta: f32, a: &[f32], b: &[f32], c: &mut [f32]) {
    debug_assert!(a.len() == m * k && b.len() == n * k && c.len() == m * n);
    if m == 0 || n == 0 {
        return;
    }
    // C^T in blocks of B's rows, so that each task writes one contiguous piece.
    let mut ct = vec![0.0f32; n * m];
    ct.par_chunks_mut(BLOCK * m).enumerate().filter(|_| k > 0).for_each(|(i, out)| {
        let rows = &b[i * BLOCK * k..(i * BLOCK * k + out.len() / m * k)];
        block(a, m, k, rows, out);
    });
    for i in 0..m {
        for j in 0..n {
            let y = alpha * ct[j * m + i];
            c[i * n + j] = if beta == 0.0 { y } else { y + beta * c[i * n + j] };
        }
    }
}

/// out[r * m + i] = A[i] . rows[r] for every row r of `rows` and i < m.
fn block(a: &[f32], m: usize, k: usize, rows: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { block_avx2(a, m, k, rows, out) };
    }
    block_lanes(a, m, k, rows, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn block_avx2(a: &[f32], m: usize, k: usize, rows: &[f32], out: &mut [f32]) {
    block_lanes(a, m, k, rows, out)
}

#[inline(always)]
fn block_lanes(a: &[f32], m: usize, k: usize, rows: &[f32], out: &mut [f32]) {
    for (row, o) in rows.chunks_exact(k).zip(out.chunks_exact_mut(m)) {
        // Four rows of A at a time share each load of B's row and keep 4 x 16 independent sums.
        let mut quads = a.chunks_exact(4 * k);
        let mut dst = o.chunks_exact_mut(4);
        for (x, d) in quads.by_ref().zip(dst.by_ref()) {
            let (x0, x) = x.split_at(k);
            let (x1, x) = x.split_at(k);
            let (x2, x3) = x.split_at(k);
            d.copy_from_slice(&dot4([x0, x1, x2, x3], row));
        }
        for (x, d) in quads.remainder().chunks_exact(k).zip(dst.into_remainder()) {
            *d = dot(x, row);
        }
    }
}

/// x . y with LANES partial sums, in the same order as each of [`dot4`]'s.
#[inline(always)]
fn dot(x: &[f32], y: &[f32]) -> f32 {
    let ((xc, xt), (yc, yt)) = (x.as_chunks::<LANES>(), y.as_chunks::<LANES>());
    let mut acc = [0.0f32; LANES];
    for (u, v) in xc.iter().zip(yc) {
        for l in 0..LANES {
            acc[l] += u[l] * v[l];
        }
    }
    acc.iter().sum::<f32>() + xt.iter().zip(yt).map(|(a, b)| a * b).sum::<f32>()
}

/// The dot products of four vectors with y. Each keeps LANES partial sums in a fixed order, so a
/// result does not depend on which other vectors it was computed with.
#[inline(always)]
fn dot4(x: [&[f32]; 4], y: &[f32]) -> [f32; 4] {
    let (yc, yt) = y.as_chunks::<LANES>();
    let ((x0, t0), (x1, t1), (x2, t2), (x3, t3)) =
        (x[0].as_chunks::<LANES>(), x[1].as_chunks::<LANES>(), x[2].as_chunks::<LANES>(), x[3].as_chunks::<LANES>());
    // Four named accumulators (not an array indexed by row) stay in registers.
    let (mut a0, mut a1, mut a2, mut a3) = ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES]);
    for ((((v, u0), u1), u2), u3) in yc.iter().zip(x0).zip(x1).zip(x2).zip(x3) {
        for l in 0..LANES {
            a0[l] += u0[l] * v[l];
            a1[l] += u1[l] * v[l];
            a2[l] += u2[l] * v[l];
            a3[l] += u3[l] * v[l];
        }
    }
    let tail = |t: &[f32]| t.iter().zip(yt).map(|(a, b)| a * b).sum::<f32>();
    [
        a0.iter().sum::<f32>() + tail(t0),
        a1.iter().sum::<f32>() + tail(t1),
        a2.iter().sum::<f32>() + tail(t2),
        a3.iter().sum::<f32>() + tail(t3),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{randn, rel_error};
    use rand::SeedableRng;

    #[test]
    fn matches_an_f64_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for (m, n, k, beta) in [(1, 70, 33, 0.0), (5, 97, 576, 0.5), (16, 33, 17, 0.0), (3, 1, 5, -1.0), (2, 3, 0, 0.0)]
        {
            let (a, b, c0) = (randn(&mut rng, m * k), randn(&mut rng, n * k), randn(&mut rng, m * n));
            let mut c = if beta == 0.0 { vec![f32::NAN; m * n] } else { c0.clone() };
            gemm_nt(m, n, k, 1.5, beta, &a, &b, &mut c);
            let want: Vec<f64> = (0..m * n)
                .map(|ij| {
                    let (i, j) = (ij / n, ij % n);
                    let s: f64 = (0..k).map(|t| a[i * k + t] as f64 * b[j * k + t] as f64).sum();
                    1.5 * s + if beta == 0.0 { 0.0 } else { beta as f64 * c0[ij] as f64 }
                })
                .collect();
            let e = rel_error(&c, &want);
            assert!(e < 1e-6, "m={m} n={n} k={k}: rel error {e:.2e}");
        }
    }
}
