//! The error vocabulary every layer shares: `Component`, `ErrorKind` and `ErrorSink`.
//!
//! A leaf, so the modules that report errors (`wxauto`, `delivery` and its platforms, the
//! listener) name them without depending on `monitor`, which records them (it implements
//! `ErrorSink`).

/// The seed's service name for the listener.
pub const SERVICE_NAME: &str = "message_listener";

/// Which part of the sidecar an error belongs to (the `component` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    /// The listener service itself (task crashes, sink failures).
    Listener,
    /// A wxauto instance client.
    Client,
    /// Message delivery to platforms and replies.
    Delivery,
    /// Configuration loading and reloading.
    Config,
}

impl Component {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Listener => "listener",
            Self::Client => "client",
            Self::Delivery => "delivery",
            Self::Config => "config",
        }
    }
}

/// The closed set of error kinds (the `kind` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorKind {
    /// A request timed out.
    Timeout,
    /// Could not connect.
    Connect,
    /// An unexpected HTTP status.
    HttpStatus,
    /// The envelope's `code` was not 0.
    ApiCode,
    /// The answer could not be decoded.
    Decode,
    /// The API key was rejected.
    Auth,
    /// A configuration reload failed.
    Reload,
    /// The message store failed.
    Storage,
    /// A supervised task panicked or failed.
    Task,
    /// WeChat itself is offline on an instance.
    Offline,
}

impl ErrorKind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Connect => "connect",
            Self::HttpStatus => "http_status",
            Self::ApiCode => "api_code",
            Self::Decode => "decode",
            Self::Auth => "auth",
            Self::Reload => "reload",
            Self::Storage => "storage",
            Self::Task => "task",
            Self::Offline => "offline",
        }
    }
}

impl Component {
    /// The seed's `service_name` for errors of this component.
    pub fn service_name(self) -> &'static str {
        match self {
            Self::Listener | Self::Client => SERVICE_NAME,
            Self::Delivery => "message_delivery",
            Self::Config => "config",
        }
    }
}

/// Where errors are reported (the monitor's error ring and `wxauto_errors_total`); delivery
/// takes one so that it can be tested without a monitor.
pub trait ErrorSink: Send + Sync {
    /// Records one error; `message` never contains a secret.
    fn record_error(
        &self,
        component: Component,
        kind: ErrorKind,
        instance_id: Option<&str>,
        message: &str,
    );
}
