//! The model's own chat template (Jinja), rendered with minijinja.

use minijinja::{Environment, ErrorKind};
use serde_json::Value;

use super::tokenizer::SpecialTokens;
use super::ModelError;

pub struct ChatTemplate {
    env: Environment<'static>,
    special: SpecialTokens,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatTemplate")
    }
}

impl ChatTemplate {
    pub fn new(source: &str, special: SpecialTokens) -> Result<Self, ModelError> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| ModelError::Template(format!("the chat template does not parse: {e}")))?;
        Ok(Self { env, special })
    }

    /// Whether the template reads the variable `name` (e.g. `tools`).
    pub fn takes(&self, name: &str) -> bool {
        self.env
            .get_template("chat")
            .is_ok_and(|t| t.undeclared_variables(false).contains(name))
    }

    /// Render `messages` (OpenAI-shaped JSON objects; content already flattened to text).
    pub fn render(
        &self,
        messages: &[Value],
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| ModelError::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.special.bos.clone().unwrap_or_default(),
            eos_token => self.special.eos.clone().unwrap_or_default(),
        })
        .map_err(|e| ModelError::Template(format!("rendering the chat template: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn python_methods_and_raise_exception_work() {
        let src = "{% for m in messages %}{% if m.role not in ['user','assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}[{{ m.role.upper() }}]{{ m.content.strip() }}{% endfor %}";
        let t = ChatTemplate::new(src, SpecialTokens::default()).unwrap();
        let ok = t
            .render(&[json!({"role": "user", "content": "  hi  "})], None, true)
            .unwrap();
        assert_eq!(ok, "[USER]hi");
        let err = t
            .render(&[json!({"role": "robot", "content": "x"})], None, true)
            .unwrap_err();
        assert!(err.to_string().contains("bad role robot"), "{err}");
    }
}
