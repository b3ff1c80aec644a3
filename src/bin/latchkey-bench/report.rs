//! Results: one `Row` per scenario run, printed as a table and written as JSON.

use std::time::Duration;

use comfy_table::{Table, presets::ASCII_MARKDOWN};
use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies in microseconds, 1 us .. 60 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds are valid")
}

pub fn record(hist: &mut Histogram<u64>, took: Duration) {
    let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
    // Saturate rather than fail on an outlier beyond 60 s.
    hist.saturating_record(micros.max(1));
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    pub variant: String,
    /// Operations per second, in `unit`.
    pub throughput: f64,
    pub unit: String,
    /// Operations counted in `throughput`.
    pub ops: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Scenario-specific figures (hand-offs/s, spread, bytes per lock, ...).
    pub details: Vec<(String, String)>,
    /// The correctness check and whether it held.
    pub check: String,
    pub check_passed: bool,
    /// The target for this row, and whether it was met (None: no target).
    pub target: String,
    pub target_met: Option<bool>,
}

impl Row {
    pub fn new(scenario: &str, variant: &str) -> Self {
        Self {
            scenario: scenario.into(),
            variant: variant.into(),
            throughput: 0.0,
            unit: String::new(),
            ops: 0,
            p50_ms: 0.0,
            p99_ms: 0.0,
            max_ms: 0.0,
            details: Vec::new(),
            check: String::new(),
            check_passed: true,
            target: String::new(),
            target_met: None,
        }
    }

    pub fn throughput(mut self, ops: u64, elapsed: Duration, unit: &str) -> Self {
        self.throughput = ops as f64 / elapsed.as_secs_f64().max(1e-9);
        self.unit = unit.into();
        self.ops = ops;
        self
    }

    pub fn latency(mut self, hist: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        self.p50_ms = ms(hist.value_at_quantile(0.50));
        self.p99_ms = ms(hist.value_at_quantile(0.99));
        self.max_ms = ms(hist.max());
        self
    }

    pub fn detail(mut self, name: &str, value: impl ToString) -> Self {
        self.details.push((name.into(), value.to_string()));
        self
    }

    pub fn check(mut self, passed: bool, text: impl Into<String>) -> Self {
        self.check_passed = passed;
        self.check = text.into();
        self
    }

    pub fn target(mut self, text: &str, met: bool) -> Self {
        self.target = text.into();
        self.target_met = Some(met);
        self
    }

    /// This run is not the one the target is for (`why` says so in the table).
    pub fn no_target(mut self, why: &str) -> Self {
        self.target = why.into();
        self.target_met = None;
        self
    }
}

pub fn print(rows: &[Row]) {
    let mut table = Table::new();
    table.load_style(ASCII_MARKDOWN).set_header(vec![
        "scenario",
        "variant",
        "throughput",
        "p50 ms",
        "p99 ms",
        "max ms",
        "details",
        "check",
        "target",
    ]);
    for row in rows {
        let details = row
            .details
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join("; ");
        let target = match row.target_met {
            Some(true) => format!("met: {}", row.target),
            Some(false) => format!("NOT MET: {}", row.target),
            None => row.target.clone(),
        };
        let throughput = if row.unit.is_empty() {
            String::new()
        } else {
            format!("{:.0} {}", row.throughput, row.unit)
        };
        let ms = |v: f64| {
            if row.unit.is_empty() {
                "-".to_owned()
            } else {
                format!("{v:.2}")
            }
        };
        table.add_row(vec![
            row.scenario.clone(),
            row.variant.clone(),
            throughput,
            ms(row.p50_ms),
            ms(row.p99_ms),
            ms(row.max_ms),
            details,
            format!(
                "{}{}",
                if row.check_passed { "ok: " } else { "FAILED: " },
                row.check
            ),
            target,
        ]);
    }
    println!("{table}");
}
