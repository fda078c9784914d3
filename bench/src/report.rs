//! Figures, each beside its anchor and target, printed as a table and
//! written as JSON.

use serde_json::{Value, json};

use crate::harness::Latency;

#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// weft / anchor must be at most this.
    RatioAtMost(f64),
    /// weft / anchor must be at least this.
    RatioAtLeast(f64),
    /// weft must be at most this, in its unit.
    AtMost(f64),
}

#[derive(Debug, Clone)]
pub struct Figure {
    pub name: String,
    pub unit: &'static str,
    pub weft: f64,
    pub anchor: Option<(String, f64)>,
    pub target: Option<Target>,
}

impl Figure {
    fn ratio(&self) -> Option<f64> {
        self.anchor.as_ref().map(|(_, a)| self.weft / a)
    }

    fn met(&self) -> Option<bool> {
        Some(match self.target? {
            Target::RatioAtMost(r) => self.ratio()? <= r,
            Target::RatioAtLeast(r) => self.ratio()? >= r,
            Target::AtMost(v) => self.weft <= v,
        })
    }

    fn target_text(&self) -> String {
        match self.target {
            Some(Target::RatioAtMost(r)) => format!("≤ {r}×"),
            Some(Target::RatioAtLeast(r)) => format!("≥ {r}×"),
            Some(Target::AtMost(v)) => format!("≤ {v} {}", self.unit),
            None => "-".into(),
        }
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub figures: Vec<Figure>,
}

impl Report {
    pub fn push(&mut self, f: Figure) {
        self.figures.push(f);
    }

    /// Adds p50/p90/p99/max rows; the target applies to p50.
    pub fn latency(
        &mut self,
        name: &str,
        weft: Latency,
        anchor_name: &str,
        anchor: Latency,
        target: Option<Target>,
    ) {
        for (q, w, a) in [
            ("p50", weft.p50, anchor.p50),
            ("p90", weft.p90, anchor.p90),
            ("p99", weft.p99, anchor.p99),
            ("max", weft.max, anchor.max),
        ] {
            self.push(Figure {
                name: format!("{name} {q}"),
                unit: "ms",
                weft: w,
                anchor: Some((anchor_name.to_owned(), a)),
                target: if q == "p50" { target } else { None },
            });
        }
    }

    /// Adds p50 and p99 rows with no anchor; the target applies to p99.
    pub fn tail_latency(&mut self, name: &str, weft: Latency, p99_target: Option<Target>) {
        for (q, v, target) in [("p50", weft.p50, None), ("p99", weft.p99, p99_target)] {
            self.push(Figure {
                name: format!("{name} {q}"),
                unit: "ms",
                weft: v,
                anchor: None,
                target,
            });
        }
    }

    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<58} {:>12} {:>12}  {:<22} {:>7}  {:<12} {}\n",
            "figure", "weft", "anchor", "anchor is", "ratio", "target", ""
        );
        for f in &self.figures {
            let (anchor_name, anchor) = f
                .anchor
                .clone()
                .map_or(("-".to_owned(), "-".to_owned()), |(n, a)| {
                    (n, format!("{a:.2}"))
                });
            let ratio = f.ratio().map_or("-".to_owned(), |r| format!("{r:.2}"));
            let met = match f.met() {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "",
            };
            out += &format!(
                "{:<58} {:>9.2} {:<2} {:>12}  {:<22} {:>7}  {:<12} {}\n",
                f.name,
                f.weft,
                f.unit,
                anchor,
                anchor_name,
                ratio,
                f.target_text(),
                met
            );
        }
        out
    }

    pub fn json(&self, quick: bool) -> Value {
        json!({
            "quick": quick,
            "figures": self.figures.iter().map(|f| json!({
                "name": f.name,
                "unit": f.unit,
                "weft": f.weft,
                "anchor": f.anchor.as_ref().map(|(n, _)| n),
                "anchor_value": f.anchor.as_ref().map(|(_, v)| v),
                "ratio": f.ratio(),
                "target": f.target_text(),
                "met": f.met(),
            })).collect::<Vec<_>>(),
        })
    }
}
