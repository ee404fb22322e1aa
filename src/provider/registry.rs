//! Named providers from configuration: the providers file (`--providers`, JSON) lists entries
//! `{"name": "...", "kind": "tencent" | "openai" | "funasr" | "loopback", ...settings}`. Secrets never live in
//! the file: Tencent reads `TENCENT_*` variables, OpenAI-compatible servers the variable named by
//! `api_key_env`. The embedded provider is always present as `embedded`.

use super::funasr::{FunAsrProvider, FunAsrSettings};
use super::loopback::{LoopbackProvider, LoopbackSettings};
use super::openai::{OpenAiProvider, OpenAiSettings};
use super::tencent::{TencentProvider, TencentSettings};
use super::{Provider, ProviderError};
use anyhow::Context;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// One provider entry of the providers file.
#[derive(Debug, Clone, Deserialize)]
pub struct ProviderEntry {
    /// Name sessions select it by (`provider` option).
    pub name: String,
    /// Kind and its settings.
    #[serde(flatten)]
    pub spec: ProviderSpec,
}

/// A provider kind with its settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ProviderSpec {
    /// Tencent Cloud real-time ASR + one-sentence recognition.
    Tencent(TencentSettings),
    /// OpenAI-compatible transcription server.
    Openai(OpenAiSettings),
    /// FunASR runtime WebSocket server.
    Funasr(FunAsrSettings),
    /// The benchmark tool [`LoopbackProvider`]: no recognition, one partial per chunk.
    Loopback(LoopbackSettings),
}

/// Reads a providers file: a JSON array of [`ProviderEntry`].
///
/// # Errors
/// Unreadable file, invalid JSON, unknown fields, duplicate or reserved names.
pub fn load_file(path: &Path) -> anyhow::Result<Vec<ProviderEntry>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading providers file {}", path.display()))?;
    let entries: Vec<ProviderEntry> = serde_json::from_str(&text)
        .with_context(|| format!("parsing providers file {}", path.display()))?;
    let mut seen = std::collections::HashSet::new();
    for e in &entries {
        anyhow::ensure!(
            e.name != "embedded",
            "providers file {}: the name \"embedded\" is reserved",
            path.display()
        );
        anyhow::ensure!(
            !e.name.is_empty() && seen.insert(e.name.clone()),
            "providers file {}: provider names must be unique and non-empty ({:?})",
            path.display(),
            e.name
        );
    }
    Ok(entries)
}

/// Builds the provider an entry describes.
///
/// # Errors
/// Invalid settings (each provider's `new` names the field).
pub fn build(entry: ProviderEntry) -> anyhow::Result<Arc<dyn Provider>> {
    Ok(match entry.spec {
        ProviderSpec::Tencent(s) => Arc::new(TencentProvider::new(&entry.name, s)?),
        ProviderSpec::Openai(s) => Arc::new(OpenAiProvider::new(&entry.name, s)?),
        ProviderSpec::Funasr(s) => Arc::new(FunAsrProvider::new(&entry.name, s)?),
        ProviderSpec::Loopback(s) => Arc::new(LoopbackProvider::new(&entry.name, s)),
    })
}

/// The configured providers by name, and the default one.
#[derive(Clone)]
pub struct Providers {
    /// Name of the provider sessions get when they name none.
    pub default: String,
    /// All configured providers.
    pub by_name: HashMap<String, Arc<dyn Provider>>,
}

impl Providers {
    /// The provider named `name`, or the default one, with its name.
    ///
    /// # Errors
    /// [`ProviderError::Unsupported`] listing the configured names.
    pub fn get(&self, name: Option<&str>) -> Result<(String, Arc<dyn Provider>), ProviderError> {
        let name = name.unwrap_or(&self.default).to_string();
        match self.by_name.get(&name) {
            Some(p) => Ok((name, Arc::clone(p))),
            None => {
                let mut names: Vec<_> = self.by_name.keys().cloned().collect();
                names.sort();
                Err(ProviderError::Unsupported(format!(
                    "unknown provider {name:?}; configured: {}",
                    names.join(", ")
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_kind_and_rejects_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.json");
        std::fs::write(
            &p,
            r#"[{"name":"tc","kind":"tencent","max_concurrency":20},
                {"name":"sp","kind":"openai","base_url":"http://127.0.0.1:8000","stream":true},
                {"name":"fa","kind":"funasr","url":"ws://127.0.0.1:10095/"},
                {"name":"lb","kind":"loopback"}]"#,
        )
        .unwrap();
        let e = load_file(&p).unwrap();
        assert_eq!(e.len(), 4);
        assert!(matches!(&e[3].spec, ProviderSpec::Loopback(_)));
        assert!(matches!(&e[0].spec, ProviderSpec::Tencent(s) if s.max_concurrency == 20));
        assert!(matches!(&e[1].spec, ProviderSpec::Openai(s) if s.stream));
        std::fs::write(&p, r#"[{"name":"tc","kind":"tencent","secret_key":"x"}]"#).unwrap();
        assert!(
            load_file(&p).is_err(),
            "secrets are not accepted in the file"
        );
        std::fs::write(&p, r#"[{"name":"embedded","kind":"funasr"}]"#).unwrap();
        assert!(load_file(&p).is_err());
    }
}
