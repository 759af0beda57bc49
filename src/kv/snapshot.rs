//! KV snapshots on disk: one file per context, which survives a restart.
//!
//! File layout (integers little-endian):
//!
//! ```text
//! b"AIOSKV\0\x02"              magic and format version
//! u32  header length, then the header: JSON {fingerprint, id, owner, created, tokens, kv_len,
//!      data_bytes}
//! u32 × tokens                 the context's tokens
//! u8 × data_bytes              the KV as the pool stores it (f16 or q8 rows and their scales,
//!                              in this machine's byte order), blocks in `KvSeq::swap_out` order
//! u64  checksum of everything before it
//! ```
//!
//! The fingerprint names the model file, its quantisation and the KV layout (row type, K
//! stored transposed, byte order): a file written for another model or layout (older files
//! held K row by row) is refused, as is one whose length or checksum is wrong.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};

use super::{KvLayout, KvSeq, BLOCK_TOKENS};

const MAGIC: &[u8; 8] = b"AIOSKV\0\x02";
/// File name ending of snapshots; refused files are renamed to end in `.rejected`.
pub const EXT: &str = "kvctx";
/// File name ending of snapshots being deleted.
const REMOVED: &str = "removed";
/// Numbers the temporary and removal names, so that no two are the same.
static SERIAL: AtomicU64 = AtomicU64::new(0);

/// What a snapshot says about its context.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub fingerprint: String,
    pub id: String,
    pub owner: String,
    pub created: u64,
    /// Tokens of the conversation (the KV holds the first `kv_len` of them).
    pub tokens: usize,
    pub kv_len: usize,
    pub data_bytes: usize,
}

/// A 64-bit checksum over bytes, four independent lanes of multiply-xor over 8-byte words
/// (several GB/s: verifying a snapshot must not cost what re-prefilling it would).
#[derive(Clone)]
struct Checksum {
    lanes: [u64; 4],
    tail: Vec<u8>,
    total: u64,
}

impl Checksum {
    fn new() -> Self {
        Self {
            lanes: [
                0x243f_6a88_85a3_08d3,
                0x1319_8a2e_0370_7344,
                0xa409_3822_299f_31d0,
                0x082e_fa98_ec4e_6c89,
            ],
            tail: Vec::new(),
            total: 0,
        }
    }

    fn mix(h: u64, w: u64) -> u64 {
        let x = (h ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^ (x >> 29)
    }

    fn update(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len() as u64;
        if !self.tail.is_empty() {
            let take = (32 - self.tail.len()).min(bytes.len());
            self.tail.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.tail.len() == 32 {
                let t = std::mem::take(&mut self.tail);
                self.block(&t);
            }
        }
        let whole = bytes.len() / 32 * 32;
        for c in bytes[..whole].chunks_exact(32) {
            self.block(c);
        }
        self.tail.extend_from_slice(&bytes[whole..]);
    }

    fn block(&mut self, c: &[u8]) {
        for (lane, w) in self.lanes.iter_mut().zip(c.chunks_exact(8)) {
            *lane = Self::mix(*lane, u64::from_le_bytes(w.try_into().unwrap()));
        }
    }

    fn finish(mut self) -> u64 {
        let mut h = self.total;
        let tail = std::mem::take(&mut self.tail);
        for w in tail.chunks(8) {
            let mut b = [0u8; 8];
            b[..w.len()].copy_from_slice(w);
            h = Self::mix(h, u64::from_le_bytes(b));
        }
        for l in self.lanes {
            h = Self::mix(h, l);
        }
        h
    }
}

/// Identify a model file cheaply: its size and a checksum of its first and last MiB (the
/// metadata and tokenizer at the front, the last tensors at the back). None if unreadable.
pub fn file_fingerprint(path: &Path) -> Option<String> {
    use std::io::{Seek, SeekFrom};
    let mut f = File::open(path).ok()?;
    let size = f.metadata().ok()?.len();
    let mut sum = Checksum::new();
    let mut buf = vec![0u8; (1 << 20).min(size as usize)];
    f.read_exact(&mut buf).ok()?;
    sum.update(&buf);
    f.seek(SeekFrom::Start(size - buf.len() as u64)).ok()?;
    f.read_exact(&mut buf).ok()?;
    sum.update(&buf);
    Some(format!("size={size}|sum={:016x}", sum.finish()))
}

/// A snapshot found (and verified) in the store.
pub struct Scanned {
    pub meta: SnapshotMeta,
    pub tokens: Vec<u32>,
    /// File size in bytes.
    pub size: u64,
}

/// The directory of snapshots of one model.
pub struct DiskStore {
    dir: PathBuf,
    fingerprint: String,
    layout: KvLayout,
}

impl DiskStore {
    /// `fingerprint` should change whenever the KV of the same tokens would (other model file,
    /// quantisation or layout); the layout is added to it here.
    pub fn new(dir: &Path, model_fingerprint: &str, layout: KvLayout) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let fingerprint = format!(
            "{model_fingerprint}|layers={}|kv_heads={}|head_dim={}|block={BLOCK_TOKENS}|{}|k=transposed|{}",
            layout.n_layers,
            layout.n_kv_heads,
            layout.head_dim,
            layout.dtype.name(),
            if cfg!(target_endian = "little") {
                "le"
            } else {
                "be"
            }
        );
        Ok(Self {
            dir: dir.to_path_buf(),
            fingerprint,
            layout,
        })
    }

    pub fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.{EXT}"))
    }

    /// Give a snapshot from [`write_unnamed`](Self::write_unnamed) its name (a rename: cheap,
    /// whatever the size). It replaces any earlier snapshot of the context.
    pub fn name(&self, tmp: &Path, id: &str) -> Result<(), String> {
        let path = self.path(id);
        std::fs::rename(tmp, &path).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Delete a file on a thread of its own (see [`remove`](Self::remove)), one that runs only
    /// when a core is idle: the kernel's work of freeing a large file's cached pages (9-10 ms
    /// for 32 MB here) would otherwise take a core from the forward pass, whose threads wait
    /// for each other, just when a context loaded from disk runs its turn.
    pub fn discard(&self, path: PathBuf) {
        std::thread::spawn(move || {
            idle_priority();
            std::fs::remove_file(path)
        });
    }

    /// Write and sync a context's snapshot under a temporary name of its own (two writes of
    /// one context never share one; a crash never leaves half a file under the real name);
    /// [`name`](Self::name) then makes it the context's, or [`discard`](Self::discard) drops it.
    /// Returns the temporary path and the file's size.
    pub fn write_unnamed(
        &self,
        id: &str,
        owner: &str,
        created: u64,
        tokens: &[u32],
        kv_len: usize,
        data: &[u8],
    ) -> Result<(PathBuf, u64), String> {
        let meta = SnapshotMeta {
            fingerprint: self.fingerprint.clone(),
            id: id.to_string(),
            owner: owner.to_string(),
            created,
            tokens: tokens.len(),
            kv_len,
            data_bytes: data.len(),
        };
        let header = serde_json::to_vec(&meta).map_err(|e| e.to_string())?;
        let path = self.path(id);
        let tmp = self.dir.join(format!(
            "{id}.{}.tmp",
            SERIAL.fetch_add(1, Ordering::Relaxed)
        ));
        let res = (|| -> std::io::Result<u64> {
            // Made again if it was removed while the server ran (a cleaner of /tmp).
            std::fs::create_dir_all(&self.dir)?;
            let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
            let mut sum = Checksum::new();
            let mut put = |w: &mut BufWriter<File>, b: &[u8]| -> std::io::Result<()> {
                sum.update(b);
                w.write_all(b)
            };
            put(&mut w, MAGIC)?;
            put(&mut w, &(header.len() as u32).to_le_bytes())?;
            put(&mut w, &header)?;
            let tok: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
            put(&mut w, &tok)?;
            for chunk in data.chunks(1 << 20) {
                put(&mut w, chunk)?;
            }
            w.write_all(&sum.finish().to_le_bytes())?;
            let f = w.into_inner().map_err(|e| e.into_error())?;
            f.sync_data()?;
            Ok(f.metadata()?.len())
        })();
        match res {
            Ok(n) => Ok((tmp, n)),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(format!("writing {}: {e}", path.display()))
            }
        }
    }

    /// Read and verify a snapshot: magic, fingerprint, lengths, checksum. The KV is read
    /// straight into its final buffer (one pass over the file, no conversion copy).
    pub fn read(&self, path: &Path) -> Result<(SnapshotMeta, Vec<u32>, Vec<u8>), String> {
        let mut f = File::open(path).map_err(|e| e.to_string())?;
        let size = f.metadata().map_err(|e| e.to_string())?.len() as usize;
        self.read_from(&mut f, size)
    }

    /// Read and verify a snapshot with its KV written straight into `kv`'s blocks (from
    /// [`KvSeq::for_fill`], as many tokens as the snapshot holds). On an error the blocks hold
    /// part of the file: drop `kv`.
    pub fn read_into(
        &self,
        path: &Path,
        kv: &mut KvSeq,
    ) -> Result<(SnapshotMeta, Vec<u32>), String> {
        let mut f = File::open(path).map_err(|e| e.to_string())?;
        let size = f.metadata().map_err(|e| e.to_string())?.len() as usize;
        let res = match Mapped::new(&f, size) {
            Some(m) => self.read_impl(&mut m.bytes(), size, Some(kv), Some(m.bytes())),
            None => self.read_impl(&mut f, size, Some(kv), None),
        };
        res.map(|(meta, tokens, _)| (meta, tokens))
    }

    /// [`read`](Self::read) from any reader of `size` bytes (the fuzz target's way in).
    pub fn read_from<R: Read>(
        &self,
        f: &mut R,
        size: usize,
    ) -> Result<(SnapshotMeta, Vec<u32>, Vec<u8>), String> {
        self.read_impl(f, size, None, None)
    }

    /// `mapped`: the whole file in memory, `f` reading it from the start: the KV is then
    /// checksummed and copied into `into` straight from it.
    fn read_impl<R: Read>(
        &self,
        f: &mut R,
        size: usize,
        into: Option<&mut KvSeq>,
        mapped: Option<&[u8]>,
    ) -> Result<(SnapshotMeta, Vec<u32>, Vec<u8>), String> {
        let mut sum = Checksum::new();
        let mut take = |f: &mut R, buf: &mut [u8], what: &str| -> Result<(), String> {
            f.read_exact(buf)
                .map_err(|_| format!("truncated (the file ends inside the {what})"))?;
            sum.update(buf);
            Ok(())
        };
        let mut head = [0u8; 12];
        take(f, &mut head, "magic").map_err(|_| "not an aios KV snapshot (too short)")?;
        if head[..7] == MAGIC[..7] && head[7] != MAGIC[7] {
            return Err(format!(
                "snapshot format version {}, this server reads version {}",
                head[7], MAGIC[7]
            ));
        }
        if &head[..8] != MAGIC {
            return Err("not an aios KV snapshot (bad magic)".into());
        }
        let hlen = u32::from_le_bytes(head[8..12].try_into().unwrap()) as usize;
        if hlen > size {
            return Err("truncated (the header runs past the end)".into());
        }
        let mut header = vec![0u8; hlen];
        take(f, &mut header, "header")?;
        let meta: SnapshotMeta =
            serde_json::from_slice(&header).map_err(|e| format!("unreadable header: {e}"))?;
        if meta.fingerprint != self.fingerprint {
            return Err(format!(
                "written for another model or KV layout ({}; this server: {})",
                meta.fingerprint, self.fingerprint
            ));
        }
        let want = meta
            .tokens
            .checked_mul(4)
            .zip(Some(meta.data_bytes))
            .and_then(|(t, d)| t.checked_add(d))
            .and_then(|n| n.checked_add(12 + hlen + 8));
        let Some(want) = want else {
            return Err("the header's lengths are impossibly large".into());
        };
        if size != want {
            return Err(format!(
                "truncated or padded: {size} bytes where the header says {want}"
            ));
        }
        let per_block = self.layout.bytes_per_block();
        if meta.kv_len > meta.tokens
            || meta.data_bytes != meta.kv_len.div_ceil(BLOCK_TOKENS) * per_block
        {
            return Err("the header's lengths do not agree with the KV layout".into());
        }
        let mut tok = vec![0u8; meta.tokens * 4];
        take(f, &mut tok, "tokens")?;
        let tokens = tok
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        // In pieces, each checksummed while it is still in cache (one pass over memory).
        const PIECE: usize = 256 << 10;
        // Pieces in flight between the reading thread and the copying one.
        const RING: usize = 4;
        let mut data = Vec::new();
        let mut stored = [0u8; 8];
        if let Some(kv) = &into {
            if kv.len() != meta.kv_len || kv.layout() != self.layout {
                return Err(format!(
                    "the snapshot holds {} tokens of KV where its index says {}",
                    meta.kv_len,
                    kv.len()
                ));
            }
        }
        let in_place = into.is_some() && mapped.is_some();
        match (into, mapped) {
            (Some(kv), Some(file)) => {
                // The file's pages themselves, on two threads at once: this one checksums the
                // KV, a second copies it into the pool's blocks (no read copy, no pipeline).
                let at = size - 8 - meta.data_bytes;
                let bytes = &file[at..size - 8];
                std::thread::scope(|scope| {
                    scope.spawn(|| kv.fill(0, bytes));
                    sum.update(bytes);
                });
                stored.copy_from_slice(&file[size - 8..]);
            }
            (Some(kv), None) => {
                // Through a few small buffers that stay in cache, on two threads: this one
                // reads each piece from the file, a second checksums it and copies it into the
                // pool's blocks, in order.
                let (ready, pieces) = mpsc::sync_channel::<(usize, Vec<u8>)>(RING);
                let (give_back, free) = mpsc::channel::<Vec<u8>>();
                for _ in 0..RING {
                    let _ = give_back.send(vec![0u8; PIECE.min(meta.data_bytes)]);
                }
                let sum = &mut sum;
                std::thread::scope(|scope| {
                    scope.spawn(move || {
                        for (at, piece) in pieces {
                            sum.update(&piece);
                            kv.fill(at, &piece);
                            let _ = give_back.send(piece);
                        }
                    });
                    // Owned here: dropped when this closure returns, however it returns, so
                    // the copier's loop ends and the scope can join it.
                    let ready = ready;
                    let mut at = 0;
                    while at < meta.data_bytes {
                        let n = PIECE.min(meta.data_bytes - at);
                        let mut piece = free.recv().expect("the copier gives pieces back");
                        piece.truncate(n);
                        f.read_exact(&mut piece)
                            .map_err(|_| "truncated (the file ends inside the KV)".to_string())?;
                        let _ = ready.send((at, piece));
                        at += n;
                    }
                    Ok::<(), String>(())
                })?;
            }
            (None, _) => {
                data = vec![0u8; meta.data_bytes];
                for piece in data.chunks_mut(PIECE) {
                    take(f, piece, "KV")?;
                }
            }
        }
        if !in_place {
            f.read_exact(&mut stored)
                .map_err(|_| "truncated (no checksum)".to_string())?;
        }
        if sum.finish() != u64::from_le_bytes(stored) {
            return Err("checksum mismatch (the file is corrupt)".into());
        }
        Ok((meta, tokens, data))
    }

    /// Every snapshot in the directory, verified. Files that fail are renamed to
    /// `<name>.rejected` (kept for inspection, never loaded) and reported with their reason.
    pub fn scan(&self) -> (Vec<Scanned>, Vec<String>) {
        let mut good = Vec::new();
        let mut refused = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return (good, refused);
        };
        for e in entries.flatten() {
            let path = e.path();
            let ext = path.extension().and_then(|x| x.to_str());
            if matches!(ext, Some(REMOVED | "tmp")) {
                // Removed, or half written, when the server stopped: never a snapshot.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if ext != Some(EXT) {
                continue;
            }
            let size = e.metadata().map(|m| m.len()).unwrap_or(0);
            let named_right =
                |m: &SnapshotMeta| path.file_stem().and_then(|s| s.to_str()) == Some(m.id.as_str());
            match self.read(&path) {
                Ok((meta, tokens, _)) if named_right(&meta) => {
                    good.push(Scanned { meta, tokens, size })
                }
                Ok(_) => refused.push(self.reject(&path, "its name does not match its id")),
                Err(why) => refused.push(self.reject(&path, &why)),
            }
        }
        (good, refused)
    }

    /// Set a refused file aside as `<name>.rejected` (kept for inspection, never loaded again);
    /// returns the log line saying why.
    pub fn reject(&self, path: &Path, why: &str) -> String {
        let mut to = path.as_os_str().to_owned();
        to.push(".rejected");
        let _ = std::fs::rename(path, &to);
        format!("refused KV snapshot {}: {why}", path.display())
    }

    /// Remove context `id`'s snapshot. The file leaves its name at once (a rename) and is
    /// unlinked on a thread of its own: freeing a large file's blocks and cached pages took
    /// 9-10 ms for 32 MB, a pause every sequence would wait for if the engine thread took it.
    /// A file left under its removal name by a crash is deleted at the next start.
    pub fn remove(&self, id: &str) {
        let n = SERIAL.fetch_add(1, Ordering::Relaxed);
        let gone = self.dir.join(format!("{id}.{n}.{REMOVED}"));
        if std::fs::rename(self.path(id), &gone).is_ok() {
            self.discard(gone);
        }
    }
}

/// A snapshot file's bytes mapped read-only: the page cache itself, no read copy (a snapshot
/// read into the pool is checksummed and copied from here). aios never changes a snapshot in
/// place (it writes a new file and renames it), and a file deleted meanwhile stays mapped.
/// `None` where mapping fails or is not available: the caller reads the file instead.
struct Mapped {
    #[cfg(unix)]
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapped {
    fn new(f: &File, len: usize) -> Option<Mapped> {
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            if len == 0 {
                return None;
            }
            // Pages mapped now, in one pass, rather than faulted in one by one by the two
            // threads that read them.
            #[cfg(target_os = "linux")]
            let populate = libc::MAP_POPULATE;
            #[cfg(not(target_os = "linux"))]
            let populate = 0;
            // SAFETY: a new private read-only mapping of `len` bytes of an open file (its
            // size); nothing else refers to it.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | populate,
                    f.as_raw_fd(),
                    0,
                )
            };
            (ptr != libc::MAP_FAILED).then_some(Mapped { ptr, len })
        }
        #[cfg(not(unix))]
        {
            let _ = (f, len);
            None
        }
    }

    fn bytes(&self) -> &[u8] {
        #[cfg(unix)]
        // SAFETY: `len` readable bytes at `ptr` while the mapping lives (until drop).
        unsafe {
            std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len)
        }
        #[cfg(not(unix))]
        unreachable!("never made")
    }
}

#[cfg(unix)]
impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; no slice of it outlives `self`.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// Run the calling thread only when a core would otherwise be idle (Linux's `SCHED_IDLE`;
/// elsewhere, nothing).
fn idle_priority() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: changes only the calling thread's scheduling class; failure leaves it as is.
        unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(dtype: crate::kv::KvDtype) -> KvLayout {
        KvLayout {
            n_layers: 2,
            n_kv_heads: 1,
            head_dim: 4,
            dtype,
        }
    }

    fn store(dir: &Path, fp: &str) -> DiskStore {
        DiskStore::new(dir, fp, layout(crate::kv::KvDtype::F16)).unwrap()
    }

    /// Write a snapshot and give it its name, as the engine does.
    fn put(s: &DiskStore, id: &str, owner: &str, tokens: &[u32], data: &[u8]) {
        let (tmp, _) = s.write_unnamed(id, owner, 7, tokens, 20, data).unwrap();
        s.name(&tmp, id).unwrap();
    }

    #[test]
    fn snapshots_round_trip_and_damage_is_refused() {
        let dir = std::env::temp_dir().join(format!("aios-snap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = store(&dir, "model-a");
        let per_block = BLOCK_TOKENS * 2 * 2 * 4 * 2; // layers × K/V × head_dim × f16
        let data: Vec<u8> = (0..2 * per_block).map(|i| (i * 7) as u8).collect();
        let tokens: Vec<u32> = (0..20).collect();
        // The directory removed under a running store: the next snapshot makes it again.
        std::fs::remove_dir_all(&dir).unwrap();
        put(&s, "ctx-1", "alice", &tokens, &data);
        let (m, t, d) = s.read(&s.path("ctx-1")).unwrap();
        assert_eq!(
            (m.owner.as_str(), m.kv_len, t, d),
            ("alice", 20, tokens.clone(), data.clone())
        );
        // Read straight into a pool's blocks: the same bytes.
        let pool = crate::kv::KvPool::new(layout(crate::kv::KvDtype::F16), 8);
        let mut kv = KvSeq::for_fill(pool.clone(), 20).unwrap();
        let (m, t) = s.read_into(&s.path("ctx-1"), &mut kv).unwrap();
        assert_eq!((m.kv_len, t), (20, tokens.clone()));
        kv.swap_out();
        assert_eq!(kv.host_data().unwrap(), &data[..]);
        // A sequence of another length than the file's is refused.
        let mut short = KvSeq::for_fill(pool.clone(), 16).unwrap();
        let err = s.read_into(&s.path("ctx-1"), &mut short).unwrap_err();
        assert!(err.contains("20 tokens of KV"), "{err}");

        // Another model's store refuses it.
        let other = store(&dir, "model-b");
        let err = other.read(&s.path("ctx-1")).unwrap_err();
        assert!(err.contains("another model"), "{err}");
        // So does a store of the same model with 8-bit KV rows.
        let q8 = DiskStore::new(&dir, "model-a", layout(crate::kv::KvDtype::Q8)).unwrap();
        let err = q8.read(&s.path("ctx-1")).unwrap_err();
        assert!(err.contains("KV layout") && err.contains("|q8|"), "{err}");
        // And an older format version is named as such.
        let mut old = std::fs::read(s.path("ctx-1")).unwrap();
        old[7] = 1;
        let err = s
            .read_from(&mut std::io::Cursor::new(&old), old.len())
            .unwrap_err();
        assert!(err.contains("format version 1"), "{err}");

        // One flipped byte in the KV, a truncated copy.
        let mut bytes = std::fs::read(s.path("ctx-1")).unwrap();
        put(&s, "ctx-2", "alice", &tokens, &data);
        std::fs::write(s.path("ctx-2"), &bytes[..bytes.len() - 100]).unwrap();
        let n = bytes.len();
        bytes[n - 50] ^= 0x40;
        std::fs::write(s.path("ctx-1"), &bytes).unwrap();
        assert!(s.read(&s.path("ctx-1")).unwrap_err().contains("checksum"));
        let mut kv = KvSeq::for_fill(pool.clone(), 20).unwrap();
        let err = s.read_into(&s.path("ctx-1"), &mut kv).unwrap_err();
        assert!(err.contains("checksum"), "{err}");
        assert!(s.read(&s.path("ctx-2")).unwrap_err().contains("truncated"));
        let mut kv = KvSeq::for_fill(pool.clone(), 20).unwrap();
        let err = s.read_into(&s.path("ctx-2"), &mut kv).unwrap_err();
        assert!(err.contains("truncated"), "{err}");

        put(&s, "ctx-3", "bob", &tokens, &data);
        // A removed snapshot leaves its name at once; what a crash left half removed or half
        // written is deleted at the next start.
        put(&s, "ctx-4", "bob", &tokens, &data);
        s.remove("ctx-4");
        assert!(!s.path("ctx-4").exists());
        std::fs::write(dir.join("ctx-5.3.removed"), b"old").unwrap();
        std::fs::write(dir.join("ctx-6.tmp"), b"half").unwrap();
        let (good, refused) = s.scan();
        assert_eq!(good.len(), 1);
        assert_eq!(good[0].meta.id, "ctx-3");
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(dir.join("ctx-1.kvctx.rejected").exists());
        assert!(!s.path("ctx-1").exists());
        assert!(!dir.join("ctx-5.3.removed").exists() && !dir.join("ctx-6.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_header_with_impossible_lengths_is_refused_not_overflowed() {
        let dir = std::env::temp_dir().join(format!("aios-snap-big-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = store(&dir, "m");
        for (tokens, values) in [
            (usize::MAX / 2, 1),
            (1, usize::MAX / 2),
            (usize::MAX, usize::MAX),
        ] {
            let h = format!(
                r#"{{"fingerprint":{:?},"id":"x","owner":"a","created":0,"tokens":{tokens},"kv_len":0,"data_bytes":{values}}}"#,
                s.fingerprint
            );
            let mut bytes = MAGIC.to_vec();
            bytes.extend((h.len() as u32).to_le_bytes());
            bytes.extend(h.as_bytes());
            bytes.extend([0u8; 16]);
            let err = s
                .read_from(&mut std::io::Cursor::new(&bytes), bytes.len())
                .unwrap_err();
            assert!(
                err.contains("impossibly large") || err.contains("truncated"),
                "{err}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
