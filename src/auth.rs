//! Agent API keys. A key is kept only as its SHA-256 digest (in the config or a key file); the
//! key a request presents decides which agent it is, or that it is the admin.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::config::Config;

/// Who a key belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Who {
    Agent(String),
    Admin,
}

/// Every configured key, by digest.
#[derive(Clone, Debug, Default)]
pub struct KeyTable {
    keys: HashMap<String, Who>,
}

/// The SHA-256 of `key`, as lowercase hex.
pub fn digest_hex(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A fresh random key (192 bits).
pub fn new_key() -> String {
    let a: u128 = rand::random();
    let b: u64 = rand::random();
    format!("aios-{a:032x}{b:016x}")
}

/// Whether `name` can name an agent: 1 to 128 visible ASCII characters (it travels in headers).
pub fn valid_agent_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 128 && name.bytes().all(|b| b.is_ascii_graphic())
}

fn checked_digest(d: &str, at: &str) -> Result<String, String> {
    let d = d.trim().to_ascii_lowercase();
    if d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{at}: a key digest is 64 hex characters (the SHA-256 of the key; `aios key NAME` prints one)"
        ));
    }
    Ok(d)
}

impl KeyTable {
    /// The keys of `cfg`: the admin key, each agent's `key_sha256`, and the key file's lines.
    pub fn from_config(cfg: &Config) -> Result<Self, String> {
        let mut t = Self::default();
        let a = &cfg.auth;
        if !a.admin_key_sha256.is_empty() {
            t.add(
                checked_digest(&a.admin_key_sha256, "auth.admin_key_sha256")?,
                Who::Admin,
                "auth.admin_key_sha256",
            )?;
        }
        for (name, agent) in &cfg.agents {
            if !valid_agent_name(name) {
                return Err(format!(
                    "agents.{name:?}: an agent name is 1 to 128 visible ASCII characters"
                ));
            }
            if !agent.key_sha256.is_empty() {
                let at = format!("agents.{name}.key_sha256");
                t.add(
                    checked_digest(&agent.key_sha256, &at)?,
                    Who::Agent(name.clone()),
                    &at,
                )?;
            }
        }
        if !a.key_file.is_empty() {
            let text = std::fs::read_to_string(&a.key_file)
                .map_err(|e| format!("auth.key_file {}: {e}", a.key_file))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let at = format!("{} line {}", a.key_file, n + 1);
                let mut parts = line.split_whitespace();
                let (Some(name), Some(digest), None) = (parts.next(), parts.next(), parts.next())
                else {
                    return Err(format!("{at}: expected `NAME SHA256HEX`"));
                };
                let who = if name == "@admin" {
                    Who::Admin
                } else if !valid_agent_name(name) || name.starts_with('@') {
                    return Err(format!("{at}: {name:?} is not an agent name"));
                } else {
                    Who::Agent(name.to_string())
                };
                t.add(checked_digest(digest, &at)?, who, &at)?;
            }
        }
        Ok(t)
    }

    fn add(&mut self, digest: String, who: Who, at: &str) -> Result<(), String> {
        match self.keys.get(&digest) {
            Some(other) if *other != who => {
                Err(format!("{at}: the same key is already given to {other:?}"))
            }
            _ => {
                self.keys.insert(digest, who);
                Ok(())
            }
        }
    }

    /// Whether any key is configured (and so every agent route needs one).
    pub fn is_on(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Whose key `key` is.
    pub fn lookup(&self, key: &str) -> Option<&Who> {
        self.keys.get(&digest_hex(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_config_and_key_file() {
        let dir = std::env::temp_dir().join(format!("aios-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keys");
        std::fs::write(
            &file,
            format!(
                "# comment\n\nbob {}\n@admin {}\n",
                digest_hex("bob-key"),
                digest_hex("root")
            ),
        )
        .unwrap();
        let mut cfg = Config::default();
        cfg.auth.key_file = file.display().to_string();
        cfg.agents.insert(
            "alice".into(),
            crate::config::AgentConfig {
                key_sha256: digest_hex("alice-key").to_uppercase(),
                ..Default::default()
            },
        );
        let t = KeyTable::from_config(&cfg).unwrap();
        assert!(t.is_on());
        assert_eq!(t.lookup("alice-key"), Some(&Who::Agent("alice".into())));
        assert_eq!(t.lookup("bob-key"), Some(&Who::Agent("bob".into())));
        assert_eq!(t.lookup("root"), Some(&Who::Admin));
        assert_eq!(t.lookup("alice-key "), None);
        assert!(!KeyTable::from_config(&Config::default()).unwrap().is_on());
        // A bad line names the file and line; one key for two agents is refused.
        std::fs::write(&file, "bob nothex\n").unwrap();
        let e = KeyTable::from_config(&cfg).unwrap_err();
        assert!(e.contains("line 1") && e.contains("64 hex"), "{e}");
        std::fs::write(&file, format!("bob {}\n", digest_hex("alice-key"))).unwrap();
        let e = KeyTable::from_config(&cfg).unwrap_err();
        assert!(e.contains("already given"), "{e}");
        // Names travel in headers: visible ASCII only.
        std::fs::write(&file, format!("jos\u{e9} {}\n", digest_hex("k"))).unwrap();
        assert!(KeyTable::from_config(&cfg).is_err());
        assert!(valid_agent_name("ci-bot_2") && !valid_agent_name(" bob") && !valid_agent_name(""));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn new_keys_are_distinct_and_digests_are_sha256() {
        assert_ne!(new_key(), new_key());
        assert_eq!(
            digest_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
