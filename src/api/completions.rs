//! `POST /v1/completions`: plain text (or token id) prompts, no chat template.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::error::ApiError;
use super::generate::{ChoiceOut, Envelope, Format, Job, OutToken};
use super::params::{Body, GenParams};
use super::{new_id, unix_now, AppState};
use crate::engine::{FinishReason, ModelInfo};

pub async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let prepared = prepare(&state, &headers, &body);
    let route = crate::providers::Route::Completions;
    super::generate::answer(&state, &headers, &body, route, prepared).await
}

/// `POST /v1/completions/render`: the token ids the engine would run for this request (one
/// list, or a list per prompt), for routers that hash prefixes as we do. Nothing runs: neither
/// the response cache nor the fallbacks are consulted.
pub async fn render(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match prepare(&state, &headers, &body) {
        Ok((job, _)) => {
            let ids = match job.prompts.as_slice() {
                [one] => json!(one),
                many => json!(many),
            };
            axum::Json(json!({"token_ids": ids})).into_response()
        }
        Err(e) => e.into_response(),
    }
}

fn prepare(
    state: &AppState,
    headers: &HeaderMap,
    bytes: &[u8],
) -> Result<(Job, CompletionFormat), ApiError> {
    let b = Body::parse(bytes)?;
    // OpenAI's default for completions is 16 tokens.
    let mut params = GenParams::read(&b, headers, &["max_tokens"])?;
    if b.get("max_tokens").is_none() {
        params.max_tokens = Some(16);
    }
    // The body is checked before the model is looked up (see chat.rs).
    if b.get("suffix").is_some_and(|s| s.as_str() != Some("")) {
        return Err(ApiError::param(
            "suffix",
            "suffix (fill-in-the-middle) is not supported",
        ));
    }
    if let Some(best_of) = b.int("best_of", 1, super::params::MAX_N)? {
        if best_of as usize != params.n {
            return Err(ApiError::param(
                "best_of",
                "best_of other than n is not supported",
            ));
        }
    }
    let echo = b.bool("echo")?.unwrap_or(false);
    let logprobs = b.int("logprobs", 0, 20)?;
    if echo && logprobs.is_some() {
        return Err(ApiError::param(
            "echo",
            "echo together with logprobs is not supported",
        ));
    }
    params.sampling.logprobs = logprobs.map(|l| l as usize);
    let schema = super::structured::response_schema(&b)?;
    let input = read_prompts(&b)?;
    let (name, engine) = state.engine_for(params.model.as_deref())?;
    let info = engine.model.clone();
    if let Some(schema) = schema {
        params.constraint = Some(super::structured::compile(
            &info,
            &schema,
            "response_format",
        )?);
    }
    let prompts: Vec<Vec<u32>> = match input {
        Prompts::Ids(ids) => ids,
        Prompts::Texts(texts) => texts
            .iter()
            .map(|s| {
                info.tokenizer
                    .encode(s, true)
                    .map_err(|e| ApiError::internal(e.to_string()))
            })
            .collect::<Result<_, _>>()?,
    };
    for p in &prompts {
        if let Some(t) = p.iter().find(|&&t| t as usize >= info.vocab_size) {
            return Err(ApiError::param(
                "prompt",
                format!("token id {t} is outside the vocabulary"),
            ));
        }
    }
    let echo_text = if echo {
        prompts.iter().map(|p| info.tokenizer.decode(p)).collect()
    } else {
        vec![]
    };
    let format = CompletionFormat {
        env: Envelope {
            id: new_id("cmpl"),
            created: unix_now(),
            model: name.clone(),
        },
        info,
        logprobs: logprobs.is_some(),
        include_usage: params.include_usage,
        echo_text,
        n: params.n,
    };
    Ok((
        Job::new(state, engine, &name, prompts, params, headers),
        format,
    ))
}

/// A request's prompts, checked in shape (before a model is looked up).
enum Prompts {
    Texts(Vec<String>),
    Ids(Vec<Vec<u32>>),
}

/// `prompt`: a string, a list of strings, a list of token ids, or a list of lists of them; at
/// most 16 prompts.
fn read_prompts(b: &Body) -> Result<Prompts, ApiError> {
    let bad = || {
        ApiError::param("prompt", "prompt must be a string, a list of strings, a list of token ids, or a list of lists of token ids")
    };
    let ids = |a: &[Value]| -> Option<Vec<u32>> {
        a.iter()
            .map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()))
            .collect()
    };
    let p = match b.get("prompt") {
        None => return Err(ApiError::param("prompt", "prompt is required")),
        Some(Value::String(s)) => Prompts::Texts(vec![s.clone()]),
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::param("prompt", "prompt must not be empty"))
        }
        Some(Value::Array(a)) => match &a[0] {
            Value::String(_) => Prompts::Texts(
                a.iter()
                    .map(|v| v.as_str().map(String::from).ok_or_else(bad))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Number(_) => Prompts::Ids(vec![ids(a).ok_or_else(bad)?]),
            Value::Array(_) => Prompts::Ids(
                a.iter()
                    .map(|v| v.as_array().and_then(|x| ids(x)).ok_or_else(bad))
                    .collect::<Result<_, _>>()?,
            ),
            _ => return Err(bad()),
        },
        Some(_) => return Err(bad()),
    };
    let n = match &p {
        Prompts::Texts(t) => t.len(),
        Prompts::Ids(i) => i.len(),
    };
    if n > 16 {
        return Err(ApiError::param("prompt", "at most 16 prompts per request"));
    }
    Ok(p)
}

pub struct CompletionFormat {
    env: Envelope,
    info: Arc<ModelInfo>,
    logprobs: bool,
    include_usage: bool,
    /// The prompt text per prompt, when `echo` is on.
    echo_text: Vec<String>,
    n: usize,
}

impl CompletionFormat {
    fn object(&self, choices: Value) -> Value {
        let mut v = self.env.object("text_completion", choices);
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    fn logprobs_json(&self, tokens: &[OutToken], mut offset: usize) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        let tok = &self.info.tokenizer;
        let (mut toks, mut lps, mut tops, mut offs) = (vec![], vec![], vec![], vec![]);
        for t in tokens {
            let Some(lp) = &t.logprobs else { continue };
            let s = tok.token_str(t.id);
            offs.push(offset);
            offset += s.len();
            toks.push(json!(s));
            lps.push(json!(lp.logprob));
            let top: serde_json::Map<String, Value> = lp
                .top
                .iter()
                .map(|&(i, l)| (tok.token_str(i), json!(l)))
                .collect();
            tops.push(Value::Object(top));
        }
        json!({"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs})
    }

    fn echo(&self, index: usize) -> &str {
        self.echo_text
            .get(index / self.n.max(1))
            .map(String::as_str)
            .unwrap_or("")
    }
}

impl Format for CompletionFormat {
    fn start_chunk(&self, index: usize) -> Option<Value> {
        let echo = self.echo(index);
        (!echo.is_empty()).then(|| {
            self.object(json!([{"index": index, "text": echo, "logprobs": Value::Null, "finish_reason": Value::Null}]))
        })
    }

    fn delta_chunk(&mut self, index: usize, text: &str, tokens: &[OutToken]) -> Option<Value> {
        Some(self.object(json!([{
            "index": index, "text": text, "logprobs": self.logprobs_json(tokens, 0),
            "finish_reason": Value::Null,
        }])))
    }

    fn finish_chunks(&mut self, index: usize, finish: FinishReason) -> Vec<Value> {
        vec![self.object(
            json!([{"index": index, "text": "", "logprobs": Value::Null, "finish_reason": finish.as_str()}]),
        )]
    }

    fn usage_chunk(&self, usage: Value) -> Value {
        self.env.usage_chunk("text_completion", usage)
    }

    fn response(&self, choices: Vec<ChoiceOut>, usage: Value) -> Value {
        let choices: Vec<Value> = choices
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let echo = self.echo(i);
                json!({
                    "index": i,
                    "text": format!("{echo}{}", c.text),
                    "logprobs": self.logprobs_json(&c.tokens, echo.len()),
                    "finish_reason": c.finish.map(|f| f.as_str()),
                })
            })
            .collect();
        let mut v = self.object(json!(choices));
        v["usage"] = usage;
        v
    }
}
