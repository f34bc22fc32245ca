//! Chat templates: a checkpoint's own Jinja template (tokenizer_config.json `chat_template`, or
//! GGUF `tokenizer.chat_template`) rendered with MiniJinja the way `transformers`'
//! `apply_chat_template` does (Python string methods, `raise_exception`, the special tokens).

use super::{tokenizer, Policy};
use crate::config::{PromptConfig, Template};
use anyhow::{anyhow, bail, Result};
use minijinja::{context, Environment, Error, ErrorKind, Value};

/// One chat message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// Renders `messages` through `template`; with `add_generation_prompt` the text ends where the
/// assistant's reply begins. `tokenizer_config` supplies `bos_token` / `eos_token`.
pub fn render(template: &str, messages: &[Message], add_generation_prompt: bool, tokenizer_config: &serde_json::Value) -> Result<String> {
    let mut env = Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_template("chat", template).map_err(|e| anyhow!("the chat template does not parse: {e}"))?;
    let special = |key: &str| -> String {
        let v = tokenizer_config.get(key);
        v.and_then(|v| v.as_str().or_else(|| v.get("content")?.as_str())).unwrap_or_default().to_string()
    };
    let tmpl = env.get_template("chat").map_err(|e| anyhow!("{e}"))?;
    let messages: Vec<Value> = messages
        .iter()
        .map(|m| Value::from(std::collections::BTreeMap::from([("role", m.role.clone()), ("content", m.content.clone())])))
        .collect();
    tmpl.render(context! {
        messages => Value::from(messages),
        add_generation_prompt => add_generation_prompt,
        bos_token => special("bos_token"),
        eos_token => special("eos_token"),
    })
    .map_err(|e| anyhow!("rendering the chat template: {e}"))
}

/// The policy's input tokens for a prompt row's text under the `[prompt]` settings.
pub fn prompt_ids(policy: &Policy, cfg: &PromptConfig, prompt: &str) -> Result<Vec<u32>> {
    tokenizer::encode(&policy.tokenizer, &prompt_text(policy.chat_template(), cfg, prompt, &policy.tokenizer_config)?)
}

/// The text of a prompt: as is (`raw`), or rendered through the chat template (`chat`).
pub fn prompt_text(template: Option<&str>, cfg: &PromptConfig, prompt: &str, tokenizer_config: &serde_json::Value) -> Result<String> {
    if cfg.template == Template::Raw {
        return Ok(prompt.to_string());
    }
    let Some(template) = template else {
        bail!(
            "prompt.template = \"chat\" but the checkpoint has no chat template (tokenizer_config.json chat_template, \
             GGUF tokenizer.chat_template); set prompt.template = \"raw\" or use a checkpoint with one"
        );
    };
    let mut messages = Vec::new();
    if !cfg.system.is_empty() {
        messages.push(Message::new("system", &cfg.system));
    }
    let user = if cfg.instructions.is_empty() { prompt.to_string() } else { format!("{prompt}\n\n{}", cfg.instructions) };
    messages.push(Message::new("user", &user));
    render(template, &messages, true, tokenizer_config)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's template (from its GGUF metadata): ChatML with a default system
    /// prompt when the messages bring none.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_with_and_without_a_system_prompt() {
        let cfg = serde_json::json!({});
        let user = [Message::new("user", "What is 2+3?")];
        let text = render(SMOLLM2, &user, true, &cfg).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
        );
        let both = [Message::new("system", "Be brief."), Message::new("user", "Hi")];
        let text = render(SMOLLM2, &both, false, &cfg).unwrap();
        assert_eq!(text, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
    }

    #[test]
    fn python_methods_special_tokens_and_raised_errors() {
        let cfg = serde_json::json!({"bos_token": "<s>", "eos_token": {"content": "</s>"}});
        let tmpl = "{{ bos_token }}{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}[{{ m.content.strip().upper() }}]{% endfor %}{{ eos_token }}";
        assert_eq!(render(tmpl, &[Message::new("user", "  hi ")], false, &cfg).unwrap(), "<s>[HI]</s>");
        let err = render(tmpl, &[Message::new("tool", "x")], false, &cfg).unwrap_err().to_string();
        assert!(err.contains("bad role tool"), "{err}");
        assert!(render("{% for %}", &[], false, &cfg).unwrap_err().to_string().contains("does not parse"));
    }

    #[test]
    fn prompt_text_raw_chat_and_missing_template() {
        let cfg = serde_json::json!({});
        let raw = PromptConfig::default();
        assert_eq!(prompt_text(None, &raw, "Q?", &cfg).unwrap(), "Q?");
        let chat = PromptConfig { template: Template::Chat, system: "S".into(), instructions: "Box it.".into() };
        assert_eq!(
            prompt_text(Some(SMOLLM2), &chat, "Q?", &cfg).unwrap(),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ?\n\nBox it.<|im_end|>\n<|im_start|>assistant\n"
        );
        let err = prompt_text(None, &chat, "Q?", &cfg).unwrap_err().to_string();
        assert!(err.contains("no chat template"), "{err}");
    }
}
