//! The one integration-test binary: real simulators and the real sidecar on loopback.

// Tests set up files with std::fs; clippy.toml's guard is for the async code of the crate.
#![allow(clippy::disallowed_methods)]
// Some helpers serve only the unix-only tests (signals, process groups); on Windows they are unused.
#![cfg_attr(not(unix), allow(dead_code, unused_imports))]

mod util;

mod binary;
mod cli;
mod config_notifier_integration;
mod consistency;
mod delivery;
mod fuzz_decoders;
mod http;
mod import_mgt;
mod listener;
mod logging;
mod media;
mod message_listener_health;
#[cfg(target_os = "linux")]
mod processes;
mod recovery;
mod reload;
mod security;
mod service_monitor;
mod shutdown;
mod status_page;
mod tidy;
