//! Reading and checking the request fields chat and completions share. Every error names the
//! parameter, with OpenAI's ranges.

use axum::http::HeaderMap;
use serde_json::{Map, Value};

use super::error::ApiError;
use crate::engine::SamplingParams;

/// A request body as a JSON object, with typed, range-checked getters.
pub struct Body(pub Map<String, Value>);

impl Body {
    /// Parse raw bytes: invalid UTF-8, malformed JSON and non-objects are 400s.
    pub fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        let text = std::str::from_utf8(bytes)
            .map_err(|e| ApiError::invalid(format!("request body is not valid UTF-8: {e}")))?;
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(m)) => Ok(Self(m)),
            Ok(_) => Err(ApiError::invalid("request body must be a JSON object")),
            Err(e) => Err(ApiError::invalid(format!(
                "request body is not valid JSON: {e}"
            ))),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    pub fn f64(&self, key: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x >= lo && x <= hi => Ok(Some(x)),
                Some(x) => Err(ApiError::param(
                    key,
                    format!("{key} must be between {lo} and {hi}, got {x}"),
                )),
                None => Err(ApiError::param(key, format!("{key} must be a number"))),
            },
        }
    }

    pub fn int(&self, key: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_i64() {
                Some(x) if x >= lo && x <= hi => Ok(Some(x)),
                Some(x) if x < lo => Err(ApiError::param(
                    key,
                    format!("{key} must be at least {lo}, got {x}"),
                )),
                Some(x) => Err(ApiError::param(
                    key,
                    format!("{key} must be at most {hi}, got {x}"),
                )),
                None => Err(ApiError::param(key, format!("{key} must be an integer"))),
            },
        }
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(ApiError::param(key, format!("{key} must be a boolean"))),
        }
    }

    pub fn string(&self, key: &str) -> Result<Option<&str>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::param(key, format!("{key} must be a string"))),
        }
    }
}

/// Everything about generation that chat and completions requests share.
#[derive(Debug, Clone)]
pub struct GenParams {
    pub model: Option<String>,
    pub sampling: SamplingParams,
    /// Requested output limit; `None` means "up to the context length".
    pub max_tokens: Option<usize>,
    pub n: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub stream: bool,
    pub include_usage: bool,
    /// Who is asking: `X-Agent-Id`, else the body's `user`, else the API key, else "anonymous".
    pub agent: String,
    /// `X-Priority` (higher first under the priority policy); `None` when absent (the agent's
    /// configured priority applies).
    pub priority: Option<i32>,
    /// `context_id`: run on this context of the agent's, and extend it.
    pub context: Option<String>,
    /// The grammar the output must follow (`response_format`, tools), set by the endpoint.
    pub constraint: Option<crate::engine::Constraint>,
    /// `cache` (default true): `false` keeps this request away from the response cache, both
    /// ways.
    pub cache: bool,
}

/// The agent of a request without a body (headers only).
pub fn agent_of(headers: &HeaderMap) -> Result<String, ApiError> {
    Ok(identity(&Body::parse(b"{}")?, headers)?.0)
}

/// The agent a request belongs to, and its priority, from headers and body.
fn identity(b: &Body, headers: &HeaderMap) -> Result<(String, Option<i32>), ApiError> {
    let header = |name: &str| -> Result<Option<&str>, ApiError> {
        headers
            .get(name)
            .map(|v| {
                v.to_str()
                    .map(str::trim)
                    .map_err(|_| ApiError::param(name, format!("{name} must be visible ASCII")))
            })
            .transpose()
    };
    let agent = match header("x-agent-id")? {
        Some(a) if !a.is_empty() => {
            if a.len() > 128 {
                return Err(ApiError::param(
                    "X-Agent-Id",
                    "X-Agent-Id is longer than 128 characters",
                ));
            }
            a.to_string()
        }
        _ => match b.string("user")? {
            Some(u) if !u.is_empty() => u.chars().take(128).collect(),
            _ => match header("authorization")?.and_then(|v| v.strip_prefix("Bearer ")) {
                Some(key) if !key.trim().is_empty() => {
                    use std::hash::{Hash, Hasher};
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    key.trim().hash(&mut h);
                    format!("key-{:016x}", h.finish())
                }
                _ => "anonymous".to_string(),
            },
        },
    };
    let priority = match header("x-priority")? {
        None => None,
        Some(p) => Some(p.parse::<i32>().map_err(|_| {
            ApiError::param(
                "X-Priority",
                format!("X-Priority must be an integer, got {p:?}"),
            )
        })?),
    };
    Ok((agent, priority))
}

/// Most choices one request may ask for.
pub const MAX_N: i64 = 16;

impl GenParams {
    /// Read the shared fields. `max_tokens_keys` are tried in order (chat also accepts
    /// `max_completion_tokens`).
    pub fn read(b: &Body, headers: &HeaderMap, max_tokens_keys: &[&str]) -> Result<Self, ApiError> {
        let model = b.string("model")?.map(String::from);
        let (agent, priority) = identity(b, headers)?;
        let mut max_tokens = None;
        for key in max_tokens_keys {
            if let Some(m) = b.int(key, 1, i64::MAX)? {
                max_tokens = Some(m as usize);
                break;
            }
        }
        let n = b.int("n", 1, MAX_N)?.unwrap_or(1) as usize;
        let stop = match b.get("stop") {
            None => vec![],
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) if a.len() <= 16 => a
                .iter()
                .map(|v| v.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    ApiError::param("stop", "stop must be a string or a list of strings")
                })?,
            Some(_) => {
                return Err(ApiError::param(
                    "stop",
                    "stop must be a string or a list of at most 16 strings",
                ))
            }
        };
        let stop_token_ids = match b.get("stop_token_ids") {
            None => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    ApiError::param(
                        "stop_token_ids",
                        "stop_token_ids must be a list of token ids",
                    )
                })?,
            Some(_) => {
                return Err(ApiError::param(
                    "stop_token_ids",
                    "stop_token_ids must be a list",
                ))
            }
        };
        let mut logit_bias = std::collections::HashMap::new();
        if let Some(v) = b.get("logit_bias") {
            let obj = v
                .as_object()
                .ok_or_else(|| ApiError::param("logit_bias", "logit_bias must be an object"))?;
            for (k, v) in obj {
                let id: u32 = k.parse().map_err(|_| {
                    ApiError::param(
                        "logit_bias",
                        format!("logit_bias key {k:?} is not a token id"),
                    )
                })?;
                let bias = v
                    .as_f64()
                    .filter(|x| (-100.0..=100.0).contains(x))
                    .ok_or_else(|| {
                        ApiError::param(
                            "logit_bias",
                            "logit_bias values must be numbers in [-100, 100]",
                        )
                    })?;
                logit_bias.insert(id, bias as f32);
            }
        }
        let stream = b.bool("stream")?.unwrap_or(false);
        let include_usage = match b.get("stream_options") {
            None => false,
            Some(Value::Object(o)) => o
                .get("include_usage")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            Some(_) => {
                return Err(ApiError::param(
                    "stream_options",
                    "stream_options must be an object",
                ))
            }
        };
        let sampling = SamplingParams {
            temperature: b.f64("temperature", 0.0, 2.0)?.unwrap_or(1.0) as f32,
            top_p: match b.f64("top_p", 0.0, 1.0)? {
                Some(p) if p <= 0.0 => {
                    return Err(ApiError::param("top_p", "top_p must be greater than 0"))
                }
                p => p.unwrap_or(1.0) as f32,
            },
            top_k: b.int("top_k", -1, 1_000_000)?.unwrap_or(0).max(0) as usize,
            min_p: b.f64("min_p", 0.0, 1.0)?.unwrap_or(0.0) as f32,
            presence_penalty: b.f64("presence_penalty", -2.0, 2.0)?.unwrap_or(0.0) as f32,
            frequency_penalty: b.f64("frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0) as f32,
            repetition_penalty: match b.f64("repetition_penalty", 0.0, 10.0)? {
                Some(r) if r <= 0.0 => {
                    return Err(ApiError::param(
                        "repetition_penalty",
                        "repetition_penalty must be greater than 0",
                    ))
                }
                r => r.unwrap_or(1.0) as f32,
            },
            logit_bias,
            seed: b.int("seed", i64::MIN, i64::MAX)?.map(|s| s as u64),
            logprobs: None,
        };
        Ok(Self {
            model,
            sampling,
            max_tokens,
            n,
            stop,
            stop_token_ids,
            ignore_eos: b.bool("ignore_eos")?.unwrap_or(false),
            stream,
            include_usage,
            agent,
            priority,
            context: b.string("context_id")?.map(String::from),
            constraint: None,
            cache: b.bool("cache")?.unwrap_or(true),
        })
    }
}
