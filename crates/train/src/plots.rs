//! Plots (plotters, PNG and SVG, with an embedded font so nothing is needed from the system):
//! loss curves against steps and against time, and heatmaps (expert utilisation per layer,
//! expert share per token class).
//!
//! The font is DejaVu Sans (`assets/DejaVuSans.ttf`, Bitstream Vera license beside it),
//! registered with plotters as `sans-serif` the first time a plot is drawn. Every figure is drawn
//! by one generic function over plotters' `DrawingBackend`, once into a PNG and once into an SVG;
//! each file is written under a temporary name and renamed into place.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};

use crate::checkpoint::{write_atomic, CheckpointError};
use crate::metrics::StepLog;

/// The embedded font (DejaVu Sans 2.37).
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
/// The family every plot asks for (the embedded font is registered under it).
pub const FAMILY: &str = "sans-serif";

/// Registers the embedded font for every style plotters may ask for (once per process).
fn ensure_font() -> Result<(), CheckpointError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        [FontStyle::Normal, FontStyle::Bold, FontStyle::Italic, FontStyle::Oblique]
            .into_iter()
            .all(|s| register_font(FAMILY, s, FONT).is_ok())
    });
    if ok {
        Ok(())
    } else {
        Err(CheckpointError::Invalid {
            path: "assets/DejaVuSans.ttf".into(),
            msg: "the embedded font does not load".into(),
        })
    }
}

/// Something drawn the same way into every backend (public so that moeba-lab's charts use the
/// same renderer, font and atomic writes).
pub trait Figure {
    /// Canvas size in pixels.
    fn size(&self) -> (u32, u32);
    /// Draws onto `area` (already sized).
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<(), String>;
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::Io { path: path.display().to_string(), msg: e.to_string() }
}

/// Writes `<stem>.png` and `<stem>.svg` of `fig` into `dir` (each under a temporary name, then
/// renamed) and returns both paths. The embedded font is registered first.
pub fn render<F: Figure>(fig: &F, dir: &Path, stem: &str) -> Result<Vec<PathBuf>, CheckpointError> {
    if stem.is_empty() || stem.contains(['/', '\\']) || stem.starts_with('.') {
        return Err(CheckpointError::Invalid {
            path: dir.display().to_string(),
            msg: format!("plot name {stem:?}: expected a plain file stem such as `loss`"),
        });
    }
    ensure_font()?;
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let size = fig.size();
    let png = dir.join(format!("{stem}.png"));
    let svg = dir.join(format!("{stem}.svg"));

    // PNG: the bitmap backend writes the file on `present`; a temporary name keeps a reader
    // from ever seeing half a file.
    let tmp = dir.join(format!(".tmp-{}-{stem}.png", std::process::id()));
    let drawn = (|| {
        let root = BitMapBackend::new(&tmp, size).into_drawing_area();
        fig.draw(&root)?;
        root.present().map_err(|e| e.to_string())
    })();
    if let Err(e) = drawn {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(&png, e));
    }
    std::fs::rename(&tmp, &png).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(&png, e)
    })?;

    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, size).into_drawing_area();
        fig.draw(&root).map_err(|e| io_err(&svg, e))?;
        root.present().map_err(|e| io_err(&svg, e))?;
    }
    write_atomic(&svg, text.as_bytes()).map_err(|e| io_err(&svg, e))?;
    Ok(vec![png, svg])
}

/// `(lo, hi)` padded by `frac` of the span, and widened around a single value.
fn padded(lo: f64, hi: f64, frac: f64, min_half: f64) -> (f64, f64) {
    if hi > lo {
        let pad = (hi - lo) * frac;
        (lo - pad, hi + pad)
    } else {
        let half = (lo.abs() * 0.05).max(min_half);
        (lo - half, hi + half)
    }
}

fn min_max(v: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    v.fold(None, |acc, x| match acc {
        None => Some((x, x)),
        Some((lo, hi)) => Some((lo.min(x), hi.max(x))),
    })
}

/// The points of [`plot_losses`].
struct LossFigure {
    /// `(step, elapsed_s, loss)` of training logs with a finite loss.
    train: Vec<(f64, f64, f64)>,
    /// The same for validation.
    val: Vec<(f64, f64, f64)>,
}

impl LossFigure {
    fn panel<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        by_time: bool,
        y: (f64, f64),
    ) -> Result<(), String> {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
        let x_of = |p: &(f64, f64, f64)| if by_time { p.1 } else { p.0 };
        let all = self.train.iter().chain(&self.val);
        let (x0, x1) = min_max(all.map(x_of)).unwrap_or((0.0, 1.0));
        let (x0, x1) = padded(x0, x1, 0.02, if by_time { 0.5 } else { 1.0 });
        let (caption, x_desc) = if by_time {
            ("against wall time", "elapsed seconds")
        } else {
            ("against optimizer steps", "step")
        };
        let mut chart = ChartBuilder::on(area)
            .caption(caption, (FAMILY, 18))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, y.0..y.1)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .x_label_formatter(&|v: &f64| if x1 - x0 >= 10.0 { format!("{v:.0}") } else { format!("{v:.1}") })
            .y_desc("loss (nats / token)")
            .label_style((FAMILY, 13))
            .axis_desc_style((FAMILY, 15))
            .light_line_style(BLACK.mix(0.06))
            .draw()
            .map_err(e)?;
        let train_color = RGBColor(31, 119, 180);
        let val_color = RGBColor(214, 39, 40);
        if !self.train.is_empty() {
            chart
                .draw_series(LineSeries::new(
                    self.train.iter().map(|p| (x_of(p), p.2)),
                    train_color.stroke_width(2),
                ))
                .map_err(e)?
                .label("train")
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], train_color.stroke_width(2))
                });
        }
        if !self.val.is_empty() {
            chart
                .draw_series(LineSeries::new(
                    self.val.iter().map(|p| (x_of(p), p.2)),
                    val_color.stroke_width(2),
                ))
                .map_err(e)?
                .label("validation")
                .legend(move |(x, y)| {
                    // Offsets relative to the legend entry's anchor.
                    EmptyElement::at((x, y))
                        + PathElement::new(vec![(0, 0), (20, 0)], val_color.stroke_width(2))
                        + Circle::new((10, 0), 3, val_color.filled())
                });
            chart
                .draw_series(self.val.iter().map(|p| Circle::new((x_of(p), p.2), 3, val_color.filled())))
                .map_err(e)?;
        }
        chart
            .configure_series_labels()
            .label_font((FAMILY, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(e)?;
        Ok(())
    }
}

impl Figure for LossFigure {
    fn size(&self) -> (u32, u32) {
        (1400, 560)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
        root.fill(&WHITE).map_err(e)?;
        let root = root.titled("Training and validation loss", (FAMILY, 24)).map_err(e)?;
        let (y0, y1) = min_max(self.train.iter().chain(&self.val).map(|p| p.2)).unwrap_or((0.0, 1.0));
        let y = padded(y0, y1, 0.05, 0.05);
        let (w, _) = root.dim_in_pixel();
        let (left, right) = root.split_horizontally(w / 2);
        self.panel(&left, false, y)?;
        self.panel(&right, true, y)?;
        Ok(())
    }
}

/// Writes `loss.png` and `loss.svg` into `dir`: training loss and validation loss against steps
/// (left) and against wall time (right). Returns the files written.
///
/// Non-finite losses are left out; with no finite loss at all it is an error (there is nothing
/// to draw).
pub fn plot_losses(logs: &[StepLog], dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let point = |l: &StepLog, y: f64| (l.step as f64, l.elapsed_s, y);
    let ok = |l: &StepLog| l.elapsed_s.is_finite();
    let train: Vec<_> =
        logs.iter().filter(|l| ok(l) && l.loss.is_finite()).map(|l| point(l, l.loss)).collect();
    let val: Vec<_> = logs
        .iter()
        .filter_map(|l| l.val_loss.filter(|v| v.is_finite() && ok(l)).map(|v| point(l, v)))
        .collect();
    if train.is_empty() && val.is_empty() {
        return Err(CheckpointError::Invalid {
            path: dir.display().to_string(),
            msg: format!("no finite loss to plot in {} log lines", logs.len()),
        });
    }
    render(&LossFigure { train, val }, dir, "loss")
}

/// A labelled matrix for [`plot_heatmap`]: `values[r][c]`, one row label per row, one column
/// label per column.
#[derive(Debug, Clone, PartialEq)]
pub struct Heatmap {
    /// Title above the plot.
    pub title: String,
    /// Row labels (for example `layer 1`).
    pub rows: Vec<String>,
    /// Column labels (for example `e0`..`e7`).
    pub cols: Vec<String>,
    /// The values, `rows.len() × cols.len()`.
    pub values: Vec<Vec<f64>>,
}

/// The viridis colour map at `t` in `[0, 1]` (piecewise linear through nine of its colours).
pub fn viridis(t: f64) -> RGBColor {
    const STOPS: [(u8, u8, u8); 9] = [
        (68, 1, 84),
        (71, 44, 122),
        (59, 81, 139),
        (44, 113, 142),
        (33, 144, 141),
        (39, 173, 129),
        (92, 200, 99),
        (170, 220, 50),
        (253, 231, 37),
    ];
    let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
    let x = t * (STOPS.len() - 1) as f64;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f64;
    let lerp = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    RGBColor(lerp(a.0, b.0), lerp(a.1, b.1), lerp(a.2, b.2))
}

/// A cell value or colour-bar tick as text.
fn fmt_value(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A heatmap laid out in pixels.
struct HeatmapFigure<'a> {
    map: &'a Heatmap,
    /// The colour scale.
    lo: f64,
    hi: f64,
    /// Cell size.
    cw: i32,
    ch: i32,
    /// Left edge of the grid (after the row labels) and top edge (after the title).
    gx: i32,
    gy: i32,
    /// Whether each cell's value is printed.
    show_values: bool,
}

const TITLE_H: i32 = 48;
const COL_LABEL_H: i32 = 34;
const BAR_GAP: i32 = 28;
const BAR_W: i32 = 22;
const BAR_LABEL_W: i32 = 80;
const PAD: i32 = 16;
/// Approximate advance of one character at the label size (for the layout only).
const CHAR_W: i32 = 8;

impl<'a> HeatmapFigure<'a> {
    fn new(map: &'a Heatmap) -> Self {
        let (nr, nc) = (map.rows.len() as i32, map.cols.len() as i32);
        let finite = map.values.iter().flatten().copied().filter(|v| v.is_finite());
        let (lo, hi) = min_max(finite).unwrap_or((0.0, 1.0));
        let (lo, hi) = if hi > lo { (lo, hi) } else { (lo - 0.5, hi + 0.5) };
        let longest = |v: &[String]| v.iter().map(|s| s.chars().count()).max().unwrap_or(0) as i32;
        let value_w = 6 * CHAR_W;
        let cw = (900 / nc.max(1)).clamp(24, 72).max(longest(&map.cols) * CHAR_W + 8);
        let ch = (600 / nr.max(1)).clamp(20, 48);
        let show_values = nr * nc <= 400 && cw >= value_w && ch >= 18;
        let gx = PAD + longest(&map.rows) * CHAR_W + 12;
        HeatmapFigure { map, lo, hi, cw, ch, gx, gy: TITLE_H, show_values }
    }

    fn t(&self, v: f64) -> f64 {
        (v - self.lo) / (self.hi - self.lo)
    }
}

impl Figure for HeatmapFigure<'_> {
    fn size(&self) -> (u32, u32) {
        let (nr, nc) = (self.map.rows.len() as i32, self.map.cols.len() as i32);
        let title_w = self.map.title.chars().count() as i32 * 11 + 2 * PAD;
        let w = (self.gx + nc * self.cw + BAR_GAP + BAR_W + BAR_LABEL_W + PAD).max(title_w).max(320);
        let h = self.gy + (nr * self.ch).max(160) + COL_LABEL_H + PAD;
        (w as u32, h as u32)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
        let map = self.map;
        let (nr, nc) = (map.rows.len() as i32, map.cols.len() as i32);
        let (w, _) = root.dim_in_pixel();
        root.fill(&WHITE).map_err(e)?;
        let centre = Pos::new(HPos::Center, VPos::Center);
        let title = TextStyle::from((FAMILY, 22).into_font()).pos(centre);
        root.draw(&Text::new(map.title.clone(), (w as i32 / 2, TITLE_H / 2), title)).map_err(e)?;

        let label = TextStyle::from((FAMILY, 14).into_font());
        let (x0, y0) = (self.gx, self.gy);
        for (r, row) in map.values.iter().enumerate() {
            let y = y0 + r as i32 * self.ch;
            let style = label.clone().pos(Pos::new(HPos::Right, VPos::Center));
            root.draw(&Text::new(map.rows[r].clone(), (x0 - 8, y + self.ch / 2), style)).map_err(e)?;
            for (c, &v) in row.iter().enumerate() {
                let x = x0 + c as i32 * self.cw;
                let fill = if v.is_finite() { viridis(self.t(v)) } else { RGBColor(200, 200, 200) };
                root.draw(&Rectangle::new([(x, y), (x + self.cw, y + self.ch)], fill.filled())).map_err(e)?;
                if self.show_values {
                    let ink = if v.is_finite() && self.t(v) > 0.6 { BLACK } else { WHITE };
                    let ink = if v.is_finite() { ink } else { BLACK };
                    let style = TextStyle::from((FAMILY, 12).into_font()).color(&ink).pos(centre);
                    let at = (x + self.cw / 2, y + self.ch / 2);
                    root.draw(&Text::new(fmt_value(v), at, style)).map_err(e)?;
                }
            }
        }
        let grid_bottom = y0 + nr * self.ch;
        root.draw(&Rectangle::new([(x0, y0), (x0 + nc * self.cw, grid_bottom)], BLACK.mix(0.5)))
            .map_err(e)?;
        for (c, name) in map.cols.iter().enumerate() {
            let x = x0 + c as i32 * self.cw + self.cw / 2;
            let style = label.clone().pos(Pos::new(HPos::Center, VPos::Top));
            root.draw(&Text::new(name.clone(), (x, grid_bottom + 8), style)).map_err(e)?;
        }

        // The colour bar: as tall as the grid (at least 160 px), low values at the bottom.
        let bx = x0 + nc * self.cw + BAR_GAP;
        let bar_h = (nr * self.ch).max(160);
        let steps = bar_h.max(1);
        for i in 0..steps {
            let t = 1.0 - (i as f64 + 0.5) / steps as f64;
            let y = y0 + i;
            root.draw(&Rectangle::new([(bx, y), (bx + BAR_W, y + 1)], viridis(t).filled())).map_err(e)?;
        }
        root.draw(&Rectangle::new([(bx, y0), (bx + BAR_W, y0 + bar_h)], BLACK.mix(0.5))).map_err(e)?;
        let tick = label.clone().pos(Pos::new(HPos::Left, VPos::Center));
        for k in 0..=4 {
            let f = k as f64 / 4.0;
            let y = y0 + bar_h - (f * bar_h as f64).round() as i32;
            let v = self.lo + (self.hi - self.lo) * f;
            root.draw(&PathElement::new(vec![(bx + BAR_W, y), (bx + BAR_W + 4, y)], BLACK)).map_err(e)?;
            root.draw(&Text::new(fmt_value(v), (bx + BAR_W + 7, y), tick.clone())).map_err(e)?;
        }
        Ok(())
    }
}

/// Writes `<stem>.png` and `<stem>.svg` into `dir`: the heatmap with a colour scale and each
/// cell's value printed when the grid is small. Errors name the shape mismatch.
///
/// Row 0 is drawn at the top. The colour scale spans the finite values; a non-finite cell is
/// drawn grey.
pub fn plot_heatmap(map: &Heatmap, dir: &Path, stem: &str) -> Result<Vec<PathBuf>, CheckpointError> {
    let bad = |msg: String| CheckpointError::Invalid { path: dir.join(stem).display().to_string(), msg };
    if map.rows.is_empty() || map.cols.is_empty() {
        return Err(bad(format!(
            "heatmap `{}`: {} rows × {} columns; nothing to draw",
            map.title,
            map.rows.len(),
            map.cols.len()
        )));
    }
    if map.values.len() != map.rows.len() {
        return Err(bad(format!(
            "heatmap `{}`: {} row labels but {} rows of values",
            map.title,
            map.rows.len(),
            map.values.len()
        )));
    }
    if let Some((r, row)) = map.values.iter().enumerate().find(|(_, row)| row.len() != map.cols.len()) {
        return Err(bad(format!(
            "heatmap `{}`: row {r} has {} values but there are {} column labels",
            map.title,
            row.len(),
            map.cols.len()
        )));
    }
    render(&HeatmapFigure::new(map), dir, stem)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("moeba-plots-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// The PNG signature and the IHDR size.
    fn png_size(path: &Path) -> (u32, u32) {
        let b = std::fs::read(path).unwrap();
        assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{}: not a PNG", path.display());
        assert_eq!(&b[8..16], b"\x00\x00\x00\x0dIHDR");
        let be = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
        (be(16), be(20))
    }

    fn logs(n: usize) -> Vec<StepLog> {
        (1..=n)
            .map(|s| StepLog {
                step: s,
                loss: 5.5 * (-(s as f64) / 20.0).exp() + 1.2,
                elapsed_s: 0.37 * s as f64,
                val_loss: s.is_multiple_of(10).then(|| 5.5 * (-(s as f64) / 20.0).exp() + 1.3),
                ..StepLog::default()
            })
            .collect()
    }

    #[test]
    fn loss_plot_png_and_svg() {
        let dir = tmp("loss");
        let files = plot_losses(&logs(60), &dir).unwrap();
        assert_eq!(files, [dir.join("loss.png"), dir.join("loss.svg")]);
        assert_eq!(png_size(&files[0]), (1400, 560));
        let svg = std::fs::read_to_string(&files[1]).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
        for text in
            ["Training and validation loss", "against optimizer steps", "against wall time", "validation"]
        {
            assert!(svg.contains(text), "the SVG lacks {text:?}");
        }
        // Nothing temporary is left behind.
        let names: Vec<_> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn loss_plot_edge_cases() {
        let dir = tmp("loss-edge");
        // One log, no validation, a NaN in the middle of others.
        plot_losses(&logs(1), &dir).unwrap();
        let mut l = logs(12);
        l[3].loss = f64::NAN;
        l[5].val_loss = Some(f64::INFINITY);
        plot_losses(&l, &dir).unwrap();
        // Only validation points.
        let mut v = logs(20);
        v.iter_mut().for_each(|l| l.loss = f64::NAN);
        plot_losses(&v, &dir).unwrap();
        // Nothing finite: an error, not an empty picture.
        let err = plot_losses(&[], &dir).unwrap_err().to_string();
        assert!(err.contains("no finite loss"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn heatmap_png_and_svg() {
        let dir = tmp("heat");
        let map = Heatmap {
            title: "Expert utilisation".into(),
            rows: (0..3).map(|r| format!("layer {r}")).collect(),
            cols: (0..5).map(|c| format!("e{c}")).collect(),
            values: (0..3).map(|r| (0..5).map(|c| ((r * 5 + c) as f64) / 14.0).collect()).collect(),
        };
        let files = plot_heatmap(&map, &dir, "experts").unwrap();
        assert_eq!(files, [dir.join("experts.png"), dir.join("experts.svg")]);
        let (w, h) = png_size(&files[0]);
        assert!(w >= 320 && h >= 160, "{w}x{h}");
        let svg = std::fs::read_to_string(&files[1]).unwrap();
        for text in ["Expert utilisation", "layer 2", "e4", "0.50", "1.00"] {
            assert!(svg.contains(text), "the SVG lacks {text:?}");
        }
        // A large grid: no per-cell values, still drawn; constant and non-finite values too.
        let big = Heatmap {
            title: "Big".into(),
            rows: (0..24).map(|r| format!("layer {r}")).collect(),
            cols: (0..64).map(|c| format!("e{c}")).collect(),
            values: vec![vec![1.0; 64]; 24],
        };
        plot_heatmap(&big, &dir, "big").unwrap();
        let mut odd = map.clone();
        odd.values[1][2] = f64::NAN;
        plot_heatmap(&odd, &dir, "odd").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn heatmap_shape_errors() {
        let dir = tmp("heat-bad");
        let map = Heatmap {
            title: "t".into(),
            rows: vec!["a".into(), "b".into()],
            cols: vec!["x".into(), "y".into(), "z".into()],
            values: vec![vec![0.0; 3], vec![0.0; 2]],
        };
        let err = plot_heatmap(&map, &dir, "m").unwrap_err().to_string();
        assert!(err.contains("row 1 has 2 values but there are 3 column labels"), "{err}");
        let short = Heatmap { values: vec![vec![0.0; 3]], ..map.clone() };
        let err = plot_heatmap(&short, &dir, "m").unwrap_err().to_string();
        assert!(err.contains("2 row labels but 1 rows of values"), "{err}");
        let empty = Heatmap { rows: vec![], values: vec![], ..map.clone() };
        assert!(plot_heatmap(&empty, &dir, "m").is_err());
        let ok = Heatmap { values: vec![vec![0.0; 3]; 2], ..map };
        assert!(plot_heatmap(&ok, &dir, "../escape").is_err());
        assert!(!dir.exists() || std::fs::read_dir(&dir).unwrap().next().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn viridis_ends_and_clamps() {
        assert_eq!(viridis(0.0), RGBColor(68, 1, 84));
        assert_eq!(viridis(1.0), RGBColor(253, 231, 37));
        assert_eq!(viridis(-3.0), viridis(0.0));
        assert_eq!(viridis(7.0), viridis(1.0));
        assert_eq!(viridis(f64::NAN), viridis(0.0));
        assert_eq!(fmt_value(0.5), "0.50");
        assert_eq!(fmt_value(12.34), "12.3");
        assert_eq!(fmt_value(1234.0), "1234");
        assert_eq!(fmt_value(1e-6), "1.0e-6");
    }
}
