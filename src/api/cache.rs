//! The exact-match response cache: complete answers to deterministic requests, kept per agent
//! and served again, streamed or not, without running the model or calling a provider.
//!
//! The key is a SHA-256 of the route, the agent, the served model's name and the request body
//! in a canonical form (object keys sorted at every level; the fields that only say how the
//! answer is delivered, `stream`, `stream_options`, `cache` and `fallback`, left out). An
//! entry is the whole non-streamed response object and the backend that produced it. Entries
//! expire `ttl` after they were stored; past the bounds on entries or bytes, the least
//! recently used go first. (A request with `"fallback": false` is served only answers the
//! local engine produced; the HTTP layer checks that.)

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub type Key = [u8; 32];

/// Body fields that change how an answer is delivered, not what it is.
const DELIVERY_FIELDS: &[&str] = &["stream", "stream_options", "cache", "fallback", "model"];

/// The cache key of a request of `agent` on `route` for `model` (the served name, aliases
/// resolved) with this body.
pub fn key(route: &str, agent: &str, model: &str, body: &Map<String, Value>) -> Key {
    let mut text = String::new();
    for part in [route, agent, model] {
        text.push_str(&part.len().to_string());
        text.push(':');
        text.push_str(part);
    }
    let fields: BTreeMap<&String, &Value> = body
        .iter()
        .filter(|(k, v)| !DELIVERY_FIELDS.contains(&k.as_str()) && !v.is_null())
        .collect();
    text.push('{');
    for (k, v) in fields {
        canonical(&Value::String(k.clone()), &mut text);
        text.push(':');
        canonical(v, &mut text);
        text.push(',');
    }
    text.push('}');
    Sha256::digest(text.as_bytes()).into()
}

/// JSON text with every object's keys sorted (the crate keeps insertion order).
fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let sorted: BTreeMap<&String, &Value> = m.iter().collect();
            out.push('{');
            for (i, (k, v)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// A stored answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Hit {
    /// The whole non-streamed response object, usage included.
    pub response: Value,
    /// Who produced it: `local` or a provider's name.
    pub backend: String,
}

struct Entry {
    hit: Hit,
    stored: Instant,
    /// Position in the recency order.
    tick: u64,
    bytes: usize,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    /// Recency order: oldest use first.
    order: BTreeMap<u64, Key>,
    tick: u64,
    bytes: usize,
}

impl Inner {
    fn remove(&mut self, key: &Key) {
        if let Some(e) = self.entries.remove(key) {
            self.order.remove(&e.tick);
            self.bytes -= e.bytes;
        }
    }
}

/// Bounded, least recently used first, with a time to live.
#[derive(Default)]
pub struct ResponseCache {
    inner: Mutex<Inner>,
    /// Keys whose answer a request is computing now; identical requests wait for it.
    flights: Mutex<HashMap<Key, tokio::sync::watch::Receiver<()>>>,
}

/// A request computing the answer for a key: while it lives, identical requests wait for its
/// answer instead of computing it again. Dropped when the request ends, answered or not.
pub struct Flight {
    cache: std::sync::Arc<ResponseCache>,
    key: Key,
    _done: tokio::sync::watch::Sender<()>,
}

impl Drop for Flight {
    fn drop(&mut self) {
        let mut f = self.cache.flights.lock().unwrap_or_else(|p| p.into_inner());
        f.remove(&self.key);
        // `_done` drops after this: every waiter wakes and looks the key up again.
    }
}

/// What a request missing the cache does: compute the answer (and let others wait for it), or
/// wait for the request already computing it.
pub enum Join {
    Lead(Flight),
    Follow(tokio::sync::watch::Receiver<()>),
}

impl ResponseCache {
    /// Lead the computation of `key`'s answer, or follow the request already leading it.
    pub fn join(self: &std::sync::Arc<Self>, key: Key) -> Join {
        let mut f = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = f.get(&key) {
            return Join::Follow(rx.clone());
        }
        let (tx, rx) = tokio::sync::watch::channel(());
        f.insert(key, rx);
        Join::Lead(Flight {
            cache: self.clone(),
            key,
            _done: tx,
        })
    }
}

impl ResponseCache {
    /// The answer stored under `key` if it is younger than `ttl` (an older one is dropped).
    pub fn get(&self, key: &Key, ttl: Duration, now: Instant) -> Option<Hit> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let expired = now.saturating_duration_since(g.entries.get(key)?.stored) >= ttl;
        if expired {
            g.remove(key);
            return None;
        }
        g.tick += 1;
        let tick = g.tick;
        let e = g.entries.get_mut(key).expect("present");
        let old = std::mem::replace(&mut e.tick, tick);
        let hit = e.hit.clone();
        g.order.remove(&old);
        g.order.insert(tick, *key);
        Some(hit)
    }

    /// Store `hit` under `key`, evicting the least recently used answers past `max_entries`
    /// or `max_bytes`. An answer larger than `max_bytes` alone is not stored.
    pub fn put(&self, key: Key, hit: Hit, now: Instant, max_entries: usize, max_bytes: usize) {
        let bytes = hit.response.to_string().len() + hit.backend.len() + 64;
        if bytes > max_bytes || max_entries == 0 {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.remove(&key);
        while g.entries.len() >= max_entries || g.bytes + bytes > max_bytes {
            let Some((_, oldest)) = g.order.pop_first() else {
                break;
            };
            if let Some(e) = g.entries.remove(&oldest) {
                g.bytes -= e.bytes;
            }
        }
        g.tick += 1;
        let tick = g.tick;
        g.order.insert(tick, key);
        g.bytes += bytes;
        g.entries.insert(
            key,
            Entry {
                hit,
                stored: now,
                tick,
                bytes,
            },
        );
    }

    /// Answers held, and their bytes.
    pub fn size(&self) -> (usize, usize) {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (g.entries.len(), g.bytes)
    }
}

/// Whether a request's output is fixed by its input: greedy (temperature 0 or `top_k` 1) or
/// seeded.
pub fn deterministic(s: &crate::engine::SamplingParams) -> bool {
    s.temperature == 0.0 || s.top_k == 1 || s.seed.is_some()
}

/// Whether every choice of a response ended on its own terms (`stop`, `length`, `tool_calls`)
/// rather than by an error, a filter or a cut stream.
pub fn complete(response: &Value) -> bool {
    match response["choices"].as_array() {
        Some(c) if !c.is_empty() => c.iter().all(|c| {
            matches!(
                c["finish_reason"].as_str(),
                Some("stop" | "length" | "tool_calls")
            )
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn hit(text: &str) -> Hit {
        Hit {
            response: json!({"choices": [{"text": text, "finish_reason": "stop"}]}),
            backend: "local".into(),
        }
    }

    #[test]
    fn keys_ignore_order_and_delivery_but_not_content() {
        let a = body(
            json!({"prompt": "hi", "max_tokens": 4, "temperature": 0, "stream": true,
                            "response_format": {"type": "json_object", "x": 1}}),
        );
        let b = body(
            json!({"response_format": {"x": 1, "type": "json_object"}, "temperature": 0,
                            "max_tokens": 4, "prompt": "hi", "cache": true, "fallback": false,
                            "stream_options": {"include_usage": true}, "model": "alias"}),
        );
        assert_eq!(
            key("completions", "a", "m", &a),
            key("completions", "a", "m", &b)
        );
        let k = key("completions", "a", "m", &a);
        assert_ne!(k, key("completions", "b", "m", &a), "per agent");
        assert_ne!(k, key("chat", "a", "m", &a), "per route");
        assert_ne!(k, key("completions", "a", "n", &a), "per model");
        let mut c = a.clone();
        c.insert("max_tokens".into(), json!(5));
        assert_ne!(k, key("completions", "a", "m", &c), "per parameter");
        let mut d = a.clone();
        d.insert("prompt".into(), json!("hi!"));
        assert_ne!(k, key("completions", "a", "m", &d), "per prompt");
        // A part cannot run into the next: ("ab", "c") is not ("a", "bc").
        assert_ne!(key("ab", "c", "m", &a), key("a", "bc", "m", &a));
    }

    #[test]
    fn ttl_and_lru_and_bytes() {
        let c = ResponseCache::default();
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let k = |i: u8| [i; 32];
        c.put(k(1), hit("one"), t0, 2, 1 << 20);
        assert_eq!(
            c.get(&k(1), ttl, t0 + Duration::from_secs(9)),
            Some(hit("one"))
        );
        assert_eq!(c.get(&k(1), ttl, t0 + Duration::from_secs(10)), None);
        assert_eq!(c.size().0, 0, "an expired answer is dropped");
        // Two fit; using 1 makes 2 the least recently used, which the third pushes out.
        c.put(k(1), hit("one"), t0, 2, 1 << 20);
        c.put(k(2), hit("two"), t0, 2, 1 << 20);
        assert!(c.get(&k(1), ttl, t0).is_some());
        c.put(k(3), hit("three"), t0, 2, 1 << 20);
        assert!(c.get(&k(2), ttl, t0).is_none());
        assert!(c.get(&k(1), ttl, t0).is_some());
        assert!(c.get(&k(3), ttl, t0).is_some());
        // Storing again replaces.
        c.put(k(3), hit("THREE"), t0, 2, 1 << 20);
        assert_eq!(c.get(&k(3), ttl, t0), Some(hit("THREE")));
        assert_eq!(c.size().0, 2);
        // The byte bound: one answer's room each, so every put evicts the one before.
        let (_, bytes) = c.size();
        let one = bytes / 2 + 8;
        let c = ResponseCache::default();
        c.put(k(1), hit("one"), t0, 100, one);
        c.put(k(2), hit("two"), t0, 100, one);
        assert!(c.get(&k(1), ttl, t0).is_none());
        assert!(c.get(&k(2), ttl, t0).is_some());
        // Too big alone: not stored.
        c.put(k(4), hit(&"x".repeat(one)), t0, 100, one);
        assert!(c.get(&k(4), ttl, t0).is_none());
        assert!(c.get(&k(2), ttl, t0).is_some());
    }

    #[test]
    fn what_counts_as_deterministic_and_complete() {
        let mut s = crate::engine::SamplingParams {
            temperature: 0.7,
            ..Default::default()
        };
        assert!(!deterministic(&s));
        s.seed = Some(3);
        assert!(deterministic(&s));
        s.seed = None;
        s.top_k = 1;
        assert!(deterministic(&s));
        s.top_k = 0;
        s.temperature = 0.0;
        assert!(deterministic(&s));
        assert!(complete(
            &json!({"choices": [{"finish_reason": "stop"}, {"finish_reason": "tool_calls"}]})
        ));
        assert!(!complete(
            &json!({"choices": [{"finish_reason": "stop"}, {"finish_reason": null}]})
        ));
        assert!(!complete(
            &json!({"choices": [{"finish_reason": "content_filter"}]})
        ));
        assert!(!complete(&json!({"choices": []})));
    }
}
