//! Finding a run config: a TOML file, a shipped config by name (embedded from `configs/`), or the
//! embedded default; then `--set key=value` overrides and validation.

use std::path::Path;

use anyhow::{bail, Context, Result};
use moeba_train::RunConfig;

include!(concat!(env!("OUT_DIR"), "/shipped_configs.rs"));

/// The name of the default config among the shipped ones.
pub const DEFAULT_NAME: &str = "tiny-hybrid";

/// The names of the shipped configs, comma separated (for messages and `--help`).
pub fn shipped_names() -> String {
    SHIPPED.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

/// A loaded config: where it came from, the config, and its warnings.
pub struct Loaded {
    /// `tiny-hybrid (embedded)` or the file's path.
    pub source: String,
    /// The validated config, overrides applied.
    pub config: RunConfig,
    /// Warnings from validation (likely mistakes that are still legal).
    pub warnings: Vec<String>,
}

/// The TOML text of `spec` (a file, or the name of a shipped config) and a description of where
/// it came from; `None` gives the embedded default.
pub fn config_text(spec: Option<&str>) -> Result<(String, String)> {
    let Some(spec) = spec else {
        return Ok((
            moeba_train::config::DEFAULT_CONFIG.to_string(),
            format!("{DEFAULT_NAME} (embedded default)"),
        ));
    };
    let path = Path::new(spec);
    if path.is_file() {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read config file {spec}"))?;
        return Ok((text, spec.to_string()));
    }
    let name = spec.strip_suffix(".toml").unwrap_or(spec);
    let name = name.strip_prefix("configs/").unwrap_or(name);
    if let Some((n, text)) = SHIPPED.iter().find(|(n, _)| *n == name) {
        return Ok((text.to_string(), format!("{n} (shipped)")));
    }
    if path.is_dir() {
        bail!(
            "{spec} is a directory, not a config file (HINT: pass a .toml file or one of: {})",
            shipped_names()
        );
    }
    bail!("no config file {spec} and no shipped config of that name (shipped: {})", shipped_names())
}

/// Parses `text`, applies `overrides` (`key=value`, e.g. `trainer.max_steps=100`) in order and
/// validates the result.
pub fn parse_with_overrides(
    text: &str,
    source: &str,
    overrides: &[String],
) -> Result<(RunConfig, Vec<String>)> {
    let (mut cfg, mut warnings) =
        RunConfig::from_toml(text).with_context(|| format!("invalid config {source}"))?;
    if overrides.is_empty() {
        return Ok((cfg, warnings));
    }
    for o in overrides {
        let Some((key, value)) = o.split_once('=') else {
            bail!("--set {o}: expected key=value, e.g. --set trainer.max_steps=100");
        };
        cfg.set(key.trim(), value.trim()).with_context(|| format!("--set {o}"))?;
    }
    warnings = cfg.validate().with_context(|| format!("invalid config {source} after --set overrides"))?;
    Ok((cfg, warnings))
}

/// Loads `spec` (see [`config_text`]) with `overrides`.
pub fn load(spec: Option<&str>, overrides: &[String]) -> Result<Loaded> {
    let (text, source) = config_text(spec)?;
    let (config, warnings) = parse_with_overrides(&text, &source, overrides)?;
    Ok(Loaded { source, config, warnings })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_configs_parse() {
        for (name, text) in SHIPPED {
            RunConfig::from_toml(text).unwrap_or_else(|e| panic!("configs/{name}.toml: {e}"));
        }
    }

    #[test]
    fn unknown_name_lists_the_shipped_ones() {
        let e = config_text(Some("no-such-config")).err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(e.contains("no-such-config") && e.contains("shipped"), "{e}");
    }

    #[test]
    fn overrides_apply_and_bad_keys_are_named() {
        let (cfg, _) =
            parse_with_overrides("", "test", &["trainer.max_steps=7".into(), "model.hidden_size=64".into()])
                .unwrap();
        assert_eq!(cfg.trainer.max_steps, 7);
        assert_eq!(cfg.model.hidden_size, 64);
        let e =
            format!("{:#}", parse_with_overrides("", "test", &["model.hiden_size=3".into()]).err().unwrap());
        assert!(e.contains("hiden_size"), "{e}");
        let e =
            format!("{:#}", parse_with_overrides("", "test", &["trainer.max_steps".into()]).err().unwrap());
        assert!(e.contains("key=value"), "{e}");
    }
}
