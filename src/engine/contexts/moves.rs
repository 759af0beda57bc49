//! Moving contexts' KV between the tiers off the engine thread: snapshots written to disk on
//! writer threads, idle contexts copied out to host memory and back into the pool on copier
//! threads, each settled on the engine thread when its thread reports (and dropped if the
//! context changed meanwhile).

use std::sync::Arc;
use std::time::Instant;

use super::{
    Command, Context, ContextError, ContextReply, Contexts, KvSeq, OnDisk, PendingWrite, Writing,
};

/// A context's KV copied out to host memory (see [`Contexts::evict_one`]): the block table and
/// length it was copied from, and the copy.
pub(in crate::engine) struct Evicted {
    pub(super) id: String,
    pub(super) blocks: Vec<u32>,
    pub(super) len: usize,
    pub(super) copy: KvSeq,
}

impl Contexts {
    /// Start bringing context `id`'s KV back from host memory, for a request that then waits:
    /// into pool blocks taken now, copied by a copier thread while the engine steps the other
    /// sequences ([`Contexts::filled`] settles it; the context keeps its host copy meanwhile,
    /// so a snapshot or a delete in between still sees it); without free blocks, by copying
    /// idle contexts (not `busy` ones) out to make room ([`Contexts::waits_for_room`]). False
    /// when neither can start: nothing more to free.
    pub(super) fn bring_back(&mut self, id: &str, busy: &[&str]) -> bool {
        let c = self.map.get_mut(id).expect("caller checked");
        if let (Ok(mut into), Some(from)) = (
            KvSeq::for_fill(self.pool.clone(), c.kv.len()),
            c.kv.host_shared(),
        ) {
            c.filling = true;
            let (fid, wake) = (id.to_string(), self.wake.clone());
            std::thread::spawn(move || {
                let t = Instant::now();
                into.fill_all(&from);
                tracing::debug!(
                    "context {fid}: {} bytes copied from host memory into the pool in {:.1} ms",
                    from.len(),
                    t.elapsed().as_secs_f64() * 1e3
                );
                let _ = wake.send(Command::Filled(fid, from, into));
            });
            return true;
        }
        let short = KvSeq::blocks_for(c.kv.len()).saturating_sub(self.pool.free_blocks());
        let mut skip = busy.to_vec();
        skip.push(id);
        while self.evicting_blocks() < short && self.evict_one(&skip) {}
        self.evicting_blocks() > 0
    }

    /// Write context `id` to disk and free its memory, on a writer thread (a snapshot of 1,400
    /// tokens took ~40 ms to write and sync here, which every running sequence would wait for
    /// on the engine thread); [`Contexts::written`] settles it. `explicit`: the client asked,
    /// so a missing or full disk tier or a failed write is its error (answered through `reply`
    /// when the write ends); otherwise the KV is dropped instead.
    pub(super) fn move_to_disk(
        &mut self,
        id: &str,
        explicit: bool,
        reply: &mut Option<ContextReply>,
    ) -> Result<(), ContextError> {
        let Some(store) = self.store.clone() else {
            if explicit {
                return Err(ContextError::Unsupported(
                    "no disk tier: set [kv] disk_dir in the configuration".into(),
                ));
            }
            self.drop_kv(id);
            return Ok(());
        };
        let used: u64 = self.map.values().map(Context::disk_bytes).sum();
        let c = self.map.get_mut(id).expect("caller checked");
        if c.on_disk.is_some() || c.writing.is_some() {
            return Ok(());
        }
        // KV still in the pool is copied out by the writer thread (its blocks are freed there).
        let bytes = KvSeq::blocks_for(c.kv.len()) * c.kv.layout().bytes_per_block();
        let need = (bytes + c.tokens.len() * 4) as u64;
        if used + need > self.disk_budget {
            if explicit {
                return Err(ContextError::Storage(format!(
                    "the disk tier is full ({used} of [kv] disk_bytes = {} bytes used)",
                    self.disk_budget
                )));
            }
            self.drop_kv(id);
            return Ok(());
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let kv = std::mem::replace(&mut c.kv, KvSeq::in_pool(self.pool.clone()));
        c.writing = Some(Writing {
            ticket,
            bytes: need,
        });
        let (owner, created, tokens) = (c.owner.clone(), c.created, c.tokens.clone());
        let (wid, wake) = (id.to_string(), self.wake.clone());
        let handle = std::thread::spawn(move || {
            let mut kv = kv;
            kv.swap_out();
            let data = kv.host_data().unwrap_or(&[]);
            let written = store.write_unnamed(&wid, &owner, created, &tokens, kv.len(), data);
            let _ = wake.send(Command::Written(ticket));
            (kv, written)
        });
        let reply = if explicit { reply.take() } else { None };
        self.pending.insert(
            ticket,
            PendingWrite {
                id: id.to_string(),
                handle,
                reply,
            },
        );
        Ok(())
    }

    /// The write with this ticket has ended (or is waited for: the server is stopping). On
    /// success the context's KV is freed and it is on disk; on failure an explicit request
    /// gets the error and the KV stays in host memory, and otherwise the KV is dropped (the
    /// tokens stay). Returns the context's id, whose waiting requests may go on.
    pub(in crate::engine) fn written(&mut self, ticket: u64) -> Option<String> {
        let p = self.pending.remove(&ticket)?;
        let (kv, mut result) = p
            .handle
            .join()
            .map(|(kv, r)| (Some(kv), r))
            .unwrap_or_else(|_| (None, Err("the snapshot writer failed".into())));
        let ours = self
            .map
            .get(&p.id)
            .is_some_and(|c| c.writing.is_some_and(|w| w.ticket == ticket));
        let store = self.store.clone().expect("writes need a store");
        if !ours {
            // Deleted, or run and extended, while it was written: the file is stale.
            if let Ok((tmp, _)) = result {
                store.discard(tmp);
            }
            if let Some(r) = p.reply {
                let _ = r.send(
                    self.owned_info(&p.id)
                        .ok_or_else(|| ContextError::NotFound(p.id.clone())),
                );
            }
            return Some(p.id);
        }
        if let Ok((tmp, _)) = &result {
            if let Err(e) = store.name(tmp, &p.id) {
                store.discard(tmp.clone());
                result = Err(e);
            }
        }
        let c = self.map.get_mut(&p.id).expect("checked above");
        c.writing = None;
        let answer = match (result.map(|(_, size)| size), kv) {
            (Ok(size), Some(kv)) => {
                c.on_disk = Some(OnDisk {
                    bytes: size,
                    kv_len: kv.len(),
                });
                Ok(())
            }
            (Err(why), Some(kv)) if p.reply.is_some() => {
                c.kv = kv;
                Err(ContextError::Storage(why))
            }
            (Err(why), _) => {
                tracing::warn!("context {}: {why}; its KV is dropped instead", p.id);
                Err(ContextError::Storage(why))
            }
            (Ok(_), None) => unreachable!("a written snapshot comes back with its KV"),
        };
        if let Some(r) = p.reply {
            let _ = r.send(answer.and_then(|()| {
                self.owned_info(&p.id)
                    .ok_or_else(|| ContextError::NotFound(p.id.clone()))
            }));
        }
        Some(p.id)
    }

    /// Past the host budget, the least recently used contexts in host memory move to disk.
    pub(super) fn enforce_host_budget(&mut self, busy: &[&str]) {
        loop {
            let used: usize = self.map.values().map(Context::host_bytes).sum();
            if used <= self.host_budget {
                return;
            }
            let oldest = self
                .map
                .iter()
                .filter(|(id, c)| c.host_bytes() > 0 && !c.filling && !busy.contains(&id.as_str()))
                .min_by_key(|(_, c)| c.last_used)
                .map(|(id, _)| id.clone());
            let Some(id) = oldest else { return };
            if let Err(e) = self.move_to_disk(&id, false, &mut None) {
                tracing::warn!("context {id}: {e}; its KV is dropped instead");
                self.drop_kv(&id);
            }
        }
    }

    /// Under pool pressure: start moving the least recently used idle context with blocks in
    /// the pool to host memory. A copier thread copies its KV out (32 MB for 1,400 tokens took
    /// 8-45 ms here, which every running sequence would wait for on the engine thread); its
    /// blocks are given back when [`Contexts::evicted`] adopts the copy. False when there is
    /// no such context.
    pub(in crate::engine) fn evict_one(&mut self, busy: &[&str]) -> bool {
        let victim = self
            .map
            .iter()
            .filter(|(id, c)| {
                c.kv.blocks() > 0 && c.evicting.is_none() && !busy.contains(&id.as_str())
            })
            .min_by_key(|(_, c)| c.last_used)
            .map(|(id, _)| id.clone());
        let Some(id) = victim else { return false };
        self.evict(id);
        true
    }

    /// Start copying context `id`'s KV (in the pool) out to host memory on a copier thread.
    pub(super) fn evict(&mut self, id: String) {
        let c = self.map.get_mut(&id).expect("caller checked");
        c.evicting = Some(c.kv.sole_blocks());
        // The copier reads a fork: blocks in the pool are never written while shared.
        let mut copy = c.kv.fork();
        let (blocks, len) = (c.kv.block_ids().to_vec(), c.kv.len());
        let wake = self.wake.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            copy.swap_out();
            tracing::debug!(
                "context {id}: {len} tokens of KV copied out to host memory in {:.1} ms",
                t.elapsed().as_secs_f64() * 1e3
            );
            let _ = wake.send(Command::Evicted(Box::new(Evicted {
                id,
                blocks,
                len,
                copy,
            })));
        });
    }

    /// Whether a request on context `id` waits for room in the pool (its KV in host memory,
    /// no copy into the pool under way): it may go on once an eviction has freed blocks.
    pub(in crate::engine) fn waits_for_room(&self, id: &str) -> bool {
        self.map
            .get(id)
            .is_some_and(|c| c.kv.is_swapped() && !c.filling && c.writing.is_none())
    }

    /// Blocks that the evictions under way will give back to the pool.
    pub(in crate::engine) fn evicting_blocks(&self) -> usize {
        self.map.values().filter_map(|c| c.evicting).sum()
    }

    /// A copier thread has copied a context's KV out to host memory: the context takes the
    /// copy and gives its blocks back, unless its KV changed meanwhile (a turn ran on it, it
    /// was deleted or written to disk), and then the copy is dropped. Past the host budget the
    /// oldest contexts in host memory move on to disk (`busy` ones stay).
    pub(in crate::engine) fn evicted(&mut self, e: Evicted, busy: &[&str]) {
        if let Some(c) = self.map.get_mut(&e.id) {
            c.evicting = None;
            if !c.kv.is_swapped() && c.kv.len() == e.len && c.kv.block_ids() == e.blocks {
                c.kv = e.copy;
                self.enforce_host_budget(busy);
            }
        }
        for r in self.host_replies.remove(&e.id).unwrap_or_default() {
            let _ = r.send(
                self.owned_info(&e.id)
                    .ok_or_else(|| ContextError::NotFound(e.id.clone())),
            );
        }
    }

    /// A copier thread has copied context `id`'s KV from host memory (`from`) into the pool
    /// blocks of `kv`: the context takes them, unless its KV changed meanwhile (deleted, or
    /// written to disk), and then they go back to the pool.
    pub(in crate::engine) fn filled(&mut self, id: &str, from: &Arc<Vec<u8>>, kv: KvSeq) {
        if let Some(c) = self.map.get_mut(id) {
            c.filling = false;
            if c.kv.host_shared().is_some_and(|d| Arc::ptr_eq(&d, from)) {
                c.kv = kv;
            }
        }
    }
}
