//! Turning a model name into files on disk: a path (file or directory), or a Hugging Face repo
//! id (`org/name`, optionally `org/name:file.gguf`) resolved from the local HF cache, offline.

use std::path::{Path, PathBuf};

use super::ModelError;

/// The local Hugging Face cache, found as huggingface_hub finds it: `HF_HUB_CACHE`, then
/// `HUGGINGFACE_HUB_CACHE`, then `HF_HOME/hub`, then `~/.cache/huggingface/hub`.
pub fn hf_cache() -> hf_hub::Cache {
    for var in ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"] {
        if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
            return hf_hub::Cache::new(PathBuf::from(p));
        }
    }
    hf_hub::Cache::from_env()
}

/// Resolve `spec` to a file or directory that [`super::load_model`] accepts.
pub fn resolve(spec: &str) -> Result<PathBuf, ModelError> {
    let p = Path::new(spec);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    let (repo, file) = match spec.split_once(':') {
        Some((r, f)) => (r, Some(f)),
        None => (spec, None),
    };
    if looks_like_repo_id(repo) {
        if let Some(found) = from_hf_cache(&hf_cache(), repo, file) {
            return Ok(found);
        }
        return Err(ModelError::NotFound(format!(
            "'{spec}' is neither a path nor a repo in the local Hugging Face cache ({}); \
             aios does not download models",
            hf_cache().path().display()
        )));
    }
    Err(ModelError::NotFound(format!(
        "no such file or directory: {spec}"
    )))
}

pub fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

/// The snapshot directory (safetensors) or GGUF file of `repo` in the cache, if present.
pub fn from_hf_cache(cache: &hf_hub::Cache, repo: &str, file: Option<&str>) -> Option<PathBuf> {
    let cached = cache.model(repo.to_string());
    if let Some(f) = file {
        return cached.get(f);
    }
    if let Some(cfg) = cached.get("config.json") {
        return cfg.parent().map(Path::to_path_buf);
    }
    // A GGUF-only repo: list the snapshot that refs/main points at.
    let folder = cache
        .path()
        .join(format!("models--{}", repo.replace('/', "--")));
    let commit = std::fs::read_to_string(folder.join("refs").join("main")).ok()?;
    let snapshot = folder.join("snapshots").join(commit.trim());
    let mut ggufs: Vec<PathBuf> = std::fs::read_dir(&snapshot)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    ggufs.sort();
    ggufs.into_iter().next()
}

/// Every model repo in the local HF cache (for `aios models`).
pub fn list_hf_cache(cache: &hf_hub::Cache) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(cache.path())
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("models--")
                .map(|rest| rest.replacen("--", "/", 1))
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_snapshots_in_a_cache_layout() {
        let root = std::env::temp_dir().join(format!("aios-hf-{}", std::process::id()));
        let repo = root.join("models--org--tiny");
        let snap = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "abc123").unwrap();
        std::fs::write(snap.join("model-q4.gguf"), b"x").unwrap();
        let cache = hf_hub::Cache::new(root.clone());
        assert_eq!(
            from_hf_cache(&cache, "org/tiny", None),
            Some(snap.join("model-q4.gguf"))
        );
        std::fs::write(snap.join("config.json"), b"{}").unwrap();
        assert_eq!(from_hf_cache(&cache, "org/tiny", None), Some(snap.clone()));
        assert_eq!(from_hf_cache(&cache, "org/other", None), None);
        assert_eq!(list_hf_cache(&cache), vec!["org/tiny".to_string()]);
        assert!(looks_like_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(!looks_like_repo_id("models/x.gguf/y"));
        std::fs::remove_dir_all(root).unwrap();
    }
}
