//! The one integration-test binary: real simulators and the real sidecar on loopback.

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
mod status_page;
mod tidy;
