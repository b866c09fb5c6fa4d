//! Charts as inline SVG, drawn on the server: a stacked progress bar, a line chart of
//! values over time against a threshold, and paired bars (reference against current).
//! Each is an `img` to assistive technology with a text alternative; colours come from
//! console.css classes, and every chart has its numbers in text beside it.

use maud::{Markup, html};

/// One segment of a [`stacked_bar`]: its CSS class suffix, label and count.
pub struct Segment<'a> {
    pub class: &'a str,
    pub label: &'a str,
    pub count: usize,
}

/// A horizontal bar split by counts (for example a wave's devices by progress).
pub fn stacked_bar(label: &str, segments: &[Segment<'_>]) -> Markup {
    let total: usize = segments.iter().map(|s| s.count).sum();
    let described = segments
        .iter()
        .filter(|s| s.count > 0)
        .map(|s| format!("{} {}", s.count, s.label))
        .collect::<Vec<_>>()
        .join(", ");
    let mut x = 0.0;
    let placed: Vec<(f64, f64, &Segment<'_>)> = segments
        .iter()
        .filter(|s| s.count > 0 && total > 0)
        .map(|s| {
            let w = 100.0 * s.count as f64 / total as f64;
            x += w;
            (x - w, w, s)
        })
        .collect();
    html! {
        svg.bar viewBox="0 0 100 6" preserveAspectRatio="none" role="img"
            aria-label=(format!("{label}: {}", if described.is_empty() { "no devices".into() } else { described.clone() })) {
            title { (label) ": " (described) }
            rect.seg-empty x="0" y="0" width="100" height="6" {}
            @for (x, w, s) in &placed {
                rect class=(format!("seg seg-{}", s.class)) data-state=(s.class) data-count=(s.count)
                    x=(format!("{x:.3}")) y="0" width=(format!("{w:.3}")) height="6" {}
            }
        }
    }
}

/// One line of a [`line_chart`]: a name and its points (time in ms, value); `marked`
/// points are drawn as filled dots (for example windows the device judged drifting).
pub struct Series {
    pub name: String,
    pub points: Vec<(u64, f64, bool)>,
}

const W: f64 = 640.0;
const H: f64 = 220.0;
const LEFT: f64 = 48.0;
const BOTTOM: f64 = 28.0;
const TOP: f64 = 10.0;
const RIGHT: f64 = 10.0;

/// Values over time, one line per series, a dashed line at `threshold`.
pub fn line_chart(title: &str, y_label: &str, series: &[Series], threshold: Option<f64>) -> Markup {
    let points = series.iter().flat_map(|s| s.points.iter());
    let (mut t0, mut t1, mut ymax) = (u64::MAX, 0u64, threshold.unwrap_or(0.0));
    for (t, y, _) in points {
        t0 = t0.min(*t);
        t1 = t1.max(*t);
        if y.is_finite() {
            ymax = ymax.max(*y);
        }
    }
    if ymax <= 0.0 {
        ymax = 1.0;
    }
    ymax *= 1.1;
    let span = (t1.saturating_sub(t0)).max(1) as f64;
    let px = move |t: u64| LEFT + (t.saturating_sub(t0)) as f64 / span * (W - LEFT - RIGHT);
    let py = move |y: f64| TOP + (1.0 - (y / ymax).clamp(0.0, 1.0)) * (H - TOP - BOTTOM);
    let empty = series.iter().all(|s| s.points.is_empty());
    html! {
        figure.chart {
            svg viewBox=(format!("0 0 {W} {H}")) role="img" aria-label=(title) {
                title { (title) }
                line.axis x1=(LEFT) y1=(H - BOTTOM) x2=(W - RIGHT) y2=(H - BOTTOM) {}
                line.axis x1=(LEFT) y1=(TOP) x2=(LEFT) y2=(H - BOTTOM) {}
                @for i in 0..=4u32 {
                    @let v = ymax * f64::from(i) / 4.0;
                    line.grid x1=(LEFT) y1=(format!("{:.1}", py(v))) x2=(W - RIGHT) y2=(format!("{:.1}", py(v))) {}
                    text.tick x=(LEFT - 4.0) y=(format!("{:.1}", py(v) + 4.0)) text-anchor="end" { (format!("{v:.2}")) }
                }
                text.tick x=(LEFT) y=(H - 8.0) { (if empty { "—".to_string() } else { crate::views::utc(t0) }) }
                text.tick x=(W - RIGHT) y=(H - 8.0) text-anchor="end" { (if empty { String::new() } else { crate::views::utc(t1) }) }
                @if let Some(th) = threshold {
                    line.threshold x1=(LEFT) y1=(format!("{:.1}", py(th))) x2=(W - RIGHT) y2=(format!("{:.1}", py(th))) {}
                    text.threshold-label x=(W - RIGHT - 4.0) y=(format!("{:.1}", py(th) - 4.0)) text-anchor="end" { "threshold " (format!("{th}")) }
                }
                @for (i, s) in series.iter().enumerate() {
                    @let path = s.points.iter().map(|(t, y, _)| format!("{:.1},{:.1}", px(*t), py(*y))).collect::<Vec<_>>().join(" ");
                    polyline class=(format!("line c{}", i % 8)) points=(path) {}
                    @for (t, y, marked) in &s.points {
                        @if *marked {
                            circle class=(format!("dot c{}", i % 8)) cx=(format!("{:.1}", px(*t))) cy=(format!("{:.1}", py(*y))) r="3.5" {}
                        }
                    }
                }
            }
            figcaption {
                (y_label) " · "
                @for (i, s) in series.iter().enumerate() {
                    span class=(format!("key c{}", i % 8)) { "■ " } (s.name) " "
                }
                @if series.iter().any(|s| s.points.iter().any(|p| p.2)) {
                    " · filled dots: windows judged drifting by the device"
                }
            }
        }
    }
}

/// Paired bars: for each bin its reference share and its current share.
pub fn paired_bars(title: &str, bins: &[(String, f64, f64)]) -> Markup {
    let max = bins
        .iter()
        .flat_map(|(_, r, c)| [*r, *c])
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let row = 22.0;
    let height = row * bins.len() as f64 + 8.0;
    let label_w = 160.0;
    let bar_w = W - label_w - 60.0;
    html! {
        figure.chart {
            svg viewBox=(format!("0 0 {W} {height}")) role="img" aria-label=(title) {
                title { (title) }
                @for (i, (bin, reference, current)) in bins.iter().enumerate() {
                    @let y = 4.0 + row * i as f64;
                    text.tick x=(label_w - 6.0) y=(y + 14.0) text-anchor="end" { (bin) }
                    rect.ref x=(label_w) y=(y + 1.0) width=(format!("{:.1}", bar_w * reference / max)) height="8" {}
                    rect.cur x=(label_w) y=(y + 10.0) width=(format!("{:.1}", bar_w * current / max)) height="8" {}
                    text.tick x=(label_w + bar_w * reference.max(*current) / max + 4.0) y=(y + 14.0) {
                        (format!("{:.0} % → {:.0} %", reference * 100.0, current * 100.0))
                    }
                }
            }
            figcaption { span.key.ref { "■ " } "reference · " span.key.cur { "■ " } "current window" }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bar_has_one_segment_per_nonzero_count_and_says_them_in_text() {
        let out = stacked_bar(
            "wave 1",
            &[
                Segment {
                    class: "active",
                    label: "active",
                    count: 3,
                },
                Segment {
                    class: "pending",
                    label: "pending",
                    count: 1,
                },
                Segment {
                    class: "failed",
                    label: "failed",
                    count: 0,
                },
            ],
        )
        .into_string();
        assert!(
            out.contains("aria-label=\"wave 1: 3 active, 1 pending\""),
            "{out}"
        );
        assert_eq!(out.matches("data-state=").count(), 2, "{out}");
        assert!(out.contains("width=\"75.000\""), "{out}");
    }

    #[test]
    fn a_chart_scales_to_its_threshold_and_marks_drifting_points() {
        let out = line_chart(
            "psi",
            "PSI",
            &[Series {
                name: "pi-a".into(),
                points: vec![(1000, 0.05, false), (2000, 0.5, true)],
            }],
            Some(0.2),
        )
        .into_string();
        assert!(out.contains("class=\"threshold\""), "{out}");
        assert_eq!(out.matches("<circle").count(), 1);
        assert!(out.contains("judged drifting"));
    }
}
