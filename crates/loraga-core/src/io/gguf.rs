//! GGUF (v2 and v3) reader: header, metadata, tensor infos and tensor data.
//!
//! File layout (little-endian): magic "GGUF", u32 version, u64 tensor count, u64 metadata count;
//! the metadata key/values (key = u64-length string, u32 value type, value); one info per tensor
//! (name, u32 n_dims, n_dims × u64 ne, u32 ggml type, u64 offset); padding to the alignment
//! (`general.alignment`, default 32); then the tensor data, each at its offset from there.
//! v1 used u32 counts and lengths and is not read; v3 only added big-endian files, which we
//! reject (their version field reads byte-swapped).
//!
//! The file is memory-mapped and every length and offset is checked against its size before use,
//! so a bad file gives an error naming the file and the key or tensor, never a panic.
//!
//! Shapes: GGUF lists dimensions fastest-varying first (`ne[0]` is the row length). We return them
//! in row-major PyTorch order, reversed: a linear layer stored with ne = [in, out] is [out, in].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::cpu::CpuStorage;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::io::gguf_metadata::{GgufMetadata, GgufValue};
use crate::io::quant::{self, GgmlType};
use crate::tensor::Tensor;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are legal; this bounds the recursion on a hostile file.
const MAX_ARRAY_DEPTH: usize = 8;

/// Where a tensor is and what it holds.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Dimensions as GGUF stores them, fastest-varying first (`ne[0]` = row length).
    pub ne: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Bytes of data, when the type's block layout is known.
    pub n_bytes: Option<usize>,
}

impl GgufTensorInfo {
    /// The shape in row-major (PyTorch) order: `ne` reversed.
    pub fn shape(&self) -> Vec<usize> {
        // Every dimension was checked to fit in usize when the file was opened.
        self.ne.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn elem_count(&self) -> usize {
        self.ne.iter().map(|&d| d as usize).product()
    }
}

/// An open GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    version: u32,
    alignment: u64,
    data_start: usize,
    metadata: GgufMetadata,
    tensors: Vec<GgufTensorInfo>,
    by_name: HashMap<String, usize>,
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(Error::io(&path))?;
        let len = file.metadata().map_err(Error::io(&path))?.len();
        if len < 24 {
            return Err(Error::format(&path, format!("truncated: {len} bytes is shorter than a GGUF header")));
        }
        // SAFETY: the map is read-only and we only ever read it through bounds-checked slices.
        // As with every mmap-based loader (llama.cpp, candle), the file must not be truncated or
        // rewritten by another process while it is open.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(Error::io(&path))?;
        Self::parse(path, map)
    }

    fn parse(path: PathBuf, map: memmap2::Mmap) -> Result<GgufFile> {
        let mut c = Cursor { buf: &map, pos: 0, file: &path, context: "the header".into() };
        let magic = c.take(4)?;
        if magic != MAGIC {
            return Err(Error::format(&path, format!("bad magic {magic:02x?}: not a GGUF file (expected \"GGUF\")")));
        }
        let version = c.u32()?;
        match version {
            2 | 3 => {}
            1 => return Err(Error::format(&path, "GGUF v1 is not supported (only v2 and v3)")),
            v if matches!(v.swap_bytes(), 2 | 3) => {
                return Err(Error::format(&path, "big-endian GGUF is not supported"));
            }
            v => return Err(Error::format(&path, format!("unknown GGUF version {v} (only v2 and v3 are read)"))),
        }
        let n_tensors = c.u64()?;
        let n_kv = c.u64()?;

        // Each entry takes at least one byte, so capping the reservation at the bytes left keeps a
        // hostile count from allocating more than the file's size.
        let mut entries = Vec::with_capacity(c.cap(n_kv));
        for i in 0..n_kv {
            c.context = format!("metadata entry {i}");
            let key = c.string()?;
            c.context = format!("metadata key '{key}'");
            let ty = c.u32()?;
            let value = c.value(ty, 0)?;
            entries.push((key, value));
        }
        let metadata = GgufMetadata::new(path.clone(), entries)?;
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(GgufValue::U32(a)) if a.is_power_of_two() => u64::from(*a),
            Some(v) => {
                return Err(Error::format(
                    &path,
                    format!("general.alignment must be a power-of-two u32, got {v:?} ({})", v.type_name()),
                ));
            }
        };

        let mut infos = Vec::with_capacity(c.cap(n_tensors));
        for i in 0..n_tensors {
            c.context = format!("tensor info {i}");
            let name = c.string()?;
            c.context = format!("tensor '{name}'");
            let n_dims = c.u32()?;
            if n_dims > MAX_DIMS {
                return Err(c.error(format!("has {n_dims} dimensions (at most {MAX_DIMS})")));
            }
            let ne = (0..n_dims).map(|_| c.u64()).collect::<Result<Vec<u64>>>()?;
            let ggml_type = GgmlType(c.u32()?);
            let offset = c.u64()?;
            infos.push(GgufTensorInfo { name, ne, ggml_type, offset, n_bytes: None });
        }

        let header_end = c.pos as u64;
        let data_start = header_end.div_ceil(alignment) * alignment;
        let file_len = map.len() as u64;
        let mut by_name = HashMap::with_capacity(infos.len());
        for (i, t) in infos.iter_mut().enumerate() {
            let fail = |msg: String| Error::format(&path, format!("tensor '{}': {msg}", t.name));
            let mut n: usize = 1;
            for &d in &t.ne {
                n = usize::try_from(d)
                    .ok()
                    .and_then(|d| n.checked_mul(d))
                    .ok_or_else(|| fail(format!("dimensions {:?} overflow the element count", t.ne)))?;
            }
            if !t.offset.is_multiple_of(alignment) {
                return Err(fail(format!("offset {} is not a multiple of the alignment {alignment}", t.offset)));
            }
            if let Some((block, _)) = t.ggml_type.block_layout() {
                let row = t.ne.first().copied().unwrap_or(1);
                if !row.is_multiple_of(block as u64) {
                    return Err(fail(format!(
                        "row length {row} is not a multiple of the {} block size {block}",
                        t.ggml_type
                    )));
                }
                let n_bytes = t.ggml_type.bytes_for(n).ok_or_else(|| fail("data size overflows".into()))?;
                let end = data_start.checked_add(t.offset).and_then(|s| s.checked_add(n_bytes as u64));
                match end {
                    Some(end) if end <= file_len => t.n_bytes = Some(n_bytes),
                    _ => {
                        return Err(fail(format!(
                            "data ({n_bytes} bytes at offset {} from the data section at {data_start}) runs past \
                             the end of the file ({file_len} bytes): truncated?",
                            t.offset
                        )));
                    }
                }
            }
            if by_name.insert(t.name.clone(), i).is_some() {
                return Err(fail("name appears twice".into()));
            }
        }
        let data_start = data_start as usize; // <= file_len whenever a tensor lies inside the file
        Ok(GgufFile { path, map, version, alignment, data_start, metadata, tensors: infos, by_name })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    pub fn metadata(&self) -> &GgufMetadata {
        &self.metadata
    }

    /// Tensor infos in file order.
    pub fn tensor_infos(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Result<&GgufTensorInfo> {
        match self.by_name.get(name) {
            Some(&i) => Ok(&self.tensors[i]),
            None => Err(Error::format(
                &self.path,
                format!("no tensor named '{name}' (the file has {} tensors)", self.tensors.len()),
            )),
        }
    }

    /// The tensor's raw bytes, in its ggml type (for dequantising elsewhere, e.g. on the GPU).
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.tensor_info(name)?;
        let n = t.n_bytes.ok_or_else(|| {
            Error::format(
                &self.path,
                format!("tensor '{name}' has type {}, whose block layout loraga does not know", t.ggml_type),
            )
        })?;
        let start = self.data_start + t.offset as usize; // checked against the file size in parse()
        Ok(&self.map[start..start + n])
    }

    /// The tensor dequantised to f32, with its shape in row-major (PyTorch) order.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let t = self.tensor_info(name)?;
        if !t.ggml_type.can_dequantize() {
            let supported: Vec<String> = GgmlType::DEQUANTIZABLE.iter().map(|t| t.to_string()).collect();
            return Err(Error::format(
                &self.path,
                format!(
                    "tensor '{name}' has type {}, which loraga cannot dequantise (it reads {})",
                    t.ggml_type,
                    supported.join(", ")
                ),
            ));
        }
        let bytes = self.tensor_bytes(name)?;
        let mut out = vec![0.0f32; t.elem_count()];
        quant::dequantize(t.ggml_type, bytes, &mut out)?;
        Ok((t.shape(), out))
    }

    /// The tensor dequantised into a [`Tensor`] of `dtype` on `device`.
    pub fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let (shape, data) = self.tensor_f32(name)?;
        Tensor::from_cpu(CpuStorage::from_f32_vec(dtype, data), shape.into(), device)
    }
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GgufFile({}, v{}, {} keys, {} tensors)",
            self.path.display(),
            self.version,
            self.metadata.len(),
            self.tensors.len()
        )
    }
}

/// Bounds-checked little-endian reads over the mapped file. `context` says what is being read,
/// so that a truncation error can name the key or tensor.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    file: &'a Path,
    context: String,
}

impl<'a> Cursor<'a> {
    fn error(&self, msg: String) -> Error {
        Error::format(self.file, format!("{}: {msg}", self.context))
    }

    fn cap(&self, count: u64) -> usize {
        count.min((self.buf.len() - self.pos) as u64) as usize
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        let left = self.buf.len() - self.pos;
        if n > left as u64 {
            return Err(self.error(format!(
                "truncated: needs {n} bytes at offset {} but the file ends at {}",
                self.pos,
                self.buf.len()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String> {
        let len = self.u64()?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| self.error(format!("string is not valid UTF-8: {e}")))
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U8(u8::from_le_bytes(self.array()?)),
            1 => GgufValue::I8(i8::from_le_bytes(self.array()?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array()?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array()?)),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array()?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(self.error(format!("bool byte is {b}, not 0 or 1"))),
            },
            8 => GgufValue::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.error(format!("arrays nested more than {MAX_ARRAY_DEPTH} deep")));
                }
                let elem_ty = self.u32()?;
                let n = self.u64()?;
                let mut items = Vec::with_capacity(self.cap(n));
                for _ in 0..n {
                    items.push(self.value(elem_ty, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array()?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array()?)),
            t => return Err(self.error(format!("unknown metadata value type {t}"))),
        })
    }
}
