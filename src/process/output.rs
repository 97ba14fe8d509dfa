//! A child's stdout and stderr, line by line, into the sidecar's log (never raw to the terminal),
//! counted per stream.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::Entry;

/// Lines longer than this are logged in pieces of this size.
const MAX_LINE: usize = 8 * 1024;

/// Which pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

/// Reads `pipe` until EOF (which comes when every process of the group closed it), logging each
/// line with the process name and stream. Invalid UTF-8 is replaced, not dropped.
pub(super) async fn forward(entry: Arc<Entry>, stream: Stream, mut pipe: impl AsyncRead + Unpin) {
    let mut line: Vec<u8> = Vec::with_capacity(256);
    let mut chunk = [0u8; 4096];
    loop {
        let read = match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        for byte in &chunk[..read] {
            if *byte == b'\n' {
                emit(&entry, stream, &line);
                line.clear();
            } else {
                line.push(*byte);
                if line.len() >= MAX_LINE {
                    emit(&entry, stream, &line);
                    line.clear();
                }
            }
        }
    }
    if !line.is_empty() {
        emit(&entry, stream, &line);
    }
}

fn emit(entry: &Entry, stream: Stream, line: &[u8]) {
    let line = String::from_utf8_lossy(line);
    let line = line.strip_suffix('\r').unwrap_or(&line);
    let counter = match stream {
        Stream::Stdout => &entry.stdout_lines,
        Stream::Stderr => &entry.stderr_lines,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    tracing::info!(
        target: "wxauto_sidecar::process::output",
        process = %entry.name,
        stream = stream.as_str(),
        "{line}"
    );
}
