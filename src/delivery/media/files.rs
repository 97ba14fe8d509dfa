//! The media files on disk: local names, MIME types, saving with a hash, pruning, base64.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::DAY_SECS;

/// The last component of a Windows (or POSIX) path, made safe as a local file name.
pub(crate) fn file_name(file_path: &str) -> String {
    let base = file_path
        .rsplit(['\\', '/'])
        .next()
        .unwrap_or_default()
        .trim();
    let cleaned: String = base
        .chars()
        .map(|c| {
            if c.is_control() || matches!(c, '<' | '>' | ':' | '"' | '|' | '?' | '*') {
                '_'
            } else {
                c
            }
        })
        .collect();
    let cleaned = cleaned.trim_matches(['.', ' ']).to_owned();
    if cleaned.is_empty() {
        "file".to_owned()
    } else {
        cleaned
    }
}

/// The MIME type of a file name's extension.
pub(crate) fn content_type(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, ext)| ext.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "bmp" => "image/bmp",
        "svg" => "image/svg+xml",
        "mp4" => "video/mp4",
        "mov" => "video/quicktime",
        "avi" => "video/x-msvideo",
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "m4a" => "audio/mp4",
        "amr" => "audio/amr",
        "silk" | "slk" => "audio/silk",
        "pdf" => "application/pdf",
        "txt" => "text/plain",
        "csv" => "text/csv",
        "doc" => "application/msword",
        "docx" => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "xls" => "application/vnd.ms-excel",
        "xlsx" => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "ppt" => "application/vnd.ms-powerpoint",
        "pptx" => "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        "zip" => "application/zip",
        _ => "application/octet-stream",
    }
}

/// Writes `bytes` to `dir/name`, or `dir/<stem>_1.<ext>`, `_2`, ... when the name is taken;
/// returns the path and the hex SHA-256.
#[allow(clippy::disallowed_methods, reason = "runs on tokio's blocking pool")]
pub(crate) fn save(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<(PathBuf, String)> {
    fs::create_dir_all(dir)?;
    let (stem, ext) = match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => (stem, Some(ext)),
        _ => (name, None),
    };
    for n in 0u32.. {
        let candidate = match (n, ext) {
            (0, _) => name.to_owned(),
            (n, Some(ext)) => format!("{stem}_{n}.{ext}"),
            (n, None) => format!("{stem}_{n}"),
        };
        let path = dir.join(candidate);
        // `create_new` makes the check and the creation one step, so two workers saving the
        // same name cannot overwrite each other.
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut file) => {
                file.write_all(bytes)?;
                file.sync_all()?;
                return Ok((path, sha256_hex(bytes)));
            }
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(err),
        }
    }
    Err(io::Error::other("no free file name"))
}

/// Hex SHA-256.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Deletes the files in `dir` last modified more than `retention_days` before `now`; returns
/// how many. Subdirectories and other entries are left alone.
#[allow(clippy::disallowed_methods, reason = "runs on tokio's blocking pool")]
pub(crate) fn prune_dir(dir: &Path, retention_days: u32, now: SystemTime) -> io::Result<u64> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(err) => return Err(err),
    };
    let keep = Duration::from_secs(u64::from(retention_days) * DAY_SECS);
    let Some(cutoff) = now.checked_sub(keep) else {
        return Ok(0);
    };
    let mut pruned = 0;
    for entry in entries.flatten() {
        let Ok(metadata) = entry.metadata() else {
            continue;
        };
        if !metadata.is_file() {
            continue;
        }
        if metadata.modified().is_ok_and(|modified| modified < cutoff)
            && fs::remove_file(entry.path()).is_ok()
        {
            pruned += 1;
        }
    }
    Ok(pruned)
}

/// Base64 (standard alphabet, padded).
pub(crate) fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
