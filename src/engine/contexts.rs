//! Named agent contexts: a conversation's tokens and the KV blocks that hold them, owned by an
//! agent and kept by the engine between requests. A request on a context starts from the KV
//! the context holds for the part of its prompt they share (a copy-on-write fork of the blocks,
//! no prefill), and when it ends the context holds the whole conversation, answer included.
//!
//! Tiers: a context's KV lives in the pool (device memory), in host memory (swapped out: an
//! exact copy, its blocks given back), or on disk (a snapshot file that survives a restart).
//! Under pool pressure idle contexts move to the host, least recently used first (copied out
//! on copier threads; the sequence that needs their blocks waits for them); past
//! `host_bytes` the host's oldest move on to disk (or, with no disk tier, lose their KV and keep
//! their tokens). A request on a context in host memory waits while a copier thread copies its
//! KV into pool blocks (the engine steps the other sequences meanwhile); when the pool has no
//! free blocks for it, the request takes the KV as a swapped-out sequence that the scheduler
//! swaps in when it runs, making room. One on disk is read and verified on a loader
//! thread, straight into pool blocks when the pool has them (else into host memory), while
//! the engine keeps stepping. Snapshots are written on writer threads too; a request on a
//! context being written waits for the write, then reads it back.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::Instant;

use super::{Command, ContextReply};
use crate::kv::snapshot::DiskStore;
use crate::kv::{KvPool, KvSeq};

/// What the API shows of a context.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ContextInfo {
    pub id: String,
    pub owner: String,
    /// Tokens whose KV the context holds.
    pub tokens: usize,
    /// Bytes of KV blocks it references (shared blocks counted in full).
    pub bytes: usize,
    /// Where its KV lives: "pool" (device memory), "host" (swapped out to host memory), "disk"
    /// (a snapshot file), or "none" (dropped under pressure: the next turn prefills again).
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
    /// The operation needs something the server is not configured for.
    #[error("{0}")]
    Unsupported(String),
    /// A snapshot could not be written or read.
    #[error("{0}")]
    Storage(String),
}

/// Where a snapshot request sends a context's KV.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    Host,
    Disk,
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
    /// Move the context's KV out of the pool now: to host memory, or to disk.
    Snapshot {
        id: String,
        owner: String,
        tier: Tier,
    },
    /// Write every context that is not on disk yet to disk (the server is stopping); returns
    /// those written. Nothing without a disk tier.
    PersistAll,
}

/// A context's snapshot file.
#[derive(Clone, Copy)]
struct OnDisk {
    bytes: u64,
    /// Tokens of KV it holds.
    kv_len: usize,
}

/// What a snapshot writer gives back with the KV: the written file's temporary path and size.
type Unnamed = Result<(PathBuf, u64), String>;

/// A snapshot being written on a writer thread, with the context's KV (in host memory), which
/// comes back when the file is written.
struct PendingWrite {
    id: String,
    handle: std::thread::JoinHandle<(KvSeq, Unnamed)>,
    /// The client that asked for it (`POST /v1/contexts/{id}/snapshot`), answered when done.
    reply: Option<ContextReply>,
}

/// A write under way: its ticket and the bytes it will take on disk.
#[derive(Clone, Copy)]
struct Writing {
    ticket: u64,
    bytes: u64,
}

pub(super) struct Context {
    owner: String,
    tokens: Vec<u32>,
    kv: KvSeq,
    /// Its snapshot file while the KV is on disk (then `kv` is empty).
    on_disk: Option<OnDisk>,
    /// Its KV is being written to disk (then `kv` is empty; the writer holds it).
    writing: Option<Writing>,
    /// Its KV, in host memory, is being copied into pool blocks by a copier thread.
    filling: bool,
    /// Its KV is being copied out to host memory by a copier thread (its blocks stay in the
    /// pool until then): the blocks that will free.
    evicting: Option<usize>,
    created: u64,
    last_used: Instant,
}

impl Context {
    fn tier(&self) -> &'static str {
        if self.on_disk.is_some() || self.writing.is_some() {
            "disk"
        } else if self.kv.is_swapped() {
            "host"
        } else if self.kv.is_empty() && !self.tokens.is_empty() {
            "none"
        } else {
            "pool"
        }
    }

    fn host_bytes(&self) -> usize {
        self.kv.host_data().map_or(0, <[u8]>::len)
    }

    /// Bytes it takes on disk, or will when its write ends.
    fn disk_bytes(&self) -> u64 {
        match (self.on_disk, self.writing) {
            (Some(d), _) => d.bytes,
            (None, Some(w)) => w.bytes,
            (None, None) => 0,
        }
    }
}

/// How a sequence on a context starts.
pub(super) enum Start {
    /// From this KV (in the pool, or swapped out for the scheduler to bring in).
    Kv(KvSeq),
    /// The KV is on disk: read this file first (it holds this many tokens of KV).
    Load(PathBuf, usize),
    /// The KV is being written to disk (then it is read back), or copied into the pool from
    /// host memory: wait for it.
    Wait,
}

/// A snapshot read back from disk (on a loader thread): its tokens and its KV, in the pool
/// or in host memory.
pub(super) type Loaded = Result<(Vec<u32>, KvSeq), String>;

/// How many contexts each tier holds, and the bytes of the host and disk tiers.
#[derive(Debug, Default)]
pub(super) struct TierTotals {
    pub pool: usize,
    pub host: usize,
    pub disk: usize,
    pub host_bytes: u64,
    pub disk_bytes: u64,
}

pub(super) struct Contexts {
    map: HashMap<String, Context>,
    pool: Arc<KvPool>,
    store: Option<Arc<DiskStore>>,
    host_budget: usize,
    disk_budget: u64,
    /// Snapshots being written, by ticket.
    pending: HashMap<u64, PendingWrite>,
    /// Clients that asked for a context to go to host memory (`POST .../snapshot`), answered
    /// when its copy out of the pool ends.
    host_replies: HashMap<String, Vec<ContextReply>>,
    next_ticket: u64,
    /// Where a writer thread says it is done (the engine's own queue).
    wake: mpsc::Sender<Command>,
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
    /// Contexts of one pool; with a disk store, the snapshots already in it are indexed (and
    /// refused ones reported in the log).
    pub(super) fn new(
        pool: Arc<KvPool>,
        store: Option<DiskStore>,
        host_budget: u64,
        disk_budget: u64,
        wake: mpsc::Sender<Command>,
    ) -> Self {
        let mut map = HashMap::new();
        if let Some(store) = &store {
            let (good, refused) = store.scan();
            for why in refused {
                tracing::error!("{why}");
            }
            for crate::kv::snapshot::Scanned { meta, tokens, size } in good {
                let kv = KvSeq::in_pool(pool.clone());
                map.insert(
                    meta.id,
                    Context {
                        owner: meta.owner,
                        tokens,
                        kv,
                        on_disk: Some(OnDisk {
                            bytes: size,
                            kv_len: meta.kv_len,
                        }),
                        writing: None,
                        filling: false,
                        evicting: None,
                        created: meta.created,
                        last_used: Instant::now(),
                    },
                );
            }
            if !map.is_empty() {
                tracing::info!("{} context snapshots restored from disk", map.len());
            }
        }
        Self {
            map,
            pool,
            store: store.map(Arc::new),
            host_budget: host_budget as usize,
            disk_budget,
            pending: HashMap::new(),
            host_replies: HashMap::new(),
            next_ticket: 0,
            wake,
        }
    }

    fn empty(&self) -> KvSeq {
        KvSeq::in_pool(self.pool.clone())
    }

    fn info(id: &str, c: &Context) -> ContextInfo {
        let bytes = match (c.on_disk, c.writing) {
            (Some(d), _) => d.bytes as usize,
            (None, Some(w)) => w.bytes as usize,
            _ if c.kv.is_swapped() => c.host_bytes(),
            _ => c.kv.blocks() * c.kv.layout().bytes_per_block(),
        };
        ContextInfo {
            id: id.to_string(),
            owner: c.owner.clone(),
            tokens: c.tokens.len(),
            bytes,
            tier: c.tier(),
            created: c.created,
        }
    }

    fn owned(&self, id: &str, owner: &str) -> Result<&Context, ContextError> {
        self.map
            .get(id)
            .filter(|c| c.owner == owner)
            .ok_or_else(|| ContextError::NotFound(id.to_string()))
    }

    /// Carry out `op` and answer `reply`, now or (a snapshot written to disk) when it is done.
    pub(super) fn request(&mut self, op: ContextOp, reply: ContextReply) {
        let mut reply = Some(reply);
        let result = self.apply(op, &mut reply);
        if let Some(r) = reply {
            let _ = r.send(result);
        }
    }

    /// Carry out `op`; an operation that finishes later takes `reply` and answers it then.
    fn apply(
        &mut self,
        op: ContextOp,
        reply: &mut Option<ContextReply>,
    ) -> Result<Vec<ContextInfo>, ContextError> {
        match op {
            ContextOp::Create { owner } => {
                let id = new_id();
                let c = Context {
                    owner,
                    tokens: Vec::new(),
                    kv: self.empty(),
                    on_disk: None,
                    writing: None,
                    filling: false,
                    evicting: None,
                    created: now(),
                    last_used: Instant::now(),
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
                // Blocks in the pool are shared copy-on-write; KV elsewhere is not copied (the
                // fork starts without KV and prefills on its first turn).
                let (kv, tokens) = match c.kv.fork_resident() {
                    Some(kv) if !kv.is_empty() => (kv, c.tokens.clone()),
                    _ => (self.empty(), Vec::new()),
                };
                let fork = Context {
                    owner: new_owner.unwrap_or(owner),
                    tokens,
                    kv,
                    on_disk: None,
                    writing: None,
                    filling: false,
                    evicting: None,
                    created: now(),
                    last_used: Instant::now(),
                };
                let nid = new_id();
                let info = Self::info(&nid, &fork);
                self.map.insert(nid, fork);
                Ok(vec![info])
            }
            ContextOp::Delete { id, owner } => {
                self.owned(&id, &owner)?;
                let c = self.map.remove(&id).expect("checked above");
                if c.on_disk.is_some() {
                    if let Some(s) = &self.store {
                        s.remove(&id);
                    }
                }
                Ok(vec![Self::info(&id, &c)])
            }
            ContextOp::PersistAll => {
                if self.store.is_none() {
                    return Ok(Vec::new());
                }
                let mut ids: Vec<String> = self
                    .map
                    .iter()
                    .filter(|(_, c)| {
                        c.on_disk.is_none() && c.writing.is_none() && !c.tokens.is_empty()
                    })
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in &ids {
                    if let Err(e) = self.move_to_disk(id, true, &mut None) {
                        tracing::error!("context {id} not saved: {e}");
                    }
                }
                // Every write under way finishes before the server stops.
                let mut tickets: Vec<u64> = self.pending.keys().copied().collect();
                tickets.sort_unstable();
                for t in tickets {
                    if let Some(id) = self.written(t) {
                        if !ids.contains(&id) {
                            ids.push(id);
                        }
                    }
                }
                Ok(ids
                    .iter()
                    .filter_map(|id| self.map.get(id).map(|c| (id, c)))
                    .filter(|(_, c)| c.on_disk.is_some())
                    .map(|(id, c)| Self::info(id, c))
                    .collect())
            }
            ContextOp::Snapshot { id, owner, tier } => {
                self.owned(&id, &owner)?;
                match tier {
                    Tier::Host => {
                        let c = &self.map[&id];
                        let in_pool = c.on_disk.is_none() && c.writing.is_none();
                        if in_pool && c.kv.blocks() > 0 {
                            // Copied out on a copier thread; answered when it is done.
                            if c.evicting.is_none() {
                                self.evict(id.clone());
                            }
                            if let Some(r) = reply.take() {
                                self.host_replies.entry(id.clone()).or_default().push(r);
                            }
                        }
                    }
                    Tier::Disk => self.move_to_disk(&id, true, reply)?,
                }
                Ok(vec![Self::info(&id, &self.map[&id])])
            }
        }
    }

    /// The API's view of context `id`, if it exists.
    fn owned_info(&self, id: &str) -> Option<Vec<ContextInfo>> {
        self.map.get(id).map(|c| vec![Self::info(id, c)])
    }

    /// Forget a context's KV, keeping its tokens: its next turn prefills them again.
    fn drop_kv(&mut self, id: &str) {
        if let Some(c) = self.map.get_mut(id) {
            c.kv = KvSeq::in_pool(self.pool.clone());
        }
    }

    /// How many contexts each tier holds, and the bytes of the host and disk tiers.
    pub(super) fn tiers(&self) -> TierTotals {
        let mut t = TierTotals::default();
        for c in self.map.values() {
            match c.tier() {
                "disk" => {
                    t.disk += 1;
                    t.disk_bytes += c.disk_bytes();
                }
                "host" => {
                    t.host += 1;
                    t.host_bytes += c.host_bytes() as u64;
                }
                "pool" => t.pool += 1,
                _ => {}
            }
        }
        t
    }

    /// Check that `owner` may run on context `id`.
    pub(super) fn check(&self, id: &str, owner: &str) -> Result<(), ContextError> {
        self.owned(id, owner).map(|_| ())
    }

    /// How a new sequence with `prompt` starts on context `id`: from the context's KV cut to
    /// the tokens it shares with the prompt (never the prompt's last token). KV in the pool is
    /// shared copy-on-write; KV in host memory is handed to the sequence (the context gets it
    /// back, extended, when the sequence ends).
    pub(super) fn start(&mut self, id: &str, prompt: &[u32], busy: &[&str]) -> Start {
        let Some(c) = self.map.get_mut(id) else {
            return Start::Kv(KvSeq::in_pool(self.pool.clone()));
        };
        c.last_used = Instant::now();
        if c.writing.is_some() || c.filling {
            return Start::Wait;
        }
        if let (Some(d), Some(s)) = (c.on_disk, &self.store) {
            return Start::Load(s.path(id), d.kv_len);
        }
        let common = c
            .tokens
            .iter()
            .zip(&prompt[..prompt.len().saturating_sub(1)])
            .take_while(|(a, b)| a == b)
            .count()
            .min(c.kv.len());
        if c.kv.is_swapped() && self.bring_back(id, busy) {
            return Start::Wait;
        }
        // KV in the pool is shared copy-on-write. KV in host memory with no room to be made
        // for it is taken by the sequence, and the scheduler swaps it in when it runs
        // (preempting lower-ranked sequences if it must).
        let c = self.map.get_mut(id).expect("found above");
        let mut kv = if c.kv.is_swapped() {
            std::mem::replace(&mut c.kv, KvSeq::in_pool(self.pool.clone()))
        } else {
            c.kv.fork()
        };
        kv.truncate(common);
        Start::Kv(kv)
    }

    /// Context `id`'s snapshot was read: its KV is now in the pool or host memory. An unreadable
    /// snapshot removes the context (the file is renamed `.rejected`) and says why.
    pub(super) fn loaded(&mut self, id: &str, result: Loaded) -> Result<(), String> {
        let Some(c) = self.map.get_mut(id) else {
            return Err(format!("context '{id}' was deleted while it loaded"));
        };
        let checked = result.and_then(|(tokens, kv)| {
            if tokens != c.tokens {
                return Err("the snapshot's tokens changed on disk".to_string());
            }
            Ok(kv)
        });
        match checked {
            Ok(kv) => {
                c.kv = kv;
                c.on_disk = None;
                if let Some(s) = &self.store {
                    s.remove(id);
                }
                self.enforce_host_budget(&[id]);
                Ok(())
            }
            Err(why) => {
                self.map.remove(id);
                let msg = format!(
                    "context '{id}' could not be loaded from its snapshot ({why}); the context was removed"
                );
                if let Some(s) = &self.store {
                    s.reject(&s.path(id), &why);
                }
                tracing::error!("{msg}");
                Err(msg)
            }
        }
    }

    /// The store snapshots are read from (for the loader thread).
    pub(super) fn store(&self) -> Option<Arc<DiskStore>> {
        self.store.clone()
    }

    /// A sequence on context `id` ended: the context now holds its tokens and KV.
    pub(super) fn finish(&mut self, id: &str, tokens: &[u32], kv: &KvSeq) {
        if let Some(c) = self.map.get_mut(id) {
            if let Some(fork) = kv.fork_resident() {
                c.tokens = tokens[..fork.len()].to_vec();
                c.kv = fork;
                c.last_used = Instant::now();
                // A write of the old KV still under way is stale now (`written` removes it).
                c.writing = None;
                if c.on_disk.take().is_some() {
                    if let Some(s) = &self.store {
                        s.remove(id);
                    }
                }
            }
        }
    }
}

mod moves;
pub(super) use moves::Evicted;

#[cfg(test)]
mod tests;
