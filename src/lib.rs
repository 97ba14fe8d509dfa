//! wxauto-sidecar: a supervised wxauto message listener with metrics and a monitor API.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod message;
pub mod monitor;
pub mod secret;
