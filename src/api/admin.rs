//! `/metrics`, usage (`/v1/usage` for the calling agent, `/admin/usage` for all) and
//! `/admin/reload`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::error::ApiError;
use super::params::agent_of;
use super::{AppState, Live};
use crate::config::Config;

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    if let Some(p) = &state.kv_events {
        use std::sync::atomic::Ordering::Relaxed;
        state
            .metrics
            .kv_events(p.published.load(Relaxed), p.dropped.load(Relaxed));
    }
    let engines = state.ready_engines();
    let text = state
        .metrics
        .render(engines.iter().map(|(n, e)| (n.as_str(), e.clone())));
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// `GET /v1/devices`: the CPU and GPUs (admin key when keys are on).
pub async fn devices() -> Response {
    match tokio::task::spawn_blocking(crate::devices::discover).await {
        Ok(r) => axum::Json(r).into_response(),
        Err(e) => ApiError::internal(format!("device discovery failed: {e}")).into_response(),
    }
}

pub async fn own_usage(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    match agent_of(&headers) {
        Ok(agent) => {
            let usage = state.governor.usage(&agent);
            axum::Json(json!({"object": "usage", "agent": agent, "usage": usage})).into_response()
        }
        Err(e) => e.into_response(),
    }
}

pub async fn all_usage(State(state): State<Arc<AppState>>) -> Response {
    let agents = state.governor.all_usage();
    axum::Json(json!({"object": "usage", "agents": agents})).into_response()
}

pub async fn reload(State(state): State<Arc<AppState>>) -> Response {
    match state.reload() {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_config",
            format!("the new configuration was refused; the old one stays: {e}"),
        )
        .into_response(),
    }
}

/// The sections a reload cannot apply (they need a restart).
fn fixed_sections(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    if old.server != new.server {
        out.push("server");
    }
    if old.kv != new.kv {
        out.push("kv");
    }
    if old.embeddings != new.embeddings {
        out.push("embeddings");
    }
    if old.memory != new.memory {
        out.push("memory");
    }
    if old.kv_events != new.kv_events {
        out.push("kv_events");
    }
    if old.providers != new.providers {
        out.push("providers");
    }
    let models = |c: &Config| {
        c.models
            .iter()
            .map(|m| {
                let mut m = m.clone();
                m.policy = None;
                m
            })
            .collect::<Vec<_>>()
    };
    if models(old) != models(new) {
        out.push("models");
    }
    let engine = |c: &Config| {
        let e = &c.engine;
        (e.max_batched_tokens, e.max_running, e.max_queued)
    };
    if engine(old) != engine(new) {
        out.push("engine (max_batched_tokens, max_running, max_queued)");
    }
    out
}

impl AppState {
    /// Read the configuration again and apply what can change while serving: keys, limits,
    /// agents, scheduling policies. An invalid configuration is refused whole.
    pub fn reload(&self) -> Result<Value, String> {
        let source = self
            .reload_source
            .get()
            .ok_or("this server has no configuration source to reload from")?;
        let new = source()?;
        let old = self.live();
        let restart = fixed_sections(&old.config, &new);
        // What a restart would change stays as it is now.
        let mut applied = new.clone();
        applied.server = old.config.server.clone();
        applied.kv = old.config.kv.clone();
        applied.embeddings = old.config.embeddings.clone();
        applied.memory = old.config.memory.clone();
        applied.kv_events = old.config.kv_events.clone();
        applied.providers = old.config.providers.clone();
        applied.models = old.config.models.clone();
        for (m, n) in applied.models.iter_mut().zip(&new.models) {
            if m.name == n.name {
                m.policy = n.policy;
            }
        }
        let e = &mut applied.engine;
        e.max_batched_tokens = old.config.engine.max_batched_tokens;
        e.max_running = old.config.engine.max_running;
        e.max_queued = old.config.engine.max_queued;
        let live = Live::new(applied)?;
        // A reload must not open a server that listens beyond loopback to anyone.
        let host = &live.config.server.host;
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !live.keys.is_on() && !loopback && !live.config.auth.allow_unauthenticated {
            return Err(format!(
                "it has no API key, and this server listens on {host}: keys stay required \
                 (set [auth] allow_unauthenticated = true to open it)"
            ));
        }
        let engine_cfg = live.config.engine_config();
        for (slot, m) in self.models.iter().zip(&live.config.models) {
            if let super::SlotState::Ready(h) =
                &*slot.state.read().unwrap_or_else(|p| p.into_inner())
            {
                h.reconfigure(
                    engine_cfg.agent_priority.clone(),
                    m.policy.unwrap_or(engine_cfg.policy),
                    engine_cfg.policy_params,
                );
            }
        }
        let keys = live.keys.is_on();
        let agents = live.config.agents.len();
        self.set_live(live);
        tracing::info!(
            keys,
            agents,
            "configuration reloaded{}",
            if restart.is_empty() {
                String::new()
            } else {
                format!("; these need a restart: {}", restart.join(", "))
            }
        );
        Ok(json!({"reloaded": true, "keys": keys, "agents": agents, "restart_needed": restart}))
    }
}
