//! Wires config, registry, monitor, supervisor, watcher, health reports and HTTP; owns shutdown.
//!
//! `run` serves a loaded config until the shutdown token fires; `builtin_loader` is the loader
//! of a config text that has no file (the demo's, tests').

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config, ConfigDiff, Loaded};
use crate::delivery::{Delivery, MediaSettings, Routing};
use crate::http::{self, AppState};
use crate::message::MessageSink;
use crate::metrics::process::ProcessCollector;
use crate::metrics::{Metrics, Registry};
use crate::monitor::{Monitor, StateCollector};
use crate::process::Processes;
use crate::process::collector::ProcessMetrics;
use crate::shutdown::Deadline;
use crate::supervisor::{ConfigLoader, Control, ReloadSource, ReplyRouter, Supervisor};

mod health_report;

use health_report::health_reports;
pub use health_report::write_atomically;

/// How long shutdown waits for tasks and connections.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// Process-level knobs from the command line.
#[derive(Clone)]
pub struct RunOptions {
    /// `--listen`, overriding `server.listen`.
    pub listen: Option<SocketAddr>,
    /// `--enable-lifecycle`.
    pub enable_lifecycle: bool,
    /// Shutdown grace period.
    pub grace: Duration,
    /// Watch the config file (off for built-in configs).
    pub watch: bool,
    /// Watch by scanning instead of filesystem events (`--watch poll`).
    pub watch_poll: bool,
    /// Where messages go instead of the default (embedding and tests).
    pub sink: Option<Arc<dyn MessageSink>>,
    /// `--web.config.file`, overriding `server.web_config_file`.
    pub web_config_file: Option<std::path::PathBuf>,
    /// The live log filter, swapped when `logging.level` changes on a reload. `None` when the
    /// level is fixed (a `--log-level` on the command line wins over the file).
    pub log_level: Option<crate::logging::LevelHandle>,
}

impl RunOptions {
    /// Defaults for a config file: no overrides, watch on.
    pub fn new() -> Self {
        Self {
            listen: None,
            enable_lifecycle: false,
            grace: DEFAULT_GRACE,
            watch: true,
            watch_poll: false,
            sink: None,
            log_level: None,
            web_config_file: None,
        }
    }
}

impl Default for RunOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// Why `run` failed at runtime (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The message store could not be opened.
    #[error("cannot open the message store: {0}")]
    Store(#[source] crate::delivery::StoreError),
    /// The web config file is invalid.
    #[error("{0}")]
    WebConfig(#[source] http::web_config::WebConfigError),
    /// The HTTP server failed.
    #[error("HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
    /// The platforms' HTTP client could not be built (no TLS backend).
    #[error("cannot build the platforms' HTTP client: {0}")]
    HttpClient(#[source] reqwest::Error),
}

/// What `run` reports once it is serving.
#[derive(Debug, Clone)]
pub struct Started {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
}

/// Serves `loaded` until `shutdown` fires. `on_started` is called once the socket is bound.
///
/// Three stages: `bind` (registry, monitor, web config, the socket), `wire` (delivery,
/// supervised processes, the supervisor and its config subscribers, the watcher) and `serve`
/// (the tasks, HTTP, and the stop). The stop has one `Deadline`, `grace` after it begins, that
/// the supervisor's actors, the deliveries and the HTTP drain share: however many of them
/// hang, the graceful part of the stop takes at most `grace` (the supervised processes are
/// stopped after it, each within its own `stop_timeout`).
pub async fn run(
    loaded: Loaded,
    loader: ConfigLoader,
    options: RunOptions,
    shutdown: CancellationToken,
    on_started: impl FnOnce(Started) + Send,
) -> Result<(), RunError> {
    let bound = bind(loaded, &options).await?;
    let wired = wire(bound, loader, &options).await?;
    serve(wired, &options, shutdown, on_started).await
}

/// What `bind` made: the recorder, the registry and the bound socket.
struct Bound {
    config: Arc<Config>,
    registry: Registry,
    process: Arc<ProcessCollector>,
    monitor: Arc<Monitor>,
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    web_config: Option<Arc<http::web_config::WebConfigHandle>>,
}

/// Stage 1: the registry and the monitor, the web config, then the socket (so a port in use
/// fails before anything is started).
async fn bind(loaded: Loaded, options: &RunOptions) -> Result<Bound, RunError> {
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
    let config = Arc::new(loaded.config);
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let process = Arc::new(ProcessCollector::new());
    // Prime the CPU sampler so the first `cpu_percent` is a real share, not 0.
    process.refresh();
    let monitor = Arc::new(Monitor::new(
        metrics,
        Arc::clone(&process),
        config.health.window,
    ));
    registry.register_collector(Box::new(Arc::clone(&process)));
    registry.register_source(Box::new(StateCollector::new(Arc::clone(&monitor))));
    registry.register_collector(Box::new(ProcessMetrics::new(
        Arc::clone(monitor.processes()),
        Arc::clone(&process),
    )));

    let addr = options.listen.unwrap_or(config.server.listen);
    let web_failures = prometheus_client::metrics::counter::Counter::default();
    registry.register(
        "wxauto_web_config_reload_failures",
        "Web config files that could not be applied (the previous one stayed active)",
        web_failures.clone(),
    );
    let web_config = match options
        .web_config_file
        .clone()
        .or_else(|| config.server.web_config_file.clone())
    {
        Some(path) => Some(
            http::web_config::WebConfigHandle::load(&path, web_failures, config.server.open_probes)
                .map_err(RunError::WebConfig)?,
        ),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Bind { addr, source })?;
    let addr = listener.local_addr().unwrap_or(addr);
    Ok(Bound {
        config,
        registry,
        process,
        monitor,
        listener,
        addr,
        web_config,
    })
}

/// What `wire` made: every part, connected, nothing but the watcher and delivery running yet.
struct Wired {
    bound: Bound,
    supervisor: Supervisor,
    control_tx: mpsc::Sender<Control>,
    control_rx: mpsc::Receiver<Control>,
    active_rx: watch::Receiver<Arc<Config>>,
    delivery: Option<Delivery>,
    delivery_stop: CancellationToken,
    processes: Processes,
    message_counts: Option<http::MessageCounts>,
    /// The supervisor and the background tasks (watcher, health reports, sampler).
    tasks: tokio_util::task::TaskTracker,
    background: CancellationToken,
    /// The one deadline of the stop.
    deadline: Deadline,
}

/// Stage 2: delivery (or the caller's sink), the supervised processes, the supervisor with
/// its config subscribers, and the watcher.
async fn wire(
    mut bound: Bound,
    loader: ConfigLoader,
    options: &RunOptions,
) -> Result<Wired, RunError> {
    let config = Arc::clone(&bound.config);
    let monitor = Arc::clone(&bound.monitor);
    let (control_tx, control_rx) = mpsc::channel(64);
    let (active_tx, active_rx) = watch::channel(Arc::clone(&config));
    let replies = Arc::new(ReplyRouter::default());
    let delivery_stop = CancellationToken::new();
    // One client (one connection pool) for every routing the platforms get, reloads included.
    let platform_http = platform_client().map_err(RunError::HttpClient)?;
    // A sink given by the caller (tests) replaces the store and the delivery workers.
    let (sink, delivery): (Arc<dyn MessageSink>, Option<Delivery>) = match &options.sink {
        Some(sink) => (Arc::clone(sink), None),
        None => {
            let delivery = start_delivery(
                &config,
                platform_http.clone(),
                Arc::clone(&replies),
                Arc::clone(&monitor),
                &mut bound.registry,
                delivery_stop.clone(),
            )
            .await?;
            (delivery.sink(), Some(delivery))
        }
    };
    // Supervised processes start in order before the listener, so a linked wxauto server is
    // on its way up when its instance is first polled.
    let processes = Processes::start(
        Arc::clone(monitor.processes()),
        Arc::clone(&bound.process),
        &config.processes,
    )
    .await;
    let deadline = Deadline::new(options.grace);
    let mut supervisor = Supervisor::new(
        Arc::clone(&config),
        loader,
        Arc::clone(&monitor),
        sink,
        replies,
        active_tx,
        control_tx.clone(),
        deadline.clone(),
    );

    if let Some(delivery) = &delivery {
        let delivery = delivery.clone();
        supervisor.subscribe(Box::new(move |config: &Arc<Config>, diff: &ConfigDiff| {
            if diff.rules_changed || diff.platforms_changed {
                delivery.swap_routing(Routing::new(
                    &config.rules,
                    &config.platforms,
                    platform_http.clone(),
                ));
            }
            if diff.delivery_changed {
                delivery.set_config(&config.delivery);
            }
            // Read live, like the retention days: the diff does not track it.
            delivery.set_media(MediaSettings::from_config(config));
            // Every configured instance (disabled ones too, like the monitor's series) has its
            // series from the start: the startup call has an empty diff.
            delivery.add_instances(config.instances.iter().map(|instance| instance.id.as_str()));
            for (id, change) in &diff.instances {
                if *change == config::InstanceChange::Removed {
                    delivery.remove_instance(id);
                }
            }
        }));
    }
    {
        let processes = processes.clone();
        supervisor.subscribe(Box::new(move |config: &Arc<Config>, _: &ConfigDiff| {
            processes.apply(config.processes.clone());
        }));
    }
    let message_counts: Option<http::MessageCounts> = delivery.clone().map(|delivery| {
        let counts: http::MessageCounts = Arc::new(move |chats: Vec<(String, String)>| {
            let delivery = delivery.clone();
            Box::pin(async move { delivery.message_counts(chats).await })
        });
        counts
    });

    // `logging.redact_chat_names` is read live by every log line that names a chat.
    supervisor.subscribe(Box::new(|config: &Arc<Config>, _: &ConfigDiff| {
        crate::logging::set_redact_chat_names(config.logging.redact_chat_names);
    }));
    if let Some(handle) = options.log_level.clone() {
        supervisor.subscribe(Box::new(move |config: &Arc<Config>, diff: &ConfigDiff| {
            if !diff.log_level_changed {
                return;
            }
            // The decoder validated the directive; a failure here would be a bug, so keep the
            // running filter and say so.
            match tracing_subscriber::EnvFilter::try_new(&config.logging.level) {
                Ok(filter) => {
                    if let Err(error) = handle.reload(filter) {
                        tracing::warn!("Cannot apply the new log level: {error}");
                    } else {
                        tracing::info!(level = %config.logging.level, "Log level changed.");
                    }
                }
                Err(error) => tracing::warn!("Cannot apply the new log level: {error}"),
            }
        }));
    }

    let tasks = tokio_util::task::TaskTracker::new();
    let background = CancellationToken::new();
    if options.watch
        && let Some(path) = config.path()
    {
        let reload = control_tx.clone();
        let on_change: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            // A full channel means a reload is queued already: dropping this one is fine.
            let _ = reload.try_send(Control::Reload {
                source: ReloadSource::Watcher,
                respond: None,
            });
        });
        let handle = config::watch::spawn(
            watched_files(path, &config),
            config::watch::WatchOptions {
                poll_only: options.watch_poll,
                ..config::watch::WatchOptions::default()
            },
            on_change.clone(),
            background.clone(),
        )
        .await;
        // The file may have changed between loading it and `spawn` hashing it, which no event
        // or poll would report: reload once. An unchanged file makes this an uncounted no-op.
        on_change();
        let path = path.to_owned();
        supervisor.subscribe(Box::new(move |config: &Arc<Config>, _: &ConfigDiff| {
            handle.set_files(watched_files(&path, config));
        }));
    }
    Ok(Wired {
        bound,
        supervisor,
        control_tx,
        control_rx,
        active_rx,
        delivery,
        delivery_stop,
        processes,
        message_counts,
        tasks,
        background,
        deadline,
    })
}

/// Stage 3: starts the supervisor, the background tasks, the signal listener and HTTP; once
/// `shutdown` fires, stops them all by one deadline.
async fn serve(
    wired: Wired,
    options: &RunOptions,
    shutdown: CancellationToken,
    on_started: impl FnOnce(Started) + Send,
) -> Result<(), RunError> {
    let Wired {
        bound,
        supervisor,
        control_tx,
        control_rx,
        active_rx,
        delivery,
        delivery_stop,
        processes,
        message_counts,
        tasks,
        background,
        deadline,
    } = wired;
    let Bound {
        config,
        registry,
        process,
        monitor,
        listener,
        addr,
        web_config,
    } = bound;
    let supervisor_stop = CancellationToken::new();
    let supervisor_task = tasks.spawn(supervisor.run(control_rx, supervisor_stop.clone()));
    tasks.spawn(health_reports(
        Arc::clone(&monitor),
        active_rx.clone(),
        message_counts.clone(),
        background.clone(),
    ));
    // The process sample readers get (/metrics, /api/v1/status, /api/v1/health), renewed off
    // the request path.
    tasks.spawn(Arc::clone(&process).refresh_every(background.clone()));
    let hangup = control_tx.clone();
    crate::shutdown::spawn(
        shutdown.clone(),
        Arc::new(move || {
            // Queued like before (waiting for room), without holding up the signal listener.
            let control = hangup.clone();
            tokio::spawn(async move {
                let _ = control
                    .send(Control::Reload {
                        source: ReloadSource::Signal,
                        respond: None,
                    })
                    .await;
            });
        }),
    );

    let ready = Arc::new(AtomicBool::new(true));
    let state = AppState {
        monitor: Arc::clone(&monitor),
        registry: Arc::new(registry),
        control: control_tx,
        config: active_rx,
        ready: Arc::clone(&ready),
        lifecycle_flag: options.enable_lifecycle,
        message_counts,
        delivery_counts: delivery.clone().map(|delivery| {
            let counts: http::DeliveryCounts = Arc::new(move || {
                let delivery = delivery.clone();
                Box::pin(async move { delivery.counts().await })
            });
            counts
        }),
        processes: processes.clone(),
        delivery: delivery.clone(),
    };
    tracing::info!(%addr, "Serving metrics and the monitor API.");
    on_started(Started { addr });
    let http_stop = CancellationToken::new();
    let server = tokio::spawn(http::serve(
        listener,
        http::router(state),
        http_stop.clone(),
        deadline.clone(),
        config.server.limits,
        web_config,
    ));

    shutdown.cancelled().await;
    tracing::info!("Shutting down.");
    // One clock for every stage below: each waits only for what is left of the grace.
    deadline.start();
    ready.store(false, Ordering::SeqCst);
    supervisor_stop.cancel();
    background.cancel();
    tasks.close();
    let mut clean = deadline.bound(tasks.wait()).await.is_some();
    if !clean {
        tracing::warn!("Shutdown grace period elapsed; stopping anyway.");
    }
    // The tracker empties as the supervisor's future ends, but tokio stores its answer a moment
    // later, on the worker that ran it: the handle is awaited (it is about to resolve), never
    // polled with `is_finished`, which raced and lost the clean-stop marker (seen under Wine).
    if clean {
        clean = supervisor_task.await.unwrap_or(false);
    }
    if let Some(delivery) = &delivery {
        // The actors have handed over what they held; let in-flight deliveries finish.
        delivery_stop.cancel();
        if deadline.bound(delivery.shutdown()).await.is_none() {
            tracing::warn!(
                "Deliveries did not finish within the grace period; they will resume at the next start."
            );
        }
        // Rows still in flight are not at risk (the next start queues them again); what the
        // marker vouches for is that nothing taken from an instance is missing from the store.
        if clean {
            match delivery.mark_clean_stop().await {
                Ok(()) => tracing::info!("Clean stop recorded."),
                Err(error) => tracing::warn!("Cannot record the clean stop: {error}"),
            }
        }
    }
    // Every supervised process group is stopped (signal, stop_timeout, kill) before exit.
    processes.shutdown().await;
    // HTTP drains until the same deadline (answers in flight; readiness already says no).
    http_stop.cancel();
    match server.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(RunError::Serve(error)),
        Err(_) => Ok(()),
    }
}

/// The config file plus the files it references (API key files).
fn watched_files(path: &std::path::Path, config: &Config) -> Vec<PathBuf> {
    let mut files = vec![path.to_owned()];
    files.extend(config.source.referenced_files.iter().cloned());
    files
}

/// The HTTP client platforms use (timeouts are per request, from each platform's config).
/// A failure is an error, not a fallback: `reqwest::Client::default()` would panic on it.
fn platform_client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .user_agent(concat!("wxauto-sidecar/", env!("CARGO_PKG_VERSION")))
        .build()
}

async fn start_delivery(
    config: &Config,
    http: reqwest::Client,
    replies: Arc<ReplyRouter>,
    monitor: Arc<Monitor>,
    registry: &mut Registry,
    cancel: CancellationToken,
) -> Result<Delivery, RunError> {
    let routing = Routing::new(&config.rules, &config.platforms, http);
    let delivery = Delivery::start(
        &config.storage,
        &config.delivery,
        MediaSettings::from_config(config),
        routing,
        replies,
        monitor,
        registry,
        cancel,
    )
    .await
    .map_err(RunError::Store)?;
    tracing::info!(path = %config.storage.path.display(), "Message store open.");
    Ok(delivery)
}

/// Builds a loader that decodes a fixed text with a fixed environment (demo and tests).
pub fn builtin_loader(text: String, env: Vec<(String, String)>) -> ConfigLoader {
    Box::new(move || {
        let lookup = |name: &str| {
            env.iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.clone())
        };
        config::decode(&text, None, &lookup)
    })
}
