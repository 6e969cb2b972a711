//! `moe run --svg FILE`: the expert load of every layer run, as small bar charts one above
//! the other (routes per expert; a dashed line at the mean, so an imbalance shows at a
//! glance; zero-compute experts in grey).

use crate::error::CliResult;
use std::path::Path;

/// The routes per expert of one layer.
pub struct LayerLoad {
    /// Its title (`layer 3`).
    pub name: String,
    /// Routes per expert: the real experts, then any zero-compute ones.
    pub counts: Vec<i64>,
    /// How many of `counts` are real experts.
    pub real: usize,
}

/// Writes the chart of `layers` to `path`, titled `title`.
pub fn write(path: &Path, title: &str, layers: &[LayerLoad]) -> CliResult<()> {
    use svg::node::element::{Line, Rectangle, Text};
    let (w, pad, panel, gap) = (960.0, 48.0, 90.0, 34.0);
    let h = pad + layers.len() as f64 * (panel + gap) + 8.0;
    let mut doc = svg::Document::new().set("viewBox", (0, 0, w, h)).set("width", w).set("height", h);
    doc = doc.add(Rectangle::new().set("width", w).set("height", h).set("fill", "white"));
    doc = doc.add(Text::new(title).set("x", pad).set("y", 24).set("font-size", 15).set("font-family", "sans-serif"));
    let pw = w - 2.0 * pad;
    for (i, l) in layers.iter().enumerate() {
        let top = pad + i as f64 * (panel + gap) + 16.0;
        let base = top + panel;
        let real = &l.counts[..l.real.min(l.counts.len())];
        let max = l.counts.iter().copied().max().unwrap_or(0).max(1) as f64;
        let mean = if real.is_empty() { 0.0 } else { real.iter().sum::<i64>() as f64 / real.len() as f64 };
        let (lo, hi) = (real.iter().min().copied().unwrap_or(0), real.iter().max().copied().unwrap_or(0));
        doc = doc.add(
            Text::new(format!(
                "{}: {} experts, routes per expert min {lo} / mean {mean:.1} / max {hi}",
                l.name, l.real
            ))
            .set("x", pad)
            .set("y", top - 4.0)
            .set("font-size", 12)
            .set("font-family", "sans-serif"),
        );
        let bw = pw / l.counts.len().max(1) as f64;
        for (e, &c) in l.counts.iter().enumerate() {
            let bh = panel * c as f64 / max;
            let fill = if e < l.real { "#1f77b4" } else { "#9a9a9a" };
            doc = doc.add(
                Rectangle::new()
                    .set("x", pad + bw * e as f64)
                    .set("y", base - bh)
                    .set("width", (bw * 0.85).max(0.5))
                    .set("height", bh)
                    .set("fill", fill),
            );
        }
        let my = base - panel * mean / max;
        doc = doc.add(
            Line::new()
                .set("x1", pad)
                .set("x2", pad + pw)
                .set("y1", my)
                .set("y2", my)
                .set("stroke", "#d62728")
                .set("stroke-dasharray", "4 3"),
        );
        doc = doc
            .add(Line::new().set("x1", pad).set("x2", pad + pw).set("y1", base).set("y2", base).set("stroke", "black"));
    }
    svg::save(path, &doc).map_err(|e| moe_engine::Error::Io { path: path.display().to_string(), source: e })?;
    Ok(())
}
