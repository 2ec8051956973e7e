//! The row order of Llama's q_proj / k_proj weights in GGUF files.
//!
//! Hugging Face Llama applies RoPE to the two halves of each head (dimension i pairs with
//! i + head_dim/2); llama.cpp rotates adjacent pairs (2i, 2i+1). So llama.cpp's converter
//! (`LlamaModel.permute` in `convert_hf_to_gguf.py`) reorders the rows of q_proj with n_head and
//! of k_proj with n_kv_head:
//!
//! ```text
//! w.reshape(n_head, 2, head_dim / 2, cols).swapaxes(1, 2).reshape(rows, cols)
//! ```
//!
//! i.e. within each head, GGUF row 2i + j is HF row j·head_dim/2 + i (j ∈ {0, 1}). Loading a GGUF
//! into a half-split (HF) model needs the inverse, [`unpermute_qk`]; using the wrong layout still
//! runs but gives a much worse model (DESIGN.md: perplexity ~82 instead of ~33 on SmolLM2).

use crate::error::{Error, Result};

/// The GGUF row that holds HF row `r`, for heads of `head_dim` rows.
fn gguf_row_of_hf_row(r: usize, head_dim: usize) -> usize {
    let (head, k) = (r / head_dim, r % head_dim);
    let (j, i) = (k / (head_dim / 2), k % (head_dim / 2));
    head * head_dim + 2 * i + j
}

fn check(len: usize, rows: usize, cols: usize, n_head: usize) -> Result<usize> {
    if rows.checked_mul(cols) != Some(len) {
        return Err(Error::shape("rope permute", format!("{len} elements are not a [{rows}, {cols}] matrix")));
    }
    if n_head == 0 || !rows.is_multiple_of(n_head) || !(rows / n_head).is_multiple_of(2) {
        return Err(Error::shape("rope permute", format!("{rows} rows do not split into {n_head} heads of even size")));
    }
    Ok(rows / n_head)
}

/// GGUF (interleaved-pair) rows → Hugging Face (half-split) rows: the inverse of llama.cpp's
/// `LlamaModel.permute(w, n_head, n_head_kv)`. `w` is row-major [rows, cols]; pass the number of
/// query heads for q_proj and of key/value heads for k_proj. Works for biases too (cols = 1).
pub fn unpermute_qk<T: Copy>(w: &[T], rows: usize, cols: usize, n_head: usize) -> Result<Vec<T>> {
    let head_dim = check(w.len(), rows, cols, n_head)?;
    let mut out = Vec::with_capacity(w.len());
    for r in 0..rows {
        let src = gguf_row_of_hf_row(r, head_dim);
        out.extend_from_slice(&w[src * cols..(src + 1) * cols]);
    }
    Ok(out)
}

/// Hugging Face rows → GGUF rows: what llama.cpp's converter does (for tests, and for writing
/// GGUF files that llama.cpp reads).
pub fn permute_qk<T: Copy>(w: &[T], rows: usize, cols: usize, n_head: usize) -> Result<Vec<T>> {
    let head_dim = check(w.len(), rows, cols, n_head)?;
    let mut out = w.to_vec();
    for r in 0..rows {
        let dst = gguf_row_of_hf_row(r, head_dim);
        out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[r * cols..(r + 1) * cols]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The converter's reshape/swapaxes written out as index arithmetic on a 4-D array, so the
    /// test does not share `gguf_row_of_hf_row` with the code under test.
    fn converter_permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
        let half = rows / n_head / 2;
        let mut out = Vec::with_capacity(w.len());
        // Output index order after swapaxes(1, 2): [head][i][j][col]; input was [head][j][i][col].
        for h in 0..n_head {
            for i in 0..half {
                for j in 0..2 {
                    let src = ((h * 2 + j) * half + i) * cols;
                    out.extend_from_slice(&w[src..src + cols]);
                }
            }
        }
        out
    }

    #[test]
    fn matches_the_converter_and_inverts() {
        // SmolLM2's k_proj shape: 3 KV heads of 64 rows, 576 columns; and a small odd one.
        for (rows, cols, n_head) in [(192, 576, 3), (12, 5, 3), (8, 1, 1)] {
            let w: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.37).sin() + i as f32 * 1e-3).collect();
            let p = permute_qk(&w, rows, cols, n_head).unwrap();
            assert_eq!(p, converter_permute(&w, rows, cols, n_head), "{rows}x{cols}/{n_head}");
            assert_ne!(p, w, "permute must move rows");
            assert_eq!(unpermute_qk(&p, rows, cols, n_head).unwrap(), w);
            assert_eq!(permute_qk(&unpermute_qk(&w, rows, cols, n_head).unwrap(), rows, cols, n_head).unwrap(), w);
        }
        // Head 0 of head_dim 4: GGUF rows [0, 2, 1, 3] of HF.
        let w: Vec<u8> = vec![10, 11, 12, 13];
        assert_eq!(permute_qk(&w, 4, 1, 1).unwrap(), vec![10, 12, 11, 13]);
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(unpermute_qk(&[0.0f32; 12], 4, 3, 3).unwrap_err().to_string().contains("do not split into 3 heads"));
        assert!(unpermute_qk(&[0.0f32; 11], 4, 3, 2).unwrap_err().to_string().contains("11 elements"));
        assert!(permute_qk(&[0.0f32; 12], 6, 2, 1).is_ok());
        assert!(permute_qk(&[0.0f32; 12], 6, 2, 0).is_err());
    }
}
