//! KV events: prefix-cache changes published in vLLM's format on a ZeroMQ PUB socket, so a
//! router that tracks which replica holds which prefix (llm-d's precise prefix-cache scorer,
//! the Gateway API Inference Extension's endpoint picker) routes aios replicas as it routes
//! vLLM ones.
//!
//! Each message has three frames: the topic `kv@<instance-id>@<model>`, an 8-byte big-endian
//! sequence number (strictly increasing per socket), and a msgpack batch
//! `[timestamp, [event, …], dp_rank]`. Events are arrays tagged with their type, as msgspec
//! writes vLLM's structs: `["BlockStored", [hash], parent_hash | nil, [token ids], block_size,
//! lora_id (nil), medium]`, `["BlockRemoved", [hash], medium]`, `["AllBlocksCleared"]`.
//!
//! The engine never waits for this: its events go into a bounded queue, and when the queue is
//! full they are dropped and counted (`aios_kv_events_dropped_total`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;
use zeromq::{Socket, SocketSend, ZmqMessage};

use crate::kv::{KvEvent, KvEventSink, BLOCK_TOKENS};

/// Events waiting to be published, at most.
const QUEUE: usize = 16 * 1024;
/// Events in one message, at most.
const BATCH: usize = 512;

/// A running publisher: hand each model's pool a [`sink`](Self::sink).
pub struct Publisher {
    tx: mpsc::Sender<(Arc<str>, KvEvent)>,
    /// Where subscribers connect (the bound address, port resolved).
    pub endpoint: String,
    pub published: Arc<AtomicU64>,
    pub dropped: Arc<AtomicU64>,
}

impl Publisher {
    /// Bind `endpoint` (`tcp://HOST:PORT`; `*` for every interface, port 0 for any free one)
    /// and publish from a task on the current tokio runtime.
    pub async fn start(endpoint: &str, instance_id: &str, medium: &str) -> Result<Self, String> {
        let bind = endpoint.replace("://*:", "://0.0.0.0:");
        let mut socket = zeromq::PubSocket::new();
        let bound = socket
            .bind(&bind)
            .await
            .map_err(|e| format!("kv_events: cannot bind {endpoint}: {e}"))?;
        let (tx, mut rx) = mpsc::channel::<(Arc<str>, KvEvent)>(QUEUE);
        let published = Arc::new(AtomicU64::new(0));
        let count = published.clone();
        let instance = instance_id.to_string();
        let medium = medium.to_string();
        tokio::spawn(async move {
            let mut seq: u64 = 0;
            let mut batch: Vec<(Arc<str>, KvEvent)> = Vec::new();
            while let Some(first) = rx.recv().await {
                batch.push(first);
                while batch.len() < BATCH {
                    match rx.try_recv() {
                        Ok(e) => batch.push(e),
                        Err(_) => break,
                    }
                }
                // One message per model, events in their order.
                while !batch.is_empty() {
                    let model = batch[0].0.clone();
                    let (mine, rest): (Vec<_>, Vec<_>) =
                        batch.drain(..).partition(|(m, _)| *m == model);
                    batch = rest;
                    let events: Vec<KvEvent> = mine.into_iter().map(|(_, e)| e).collect();
                    let mut msg = ZmqMessage::from(format!("kv@{instance}@{model}"));
                    msg.push_back(seq.to_be_bytes().to_vec().into());
                    msg.push_back(encode_batch(now_secs(), &events, &medium).into());
                    seq += 1;
                    if let Err(e) = socket.send(msg).await {
                        tracing::warn!("kv_events: send failed: {e}");
                    }
                    count.fetch_add(events.len() as u64, Ordering::Relaxed);
                }
            }
        });
        Ok(Self {
            tx,
            endpoint: bound.to_string(),
            published,
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The sink for model `model`'s pool: queues without waiting, drops (counted) when full.
    pub fn sink(&self, model: &str) -> KvEventSink {
        let (tx, dropped, model) = (
            self.tx.clone(),
            self.dropped.clone(),
            Arc::<str>::from(model),
        );
        Arc::new(move |e| {
            if tx.try_send((model.clone(), e)).is_err() {
                dropped.fetch_add(1, Ordering::Relaxed);
            }
        })
    }
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The msgpack batch `[ts, [events], dp_rank]`.
pub fn encode_batch(ts: f64, events: &[KvEvent], medium: &str) -> Vec<u8> {
    use rmp::encode::{write_array_len, write_f64, write_nil, write_str, write_uint};
    let mut out = Vec::with_capacity(64 + events.len() * 96);
    // Writing to a Vec cannot fail.
    let w = &mut out;
    write_array_len(w, 3).unwrap();
    write_f64(w, ts).unwrap();
    write_array_len(w, events.len() as u32).unwrap();
    for e in events {
        match e {
            KvEvent::Stored {
                hash,
                parent,
                tokens,
            } => {
                write_array_len(w, 7).unwrap();
                write_str(w, "BlockStored").unwrap();
                write_array_len(w, 1).unwrap();
                write_uint(w, *hash).unwrap();
                match parent {
                    Some(p) => write_uint(w, *p).map(|_| ()).unwrap(),
                    None => write_nil(w).unwrap(),
                }
                write_array_len(w, tokens.len() as u32).unwrap();
                for &t in tokens {
                    write_uint(w, t as u64).unwrap();
                }
                write_uint(w, BLOCK_TOKENS as u64).unwrap();
                write_nil(w).unwrap();
                write_str(w, medium).unwrap();
            }
            KvEvent::Removed { hash } => {
                write_array_len(w, 3).unwrap();
                write_str(w, "BlockRemoved").unwrap();
                write_array_len(w, 1).unwrap();
                write_uint(w, *hash).unwrap();
                write_str(w, medium).unwrap();
            }
            KvEvent::Cleared => {
                write_array_len(w, 1).unwrap();
                write_str(w, "AllBlocksCleared").unwrap();
            }
        }
    }
    write_uint(w, 0).unwrap();
    out
}
