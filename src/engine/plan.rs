//! Each step's plan: which sequences run and how many tokens each, and the KV blocks they
//! need, preempting lower-ranked sequences (by swapping on copier threads, or dropping their
//! KV for recomputation) when the pool is short.

use std::time::Instant;

use super::{Command, Engine, Preemption, Sequence};

impl Engine {
    /// Token budget per sequence for the next step. The policy ranks every live sequence; the
    /// first `max_running` are served: all their decode tokens first, then prompt chunks in rank
    /// order while the budget lasts. The others pause, keeping their KV.
    ///
    /// Then KV blocks, in rank order: each served sequence gets the blocks its tokens need,
    /// swapping out the lowest-ranked sequences below it when the pool is short (their KV goes
    /// to host memory and comes back bit for bit when they run again). A sequence that still
    /// does not fit gets a smaller prompt chunk, or waits.
    pub(super) fn plan(&mut self) -> Vec<usize> {
        let cands: Vec<_> = self.running.iter().map(Sequence::candidate).collect();
        let order = self.policy.rank(&cands, Instant::now());
        let chosen = &order[..order.len().min(self.cfg.max_running.max(1))];
        if self.cfg.prefix_cache {
            // A sequence with no KV yet (new, or preempted by recomputation) starts from the
            // longest cached prefix of its tokens.
            for &i in chosen {
                self.running[i].attach_prefix();
            }
        }
        let mut left = self.cfg.max_batched_tokens.max(1);
        let mut plan = vec![0; self.running.len()];
        // Sequences whose KV is on its way out or back wait for it.
        let chosen: Vec<usize> = chosen
            .iter()
            .copied()
            .filter(|&i| !self.is_moving(self.running[i].id()))
            .collect();
        let chosen = &chosen[..];
        for &i in chosen {
            if self.running[i].pending() == 1 && left > 0 {
                plan[i] = 1;
                left -= 1;
            }
        }
        for &i in chosen {
            if plan[i] == 0 && left > 0 {
                plan[i] = self.running[i].pending().min(left);
                left -= plan[i];
            }
        }
        let mut rank = vec![0; self.running.len()];
        for (r, &i) in order.iter().enumerate() {
            rank[i] = r;
        }
        for &i in chosen {
            if plan[i] == 0 {
                continue;
            }
            while self.running[i].kv().blocks_needed(plan[i]) > self.pool.free_blocks() {
                // Idle contexts leave the pool first (to host memory, least recently used),
                // copied out on copier threads: this sequence waits for the blocks they give
                // back (a shorter chunk, or nothing, this step) while the others run.
                let short = self.running[i].kv().blocks_needed(plan[i]) - self.pool.free_blocks();
                let coming: usize = self.moving_out.values().sum();
                if self.contexts.evicting_blocks() + coming >= short {
                    break;
                }
                let busy: Vec<&str> = self.running.iter().filter_map(Sequence::context).collect();
                if self.contexts.evict_one(&busy) {
                    continue;
                }
                // Then the lowest-ranked sequence below this one that holds blocks (and is not
                // being copied out already).
                let victim = order
                    .iter()
                    .rev()
                    .take_while(|&&j| rank[j] > rank[i])
                    .find(|&&j| {
                        self.running[j].kv().blocks() > 0 && !self.is_moving(self.running[j].id())
                    });
                match victim {
                    Some(&j) => {
                        match self.cfg.preemption {
                            Preemption::Swap => self.start_swap_out(j),
                            Preemption::Recompute => self.running[j].kv_mut().drop_for_recompute(),
                        }
                        plan[j] = 0;
                    }
                    None => break,
                }
            }
            let kv = self.running[i].kv();
            let free = self.pool.free_blocks();
            if kv.blocks_needed(plan[i]) > free {
                // What fits: a shorter prompt chunk, or nothing this step.
                let room = (kv.blocks() + free) * crate::kv::BLOCK_TOKENS;
                plan[i] = plan[i].min(room.saturating_sub(kv.len()));
            }
            if plan[i] > 0 && self.running[i].kv().is_swapped() {
                // Swapped out: copied back on a copier thread; it runs once that is settled.
                self.start_swap_in(i);
                plan[i] = 0;
            }
            if plan[i] > 0 && self.running[i].kv_mut().reserve(plan[i]).is_err() {
                plan[i] = 0;
            }
        }
        plan
    }

    /// Whether sequence `id`'s KV is being copied between the pool and host memory.
    fn is_moving(&self, id: u64) -> bool {
        self.moving_out.contains_key(&id) || self.moving_in.contains(&id)
    }

    /// Preempt sequence `i` by swapping: its KV is copied to host memory on a copier thread
    /// while the others run (32 MB took 3 ms here, a step's worth of stall on the engine
    /// thread), and its blocks go back to the pool when [`Command::SwappedOut`] is settled.
    fn start_swap_out(&mut self, i: usize) {
        let s = &self.running[i];
        let frees = s.kv().sole_blocks();
        let Some(job) = s.kv().copy_out_job() else {
            return;
        };
        let (id, tx) = (s.id(), self.loopback.clone());
        self.moving_out.insert(id, frees);
        std::thread::spawn(move || {
            let copy = job.run();
            let _ = tx.send(Command::SwappedOut(id, Box::new(copy)));
        });
    }

    /// Bring swapped-out sequence `i` back: pool blocks taken now, filled on a copier thread
    /// ([`Command::SwappedIn`]). Nothing starts when the pool is short of blocks.
    fn start_swap_in(&mut self, i: usize) {
        let s = &self.running[i];
        let Ok(Some(job)) = s.kv().fill_job() else {
            return;
        };
        let (id, tx) = (s.id(), self.loopback.clone());
        self.moving_in.insert(id);
        std::thread::spawn(move || {
            let (from, into) = job.run();
            let _ = tx.send(Command::SwappedIn(id, from, into));
        });
    }
}
