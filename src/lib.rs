//! wxauto-sidecar: a supervised wxauto message listener with metrics and a monitor API.
//!
//! Code map (see ARCHITECTURE.md): `config` (YAML → validated `Config`, watcher), `wxauto`
//! (the upstream client), `listener` (one actor per instance), `supervisor` (the control loop),
//! `monitor` (errors, counters, health score, JSON documents), `metrics` (Prometheus registry),
//! `http` (endpoints), `dead_cli` (the `dead` command), `import_mgt` (WXAUTO-MGT database →
//! config), `process` (supervised external programs), `service` (Windows service mode),
//! `simulator` (a fake wxauto server), `app` (wiring), `logging`, `shutdown`.
// No unsafe code, except on Windows: the Win32 Job Object calls in `process/windows.rs`, and the
// callback windows-service's `define_windows_service!` expands to in `service::scm`.
#![cfg_attr(not(windows), forbid(unsafe_code))]
#![cfg_attr(windows, deny(unsafe_code))]
#![warn(missing_docs)]

pub mod app;
pub mod backoff;
pub mod config;
pub mod dead_cli;
pub mod delivery;
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
