//! Draws the exchange benchmark's results as an SVG chart: throughput (hub and raw RabbitMQ)
//! and end-to-end p99 latency against the number of concurrent senders, one line per document
//! size. `make bench` renders it to `docs/bench-chart.png` with headless Chromium.

/// One measured case, as the chart needs it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Point {
    pub(crate) size_kib: usize,
    pub(crate) senders: usize,
    pub(crate) hub_docs_per_s: f64,
    pub(crate) raw_msgs_per_s: f64,
    pub(crate) e2e_p99_ms: f64,
    pub(crate) send_p99_ms: f64,
}

const WIDTH: f64 = 1000.0;
const HEIGHT: f64 = 820.0;
const COLOURS: [&str; 3] = ["#1f77b4", "#d62728", "#2ca02c"];

/// The chart as an SVG document.
pub(crate) fn svg(points: &[Point], title: &str) -> String {
    let mut sizes: Vec<usize> = points.iter().map(|p| p.size_kib).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" font-family=\"sans-serif\" font-size=\"13\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"28\" text-anchor=\"middle\" font-size=\"17\">{}</text>\n",
        WIDTH / 2.0,
        escape(title)
    );
    let throughput = Panel {
        top: 60.0,
        label: "documents (hub) / messages (raw) per second",
    };
    let latency = Panel {
        top: 450.0,
        label: "p99 latency, ms (log scale): end to end (solid), Send (dotted)",
    };
    let max_rate = points
        .iter()
        .map(|p| p.hub_docs_per_s.max(p.raw_msgs_per_s))
        .fold(1.0, f64::max);
    let max_rate = nice_ceiling(max_rate);
    let latencies = points.iter().flat_map(|p| [p.e2e_p99_ms, p.send_p99_ms]);
    let max_latency = latencies.clone().fold(1.0, f64::max).max(10.0);
    let min_latency = latencies.fold(f64::MAX, f64::min).clamp(0.1, 1.0);
    out += &throughput.frame(
        &(0..=4)
            .map(|i| max_rate * f64::from(i) / 4.0)
            .collect::<Vec<_>>(),
        |v| throughput.y_linear(v, max_rate),
    );
    let decades: Vec<f64> = (-1..=5)
        .map(|e| 10f64.powi(e))
        .filter(|v| *v >= min_latency / 1.01 && *v <= max_latency * 1.5)
        .collect();
    out += &latency.frame(&decades, |v| latency.y_log(v, min_latency, max_latency));
    for (index, size) in sizes.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        let mut series: Vec<&Point> = points.iter().filter(|p| p.size_kib == *size).collect();
        series.sort_by_key(|p| p.senders);
        let line = |panel: &Panel, y: &dyn Fn(&Point) -> f64, dash: &str| {
            let path: Vec<String> = series
                .iter()
                .map(|p| format!("{:.1},{:.1}", panel.x(p.senders), y(p)))
                .collect();
            let mut svg = format!(
                "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2.5\" stroke-dasharray=\"{dash}\" points=\"{}\"/>\n",
                path.join(" ")
            );
            for p in &series {
                svg += &format!(
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{colour}\"/>\n",
                    panel.x(p.senders),
                    y(p)
                );
            }
            svg
        };
        out += &line(
            &throughput,
            &|p| throughput.y_linear(p.hub_docs_per_s, max_rate),
            "",
        );
        out += &line(
            &throughput,
            &|p| throughput.y_linear(p.raw_msgs_per_s, max_rate),
            "6 4",
        );
        out += &line(
            &latency,
            &|p| latency.y_log(p.e2e_p99_ms, min_latency, max_latency),
            "",
        );
        out += &line(
            &latency,
            &|p| latency.y_log(p.send_p99_ms, min_latency, max_latency),
            "2 3",
        );
        let legend_y = 62.0 + 20.0 * index as f64;
        out += &format!(
            "<line x1=\"790\" y1=\"{legend_y}\" x2=\"820\" y2=\"{legend_y}\" stroke=\"{colour}\" stroke-width=\"2.5\"/><text x=\"826\" y=\"{}\">{size} KiB</text>\n",
            legend_y + 4.0
        );
    }
    out += "<text x=\"790\" y=\"140\">solid: hub, dashed: raw</text>\n";
    out += "</svg>\n";
    out
}

struct Panel {
    top: f64,
    label: &'static str,
}

impl Panel {
    const LEFT: f64 = 90.0;
    const WIDTH: f64 = 660.0;
    const HEIGHT: f64 = 300.0;
    const SENDERS: [usize; 4] = [1, 8, 64, 256];

    fn x(&self, senders: usize) -> f64 {
        // Log scale over 1..256.
        Self::LEFT + Self::WIDTH * (senders.max(1) as f64).log2() / 8.0
    }

    fn y_linear(&self, value: f64, max: f64) -> f64 {
        self.top + Self::HEIGHT * (1.0 - value / max)
    }

    fn y_log(&self, value: f64, min: f64, max: f64) -> f64 {
        let (low, high) = (min.log10(), (max * 1.5).log10());
        let share = ((value.max(min)).log10() - low) / (high - low);
        self.top + Self::HEIGHT * (1.0 - share)
    }

    /// Axes, grid lines at `ticks` (placed by `y`), the senders' axis and the label.
    fn frame(&self, ticks: &[f64], y: impl Fn(f64) -> f64) -> String {
        let bottom = self.top + Self::HEIGHT;
        let mut out = format!(
            "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#444\"/>\n<text x=\"{}\" y=\"{}\" font-size=\"14\">{}</text>\n",
            Self::LEFT,
            self.top,
            Self::WIDTH,
            Self::HEIGHT,
            Self::LEFT,
            self.top - 8.0,
            escape(self.label)
        );
        for tick in ticks {
            let at = y(*tick);
            out += &format!(
                "<line x1=\"{}\" y1=\"{at:.1}\" x2=\"{}\" y2=\"{at:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
                Self::LEFT,
                Self::LEFT + Self::WIDTH,
                Self::LEFT - 6.0,
                at + 4.0,
                format_tick(*tick)
            );
        }
        for senders in Self::SENDERS {
            let at = self.x(senders);
            out += &format!(
                "<line x1=\"{at:.1}\" y1=\"{}\" x2=\"{at:.1}\" y2=\"{bottom}\" stroke=\"#eee\"/><text x=\"{at:.1}\" y=\"{}\" text-anchor=\"middle\">{senders}</text>\n",
                self.top,
                bottom + 18.0
            );
        }
        out += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">concurrent senders</text>\n",
            Self::LEFT + Self::WIDTH / 2.0,
            bottom + 38.0
        );
        out
    }
}

fn format_tick(value: f64) -> String {
    if value >= 1.0 {
        format!("{value:.0}")
    } else {
        format!("{value}")
    }
}

/// The smallest of 1, 2, 5 × 10^k at or above `value`.
fn nice_ceiling(value: f64) -> f64 {
    let magnitude = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|v| *v >= value)
        .unwrap_or(value)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
