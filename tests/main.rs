//! The one integration-test binary: real simulators and the real sidecar on loopback.

mod util;

mod binary;
mod cli;
mod consistency;
mod delivery;
mod http;
mod listener;
mod media;
mod reload;
mod security;
mod tidy;
