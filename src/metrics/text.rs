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
    /// What follows a 0.0.4 bucket line's series labels up to its value: `,le="…"} `, `le`
    /// as client_golang writes it (whole numbers without `.0`), `+Inf` last (a line is then a
    /// copy of the labels, one of this and the number).
    text_tails: Vec<String>,
    /// An OpenMetrics bucket line's first label: `le="…"`, as `dtoa` writes it (`1.0`),
    /// `+Inf` last.
    openmetrics_les: Vec<String>,
}

impl Bounds {
    /// Formats the `le` values of `values` (ascending, finite; `+Inf` is implied).
    pub fn new(values: &'static [f64]) -> Self {
        let inf = || std::iter::once("+Inf".to_owned());
        Self {
            values,
            text_tails: values
                .iter()
                .map(|&v| go_float(v))
                .chain(inf())
                .map(|le| format!(",le=\"{le}\"}} "))
                .collect(),
            openmetrics_les: values
                .iter()
                .map(|&v| dtoa::Buffer::new().format(v).to_owned())
                .chain(inf())
                .map(|le| format!("le=\"{le}\""))
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

/// Label pairs rendered once as `k="v",k2="v2"` with the values escaped, for the lines of a
/// histogram series or for series that share their first label: `start` renders the shared
/// one, `with` appends the rest (rendered once too) after it.
#[derive(Debug, Default)]
pub struct Labels {
    text: String,
    /// Length of what `start` rendered, which `with` keeps.
    base: usize,
}

impl Labels {
    /// Appends `key="value"` (the value escaped), after a comma unless it is the first.
    pub fn push(&mut self, key: &str, value: &str) {
        if !self.text.is_empty() {
            self.text.push(',');
        }
        self.text.push_str(key);
        self.text.push_str("=\"");
        push_label_value(&mut self.text, value);
        self.text.push('"');
    }

    /// A set rendered from pairs.
    pub fn of(labels: &[(&str, &str)]) -> Self {
        let mut rendered = Self::default();
        rendered.set(labels);
        rendered
    }

    /// Starts over with `key="value"`, the part each following `with` keeps.
    pub fn start(&mut self, key: &str, value: &str) {
        self.text.clear();
        self.push(key, value);
        self.base = self.text.len();
    }

    /// The part rendered by `start`, then `rest` (already rendered).
    pub fn with(&mut self, rest: &Labels) -> &Labels {
        self.text.truncate(self.base);
        if !self.text.is_empty() && !rest.text.is_empty() {
            self.text.push(',');
        }
        self.text.push_str(&rest.text);
        self
    }

    fn set(&mut self, labels: &[(&str, &str)]) {
        self.text.clear();
        self.base = 0;
        for (key, value) in labels {
            self.push(key, value);
        }
    }
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
    /// The labels of a series given as pairs, rendered here (reused, so one allocation per
    /// scrape at most).
    scratch: Labels,
    /// The part a histogram series' bucket lines share (reused like `scratch`).
    fixed: String,
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
            scratch: Labels::default(),
            fixed: String::new(),
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
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.set(labels);
        self.sample_with(&scratch, value);
        self.scratch = scratch;
    }

    /// One sample of the current family with labels rendered beforehand.
    pub fn sample_with(&mut self, labels: &Labels, value: Value) {
        self.header();
        let suffix = if self.family.kind == Kind::Counter {
            "_total"
        } else {
            ""
        };
        self.line(suffix, &labels.text, value);
    }

    /// A counter sample.
    pub fn counter(&mut self, labels: &[(&str, &str)], value: u64) {
        self.sample(labels, Value::Int(value));
    }

    /// A counter sample with labels rendered beforehand.
    pub fn counter_with(&mut self, labels: &Labels, value: u64) {
        self.sample_with(labels, Value::Int(value));
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
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.set(labels);
        self.histogram_with(&scratch, bounds, buckets, sum);
        self.scratch = scratch;
    }

    /// `histogram` with the series' labels rendered beforehand.
    pub fn histogram_with(&mut self, labels: &Labels, bounds: &Bounds, buckets: &[u64], sum: f64) {
        debug_assert_eq!(buckets.len(), bounds.values.len() + 1);
        self.header();
        let labels = labels.text.as_str();
        let count: u64 = buckets.iter().sum();
        let mut cumulative = 0;
        // Every bucket line repeats all but `le` and the number: write that part once into
        // `fixed`, then each line is a copy of it, of the bound's piece and the number.
        let mut fixed = std::mem::take(&mut self.fixed);
        fixed.clear();
        if self.openmetrics {
            self.line("_sum", labels, Value::Float(sum));
            self.line("_count", labels, Value::Int(count));
            // `<name>_bucket{le="…"` + `,<labels>} `
            if !labels.is_empty() {
                fixed.push(',');
                fixed.push_str(labels);
            }
            fixed.push_str("} ");
            for (le, n) in bounds.openmetrics_les.iter().zip(buckets) {
                cumulative += n;
                self.out.push_str(self.family.name);
                self.out.push_str("_bucket{");
                self.out.push_str(le);
                self.out.push_str(&fixed);
                self.int(cumulative);
            }
        } else {
            // `<name>_bucket{<labels>` + `,le="…"} `
            fixed.push_str(self.family.name);
            fixed.push_str("_bucket{");
            fixed.push_str(labels);
            let first = usize::from(labels.is_empty());
            for (tail, n) in bounds.text_tails.iter().zip(buckets) {
                cumulative += n;
                self.out.push_str(&fixed);
                self.out.push_str(&tail[first..]);
                self.int(cumulative);
            }
            self.line("_sum", labels, Value::Float(sum));
            self.line("_count", labels, Value::Int(count));
        }
        self.fixed = fixed;
    }

    /// `<name><suffix>{<labels>} <value>`, without braces when there are no labels.
    fn line(&mut self, suffix: &str, labels: &str, value: Value) {
        self.out.push_str(self.family.name);
        self.out.push_str(suffix);
        if labels.is_empty() {
            self.out.push(' ');
        } else {
            self.out.push('{');
            self.out.push_str(labels);
            self.out.push_str("} ");
        }
        match value {
            Value::Int(n) => self.int(n),
            Value::Float(v) => self.float(v),
        }
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

    /// A number and the line's end.
    fn int(&mut self, n: u64) {
        self.out.push_str(self.ints.format(n));
        self.out.push('\n');
    }

    fn float(&mut self, v: f64) {
        self.out.push_str(match v {
            v if v.is_finite() => self.floats.format_finite(v),
            v if v.is_nan() => "NaN",
            v if v > 0.0 => "+Inf",
            _ => "-Inf",
        });
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
    fn a_histogram_without_labels_has_only_le() {
        let bounds = Bounds::new(&[0.5]);
        let (text, openmetrics) = both(|e| {
            e.family(&LATENCY);
            e.histogram(&[], &bounds, &[1, 1], 2.0);
        });
        assert_eq!(
            text.lines().skip(2).collect::<Vec<_>>(),
            [
                "demo_latency_seconds_bucket{le=\"0.5\"} 1",
                "demo_latency_seconds_bucket{le=\"+Inf\"} 2",
                "demo_latency_seconds_sum 2.0",
                "demo_latency_seconds_count 2",
            ]
        );
        assert_eq!(
            openmetrics.lines().skip(3).collect::<Vec<_>>(),
            [
                "demo_latency_seconds_sum 2.0",
                "demo_latency_seconds_count 2",
                "demo_latency_seconds_bucket{le=\"0.5\"} 1",
                "demo_latency_seconds_bucket{le=\"+Inf\"} 2",
                "# EOF",
            ]
        );
    }

    #[test]
    fn labels_rendered_beforehand_write_what_pairs_write() {
        let bounds = Bounds::new(&[0.5]);
        let (pairs, pairs_om) = both(|e| {
            e.family(&COUNTER);
            e.counter(&[("id", "a\"b"), ("x", "1")], 1);
            e.counter(&[("id", "a\"b"), ("x", "2")], 2);
            e.family(&LATENCY);
            e.histogram(&[("id", "a\"b"), ("x", "3")], &bounds, &[0, 1], 1.0);
        });
        let (rendered, rendered_om) = both(|e| {
            let mut labels = Labels::default();
            labels.start("id", "a\"b");
            e.family(&COUNTER);
            for (x, n) in [("1", 1), ("2", 2)] {
                e.counter_with(labels.with(&Labels::of(&[("x", x)])), n);
            }
            e.family(&LATENCY);
            let rest = Labels::of(&[("x", "3")]);
            e.histogram_with(labels.with(&rest), &bounds, &[0, 1], 1.0);
        });
        assert!(
            pairs.contains(r#"demo_requests_total{id="a\"b",x="2"} 2"#),
            "{pairs}"
        );
        assert_eq!(rendered, pairs);
        assert_eq!(rendered_om, pairs_om);
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
