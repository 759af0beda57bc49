//! Named agent contexts: a conversation's tokens and the KV blocks that hold them, owned by an
//! agent and kept by the engine between requests. A request on a context starts from the KV
//! the context holds for the part of its prompt they share (a copy-on-write fork of the blocks,
//! no prefill), and when it ends the context holds the whole conversation, answer included.

use std::collections::HashMap;

use crate::kv::KvSeq;

/// What the API shows of a context.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ContextInfo {
    pub id: String,
    pub owner: String,
    /// Tokens whose KV the context holds.
    pub tokens: usize,
    /// Bytes of KV blocks it references (shared blocks counted in full).
    pub bytes: usize,
    /// Where its KV lives: "pool" (device memory) or "host" (swapped out).
    pub tier: &'static str,
    pub created: u64,
}

/// Why a context operation was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    /// Unknown, or owned by another agent (the two are not told apart).
    #[error("no context '{0}' for this agent")]
    NotFound(String),
    #[error("the engine has stopped")]
    Stopped,
}

/// An operation on contexts, with the agent asking.
#[derive(Clone, Debug)]
pub enum ContextOp {
    Create {
        owner: String,
    },
    List {
        owner: String,
    },
    Get {
        id: String,
        owner: String,
    },
    /// A new context sharing the blocks, owned by `new_owner` (default: the owner).
    Fork {
        id: String,
        owner: String,
        new_owner: Option<String>,
    },
    Delete {
        id: String,
        owner: String,
    },
}

pub(super) struct Context {
    owner: String,
    tokens: Vec<u32>,
    kv: KvSeq,
    created: u64,
}

#[derive(Default)]
pub(super) struct Contexts {
    map: HashMap<String, Context>,
}

fn new_id() -> String {
    format!("ctx-{:016x}", rand::random::<u64>())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Contexts {
    fn info(id: &str, c: &Context) -> ContextInfo {
        ContextInfo {
            id: id.to_string(),
            owner: c.owner.clone(),
            tokens: c.kv.len(),
            bytes: c.kv.blocks() * c.kv.layout().bytes_per_block(),
            tier: if c.kv.is_swapped() { "host" } else { "pool" },
            created: c.created,
        }
    }

    fn owned(&self, id: &str, owner: &str) -> Result<&Context, ContextError> {
        self.map
            .get(id)
            .filter(|c| c.owner == owner)
            .ok_or_else(|| ContextError::NotFound(id.to_string()))
    }

    pub(super) fn apply(
        &mut self,
        op: ContextOp,
        empty: impl FnOnce() -> KvSeq,
    ) -> Result<Vec<ContextInfo>, ContextError> {
        match op {
            ContextOp::Create { owner } => {
                let id = new_id();
                let c = Context {
                    owner,
                    tokens: Vec::new(),
                    kv: empty(),
                    created: now(),
                };
                let info = Self::info(&id, &c);
                self.map.insert(id, c);
                Ok(vec![info])
            }
            ContextOp::List { owner } => {
                let mut v: Vec<ContextInfo> = self
                    .map
                    .iter()
                    .filter(|(_, c)| c.owner == owner)
                    .map(|(id, c)| Self::info(id, c))
                    .collect();
                v.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
                Ok(v)
            }
            ContextOp::Get { id, owner } => Ok(vec![Self::info(&id, self.owned(&id, &owner)?)]),
            ContextOp::Fork {
                id,
                owner,
                new_owner,
            } => {
                let c = self.owned(&id, &owner)?;
                let mut kv = c.kv.fork_resident().unwrap_or_else(empty);
                let tokens = if kv.is_empty() {
                    Vec::new()
                } else {
                    c.tokens.clone()
                };
                kv.truncate(tokens.len());
                let fork = Context {
                    owner: new_owner.unwrap_or(owner),
                    tokens,
                    kv,
                    created: now(),
                };
                let nid = new_id();
                let info = Self::info(&nid, &fork);
                self.map.insert(nid, fork);
                Ok(vec![info])
            }
            ContextOp::Delete { id, owner } => {
                self.owned(&id, &owner)?;
                let c = self.map.remove(&id).expect("checked above");
                Ok(vec![Self::info(&id, &c)])
            }
        }
    }

    /// Check that `owner` may run on context `id`.
    pub(super) fn check(&self, id: &str, owner: &str) -> Result<(), ContextError> {
        self.owned(id, owner).map(|_| ())
    }

    /// The KV a new sequence with `prompt` starts from on context `id`: a fork of the context's
    /// blocks cut to the tokens they share with the prompt (never its last token).
    pub(super) fn start(&self, id: &str, prompt: &[u32]) -> Option<KvSeq> {
        let c = self.map.get(id)?;
        let mut kv = c.kv.fork_resident()?;
        let common = c
            .tokens
            .iter()
            .zip(&prompt[..prompt.len().saturating_sub(1)])
            .take_while(|(a, b)| a == b)
            .count()
            .min(kv.len());
        kv.truncate(common);
        Some(kv)
    }

    /// A sequence on context `id` ended: the context now holds its tokens and KV.
    pub(super) fn finish(&mut self, id: &str, tokens: &[u32], kv: &KvSeq) {
        if let Some(c) = self.map.get_mut(id) {
            if let Some(fork) = kv.fork_resident() {
                c.tokens = tokens[..fork.len()].to_vec();
                c.kv = fork;
            }
        }
    }
}
