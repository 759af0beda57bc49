//! How an engine is configured: its step sizes, policy, KV pool and tiers.

use std::sync::Arc;

use super::{PolicyKind, PolicyParams};

/// How the engine forms its steps.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Most tokens one step feeds the model. Decode tokens of running sequences come first; the
    /// rest goes to prompts, in chunks, so a long prompt never stalls the others.
    pub max_batched_tokens: usize,
    /// Most sequences served in one step; the policy picks which when more are live.
    pub max_running: usize,
    /// Most sequences waiting beyond `max_running`; past it requests are refused (503).
    pub max_queued: usize,
    pub policy: PolicyKind,
    pub policy_params: PolicyParams,
    /// The KV pool's size.
    pub kv: KvBudget,
    /// What happens to a preempted sequence's KV.
    pub preemption: Preemption,
    /// Reuse cached KV blocks of earlier sequences with the same prefix.
    pub prefix_cache: bool,
    /// Host memory for idle contexts' KV pushed out of the pool.
    pub host_bytes: u64,
    /// Where this model's context snapshots live (the disk tier); None for no disk tier.
    pub snapshot_dir: Option<std::path::PathBuf>,
    /// Most bytes of snapshots on disk.
    pub disk_bytes: u64,
    /// Pool memory committed at start, on a background thread (the rest on first use).
    pub prefault_bytes: u64,
    /// How KV rows are stored (f16, or 8-bit with a scale per row).
    pub kv_dtype: crate::kv::KvDtype,
    /// Priorities of named agents, for requests without an `X-Priority` header.
    pub agent_priority: Arc<std::collections::HashMap<String, i32>>,
}

/// What preemption does with a sequence's KV when the pool runs short.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preemption {
    /// Copy it to host memory and back (the default: nothing is recomputed).
    Swap,
    /// Drop it and prefill the sequence's tokens again when it resumes (no host memory).
    Recompute,
}

/// How much memory the KV pool takes, allocated once when the engine starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KvBudget {
    Bytes(u64),
    /// A fraction of the memory available when the engine starts.
    FractionOfFree(f64),
}

impl KvBudget {
    /// Bytes for the pool on this machine now.
    pub fn bytes(self) -> u64 {
        match self {
            KvBudget::Bytes(b) => b,
            KvBudget::FractionOfFree(f) => (available_memory() as f64 * f) as u64,
        }
    }
}

/// Memory available for new allocations (`MemAvailable`), or 4 GiB when unknown.
pub fn available_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(4 << 30)
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batched_tokens: 512,
            max_running: 16,
            max_queued: 256,
            policy: PolicyKind::Fifo,
            policy_params: PolicyParams {
                quantum: 32,
                aging_secs: 30.0,
            },
            kv: KvBudget::FractionOfFree(0.25),
            preemption: Preemption::Swap,
            prefix_cache: true,
            host_bytes: 4 << 30,
            snapshot_dir: None,
            disk_bytes: 64 << 30,
            prefault_bytes: 1 << 30,
            kv_dtype: Default::default(),
            agent_priority: Default::default(),
        }
    }
}
