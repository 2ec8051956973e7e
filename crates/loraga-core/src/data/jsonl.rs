//! Prompt/response records from JSONL: one JSON object a line, two string fields named by
//! [`Fields`] (GSM8K's `question` and `answer` by default). Blank lines are skipped; anything
//! else that is not such an object is an error naming the file and the 1-based line.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// One training or evaluation example as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub prompt: String,
    pub response: String,
}

/// The names of the prompt and response fields of each JSON object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fields {
    pub prompt: String,
    pub response: String,
}

impl Default for Fields {
    /// GSM8K's field names.
    fn default() -> Fields {
        Fields { prompt: "question".into(), response: "answer".into() }
    }
}

/// Every record of a JSONL file. An empty file (no records) is an error: a run over it would
/// silently do nothing.
pub fn read_jsonl(path: impl AsRef<Path>, fields: &Fields) -> Result<Vec<Record>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
    let records = parse_jsonl(&text, fields).map_err(|msg| Error::format(path, msg))?;
    if records.is_empty() {
        return Err(Error::format(path, "holds no records (the file is empty or only blank lines)"));
    }
    Ok(records)
}

/// The records of JSONL text; the error message names the 1-based line.
pub fn parse_jsonl(text: &str, fields: &Fields) -> std::result::Result<Vec<Record>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| format!("line {}: not valid JSON: {e}", i + 1))?;
        let field = |name: &str| -> std::result::Result<String, String> {
            match v.get(name) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(format!("line {}: field '{name}' is {}, expected a string", i + 1, kind(other))),
                None if v.is_object() => Err(format!("line {}: no field '{name}'", i + 1)),
                None => Err(format!("line {}: expected a JSON object, got {}", i + 1, kind(&v))),
            }
        };
        out.push(Record { prompt: field(&fields.prompt)?, response: field(&fields.response)? });
    }
    Ok(out)
}

/// The records as JSONL text with the given field names (e.g. to save a synthetic set).
pub fn to_jsonl(records: &[Record], fields: &Fields) -> String {
    let mut out = String::new();
    for r in records {
        let mut obj = serde_json::Map::new();
        obj.insert(fields.prompt.clone(), Value::String(r.prompt.clone()));
        obj.insert(fields.response.clone(), Value::String(r.response.clone()));
        out.push_str(&Value::Object(obj).to_string());
        out.push('\n');
    }
    out
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
