//! A context snapshot read back from disk: a truncated, padded or corrupt file is refused,
//! never a panic.
#![no_main]

use std::sync::OnceLock;

use aios::kv::snapshot::DiskStore;
use aios::kv::KvLayout;

fn store() -> &'static DiskStore {
    static STORE: OnceLock<DiskStore> = OnceLock::new();
    STORE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("aios-fuzz-snap-{}", std::process::id()));
        let layout = KvLayout {
            n_layers: 1,
            n_kv_heads: 1,
            head_dim: 2,
            dtype: aios::kv::KvDtype::F16,
        };
        DiskStore::new(&dir, "fuzz", layout).expect("a temp dir for the store")
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = store().read_from(&mut std::io::Cursor::new(data), data.len());
});
