//! [`Report`] (the report.md of a lab) and [`LabRun`] (what a finished lab returns), and
//! [`finish`], which writes results.json and report.md atomically into the run directory.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::machine::MachineInfo;
use crate::{LabError, LabOptions, Result};

/// A lab's report: question, setup, tables, pictures, and the answer the numbers give.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Title (`# …`).
    pub title: String,
    /// The question the lab answers.
    pub question: String,
    /// The setup: sizes, steps, machine (markdown).
    pub setup: String,
    /// Markdown tables (see [`md_table`]), each with a line of caption before it.
    pub tables: Vec<String>,
    /// Pictures: `(caption, file name relative to the run directory)`.
    pub figures: Vec<(String, String)>,
    /// The answer, from the measured figures (markdown).
    pub answer: String,
}

impl Report {
    /// The report as markdown.
    pub fn to_markdown(&self) -> String {
        let mut s =
            format!("# {}\n\n## Question\n\n{}\n\n## Setup\n\n{}\n\n", self.title, self.question, self.setup);
        if !self.tables.is_empty() {
            s.push_str("## Results\n\n");
            for t in &self.tables {
                s.push_str(t);
                s.push_str("\n\n");
            }
        }
        if !self.figures.is_empty() {
            s.push_str("## Pictures\n\n");
            for (caption, file) in &self.figures {
                s.push_str(&format!("![{caption}]({file})\n\n*{caption}*\n\n"));
            }
        }
        s.push_str(&format!("## Answer\n\n{}\n", self.answer));
        s
    }
}

/// A markdown table: a header row and rows of cells.
pub fn md_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = format!(
        "| {} |\n|{}|\n",
        headers.join(" | "),
        headers.iter().map(|_| "---").collect::<Vec<_>>().join("|")
    );
    for r in rows {
        s.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    s
}

/// A finished lab.
#[derive(Debug, Clone)]
pub struct LabRun {
    /// The run directory.
    pub dir: PathBuf,
    /// The whole results.json.
    pub results: Value,
    /// The report.
    pub report: Report,
    /// Every file written (results.json, report.md, the plots).
    pub files: Vec<PathBuf>,
}

/// Writes `results.json` — `{lab, quick, machine, config, results}` — and `report.md` into
/// `opts.out`, each under a temporary name then renamed, and returns the [`LabRun`]. `config`
/// is every setting the lab used; `results` every measured number. `plots` are files already
/// written into `opts.out`. JSON cannot hold a non-finite number: serde_json writes it as
/// `null`, so say in the report why a value is missing.
pub fn finish(
    opts: &LabOptions,
    lab: &str,
    config: Value,
    results: Value,
    report: Report,
    plots: Vec<PathBuf>,
) -> Result<LabRun> {
    std::fs::create_dir_all(&opts.out).map_err(|source| LabError::Io { path: opts.out.clone(), source })?;
    let all = json!({
        "lab": lab,
        "quick": opts.quick,
        "machine": MachineInfo::collect(),
        "config": config,
        "results": results,
    });
    let text = serde_json::to_string_pretty(&all).map_err(|e| LabError::Msg(format!("results.json: {e}")))?;
    let results_path = opts.out.join("results.json");
    write_atomic(&results_path, text.as_bytes())?;
    let report_path = opts.out.join("report.md");
    write_atomic(&report_path, report.to_markdown().as_bytes())?;
    let mut files = vec![results_path, report_path];
    files.extend(plots);
    Ok(LabRun { dir: opts.out.clone(), results: all, report, files })
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    moeba_train::checkpoint::write_atomic(path, bytes)
        .map_err(|e| LabError::Msg(format!("{}: {e}", path.display())))
}
