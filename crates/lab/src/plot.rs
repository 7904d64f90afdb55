//! The lab plots (PNG and SVG, plotters, the embedded font of moeba-train's plots): line charts
//! with optional log axes ([`plot_lines`]), stacked areas ([`plot_stacked`]) and heatmaps
//! ([`plot_heatmap`], moeba-train's). Each writes `<stem>.png` and `<stem>.svg` into a directory
//! and returns both paths.

use std::path::{Path, PathBuf};

pub use moeba_train::plots::Heatmap;

use crate::{LabError, Result};

/// One line of a [`LineChart`]: a name for the legend and its `(x, y)` points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// Points, in x order. Non-finite points are skipped.
    pub points: Vec<(f64, f64)>,
}

/// A line chart.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LineChart {
    /// Title above the plot.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Logarithmic x axis (every x must be > 0).
    pub log_x: bool,
    /// Logarithmic y axis (every y must be > 0).
    pub log_y: bool,
    /// The lines.
    pub series: Vec<Series>,
}

/// A stacked area chart: at each `x`, the layers' values stacked bottom to top (expert
/// utilisation over training steps).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StackedArea {
    /// Title above the plot.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// The x values, increasing.
    pub x: Vec<f64>,
    /// `(name, values)` per layer, each `x.len()` long.
    pub layers: Vec<(String, Vec<f64>)>,
}

/// Draws `chart` into `dir/<stem>.{png,svg}`. Errors on an empty chart or a non-positive value
/// on a log axis, naming the series.
pub fn plot_lines(chart: &LineChart, dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let _ = (chart, dir, stem);
    Err(LabError::Msg("plot_lines is not implemented yet".into()))
}

/// Draws `area` into `dir/<stem>.{png,svg}`. Errors when a layer's length differs from `x`'s.
pub fn plot_stacked(area: &StackedArea, dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let _ = (area, dir, stem);
    Err(LabError::Msg("plot_stacked is not implemented yet".into()))
}

/// Draws `map` into `dir/<stem>.{png,svg}` (moeba-train's heatmap).
pub fn plot_heatmap(map: &Heatmap, dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    moeba_train::plots::plot_heatmap(map, dir, stem).map_err(|e| LabError::Msg(e.to_string()))
}
