//! safetensors checkpoints: one file, or shards listed by a `model.safetensors.index.json`
//! (`{"weight_map": {tensor name: shard file name}}`, as transformers writes them); and an atomic
//! writer for adapters.
//!
//! Files are memory-mapped and validated by the `safetensors` crate (header JSON, offsets within
//! the file, the file exactly covered); F32, F16 and BF16 tensors convert to f32 or bf16.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensorError, SafeTensors};

use crate::cpu::CpuStorage;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The name transformers gives the shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
const SINGLE_FILE: &str = "model.safetensors";

struct Shard {
    path: PathBuf,
    map: memmap2::Mmap,
    /// Where the data section starts: 8 + header length.
    data_start: usize,
    metadata: Metadata,
}

/// A checkpoint of one or more safetensors files, opened for reading tensors by name.
pub struct SafetensorsCheckpoint {
    /// The file or index that was opened, for messages about the checkpoint as a whole.
    source: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name → index into `shards`.
    location: BTreeMap<String, usize>,
}

impl SafetensorsCheckpoint {
    /// `path` is a `.safetensors` file, a shard index (`*.index.json`), or a directory holding
    /// `model.safetensors.index.json` or `model.safetensors`.
    pub fn open(path: impl AsRef<Path>) -> Result<SafetensorsCheckpoint> {
        let path = path.as_ref();
        if path.is_dir() {
            let index = path.join(INDEX_FILE);
            return if index.exists() { Self::open_index(&index) } else { Self::open_file(&path.join(SINGLE_FILE)) };
        }
        if path.to_string_lossy().ends_with(".json") { Self::open_index(path) } else { Self::open_file(path) }
    }

    fn open_file(path: &Path) -> Result<SafetensorsCheckpoint> {
        let shard = open_shard(path)?;
        let location = shard.metadata.tensors().into_keys().map(|name| (name, 0)).collect();
        Ok(SafetensorsCheckpoint { source: path.to_path_buf(), shards: vec![shard], location })
    }

    fn open_index(index: &Path) -> Result<SafetensorsCheckpoint> {
        let text = std::fs::read_to_string(index).map_err(Error::io(index))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(index, format!("invalid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::format(index, "no \"weight_map\" object"))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shards = Vec::new();
        let mut shard_of_file: HashMap<&str, usize> = HashMap::new();
        let mut location = BTreeMap::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| Error::format(index, format!("weight_map['{name}'] is not a file name")))?;
            let i = match shard_of_file.get(file) {
                Some(&i) => i,
                None => {
                    let shard_path = dir.join(file);
                    if !shard_path.is_file() {
                        return Err(Error::format(
                            index,
                            format!("shard {} (holding '{name}') is missing", shard_path.display()),
                        ));
                    }
                    shards.push(open_shard(&shard_path)?);
                    shard_of_file.insert(file, shards.len() - 1);
                    shards.len() - 1
                }
            };
            if shards[i].metadata.info(name).is_none() {
                return Err(Error::format(
                    &shards[i].path,
                    format!("tensor '{name}' is listed for this shard in {} but is not in it", index.display()),
                ));
            }
            location.insert(name.clone(), i);
        }
        Ok(SafetensorsCheckpoint { source: index.to_path_buf(), shards, location })
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.location.keys().map(|s| s.as_str())
    }

    pub fn path(&self) -> &Path {
        &self.source
    }

    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    fn info(&self, name: &str) -> Result<(&Shard, &TensorInfo)> {
        let shard = self.location.get(name).map(|&i| &self.shards[i]).ok_or_else(|| {
            Error::format(&self.source, format!("no tensor named '{name}' ({} tensors)", self.location.len()))
        })?;
        let info = shard.metadata.info(name).expect("location only lists tensors found in their shard");
        Ok((shard, info))
    }

    /// An entry of the `__metadata__` string map (of the first file of a sharded checkpoint).
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.shards.first()?.metadata.metadata().as_ref()?.get(key).map(String::as_str)
    }

    /// The tensor's shape (row-major) and its dtype in the file.
    pub fn shape_and_dtype(&self, name: &str) -> Result<(Vec<usize>, Dtype)> {
        let (_, info) = self.info(name)?;
        Ok((info.shape.clone(), info.dtype))
    }

    /// The tensor converted to `dtype` on `device`. F32, F16 and BF16 are read; others error.
    pub fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let (shard, info) = self.info(name)?;
        // read_metadata checked that every tensor's offsets lie inside the file.
        let bytes = &shard.map[shard.data_start + info.data_offsets.0..shard.data_start + info.data_offsets.1];
        let cpu = match (info.dtype, dtype) {
            (Dtype::BF16, DType::BF16) => {
                CpuStorage::BF16(bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]])).collect())
            }
            (Dtype::F32, _) => {
                let v = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                CpuStorage::from_f32_vec(dtype, v)
            }
            (Dtype::F16, _) => {
                let v = bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
                CpuStorage::from_f32_vec(dtype, v)
            }
            (Dtype::BF16, DType::F32) => {
                CpuStorage::F32(bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect())
            }
            (other, _) => {
                return Err(Error::format(
                    &shard.path,
                    format!("tensor '{name}' is {other}; loraga reads F32, F16 and BF16"),
                ));
            }
        };
        Tensor::from_cpu(cpu, info.shape.clone().into(), device)
    }
}

fn open_shard(path: &Path) -> Result<Shard> {
    let file = std::fs::File::open(path).map_err(Error::io(path))?;
    // SAFETY: read-only map, read only through bounds-checked slices; the file must not be
    // truncated or rewritten while open (the same contract as every mmap-based loader).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(Error::io(path))?;
    let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
        let msg = match e {
            SafeTensorError::MetadataIncompleteBuffer | SafeTensorError::InvalidHeaderLength => {
                format!("the file size does not match its header (truncated?): {e}")
            }
            e => format!("not a valid safetensors file: {e}"),
        };
        Error::format(path, msg)
    })?;
    Ok(Shard { path: path.to_path_buf(), data_start: 8 + header_len, map, metadata })
}

/// Writes `tensors` to `path` as one safetensors file, atomically: the bytes go to a temporary
/// file in the same folder, which is fsynced and then renamed over `path`, so a crash leaves
/// either the old file or the new one, never half of one.
pub fn save_safetensors(
    path: impl AsRef<Path>,
    tensors: &[(&str, &Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let path = path.as_ref();
    let mut owned = Vec::with_capacity(tensors.len());
    for &(name, t) in tensors {
        let (dtype, bytes) = match t.storage().to_cpu()? {
            CpuStorage::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()),
            CpuStorage::BF16(v) => (Dtype::BF16, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        };
        owned.push((name, dtype, t.dims().to_vec(), bytes));
    }
    let views = owned
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (*name, v))
                .map_err(|e| Error::format(path, format!("tensor '{name}': {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let buffer = safetensors::serialize(views, metadata).map_err(|e| Error::format(path, e.to_string()))?;

    super::atomic::write(path, &buffer)
}
