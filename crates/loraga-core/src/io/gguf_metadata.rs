//! GGUF metadata: typed key/values, and accessors whose errors name the file and the key.
//! The parsing lives in `gguf.rs`; this module only holds what was read.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::error::{Error, Result};

/// One metadata value, of any of GGUF's 13 value types. Arrays hold values of one type (which
/// may itself be an array).
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::F32(_) => "f32",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F64(_) => "f64",
        }
    }

    /// Any integer, widened without loss (converters differ in which width they write).
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v.into(),
            GgufValue::I8(v) => v.into(),
            GgufValue::U16(v) => v.into(),
            GgufValue::I16(v) => v.into(),
            GgufValue::U32(v) => v.into(),
            GgufValue::I32(v) => v.into(),
            GgufValue::U64(v) => v.into(),
            GgufValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// The key/values of one GGUF file, in file order.
#[derive(Debug, Clone)]
pub struct GgufMetadata {
    file: PathBuf,
    entries: Vec<(String, GgufValue)>,
    index: HashMap<String, usize>,
}

impl GgufMetadata {
    pub(crate) fn new(file: PathBuf, entries: Vec<(String, GgufValue)>) -> Result<Self> {
        let mut index = HashMap::with_capacity(entries.len());
        for (i, (key, _)) in entries.iter().enumerate() {
            if index.insert(key.clone(), i).is_some() {
                return Err(Error::format(file, format!("metadata key '{key}' appears twice")));
            }
        }
        Ok(GgufMetadata { file, entries, index })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &GgufValue)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.index.get(key).map(|&i| &self.entries[i].1)
    }

    /// The value, or an error saying the key is missing.
    pub fn require(&self, key: &str) -> Result<&GgufValue> {
        self.get(key).ok_or_else(|| Error::format(&self.file, format!("metadata key '{key}' is missing")))
    }

    fn wrong_type(&self, key: &str, value: &GgufValue, expected: &str) -> Error {
        Error::format(&self.file, format!("metadata key '{key}' is {}, expected {expected}", value.type_name()))
    }

    fn integer<T: TryFrom<i128>>(&self, key: &str, expected: &str) -> Result<T> {
        let value = self.require(key)?;
        let v = value.as_i128().ok_or_else(|| self.wrong_type(key, value, expected))?;
        T::try_from(v)
            .map_err(|_| Error::format(&self.file, format!("metadata key '{key}' = {v} does not fit in {expected}")))
    }

    /// An integer key as u32; any integer type is accepted if the value fits.
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        self.integer(key, "u32")
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.integer(key, "u64")
    }

    pub fn get_i64(&self, key: &str) -> Result<i64> {
        self.integer(key, "i64")
    }

    /// A float key as f32 (an f64 is narrowed: some converters write f64).
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        match self.require(key)? {
            GgufValue::F32(v) => Ok(*v),
            GgufValue::F64(v) => Ok(*v as f32),
            v => Err(self.wrong_type(key, v, "f32")),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        match self.require(key)? {
            GgufValue::Bool(v) => Ok(*v),
            v => Err(self.wrong_type(key, v, "bool")),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        let value = self.require(key)?;
        value.as_str().ok_or_else(|| self.wrong_type(key, value, "string"))
    }

    fn array(&self, key: &str, expected: &str) -> Result<&[GgufValue]> {
        let value = self.require(key)?;
        value.as_array().ok_or_else(|| self.wrong_type(key, value, expected))
    }

    fn element_error(&self, key: &str, i: usize, v: &GgufValue, expected: &str) -> Error {
        Error::format(&self.file, format!("metadata key '{key}'[{i}] is {}, expected {expected}", v.type_name()))
    }

    /// A string array, e.g. `tokenizer.ggml.tokens` or `tokenizer.ggml.merges`.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let arr = self.array(key, "array of string")?;
        arr.iter().enumerate().map(|(i, v)| v.as_str().ok_or_else(|| self.element_error(key, i, v, "string"))).collect()
    }

    /// A float array, e.g. `tokenizer.ggml.scores`.
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        let arr = self.array(key, "array of f32")?;
        arr.iter()
            .enumerate()
            .map(|(i, v)| match v {
                GgufValue::F32(x) => Ok(*x),
                _ => Err(self.element_error(key, i, v, "f32")),
            })
            .collect()
    }

    /// An integer array as i64 (any integer element type), e.g. `tokenizer.ggml.token_type`.
    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>> {
        let arr = self.array(key, "array of integers")?;
        arr.iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_i128().and_then(|x| i64::try_from(x).ok()).ok_or_else(|| self.element_error(key, i, v, "i64"))
            })
            .collect()
    }
}
