//! Embeds the shipped run configs (`configs/*.toml` at the workspace root) into the binary, so
//! `moeba train jamba-like` works from any directory: writes `$OUT_DIR/shipped_configs.rs` with
//! one `include_str!` per file, sorted by name.

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dir = manifest.join("..").join("..").join("configs");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut entries: Vec<(String, PathBuf)> = Vec::new();
    if let Ok(read) = std::fs::read_dir(&dir) {
        for entry in read.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
                if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                    let path = path.canonicalize().unwrap_or(path.clone());
                    println!("cargo:rerun-if-changed={}", path.display());
                    entries.push((stem.to_string(), path));
                }
            }
        }
    }
    entries.sort();
    let mut code = String::from(
        "/// The configs shipped in `configs/`, embedded at build time: (name, TOML text), sorted by name.\n\
         pub const SHIPPED: &[(&str, &str)] = &[\n",
    );
    for (name, path) in entries {
        code.push_str(&format!("    ({name:?}, include_str!({:?})),\n", path.display().to_string()));
    }
    code.push_str("];\n");
    std::fs::write(out.join("shipped_configs.rs"), code)
        .expect("cannot write shipped_configs.rs into OUT_DIR");
}
