//! Loading a Llama: its config and its base weights (frozen, f32) into [`Params`].
//!
//! - Hugging Face: `config.json` and `*.safetensors` (one file or a sharded index).
//! - GGUF (llama.cpp): config from the `llama.*` metadata keys, tensors renamed to Hugging Face
//!   names, dequantised to f32, and q/k rows un-permuted from llama.cpp's interleaved RoPE pairs
//!   back to the half-split layout ([`crate::io::unpermute_qk`]).

use std::path::Path;

use serde_json::Value;

use super::llama::{Llama, LlamaConfig};
use crate::autograd::Params;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::io::{GgufFile, SafetensorsCheckpoint, unpermute_qk};
use crate::tensor::Tensor;

impl LlamaConfig {
    /// Parses a Hugging Face `config.json` of a `LlamaForCausalLM`. Features this model does not
    /// implement (RoPE scaling, biases, another activation) are errors, not silently ignored.
    pub fn from_hf_json(path: impl AsRef<Path>) -> Result<LlamaConfig> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        let int = |key: &str| -> Result<Option<usize>> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| Error::format(path, format!("'{key}' is {x}, expected a non-negative integer"))),
            }
        };
        let need = |key: &str| int(key)?.ok_or_else(|| Error::format(path, format!("'{key}' is missing")));
        let float = |x: Option<&Value>, key: &str| -> Result<Option<f32>> {
            match x {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_f64()
                    .map(|f| Some(f as f32))
                    .ok_or_else(|| Error::format(path, format!("'{key}' is {x}, expected a number"))),
            }
        };
        for key in ["attention_bias", "mlp_bias"] {
            if v.get(key).and_then(Value::as_bool) == Some(true) {
                return Err(Error::format(path, format!("'{key}' is true; loraga's Llama has no biases")));
            }
        }
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str)
            && act != "silu"
        {
            return Err(Error::format(path, format!("hidden_act '{act}' is not supported (Llama uses silu)")));
        }
        // transformers 5 writes `rope_parameters`, older versions `rope_theta` and `rope_scaling`.
        let rope = v.get("rope_parameters").or_else(|| v.get("rope_scaling")).filter(|r| !r.is_null());
        if let Some(kind) = rope.and_then(|r| r.get("rope_type").or_else(|| r.get("type"))).and_then(Value::as_str)
            && kind != "default"
        {
            return Err(Error::format(path, format!("RoPE type '{kind}' is not supported (only the default RoPE)")));
        }
        let theta = float(rope.and_then(|r| r.get("rope_theta")), "rope_parameters.rope_theta")?;
        let heads = need("num_attention_heads")?;
        let hidden = need("hidden_size")?;
        let config = LlamaConfig {
            hidden_size: hidden,
            intermediate_size: need("intermediate_size")?,
            num_hidden_layers: need("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: int("num_key_value_heads")?.unwrap_or(heads),
            head_dim: int("head_dim")?.unwrap_or(hidden / heads.max(1)),
            rms_norm_eps: float(v.get("rms_norm_eps"), "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: theta.or(float(v.get("rope_theta"), "rope_theta")?).unwrap_or(10000.0),
            vocab_size: need("vocab_size")?,
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            max_position_embeddings: int("max_position_embeddings")?.unwrap_or(2048),
        };
        config.validate()?;
        Ok(config)
    }

    /// The config from a GGUF file's `llama.*` metadata; the vocabulary size and tying come from
    /// the tensors (`token_embd` rows; no `output` tensor means a tied head).
    pub fn from_gguf(file: &GgufFile) -> Result<LlamaConfig> {
        let m = file.metadata();
        let arch = m.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(Error::format(file.path(), format!("general.architecture is '{arch}', not llama")));
        }
        let u = |key: &str| -> Result<usize> { Ok(m.get_u32(&format!("llama.{key}"))? as usize) };
        let opt = |key: &str| -> Result<Option<usize>> {
            if m.get(&format!("llama.{key}")).is_some() { u(key).map(Some) } else { Ok(None) }
        };
        let (hidden, heads) = (u("embedding_length")?, u("attention.head_count")?);
        let embd = file.tensor_info("token_embd.weight")?.shape();
        let config = LlamaConfig {
            hidden_size: hidden,
            intermediate_size: u("feed_forward_length")?,
            num_hidden_layers: u("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: opt("attention.head_count_kv")?.unwrap_or(heads),
            head_dim: opt("attention.key_length")?.unwrap_or(hidden / heads.max(1)),
            rms_norm_eps: m.get_f32("llama.attention.layer_norm_rms_epsilon")?,
            rope_theta: if m.get("llama.rope.freq_base").is_some() {
                m.get_f32("llama.rope.freq_base")?
            } else {
                10000.0
            },
            vocab_size: embd[0],
            tie_word_embeddings: file.tensor_info("output.weight").is_err(),
            max_position_embeddings: opt("context_length")?.unwrap_or(2048),
        };
        config.validate()?;
        Ok(config)
    }
}

/// The GGUF name of a Hugging Face Llama weight (llama.cpp's `convert_hf_to_gguf.py` mapping).
pub fn gguf_name(hf_name: &str) -> Result<String> {
    let fixed = match hf_name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Ok(f.to_string());
    }
    let unknown = || Error::InvalidArgument(format!("no GGUF name for the Llama weight '{hf_name}'"));
    let rest = hf_name.strip_prefix("model.layers.").ok_or_else(unknown)?;
    let (layer, module) = rest.split_once('.').ok_or_else(unknown)?;
    let gguf = match module {
        "input_layernorm.weight" => "attn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "post_attention_layernorm.weight" => "ffn_norm",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        _ => return Err(unknown()),
    };
    Ok(format!("blk.{layer}.{gguf}.weight"))
}

fn check_shape(name: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        return Err(Error::layer("Llama load", name, format!("has shape {got:?}, the config implies {want:?}")));
    }
    Ok(())
}

impl Llama {
    /// A Hugging Face checkpoint: `config` is its `config.json`, `weights` a `.safetensors` file,
    /// a shard index, or the folder holding them. Base weights are frozen.
    pub fn load_safetensors(config: impl AsRef<Path>, weights: impl AsRef<Path>) -> Result<(Llama, Params)> {
        let model = Llama::new(LlamaConfig::from_hf_json(config)?)?;
        let ckpt = SafetensorsCheckpoint::open(weights)?;
        let mut params = Params::new();
        for (name, shape) in model.config.weight_shapes() {
            let t = ckpt.tensor(&name, DType::F32, &Device::Cpu)?;
            check_shape(&name, t.dims(), &shape)?;
            params.insert(name, t, false)?;
        }
        Ok((model, params))
    }

    /// A llama.cpp GGUF file, dequantised to f32 with q/k un-permuted. Base weights are frozen.
    pub fn load_gguf(path: impl AsRef<Path>) -> Result<(Llama, Params)> {
        let file = GgufFile::open(path)?;
        let model = Llama::new(LlamaConfig::from_gguf(&file)?)?;
        let c = &model.config;
        let mut params = Params::new();
        for (name, shape) in c.weight_shapes() {
            let gname = gguf_name(&name)?;
            let (got, mut data) = file.tensor_f32(&gname)?;
            check_shape(&name, &got, &shape)?;
            let heads = if name.ends_with("q_proj.weight") {
                Some(c.num_attention_heads)
            } else if name.ends_with("k_proj.weight") {
                Some(c.num_key_value_heads)
            } else {
                None
            };
            if let Some(n_head) = heads {
                data = unpermute_qk(&data, shape[0], shape[1], n_head)?;
            }
            params.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?, false)?;
        }
        Ok((model, params))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_config(json: serde_json::Value) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, json.to_string()).unwrap();
        (dir, path)
    }

    fn base() -> serde_json::Value {
        serde_json::json!({"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 50, "rope_theta": 500000.0})
    }

    #[test]
    fn hf_config_defaults_and_both_rope_spellings() {
        let (_d, p) = write_config(base());
        let c = LlamaConfig::from_hf_json(&p).unwrap();
        assert_eq!((c.num_key_value_heads, c.head_dim, c.rope_theta, c.tie_word_embeddings), (4, 16, 500000.0, false));
        let mut v = base();
        v["rope_parameters"] = serde_json::json!({"rope_theta": 1234.0, "rope_type": "default"});
        let (_d, p) = write_config(v);
        assert_eq!(LlamaConfig::from_hf_json(&p).unwrap().rope_theta, 1234.0);
    }

    #[test]
    fn hf_config_errors_name_the_key() {
        let cases = [
            ("rope_scaling", serde_json::json!({"rope_type": "llama3", "factor": 8.0}), "RoPE type 'llama3'"),
            ("attention_bias", serde_json::json!(true), "'attention_bias' is true"),
            ("hidden_act", serde_json::json!("gelu"), "hidden_act 'gelu'"),
            ("num_key_value_heads", serde_json::json!(3), "4 heads do not share 3"),
            ("vocab_size", serde_json::json!("many"), "'vocab_size' is \"many\""),
        ];
        for (key, value, want) in cases {
            let mut v = base();
            v[key] = value;
            let (_d, p) = write_config(v);
            let e = LlamaConfig::from_hf_json(&p).unwrap_err().to_string();
            assert!(e.contains(want), "{key}: {e}");
        }
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        let (_d, p) = write_config(v);
        assert!(LlamaConfig::from_hf_json(&p).unwrap_err().to_string().contains("'hidden_size' is missing"));
    }

    #[test]
    fn gguf_names_follow_llama_cpp() {
        assert_eq!(gguf_name("model.embed_tokens.weight").unwrap(), "token_embd.weight");
        assert_eq!(gguf_name("lm_head.weight").unwrap(), "output.weight");
        assert_eq!(gguf_name("model.layers.7.self_attn.o_proj.weight").unwrap(), "blk.7.attn_output.weight");
        assert_eq!(gguf_name("model.layers.0.post_attention_layernorm.weight").unwrap(), "blk.0.ffn_norm.weight");
        assert_eq!(gguf_name("model.layers.29.mlp.down_proj.weight").unwrap(), "blk.29.ffn_down.weight");
        assert!(gguf_name("model.layers.1.self_attn.rotary_emb.inv_freq").is_err());
    }
}
