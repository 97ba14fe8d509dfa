//! wxauto-sidecar: a supervised wxauto message listener with metrics and a monitor API.
//!
//! # Code map
//!
//! Every module, roughly bottom-up (ARCHITECTURE.md has the invariants; `tests/tidy.rs` checks
//! that each `pub mod` below is listed here):
//!
//! - `secret`: `Secret`, redaction of every registered secret from text.
//! - `backoff`: jittered exponential backoff.
//! - `event`: the error vocabulary (`Component`, `ErrorKind`, the `ErrorSink` trait).
//! - `clock`: unix seconds, RFC 3339 and uptime texts.
//! - `config`: YAML → validated `Config` (`decode/`), config diffs, the file watcher.
//! - `message`: the seam between listener and delivery (`InboundMessage`, `MessageSink`,
//!   `ReplySender`).
//! - `metrics`: the Prometheus registry, event-driven families, process sampling.
//! - `wxauto`: the typed client of one wxauto HTTP API server.
//! - `process`: supervised external programs (`processes:`).
//! - `monitor`: the one recorder (errors, counters, windows, live state), health score, JSON.
//! - `listener`: one actor per instance (connectivity and its schedule, chat table, draining,
//!   recovery).
//! - `delivery`: the SQLite queue, rules, platforms, workers and media.
//! - `supervisor`: the control loop that owns every actor; `ReplyRouter`.
//! - `http`: the endpoints, the accept loop, the web config, the status page.
//! - `logging`: stderr and daily log files, text or JSON.
//! - `shutdown`: signals (graceful stop, abort, SIGHUP reload); the one stop `Deadline`.
//! - `app`: wiring of all of the above (bind → wire → serve); owns shutdown.
//! - `cli`: the `health` command and `HttpAccess` (TLS and basic auth for `health`, `dead`).
//! - `dead_cli`: the `dead` command (dead letters of a running sidecar).
//! - `import_mgt`: WXAUTO-MGT database → config.
//! - `service`: the Windows service mode.
//! - `simulator`: a fake wxauto server (`simulate`, tests) and the `demo` instances.
// No unsafe code, except on Windows: the Win32 Job Object calls in `process/windows.rs`, and the
// callback windows-service's `define_windows_service!` expands to in `service::scm`.
#![cfg_attr(not(windows), forbid(unsafe_code))]
#![cfg_attr(windows, deny(unsafe_code))]
#![warn(missing_docs)]
// Tests read and write their fixtures with std::fs (clippy.toml guards the async code).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub mod app;
pub mod backoff;
pub mod cli;
pub mod clock;
pub mod config;
pub mod dead_cli;
pub mod delivery;
pub mod event;
pub mod http;
pub mod import_mgt;
pub mod listener;
pub mod logging;
pub mod message;
pub mod metrics;
pub mod monitor;
pub mod process;
pub mod secret;
pub mod service;
pub mod shutdown;
pub mod simulator;
pub mod supervisor;
pub mod wxauto;
