//! Time as the documents show it: unix seconds, RFC 3339 and `1d 2h 3m 4s` uptimes.
//!
//! A leaf, shared by the monitor's reports, the supervised processes and the HTTP layer.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};

/// Unix seconds of a `SystemTime`.
pub fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs_f64())
        .unwrap_or(0.0)
}

/// RFC 3339 in UTC with milliseconds.
pub fn rfc3339(time: SystemTime) -> String {
    DateTime::<Utc>::from(time).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// RFC 3339 of unix seconds (negative ones are the epoch), as `rfc3339`.
pub fn rfc3339_of_seconds(seconds: f64) -> String {
    rfc3339(UNIX_EPOCH + Duration::from_secs_f64(seconds.max(0.0)))
}

/// `1d 2h 3m 4s`-style uptime, like the seed's `uptime_formatted`.
pub fn format_uptime(seconds: f64) -> String {
    let total = seconds.max(0.0) as u64;
    let (days, hours, minutes, secs) = (
        total / 86_400,
        total % 86_400 / 3600,
        total % 3600 / 60,
        total % 60,
    );
    if days > 0 {
        format!("{days}d {hours}h {minutes}m {secs}s")
    } else if hours > 0 {
        format!("{hours}h {minutes}m {secs}s")
    } else if minutes > 0 {
        format!("{minutes}m {secs}s")
    } else {
        format!("{secs}s")
    }
}
