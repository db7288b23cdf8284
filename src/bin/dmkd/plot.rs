//! Loss curves as PNG (plotters, with a bundled DejaVu Sans Mono font so no
//! system font library is needed) and as CSV.

use std::io::Write;
use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontStyle;

use dmkd::error::{Error, Result};

/// The bundled font (Bitstream Vera license, see `assets/DejaVu-LICENSE.txt`).
static FONT: &[u8] = include_bytes!("../../../assets/DejaVuSansMono.ttf");

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Format {
        path: path.display().to_string(),
        detail: format!("cannot draw plot: {e}"),
    }
}

/// A named series of (step, value) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(usize, f64)>,
}

/// Write series as CSV: `step,<name1>,<name2>,...` (series share their steps).
pub fn write_csv(path: &Path, series: &[Series]) -> Result<()> {
    let io = |e| Error::Io {
        path: path.display().to_string(),
        source: e,
    };
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    let header: Vec<&str> = series.iter().map(|s| s.name.as_str()).collect();
    writeln!(f, "step,{}", header.join(",")).map_err(io)?;
    let rows = series.first().map_or(0, |s| s.points.len());
    for i in 0..rows {
        let step = series[0].points[i].0;
        let vals: Vec<String> = series
            .iter()
            .map(|s| format!("{:e}", s.points[i].1))
            .collect();
        writeln!(f, "{step},{}", vals.join(",")).map_err(io)?;
    }
    f.flush().map_err(io)
}

/// The smallest and largest finite positive value of all series: the
/// log-scale y axis's range (zeros, negatives, NaN and infinities cannot be
/// drawn on it and are left out). `None` when there is no such value.
fn positive_range(series: &[Series]) -> Option<(f64, f64)> {
    let positive = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|v| v.is_finite() && *v > 0.0);
    let (lo, hi) = positive.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    // `lo` stays infinite only when no value was positive and finite.
    lo.is_finite().then_some((lo, hi))
}

/// Draw series on a log-scale y axis into a PNG.
pub fn write_png(path: &Path, title: &str, series: &[Series]) -> Result<()> {
    draw(
        BitMapBackend::new(path, (960, 600)).into_drawing_area(),
        path,
        title,
        series,
    )
}

/// [`write_png`]'s drawing onto `root` (`path` names the file in errors).
fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    path: &Path,
    title: &str,
    series: &[Series],
) -> Result<()> {
    // Registering twice is harmless; it replaces the same entry.
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| plot_err(path, "bundled font"))?;
    let Some((lo, hi)) = positive_range(series) else {
        return Err(plot_err(path, "no positive values to plot"));
    };
    let max_step = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .max()
        .unwrap_or(1)
        .max(1);
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0..max_step, (lo * 0.8..hi * 1.25).log_scale())
        .map_err(|e| plot_err(path, e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss (log scale)")
        .y_label_formatter(&|v| format!("{v:.1e}"))
        .draw()
        .map_err(|e| plot_err(path, e))?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let width = if i == 0 { 3 } else { 1 };
        chart
            .draw_series(LineSeries::new(
                s.points.iter().filter(|p| p.1 > 0.0).copied(),
                color.stroke_width(width),
            ))
            .map_err(|e| plot_err(path, e))?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| plot_err(path, e))?;
    root.present().map_err(|e| plot_err(path, e))
}

#[cfg(test)]
mod tests {
    use super::{Series, draw, positive_range, write_png};
    use plotters::prelude::*;

    /// The pixels of `color` in `series` drawn on a 480 x 300 RGB canvas.
    fn pixels_of(series: &[Series], color: RGBColor) -> usize {
        let (w, h) = (480u32, 300u32);
        let mut buf = vec![0u8; (w * h * 3) as usize];
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        draw(root, std::path::Path::new("memory"), "t", series).unwrap();
        // Near the color: a 1-pixel line is anti-aliased, few of its pixels
        // carry the exact color.
        let near = |a: u8, b: u8| a.abs_diff(b) < 48;
        buf.chunks_exact(3)
            .filter(|p| near(p[0], color.0) && near(p[1], color.1) && near(p[2], color.2))
            .count()
    }

    /// The total (the first series) is drawn 3 pixels wide, the levels 1;
    /// only positive values are drawn (a level of non-positive values
    /// leaves only its legend entry).
    #[test]
    fn the_total_is_drawn_wider_and_non_positive_points_not_at_all() {
        let line = |name: &str, scale: f64| Series {
            name: name.into(),
            points: (0..=20)
                .map(|i| (i, scale * 10f64.powf(-(i as f64) / 10.0)))
                .collect(),
        };
        let c = |i: usize| Palette99::pick(i).to_rgba();
        let rgb = |i: usize| RGBColor(c(i).0, c(i).1, c(i).2);
        let both = [line("total", 4.0), line("P3", 1.0)];
        let (total, level) = (pixels_of(&both, rgb(0)), pixels_of(&both, rgb(1)));
        assert!(total > 2 * level && level > 100, "{total} vs {level}");
        // A level whose values are all zero or negative: its legend only
        // (a 20-pixel stroke, 3 wide), no line.
        let dead = Series {
            name: "P4".into(),
            points: (0..=20).map(|i| (i, -(i as f64))).collect(),
        };
        let with_dead = [line("total", 4.0), line("P3", 1.0), dead];
        let legend_only = pixels_of(&with_dead, rgb(2));
        let live = pixels_of(&with_dead, rgb(1));
        // Measured: the legend entry 80 pixels, the same entry with its
        // 1-pixel line about 270, the 3-pixel total about 1230.
        assert!(
            legend_only < 100 && live > legend_only + 100,
            "{legend_only} vs {live}"
        );
    }

    fn series(values: &[f64]) -> Vec<Series> {
        vec![
            Series {
                name: "a".into(),
                points: values.iter().copied().enumerate().collect(),
            },
            Series {
                name: "b".into(),
                points: vec![(0, 3.0)],
            },
        ]
    }

    #[test]
    fn the_log_axis_spans_the_finite_positive_values_only() {
        let s = series(&[0.0, -5.0, 0.5, f64::NAN, f64::INFINITY, 7.0, 1e-300]);
        assert_eq!(positive_range(&s), Some((1e-300, 7.0)));
        // One positive value is a range of one point.
        assert_eq!(positive_range(&series(&[0.0])), Some((3.0, 3.0)));
        let none = vec![Series {
            name: "z".into(),
            points: vec![(0, 0.0), (1, -1.0), (2, f64::NAN), (3, f64::INFINITY)],
        }];
        assert_eq!(positive_range(&none), None);
        assert_eq!(positive_range(&[]), None);
    }

    #[test]
    fn a_plot_of_nothing_positive_is_an_error_naming_the_file() {
        let path = std::env::temp_dir().join(format!("dmkd-plot-{}.png", std::process::id()));
        let none = vec![Series {
            name: "z".into(),
            points: vec![(0, 0.0), (1, -2.0)],
        }];
        let e = write_png(&path, "t", &none).unwrap_err();
        assert!(
            e.to_string().contains("no positive values") && e.to_string().contains("dmkd-plot-"),
            "{e}"
        );
        // With zeros and a NaN among positive values it draws.
        write_png(&path, "t", &series(&[0.0, 2.0, f64::NAN, 4.0])).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() > 1000);
        std::fs::remove_file(&path).ok();
    }
}
