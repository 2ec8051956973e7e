//! How JSONL records become prompts and responses, shared by `loraga train` and `loraga eval`:
//! the field names, the prompt template, and an optional chat template.
//!
//! With a chat template the prompt becomes the user's turn and the response the assistant's,
//! ended by the turn's end token instead of the tokenizer's EOS (ChatML, SmolLM2-Instruct's and
//! Qwen's format):
//!
//!   [system turn]  <|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n  {response}<|im_end|>
//!
//! `--chat-template model` uses the model's own template (GGUF `tokenizer.chat_template`, or a
//! Hugging Face folder's `chat_template.jinja` / `tokenizer_config.json`). loraga does not run
//! Jinja: it recognises ChatML templates, and keeps the system turn such a template writes when
//! the conversation has none (SmolLM2's "You are a helpful AI assistant named SmolLM, ...").

use clap::{Args, ValueEnum};
use loraga_core::data::{EncodeOptions, Fields, PromptTemplate};
use loraga_core::tokenizer::Tokenizer;
use loraga_core::{Error, Result};
use serde::{Deserialize, Serialize};

const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";
const CHATML_TURNS: &str = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChatTemplate {
    /// Built-in ChatML: the user turn and the assistant header, no system turn.
    Chatml,
    /// The model's own chat template (it must be ChatML), with its default system turn.
    Model,
}

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct DataFormat {
    /// JSONL field holding the prompt (GSM8K: question).
    #[arg(long, default_value = "question")]
    pub prompt_field: String,
    /// JSONL field holding the response, trained on (GSM8K: answer).
    #[arg(long, default_value = "answer")]
    pub response_field: String,
    /// Text around the prompt, with one {prompt}; the loss covers only the response and EOS.
    #[arg(long, default_value = "Question: {prompt}\nAnswer: ")]
    pub template: String,
    /// Write prompts as a chat instead of --template (default: no chat template). `chatml`: the
    /// user turn and assistant header of ChatML; `model`: the model's own chat template (GGUF
    /// tokenizer.chat_template or tokenizer_config.json), which must be ChatML (loraga does not
    /// run Jinja), with the system turn it writes by default. The response then ends with
    /// <|im_end|> instead of the tokenizer's EOS.
    #[arg(long, value_enum, conflicts_with = "template")]
    #[serde(default)]
    pub chat_template: Option<ChatTemplate>,
}

impl DataFormat {
    pub fn fields(&self) -> Fields {
        Fields { prompt: self.prompt_field.clone(), response: self.response_field.clone() }
    }

    /// Encoding options for `tok` (`model_chat_template`: the model's template text, if it has
    /// one): the prompt template and the end token appended to every response.
    pub fn encode_options(
        &self,
        tok: &Tokenizer,
        max_len: usize,
        model_chat_template: Option<&str>,
    ) -> Result<EncodeOptions> {
        let mut opts = EncodeOptions::new(tok, max_len)?;
        opts.template = match self.chat_template {
            None => PromptTemplate::new(self.template.clone())?,
            Some(ChatTemplate::Chatml) => PromptTemplate::chatml(),
            Some(ChatTemplate::Model) => {
                let text = model_chat_template.ok_or_else(|| {
                    Error::InvalidArgument(
                        "--chat-template model: the model has no chat template (use --chat-template chatml or --template)"
                            .into(),
                    )
                })?;
                chatml_from_model(text)?
            }
        };
        if self.chat_template.is_some() {
            PromptTemplate::chatml().check(tok)?;
            opts.eos = tok.token_to_id(IM_END).expect("checked: the tokenizer has <|im_end|>");
        }
        Ok(opts)
    }
}

/// The prompt template a ChatML chat template renders for one user message and the assistant's
/// answer to come, including the system turn it writes when there is no system message.
pub fn chatml_from_model(jinja: &str) -> Result<PromptTemplate> {
    if !jinja.contains(IM_START) || !jinja.contains(IM_END) {
        return Err(Error::InvalidArgument(format!(
            "--chat-template model: the model's chat template is not ChatML (no {IM_START}/{IM_END}), and loraga does \
             not run Jinja; use --template or --chat-template chatml. Its start: {:?}",
            jinja.chars().take(120).collect::<String>()
        )));
    }
    let system = default_system_turn(jinja).unwrap_or_default();
    PromptTemplate::new(format!("{system}{CHATML_TURNS}"))
}

/// A system turn written as one string literal (`'<|im_start|>system\n...<|im_end|>\n'`), as
/// templates do that add a default system prompt; None if the template writes none.
fn default_system_turn(jinja: &str) -> Option<String> {
    // Newlines may be written out or escaped (`\n` in a literal); read both as newlines.
    let text = jinja.replace("\\n", "\n");
    let start = text.find(&format!("{IM_START}system\n"))?;
    let quote = text[..start].chars().next_back().filter(|c| *c == '\'' || *c == '"')?;
    let body = &text[start..];
    let end = body.find(IM_END)? + IM_END.len();
    let turn = &body[..end];
    if turn.contains(quote) {
        return None; // the system text is not one literal (e.g. it inserts a variable)
    }
    // The literal may go on with the newline that ends the turn.
    let newline = if body[end..].starts_with('\n') { "\n" } else { "" };
    Some(format!("{turn}{newline}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The start of SmolLM2-Instruct's template, as its GGUF stores it.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}\
        {{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}\
        {% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}\
        {% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn a_chatml_template_keeps_its_default_system_turn() {
        let t = chatml_from_model(SMOLLM2).unwrap();
        assert_eq!(
            t.render("2+2?"),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
        // Escaped newlines, as a tokenizer_config.json's JSON string may leave them.
        let escaped = SMOLLM2.replace('\n', "\\n");
        assert_eq!(chatml_from_model(&escaped).unwrap().render("x"), t.render("x"));
    }

    #[test]
    fn a_chatml_template_without_a_system_turn_writes_the_turns_only() {
        let plain =
            "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}";
        assert_eq!(chatml_from_model(plain).unwrap().render("hi"), CHATML_TURNS.replace("{prompt}", "hi"));
        // A system prompt taken from a variable is not a literal: no system turn is invented.
        let var = "{{ '<|im_start|>system\n' + system_message + '<|im_end|>\n' }}";
        assert_eq!(chatml_from_model(var).unwrap().render("hi"), CHATML_TURNS.replace("{prompt}", "hi"));
    }

    #[test]
    fn other_templates_are_refused_by_name() {
        let llama3 = "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}";
        let e = chatml_from_model(llama3).unwrap_err().to_string();
        assert!(e.contains("not ChatML") && e.contains("--template"), "{e}");
    }
}
