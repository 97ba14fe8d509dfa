//! The periodic health report: the health document written atomically to
//! `health.report_file`, and one summary line in the log.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::http;
use crate::monitor::{Monitor, report};

/// The periodic health check: write the report file atomically and log one summary line.
pub(super) async fn health_reports(
    monitor: Arc<Monitor>,
    config: watch::Receiver<Arc<Config>>,
    message_counts: Option<http::MessageCounts>,
    cancel: CancellationToken,
) {
    loop {
        let (interval, path) = {
            let config = config.borrow();
            (
                config.health.report_interval,
                config.health.report_file.clone(),
            )
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        // The same document as GET /api/v1/health, store counts included.
        let snap = monitor.snapshot();
        let counts = http::store_counts(message_counts.as_ref(), &snap).await;
        let document = monitor.health_document(&snap, &counts);
        tracing::info!(
            score = snap.health.score,
            status = snap.health.status.as_str(),
            lost = %report::lost_points(&snap),
            "Health check."
        );
        let result = tokio::task::spawn_blocking(move || write_atomically(&path, &document)).await;
        if let Ok(Err(error)) = result {
            tracing::warn!("Cannot write the health report: {error}");
        }
    }
}

/// Writes JSON to a temp file beside `path`, then renames it over `path`.
#[allow(
    clippy::disallowed_methods,
    reason = "runs on tokio's blocking pool (the report writer) or at start"
)]
pub fn write_atomically(
    path: &std::path::Path,
    document: &serde_json::Value,
) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let text = serde_json::to_vec_pretty(document).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}
