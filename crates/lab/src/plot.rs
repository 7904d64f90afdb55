//! The lab plots (PNG and SVG, plotters, the embedded font of moeba-train's plots): line charts
//! with optional log axes ([`plot_lines`]), stacked areas ([`plot_stacked`]) and heatmaps
//! ([`plot_heatmap`], moeba-train's). Each writes `<stem>.png` and `<stem>.svg` into a directory
//! and returns both paths.

use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::{AsRangedCoord, Ranged, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

pub use moeba_train::plots::Heatmap;
use moeba_train::plots::{render, Figure, FAMILY};

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
    /// The lines, coloured by position ([`palette`]); a series without a finite point is left
    /// out (its colour slot is kept, so charts of the same series match).
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

/// The colour of series `i` (matplotlib's tab10, then repeated).
pub fn palette(i: usize) -> RGBColor {
    const TAB10: [(u8, u8, u8); 10] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ];
    let (r, g, b) = TAB10[i % TAB10.len()];
    RGBColor(r, g, b)
}

/// An axis value as short text: `1K`, `128K`, `2M` for powers of 1024 ≥ 1024 on a log axis,
/// else a compact decimal or scientific form.
pub fn fmt_tick(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        let s = format!("{v:.1e}");
        s.replace(".0e", "e")
    } else if a >= 100.0 || (v.fract() == 0.0 && a >= 1.0) {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').to_string()
    }
}

/// Like [`fmt_tick`], but exact multiples of 1024 ≥ 1024 print as `1K`, `64K`, `1M`
/// (context lengths, byte counts).
fn fmt_tick_binary(v: f64) -> String {
    let r = v.round();
    if (v - r).abs() < 1e-9 && r >= 1024.0 {
        let n = r as u64;
        if n.is_multiple_of(1 << 20) {
            return format!("{}M", n >> 20);
        }
        if n.is_multiple_of(1 << 10) {
            return format!("{}K", n >> 10);
        }
    }
    fmt_tick(v)
}

/// The axis range of `values`: padded by 4% (linear) or a factor of 1.25 (log); a single
/// value is widened around itself.
fn axis_range(lo: f64, hi: f64, log: bool) -> (f64, f64) {
    if log {
        if hi > lo {
            (lo / 1.25, hi * 1.25)
        } else {
            (lo / 2.0, hi * 2.0)
        }
    } else if hi > lo {
        let pad = (hi - lo) * 0.04;
        (lo - pad, hi + pad)
    } else {
        let half = (lo.abs() * 0.05).max(0.5);
        (lo - half, hi + half)
    }
}

/// A validated [`LineChart`] ready to draw.
struct LinesFigure<'a> {
    chart: &'a LineChart,
    /// The finite points of each series.
    points: Vec<Vec<(f64, f64)>>,
    x: (f64, f64),
    y: (f64, f64),
}

impl LinesFigure<'_> {
    fn draw_in<DB, X, Y>(
        &self,
        root: &DrawingArea<DB, Shift>,
        xr: X,
        yr: Y,
    ) -> std::result::Result<(), String>
    where
        DB: DrawingBackend,
        X: AsRangedCoord<Value = f64>,
        Y: AsRangedCoord<Value = f64>,
        X::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
        Y::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
    {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
        let c = self.chart;
        let mut chart = ChartBuilder::on(root)
            .caption(&c.title, (FAMILY, 22))
            .margin(16)
            .x_label_area_size(50)
            .y_label_area_size(80)
            .build_cartesian_2d(xr, yr)
            .map_err(e)?;
        let xf = |v: &f64| if c.log_x { fmt_tick_binary(*v) } else { fmt_tick(*v) };
        let yf = |v: &f64| if c.log_y { fmt_tick_binary(*v) } else { fmt_tick(*v) };
        chart
            .configure_mesh()
            .x_desc(c.x_label.as_str())
            .y_desc(c.y_label.as_str())
            .x_label_formatter(&xf)
            .y_label_formatter(&yf)
            .label_style((FAMILY, 13))
            .axis_desc_style((FAMILY, 15))
            .light_line_style(BLACK.mix(0.06))
            .draw()
            .map_err(e)?;
        for (i, (s, pts)) in c.series.iter().zip(&self.points).enumerate() {
            // An empty series is left out of the plot and the legend but keeps its colour slot,
            // so that charts of the same series match.
            if pts.is_empty() {
                continue;
            }
            let color = palette(i);
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(e)?
                .label(s.name.as_str())
                .legend(move |(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new(vec![(0, 0), (20, 0)], color.stroke_width(2))
                        + Circle::new((10, 0), 3, color.filled())
                });
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(e)?;
        }
        chart
            .configure_series_labels()
            .label_font((FAMILY, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(e)?;
        Ok(())
    }
}

impl Figure for LinesFigure<'_> {
    fn size(&self) -> (u32, u32) {
        (1000, 680)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> std::result::Result<(), String> {
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (x, y) = (self.x.0..self.x.1, self.y.0..self.y.1);
        // Ticks at powers of two where every value is one (context lengths), else of ten.
        let pow2 = |v: f64| v >= 1.0 && v.fract() == 0.0 && (v as u64).is_power_of_two();
        let base = |all: bool| if all { 2.0 } else { 10.0 };
        let xb = base(self.points.iter().flatten().all(|p| pow2(p.0)));
        let yb = base(self.points.iter().flatten().all(|p| pow2(p.1)));
        match (self.chart.log_x, self.chart.log_y) {
            (false, false) => self.draw_in(root, x, y),
            (true, false) => self.draw_in(root, x.log_scale().base(xb), y),
            (false, true) => self.draw_in(root, x, y.log_scale().base(yb)),
            (true, true) => self.draw_in(root, x.log_scale().base(xb), y.log_scale().base(yb)),
        }
    }
}

fn plot_err(dir: &Path, stem: &str, e: impl std::fmt::Display) -> LabError {
    LabError::Msg(format!("plot {}: {e}", dir.join(stem).display()))
}

/// Draws `chart` into `dir/<stem>.{png,svg}`. Errors on an empty chart or a non-positive value
/// on a log axis, naming the series.
pub fn plot_lines(chart: &LineChart, dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let bad = |msg: String| LabError::Invalid(format!("plot `{}` ({stem}): {msg}", chart.title));
    let mut points = Vec::with_capacity(chart.series.len());
    for s in &chart.series {
        let pts: Vec<(f64, f64)> =
            s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
        if let Some((x, y)) =
            pts.iter().find(|(x, y)| (chart.log_x && *x <= 0.0) || (chart.log_y && *y <= 0.0))
        {
            return Err(bad(format!(
                "series `{}` has the point ({x}, {y}), which a logarithmic axis cannot show",
                s.name
            )));
        }
        points.push(pts);
    }
    let all = || points.iter().flatten();
    let min_max = |v: &mut dyn Iterator<Item = f64>| {
        v.fold(None, |acc: Option<(f64, f64)>, x| match acc {
            None => Some((x, x)),
            Some((lo, hi)) => Some((lo.min(x), hi.max(x))),
        })
    };
    let (Some((x0, x1)), Some((y0, y1))) =
        (min_max(&mut all().map(|p| p.0)), min_max(&mut all().map(|p| p.1)))
    else {
        return Err(bad(format!("{} series and no finite point; nothing to draw", chart.series.len())));
    };
    let fig =
        LinesFigure { chart, points, x: axis_range(x0, x1, chart.log_x), y: axis_range(y0, y1, chart.log_y) };
    render(&fig, dir, stem).map_err(|e| plot_err(dir, stem, e))
}

/// A validated [`StackedArea`] ready to draw.
struct StackedFigure<'a> {
    area: &'a StackedArea,
    /// Cumulative tops per layer: `tops[l][i]` = sum of layers `0..=l` at `x[i]`.
    tops: Vec<Vec<f64>>,
}

impl Figure for StackedFigure<'_> {
    fn size(&self) -> (u32, u32) {
        (1000, 620)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> std::result::Result<(), String> {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
        let a = self.area;
        root.fill(&WHITE).map_err(e)?;
        let (w, _) = root.dim_in_pixel();
        let legend_w = (a.layers.iter().map(|(n, _)| n.chars().count()).max().unwrap_or(0) as u32 * 8 + 50)
            .clamp(80, w / 3);
        let (plot_area, legend_area) = root.split_horizontally(w - legend_w);
        let x0 = a.x[0];
        let x1 = *a.x.last().unwrap_or(&x0);
        let (x0, x1) = if x1 > x0 { (x0, x1) } else { (x0 - 0.5, x1 + 0.5) };
        let top = self.tops.last().map(|t| t.iter().copied().fold(0.0, f64::max)).unwrap_or(1.0);
        let y1 = if top > 0.0 { top * 1.02 } else { 1.0 };
        let mut chart = ChartBuilder::on(&plot_area)
            .caption(&a.title, (FAMILY, 22))
            .margin(16)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, 0.0..y1)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc(a.x_label.as_str())
            .y_desc(a.y_label.as_str())
            .x_label_formatter(&|v: &f64| fmt_tick(*v))
            .y_label_formatter(&|v: &f64| fmt_tick(*v))
            .label_style((FAMILY, 13))
            .axis_desc_style((FAMILY, 15))
            .light_line_style(BLACK.mix(0.06))
            .draw()
            .map_err(e)?;
        let zeros = vec![0.0; a.x.len()];
        for (l, tops) in self.tops.iter().enumerate() {
            let below = if l == 0 { &zeros } else { &self.tops[l - 1] };
            let mut poly: Vec<(f64, f64)> = a.x.iter().copied().zip(tops.iter().copied()).collect();
            poly.extend(a.x.iter().copied().zip(below.iter().copied()).rev());
            let color = palette(l);
            chart.draw_series(std::iter::once(Polygon::new(poly, color.mix(0.85).filled()))).map_err(e)?;
            chart
                .draw_series(LineSeries::new(
                    a.x.iter().copied().zip(tops.iter().copied()),
                    color.stroke_width(1),
                ))
                .map_err(e)?;
        }
        // The legend, top layer first (as the areas are stacked).
        let style = TextStyle::from((FAMILY, 14).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
        for (k, l) in (0..a.layers.len()).rev().enumerate() {
            let y = 60 + k as i32 * 22;
            let color = palette(l);
            legend_area
                .draw(&Rectangle::new([(6, y - 7), (22, y + 7)], color.mix(0.85).filled()))
                .map_err(e)?;
            legend_area.draw(&Text::new(a.layers[l].0.clone(), (30, y), style.clone())).map_err(e)?;
        }
        Ok(())
    }
}

/// Draws `area` into `dir/<stem>.{png,svg}`. Errors when a layer's length differs from `x`'s.
pub fn plot_stacked(area: &StackedArea, dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let bad = |msg: String| LabError::Invalid(format!("plot `{}` ({stem}): {msg}", area.title));
    if area.x.is_empty() || area.layers.is_empty() {
        return Err(bad(format!(
            "{} x values and {} layers; nothing to draw",
            area.x.len(),
            area.layers.len()
        )));
    }
    if let Some(i) = area.x.iter().position(|v| !v.is_finite()) {
        return Err(bad(format!("x[{i}] is {}", area.x[i])));
    }
    if area.x.windows(2).any(|w| w[1] < w[0]) {
        return Err(bad("the x values are not increasing".into()));
    }
    let mut tops: Vec<Vec<f64>> = Vec::with_capacity(area.layers.len());
    for (name, values) in &area.layers {
        if values.len() != area.x.len() {
            return Err(bad(format!(
                "layer `{name}` has {} values but there are {} x values",
                values.len(),
                area.x.len()
            )));
        }
        if let Some(v) = values.iter().find(|v| !v.is_finite() || **v < 0.0) {
            return Err(bad(format!(
                "layer `{name}` has the value {v}; a stacked area needs finite values ≥ 0"
            )));
        }
        let below = tops.last();
        tops.push(values.iter().enumerate().map(|(i, v)| v + below.map_or(0.0, |b| b[i])).collect());
    }
    render(&StackedFigure { area, tops }, dir, stem).map_err(|e| plot_err(dir, stem, e))
}

/// Draws `map` into `dir/<stem>.{png,svg}` (moeba-train's heatmap).
pub fn plot_heatmap(map: &Heatmap, dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    moeba_train::plots::plot_heatmap(map, dir, stem).map_err(|e| LabError::Msg(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("moeba-lab-plot-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn check_files(files: &[PathBuf], dir: &Path, stem: &str, texts: &[&str]) {
        assert_eq!(files, [dir.join(format!("{stem}.png")), dir.join(format!("{stem}.svg"))]);
        let png = std::fs::read(&files[0]).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let svg = std::fs::read_to_string(&files[1]).unwrap();
        assert!(svg.starts_with("<svg"));
        for t in texts {
            assert!(svg.contains(t), "{stem}.svg lacks {t:?}");
        }
    }

    fn chart(log_x: bool, log_y: bool) -> LineChart {
        let xs: Vec<f64> = (10..=17).map(|p| (1u64 << p) as f64).collect();
        LineChart {
            title: "Time against context".into(),
            x_label: "context length (tokens)".into(),
            y_label: "seconds".into(),
            log_x,
            log_y,
            series: vec![
                Series { name: "attention".into(), points: xs.iter().map(|&x| (x, 1e-9 * x * x)).collect() },
                Series {
                    name: "mamba".into(),
                    points: xs.iter().map(|&x| (x, 1e-6 * x)).chain([(1e6, f64::NAN)]).collect(),
                },
            ],
        }
    }

    #[test]
    fn lines_every_axis_kind() {
        let dir = tmp("lines");
        for (lx, ly) in [(false, false), (true, false), (false, true), (true, true)] {
            let stem = format!("l{}{}", lx as u8, ly as u8);
            let files = plot_lines(&chart(lx, ly), &dir, &stem).unwrap();
            check_files(&files, &dir, &stem, &["Time against context", "attention", "mamba", "seconds"]);
        }
        // The log x axis labels context lengths in K.
        let svg = std::fs::read_to_string(dir.join("l11.svg")).unwrap();
        assert!(svg.contains("16K") || svg.contains("32K") || svg.contains("64K"), "no K ticks");
        // A single point and a constant series still draw.
        let one = LineChart {
            series: vec![Series { name: "one".into(), points: vec![(3.0, 2.0)] }],
            ..chart(true, true)
        };
        plot_lines(&one, &dir, "one").unwrap();
        // An empty series is left out of the legend, the others keep their colours.
        let mut gap = chart(true, true);
        gap.series.insert(0, Series { name: "no figure".into(), points: vec![] });
        let files = plot_lines(&gap, &dir, "gap").unwrap();
        let svg = std::fs::read_to_string(&files[1]).unwrap();
        assert!(!svg.contains("no figure") && svg.contains("mamba"));
        let (c0, c1) = (palette(1), palette(2));
        for c in [c0, c1] {
            let hex = format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2);
            assert!(svg.to_uppercase().contains(&hex), "colour {hex} missing");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lines_errors() {
        let dir = tmp("lines-bad");
        let mut c = chart(true, true);
        c.series[1].points[2].1 = 0.0;
        let err = plot_lines(&c, &dir, "bad").unwrap_err().to_string();
        assert!(err.contains("`mamba`") && err.contains("logarithmic"), "{err}");
        let empty = LineChart { series: vec![], ..chart(false, false) };
        assert!(plot_lines(&empty, &dir, "e").unwrap_err().to_string().contains("nothing to draw"));
        let nan = LineChart {
            series: vec![Series { name: "n".into(), points: vec![(f64::NAN, 1.0)] }],
            ..chart(false, false)
        };
        assert!(plot_lines(&nan, &dir, "n").is_err());
        assert!(plot_lines(&chart(false, false), &dir, "../x").is_err());
        assert_eq!(fmt_tick_binary(131072.0), "128K");
        assert_eq!(fmt_tick_binary(2097152.0), "2M");
        assert_eq!(fmt_tick(0.25), "0.25");
        assert_eq!(fmt_tick(1e-5), "1e-5");
        assert_eq!(fmt_tick(300.0), "300");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn stacked_and_errors() {
        let dir = tmp("stacked");
        let x: Vec<f64> = (0..20).map(|s| s as f64 * 10.0).collect();
        let layers: Vec<(String, Vec<f64>)> = (0..4)
            .map(|e| {
                (
                    format!("expert {e}"),
                    x.iter().map(|s| 0.25 + 0.001 * (s - 100.0) * (e as f64 - 1.5)).collect(),
                )
            })
            .collect();
        let area = StackedArea {
            title: "Expert utilisation".into(),
            x_label: "step".into(),
            y_label: "share of tokens".into(),
            x: x.clone(),
            layers,
        };
        let files = plot_stacked(&area, &dir, "util").unwrap();
        check_files(&files, &dir, "util", &["Expert utilisation", "expert 3", "step"]);
        let mut short = area.clone();
        short.layers[2].1.pop();
        let err = plot_stacked(&short, &dir, "s").unwrap_err().to_string();
        assert!(err.contains("`expert 2` has 19 values but there are 20"), "{err}");
        let mut neg = area.clone();
        neg.layers[0].1[0] = -1.0;
        assert!(plot_stacked(&neg, &dir, "n").is_err());
        let empty = StackedArea { layers: vec![], ..area.clone() };
        assert!(plot_stacked(&empty, &dir, "e").is_err());
        // One x value.
        let one = StackedArea { x: vec![5.0], layers: vec![("a".into(), vec![1.0])], ..area };
        plot_stacked(&one, &dir, "one").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
