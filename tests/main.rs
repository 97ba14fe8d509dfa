//! The one integration-test binary: real simulators and the real sidecar on loopback.

mod util;

mod binary;
mod delivery;
mod http;
mod import_mgt;
mod listener;
mod logging;
mod media;
#[cfg(target_os = "linux")]
mod processes;
mod recovery;
mod reload;
mod security;
mod status_page;
mod tidy;
