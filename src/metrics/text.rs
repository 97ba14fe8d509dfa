//! The hand-written exposition writer: Prometheus text 0.0.4 and OpenMetrics 1.0.0 written
//! straight into the scrape buffer, numbers through `itoa`/`dtoa` (no `fmt` machinery), no
//! allocation per series.
//!
//! The bytes match what prometheus-client 0.26 writes for the same family (the differential
//! tests in `metrics::tests` hold the two side by side): in 0.0.4 a counter's HELP and TYPE name
//! carry `_total` and a histogram's `le` comes last with its buckets first; in OpenMetrics the
//! family name has no `_total`, a `# UNIT` line follows when the family has a unit, `le` comes
//! first and `_sum`/`_count` precede the buckets. A family without series writes nothing.

/// What a family is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Samples named `<name>_total`.
    Counter,
    /// Samples named `<name>`.
    Gauge,
    /// `<name>_bucket`, `<name>_sum` and `<name>_count`.
    Histogram,
}

/// A family's name, help and type: everything of its header.
#[derive(Debug)]
pub struct Descriptor {
    /// The full name including the unit suffix, without `_total`.
    pub name: &'static str,
    /// The HELP text as exposed (with its final period).
    pub help: &'static str,
    /// The type.
    pub kind: Kind,
    /// The unit (`seconds`), for OpenMetrics' `# UNIT` line; `name` already ends with it.
    pub unit: Option<&'static str>,
}

impl Descriptor {
    /// A counter family (`name` without `_total`).
    pub const fn counter(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            kind: Kind::Counter,
            unit: None,
        }
    }

    /// A gauge family; `name` ends with `_<unit>` when there is a unit.
    pub const fn gauge(name: &'static str, help: &'static str, unit: Option<&'static str>) -> Self {
        Self {
            name,
            help,
            kind: Kind::Gauge,
            unit,
        }
    }

    /// A histogram family; `name` ends with `_<unit>` when there is a unit.
    pub const fn histogram(
        name: &'static str,
        help: &'static str,
        unit: Option<&'static str>,
    ) -> Self {
        Self {
            name,
            help,
            kind: Kind::Histogram,
            unit,
        }
    }
}

/// Upper bounds of a histogram with their `le` label values in both formats, formatted once.
#[derive(Debug, Clone)]
pub struct Bounds {
    values: &'static [f64],
    /// `le="…"` as client_golang writes it (whole numbers without `.0`), for 0.0.4.
    text: Vec<String>,
    /// `le="…"` as `dtoa` writes it (`1.0`), for OpenMetrics.
    openmetrics: Vec<String>,
}

impl Bounds {
    /// Formats the `le` values of `values` (ascending, finite; `+Inf` is implied).
    pub fn new(values: &'static [f64]) -> Self {
        Self {
            values,
            text: values
                .iter()
                .map(|&v| format!("le=\"{}\"", go_float(v)))
                .collect(),
            openmetrics: values
                .iter()
                .map(|&v| format!("le=\"{}\"", dtoa::Buffer::new().format(v)))
                .collect(),
        }
    }

    /// The bounds.
    pub fn values(&self) -> &'static [f64] {
        self.values
    }

    /// The bucket an observation falls in: the first bound it does not exceed, or
    /// `values().len()` for `+Inf`.
    pub fn bucket(&self, value: f64) -> usize {
        self.values
            .iter()
            .position(|bound| value <= *bound)
            .unwrap_or(self.values.len())
    }
}

/// Formats a bound the way prometheus-client's 0.0.4 encoder does (client_golang's
/// `strconv.FormatFloat(v, 'g', -1, 64)`) for the bounds a histogram here uses: whole numbers
/// below 1e6 without a fraction, others in Rust's shortest form (the same digits in
/// `[1e-4, 1e6)`). Runs once per bound, at construction.
fn go_float(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e6 {
        itoa::Buffer::new().format(value as i64).to_owned()
    } else {
        value.to_string()
    }
}

/// The number values a sample carries.
#[derive(Debug, Clone, Copy)]
pub enum Value {
    /// An integer (counters, histogram counts).
    Int(u64),
    /// A float (gauges).
    Float(f64),
}

/// Writes families into a `String` in one of the two formats.
pub struct Encoder<'a> {
    out: &'a mut String,
    openmetrics: bool,
    /// The family samples are written for.
    family: &'static Descriptor,
    /// Whether `family`'s header is still to be written (before its first sample).
    header_pending: bool,
    ints: itoa::Buffer,
    floats: dtoa::Buffer,
    /// A histogram series' labels, rendered once for its lines (reused, so one allocation
    /// per scrape at most).
    labels: String,
}

/// A placeholder family before the first `family` call.
static NO_FAMILY: Descriptor = Descriptor {
    name: "",
    help: "",
    kind: Kind::Gauge,
    unit: None,
};

impl<'a> Encoder<'a> {
    /// An encoder appending to `out`.
    pub fn new(out: &'a mut String, openmetrics: bool) -> Self {
        Self {
            out,
            openmetrics,
            family: &NO_FAMILY,
            header_pending: false,
            ints: itoa::Buffer::new(),
            floats: dtoa::Buffer::new(),
            labels: String::new(),
        }
    }

    /// Whether this is OpenMetrics (else text 0.0.4).
    pub fn openmetrics(&self) -> bool {
        self.openmetrics
    }

    /// Starts a family; its header is written with its first sample, so a family without
    /// series leaves no trace.
    pub fn family(&mut self, family: &'static Descriptor) {
        self.family = family;
        self.header_pending = true;
    }

    /// One sample of the current family (a counter or a gauge).
    pub fn sample(&mut self, labels: &[(&str, &str)], value: Value) {
        self.header();
        self.out.push_str(self.family.name);
        if self.family.kind == Kind::Counter {
            self.out.push_str("_total");
        }
        self.labels(labels);
        self.value(value);
    }

    /// A counter sample.
    pub fn counter(&mut self, labels: &[(&str, &str)], value: u64) {
        self.sample(labels, Value::Int(value));
    }

    /// A gauge sample.
    pub fn gauge(&mut self, labels: &[(&str, &str)], value: f64) {
        self.sample(labels, Value::Float(value));
    }

    /// Every sample of one histogram series. `buckets` holds the non-cumulative count of each
    /// bound of `bounds` and then of `+Inf`; the count is their sum.
    pub fn histogram(
        &mut self,
        labels: &[(&str, &str)],
        bounds: &Bounds,
        buckets: &[u64],
        sum: f64,
    ) {
        debug_assert_eq!(buckets.len(), bounds.values.len() + 1);
        self.header();
        let count: u64 = buckets.iter().sum();
        // The labels are the same on every line of the series: render them once.
        let mut rendered = std::mem::take(&mut self.labels);
        rendered.clear();
        for (i, (key, value)) in labels.iter().enumerate() {
            if i > 0 {
                rendered.push(',');
            }
            rendered.push_str(key);
            rendered.push_str("=\"");
            push_label_value(&mut rendered, value);
            rendered.push('"');
        }
        let mut cumulative = 0;
        if self.openmetrics {
            self.summary_line("_sum", &rendered, Value::Float(sum));
            self.summary_line("_count", &rendered, Value::Int(count));
            for (le, n) in bounds.openmetrics.iter().zip(buckets) {
                cumulative += n;
                self.bucket_line(le, &rendered, Value::Int(cumulative));
            }
            self.bucket_line("le=\"+Inf\"", &rendered, Value::Int(count));
        } else {
            for (le, n) in bounds.text.iter().zip(buckets) {
                cumulative += n;
                self.bucket_line(le, &rendered, Value::Int(cumulative));
            }
            self.bucket_line("le=\"+Inf\"", &rendered, Value::Int(count));
            self.summary_line("_sum", &rendered, Value::Float(sum));
            self.summary_line("_count", &rendered, Value::Int(count));
        }
        self.labels = rendered;
    }

    /// `<name>_bucket{..}`: `le` first in OpenMetrics, last in 0.0.4 (as prometheus-client).
    fn bucket_line(&mut self, le: &str, rendered: &str, value: Value) {
        self.out.push_str(self.family.name);
        self.out.push_str("_bucket{");
        if rendered.is_empty() {
            self.out.push_str(le);
        } else if self.openmetrics {
            self.out.push_str(le);
            self.out.push(',');
            self.out.push_str(rendered);
        } else {
            self.out.push_str(rendered);
            self.out.push(',');
            self.out.push_str(le);
        }
        self.out.push('}');
        self.value(value);
    }

    /// `<name>_sum` or `<name>_count` with the series' labels.
    fn summary_line(&mut self, suffix: &str, rendered: &str, value: Value) {
        self.out.push_str(self.family.name);
        self.out.push_str(suffix);
        if !rendered.is_empty() {
            self.out.push('{');
            self.out.push_str(rendered);
            self.out.push('}');
        }
        self.value(value);
    }

    /// `# EOF`, the end of an OpenMetrics exposition (nothing in 0.0.4).
    pub fn finish(self) {
        if self.openmetrics {
            self.out.push_str("# EOF\n");
        }
    }

    fn header(&mut self) {
        if !self.header_pending {
            return;
        }
        self.header_pending = false;
        let family = self.family;
        let total = if family.kind == Kind::Counter && !self.openmetrics {
            "_total"
        } else {
            ""
        };
        self.out.push_str("# HELP ");
        self.out.push_str(family.name);
        self.out.push_str(total);
        self.out.push(' ');
        push_help(self.out, family.help, self.openmetrics);
        self.out.push_str("\n# TYPE ");
        self.out.push_str(family.name);
        self.out.push_str(total);
        self.out.push_str(match family.kind {
            Kind::Counter => " counter\n",
            Kind::Gauge => " gauge\n",
            Kind::Histogram => " histogram\n",
        });
        if let (Some(unit), true) = (family.unit, self.openmetrics) {
            self.out.push_str("# UNIT ");
            self.out.push_str(family.name);
            self.out.push(' ');
            self.out.push_str(unit);
            self.out.push('\n');
        }
    }

    /// `{k="v",..}`; nothing without labels.
    fn labels(&mut self, labels: &[(&str, &str)]) {
        if labels.is_empty() {
            return;
        }
        self.out.push('{');
        for (i, (key, value)) in labels.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            self.out.push_str(key);
            self.out.push_str("=\"");
            push_label_value(self.out, value);
            self.out.push('"');
        }
        self.out.push('}');
    }

    fn value(&mut self, value: Value) {
        self.out.push(' ');
        match value {
            Value::Int(n) => self.out.push_str(self.ints.format(n)),
            Value::Float(v) if v.is_finite() => self.out.push_str(self.floats.format_finite(v)),
            Value::Float(v) if v.is_nan() => self.out.push_str("NaN"),
            Value::Float(v) if v > 0.0 => self.out.push_str("+Inf"),
            Value::Float(_) => self.out.push_str("-Inf"),
        }
        self.out.push('\n');
    }
}

/// A label value with `\`, `"` and newline escaped (both formats escape the same three).
pub fn push_label_value(out: &mut String, value: &str) {
    if !value.bytes().any(|b| matches!(b, b'\\' | b'"' | b'\n')) {
        out.push_str(value);
        return;
    }
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A HELP text: 0.0.4 escapes `\` and newline; OpenMetrics also `"`.
fn push_help(out: &mut String, help: &str, openmetrics: bool) {
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if openmetrics => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static COUNTER: Descriptor = Descriptor {
        name: "demo_requests",
        help: "Requests.",
        kind: Kind::Counter,
        unit: None,
    };
    static LATENCY: Descriptor = Descriptor {
        name: "demo_latency_seconds",
        help: "Latency.",
        kind: Kind::Histogram,
        unit: Some("seconds"),
    };

    fn both(write: impl Fn(&mut Encoder<'_>)) -> (String, String) {
        let mut text = String::new();
        let mut encoder = Encoder::new(&mut text, false);
        write(&mut encoder);
        encoder.finish();
        let mut openmetrics = String::new();
        let mut encoder = Encoder::new(&mut openmetrics, true);
        write(&mut encoder);
        encoder.finish();
        (text, openmetrics)
    }

    #[test]
    fn counters_follow_each_formats_naming_rules() {
        let (text, openmetrics) = both(|e| {
            e.family(&COUNTER);
            e.counter(&[("path", "/a")], 3);
            e.counter(&[], 0);
        });
        assert_eq!(
            text,
            "# HELP demo_requests_total Requests.\n# TYPE demo_requests_total counter\n\
             demo_requests_total{path=\"/a\"} 3\ndemo_requests_total 0\n"
        );
        assert_eq!(
            openmetrics,
            "# HELP demo_requests Requests.\n# TYPE demo_requests counter\n\
             demo_requests_total{path=\"/a\"} 3\ndemo_requests_total 0\n# EOF\n"
        );
    }

    #[test]
    fn histograms_order_le_and_the_summary_lines_per_format() {
        let bounds = Bounds::new(&[0.5, 1.0]);
        let (text, openmetrics) = both(|e| {
            e.family(&LATENCY);
            e.histogram(&[("k", "v")], &bounds, &[1, 0, 2], 4.25);
        });
        assert_eq!(
            text,
            "# HELP demo_latency_seconds Latency.\n# TYPE demo_latency_seconds histogram\n\
             demo_latency_seconds_bucket{k=\"v\",le=\"0.5\"} 1\n\
             demo_latency_seconds_bucket{k=\"v\",le=\"1\"} 1\n\
             demo_latency_seconds_bucket{k=\"v\",le=\"+Inf\"} 3\n\
             demo_latency_seconds_sum{k=\"v\"} 4.25\n\
             demo_latency_seconds_count{k=\"v\"} 3\n"
        );
        assert_eq!(
            openmetrics,
            "# HELP demo_latency_seconds Latency.\n# TYPE demo_latency_seconds histogram\n\
             # UNIT demo_latency_seconds seconds\n\
             demo_latency_seconds_sum{k=\"v\"} 4.25\n\
             demo_latency_seconds_count{k=\"v\"} 3\n\
             demo_latency_seconds_bucket{le=\"0.5\",k=\"v\"} 1\n\
             demo_latency_seconds_bucket{le=\"1.0\",k=\"v\"} 1\n\
             demo_latency_seconds_bucket{le=\"+Inf\",k=\"v\"} 3\n# EOF\n"
        );
    }

    #[test]
    fn a_family_without_series_writes_no_header() {
        let (text, openmetrics) = both(|e| {
            e.family(&COUNTER);
            e.family(&LATENCY);
        });
        assert_eq!(text, "");
        assert_eq!(openmetrics, "# EOF\n");
    }

    #[test]
    fn label_values_are_escaped_and_special_floats_are_spelled_out() {
        let (text, _) = both(|e| {
            e.family(&COUNTER);
            e.gauge(&[("v", "a\\b\"c\nd é")], 0.25);
            e.gauge(&[], 1.0);
            e.gauge(&[], f64::INFINITY);
            e.gauge(&[], f64::NEG_INFINITY);
            e.gauge(&[], f64::NAN);
        });
        let lines: Vec<&str> = text.lines().skip(2).collect();
        assert_eq!(
            lines,
            [
                r#"demo_requests_total{v="a\\b\"c\nd é"} 0.25"#,
                "demo_requests_total 1.0",
                "demo_requests_total +Inf",
                "demo_requests_total -Inf",
                "demo_requests_total NaN",
            ]
        );
    }

    #[test]
    fn observations_land_in_the_first_bound_they_do_not_exceed() {
        let bounds = Bounds::new(&[0.005, 0.02]);
        assert_eq!(bounds.bucket(0.0), 0);
        assert_eq!(bounds.bucket(0.005), 0);
        assert_eq!(bounds.bucket(0.0051), 1);
        assert_eq!(bounds.bucket(0.02), 1);
        assert_eq!(bounds.bucket(7.0), 2);
        assert_eq!(bounds.bucket(f64::NAN), 2);
    }
}
