//! The log filter of `logging.level` and `--log-level`: `tracing` directives, checked so that a
//! typo is an error instead of a filter that switches every log line off.
//!
//! `tracing_subscriber::EnvFilter` reads a bare word that is not a level as a target name
//! (`warnn` enables target `warnn` and nothing else), so a bare directive must be a level here.

use tracing_subscriber::EnvFilter;

/// The level names a directive without `=` may be (in any case).
pub const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Checks a comma-separated list of directives, each a level name or `target=level` (with
/// `tracing`'s span and field filters), and answers it as the logger takes it: without the
/// blanks around directives, which `EnvFilter` would misread (`info, a=debug`). The error names
/// the first bad directive and the allowed forms.
pub fn parse_log_filter(text: &str) -> Result<String, String> {
    let mut directives = Vec::new();
    for directive in text.split(',').map(str::trim) {
        if directive.is_empty() {
            continue;
        }
        if is_bare(directive)
            && !LOG_LEVELS
                .iter()
                .any(|level| level.eq_ignore_ascii_case(directive))
        {
            return Err(format!(
                "unknown log level {directive:?}; expected one of {}, or target=level \
                 (e.g. info,wxauto_sidecar=debug)",
                LOG_LEVELS.join(", ")
            ));
        }
        directives.push(directive);
    }
    let filter = directives.join(",");
    match EnvFilter::try_new(&filter) {
        Ok(_) => Ok(filter),
        Err(error) => Err(format!("invalid log filter {text:?}: {error}")),
    }
}

/// Whether a directive names no level: no `=` after its span filter (`target[span{f=v}]`).
fn is_bare(directive: &str) -> bool {
    let after_span = directive
        .rfind(']')
        .map_or(directive, |at| &directive[at..]);
    !after_span.contains('=')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_directives_must_be_level_names() {
        for good in [
            "info",
            "WARN",
            "Debug",
            "off",
            "info,wxauto_sidecar=debug",
            "wxauto_sidecar=trace, warn",
            "hyper=off,error",
            "[listener{instance_id=wx1}]=debug",
            "wxauto_sidecar=",
        ] {
            assert!(parse_log_filter(good).is_ok(), "{good}");
        }
        assert_eq!(
            parse_log_filter(" info , wxauto_sidecar=debug,,").as_deref(),
            Ok("info,wxauto_sidecar=debug")
        );
        for (bad, named) in [
            ("warnn", "\"warnn\""),
            ("bogus", "\"bogus\""),
            ("info,wxauto_sidecar", "\"wxauto_sidecar\""),
            ("3", "\"3\""),
            ("warning", "\"warning\""),
            ("wxauto_sidecar[listener]", "\"wxauto_sidecar[listener]\""),
        ] {
            let error = parse_log_filter(bad).expect_err(bad);
            assert!(error.contains(named), "{bad}: {error}");
            assert!(
                error.contains("trace, debug, info, warn, error, off")
                    && error.contains("target=level"),
                "{error}"
            );
        }
        // What `EnvFilter` itself refuses is still refused, with its reason.
        let error = parse_log_filter("a=b=c").unwrap_err();
        assert!(error.starts_with("invalid log filter \"a=b=c\""), "{error}");
    }
}
