//! The `wxauto-sidecar` binary: parses the command line, sets up logging, maps exit codes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use wxauto_sidecar::app::{self, RunOptions};
use wxauto_sidecar::cli;
use wxauto_sidecar::config;
use wxauto_sidecar::dead_cli::{self, DeadAction};
use wxauto_sidecar::import_mgt::ImportOptions;
use wxauto_sidecar::logging;
use wxauto_sidecar::simulator::{ApiGeneration, SimConfig, Simulator};

use wxauto_sidecar::cli::{EXIT_CONFIG, EXIT_RUNTIME, EXIT_USAGE};

#[derive(Parser, Debug)]
#[command(
    name = "wxauto-sidecar",
    version,
    about = "Supervised wxauto message listener with Prometheus metrics, a health score and a JSON monitor API",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the sidecar (the default).
    Run(RunArgs),
    /// Simulated wxauto instances plus the sidecar, no config needed.
    Demo {
        /// Listen address of the sidecar.
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
    },
    /// Validate a config file, and its web config file when one is set: exit 0 if valid, else
    /// print every error and exit 1.
    CheckConfig {
        /// The config file.
        #[arg(long, env = "WXAUTO_SIDECAR_CONFIG", value_name = "FILE")]
        config: PathBuf,
        /// Check syntax, types and references without resolving secrets: the environment
        /// variables and key files the config names are not read, nor the certificate, key
        /// and CA files of the web config (for CI).
        #[arg(long)]
        no_secrets: bool,
        /// Web config file to check (overrides `server.web_config_file`, as for `run`).
        #[arg(long = "web.config.file", value_name = "FILE")]
        web_config_file: Option<PathBuf>,
    },
    /// Windows only: install, uninstall or run the sidecar as a Windows service.
    Service {
        #[command(subcommand)]
        action: ServiceAction,
    },
    /// Query a running sidecar: exit 0 healthy, 1 warning, 2 critical or unreachable.
    Health {
        /// Base URL of the sidecar.
        #[arg(long, default_value = "http://127.0.0.1:8907")]
        url: String,
        /// PEM file of the CA that signed the sidecar's certificate (for an https URL).
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
        /// Basic-auth user.
        #[arg(long, requires = "password_file")]
        user: Option<String>,
        /// File holding the basic-auth password (one line).
        #[arg(long, value_name = "FILE", requires = "user")]
        password_file: Option<PathBuf>,
    },
    /// Dead letters of a running sidecar: list them, queue them again, or delete them
    /// (retry and purge need lifecycle enabled).
    Dead {
        /// `list`, `retry` or `purge`.
        #[arg(value_enum)]
        action: DeadCommand,
        /// Base URL of the sidecar.
        #[arg(long, default_value = "http://127.0.0.1:8907")]
        url: String,
        /// Only these dead letters (the ids `dead list` shows); repeatable. Default: all.
        #[arg(long = "id", value_name = "ID")]
        ids: Vec<i64>,
        /// At most this many in a list (1 to 1000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=1000))]
        limit: u16,
        /// PEM file of the CA that signed the sidecar's certificate (for an https URL).
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
        /// Basic-auth user.
        #[arg(long, requires = "password_file")]
        user: Option<String>,
        /// File holding the basic-auth password (one line).
        #[arg(long, value_name = "FILE", requires = "user")]
        password_file: Option<PathBuf>,
    },
    /// A standalone wxauto HTTP API simulator.
    Simulate {
        /// Listen address.
        #[arg(long, value_name = "ADDR")]
        listen: SocketAddr,
        /// The API key the simulator accepts.
        #[arg(long, env = "WXAUTO_SIM_API_KEY", default_value = "test-key-2")]
        api_key: String,
        /// Fail about 20% of the calls.
        #[arg(long)]
        flaky: bool,
        /// Inject a random message this often (0 = never), e.g. `2s`.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        chatter: std::time::Duration,
        /// Which body key listen/add and listen/remove read: `who` (servers before mid-2025)
        /// or `nickname` (current ones).
        #[arg(long, value_enum, default_value = "nickname")]
        api_generation: SimGeneration,
        /// Do not serve `GET /api/chat/get-all-messages` (like some older servers).
        #[arg(long)]
        no_history: bool,
        /// How long destructive reads take to answer after taking the messages, e.g. `300ms`.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        read_latency: std::time::Duration,
    },
    /// Write a sidecar config (and optionally a secrets file) from a WXAUTO-MGT database.
    ImportMgt {
        /// The WXAUTO-MGT database.
        #[arg(long, value_name = "FILE", default_value = "data/wxauto_mgt.db")]
        db: PathBuf,
        /// Write the config here instead of to stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Write the secrets as NAME=value lines here (mode 0600 on unix).
        #[arg(long, value_name = "FILE")]
        secrets_file: Option<PathBuf>,
        /// Overwrite existing --out and --secrets-file files.
        #[arg(long)]
        force: bool,
    },
}

/// `dead` actions.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DeadCommand {
    /// Print the dead letters.
    List,
    /// Queue them for another delivery (rules, platform, reply).
    Retry,
    /// Delete them.
    Purge,
}

/// `simulate --api-generation`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum SimGeneration {
    /// `{"who": ...}`.
    Who,
    /// `{"nickname": ...}`.
    Nickname,
}

#[derive(Subcommand, Debug)]
enum ServiceAction {
    /// Register the service (run elevated); it starts `service run` with this config.
    Install {
        /// The config file (stored as an absolute path in the service's command line).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Service name.
        #[arg(long, default_value = "wxauto-sidecar")]
        name: String,
        /// Start the service at boot instead of on demand.
        #[arg(long)]
        auto_start: bool,
    },
    /// Stop (if running) and remove the service.
    Uninstall {
        /// Service name.
        #[arg(long, default_value = "wxauto-sidecar")]
        name: String,
    },
    /// What the Service Control Manager starts; not for interactive use.
    Run {
        /// The config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Service name (must match the installed one).
        #[arg(long, default_value = "wxauto-sidecar")]
        name: String,
    },
}

#[derive(Args, Debug, Default)]
struct RunArgs {
    /// The YAML config file.
    #[arg(long, env = "WXAUTO_SIDECAR_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Listen address (overrides `server.listen`).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Log filter (overrides `logging.level`): a level (trace, debug, info, warn, error, off)
    /// or `target=level` directives, comma-separated, e.g. `info,wxauto_sidecar=debug`.
    // Checked here: a typo is a usage error (exit 64), never a filter that logs nothing.
    #[arg(long, value_name = "LEVEL", value_parser = config::parse_log_filter)]
    log_level: Option<String>,
    /// Allow POST /-/reload, /api/v1/reload and /api/v1/restart.
    #[arg(long)]
    enable_lifecycle: bool,
    /// Web config file (TLS, basic auth, headers; overrides `server.web_config_file`).
    #[arg(long = "web.config.file", value_name = "FILE")]
    web_config_file: Option<PathBuf>,
    /// How to watch the config file: `native` filesystem events (with a scan fallback), or
    /// `poll` (scan every 2 s) for network drives, WSL paths and filesystems without events.
    #[arg(long, value_enum, default_value_t = WatchMode::Native)]
    watch: WatchMode,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
enum WatchMode {
    #[default]
    Native,
    Poll,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            // `--help` and `--version` arrive here too, and are not errors.
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // reqwest is built without a default crypto provider; install ring before any client.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("wxauto-sidecar: cannot start the async runtime: {error}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    match cli.command {
        None => exit(runtime.block_on(run(cli.run, CancellationToken::new()))),
        Some(Command::Run(args)) => exit(runtime.block_on(run(args, CancellationToken::new()))),
        Some(Command::Demo { listen }) => runtime.block_on(demo(listen)),
        Some(Command::CheckConfig {
            config,
            no_secrets,
            web_config_file,
        }) => ExitCode::from(cli::check_config(&config, no_secrets, web_config_file)),
        Some(Command::Service { action }) => service(action),
        Some(Command::Health {
            url,
            ca_file,
            user,
            password_file,
        }) => {
            let access = cli::HttpAccess {
                ca_file,
                user,
                password_file,
            };
            let code = runtime.block_on(cli::health_command_with(&url, &access));
            ExitCode::from(u8::try_from(code).unwrap_or(EXIT_RUNTIME))
        }
        Some(Command::Dead {
            action,
            url,
            ids,
            limit,
            ca_file,
            user,
            password_file,
        }) => {
            let access = cli::HttpAccess {
                ca_file,
                user,
                password_file,
            };
            let action = match action {
                DeadCommand::List => DeadAction::List,
                DeadCommand::Retry => DeadAction::Retry,
                DeadCommand::Purge => DeadAction::Purge,
            };
            let code = runtime.block_on(dead_cli::run(
                &url,
                &access,
                action,
                &ids,
                usize::from(limit),
            ));
            ExitCode::from(u8::try_from(code).unwrap_or(EXIT_RUNTIME))
        }
        Some(Command::Simulate {
            listen,
            api_key,
            flaky,
            chatter,
            api_generation,
            no_history,
            read_latency,
        }) => {
            let config = SimConfig {
                api_key,
                name: "sim".to_owned(),
                flaky,
                api_generation: match api_generation {
                    SimGeneration::Who => ApiGeneration::Who,
                    SimGeneration::Nickname => ApiGeneration::Nickname,
                },
                history: !no_history,
                read_latency,
            };
            runtime.block_on(simulate(listen, config, chatter))
        }
        Some(Command::ImportMgt {
            db,
            out,
            secrets_file,
            force,
        }) => ExitCode::from(cli::import_mgt(&ImportOptions {
            db,
            out,
            secrets_file,
            force,
        })),
    }
}

#[cfg(not(windows))]
fn service(action: ServiceAction) -> ExitCode {
    let _ = action;
    eprintln!(
        "wxauto-sidecar: `service` is Windows only (it registers with the Windows Service \
         Control Manager); on Linux use the systemd unit in deploy/systemd/"
    );
    ExitCode::from(EXIT_USAGE)
}

#[cfg(windows)]
fn service(action: ServiceAction) -> ExitCode {
    use wxauto_sidecar::service as win;
    let result = match action {
        ServiceAction::Install {
            config,
            name,
            auto_start,
        } => win::install(&name, &config, auto_start).map(|()| {
            println!("installed service {name}; start it with `sc start {name}`");
        }),
        ServiceAction::Uninstall { name } => win::uninstall(&name).map(|()| {
            println!("removed service {name}");
        }),
        ServiceAction::Run { config, name } => {
            win::run_dispatcher(&name, config, Box::new(run_as_service))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("wxauto-sidecar: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

/// The sidecar as the service runs it: `run --config <path>`, stopping when `shutdown` fires
/// (the SCM's stop or shutdown request). Returns the process exit code. A service has no
/// console: what `run` would print on a failure goes to `service::FAILURE_FILE` beside the
/// config, and a failure file from an earlier run is removed first.
#[cfg(windows)]
fn run_as_service(config: PathBuf, shutdown: CancellationToken) -> u8 {
    use wxauto_sidecar::service as win;
    let _ = win::clear_failure(&config);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => {
            let args = RunArgs {
                config: Some(config.clone()),
                ..RunArgs::default()
            };
            runtime.block_on(run(args, shutdown))
        }
        Err(error) => Err(Failure::runtime(format!(
            "wxauto-sidecar: cannot start the async runtime: {error}"
        ))),
    };
    match result {
        Ok(()) => 0,
        Err(failure) => {
            let _ = win::record_failure(&config, failure.code, &failure.message);
            failure.code
        }
    }
}

/// Why a run ended with a failure: the exit code and what to tell the operator (printed to
/// stderr in a console; written to the failure file by the Windows service).
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn config(message: String) -> Self {
        Self {
            code: EXIT_CONFIG,
            message,
        }
    }

    fn runtime(message: String) -> Self {
        Self {
            code: EXIT_RUNTIME,
            message,
        }
    }
}

/// The console's end of a run: a failure is printed to stderr and becomes the exit code.
fn exit(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("{}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

/// Runs the sidecar until a signal or `shutdown` (the Windows service's stop) ends it.
async fn run(args: RunArgs, shutdown: CancellationToken) -> Result<(), Failure> {
    let Some(path) = args.config.clone() else {
        return Err(Failure::config(
            "wxauto-sidecar: no configuration: pass --config FILE or set WXAUTO_SIDECAR_CONFIG (or try `wxauto-sidecar demo`)"
                .to_owned(),
        ));
    };
    let loaded = match config::load_file(&path) {
        Ok(loaded) => loaded,
        Err(errors) => {
            return Err(Failure::config(format!(
                "{errors}\nwxauto-sidecar: invalid configuration ({} error(s))",
                errors.errors.len()
            )));
        }
    };
    let level = args
        .log_level
        .clone()
        .unwrap_or_else(|| loaded.config.logging.level.clone());
    let guard = match logging::init(&level, Some(&loaded.config.logging)) {
        Ok(guard) => guard,
        Err(error) => {
            return Err(Failure::runtime(format!(
                "wxauto-sidecar: cannot open the log directory {}: {error}",
                loaded.config.logging.dir.display()
            )));
        }
    };
    let loader_path = path.clone();
    let loader = Box::new(move || config::load_file(&loader_path));
    let options = RunOptions {
        listen: args.listen,
        enable_lifecycle: args.enable_lifecycle,
        web_config_file: args.web_config_file,
        watch_poll: args.watch == WatchMode::Poll,
        // `--log-level` wins over the file, on reloads too.
        log_level: args.log_level.is_none().then(|| guard.level.clone()),
        ..RunOptions::new()
    };
    let result = serve(loaded, loader, options, shutdown).await;
    drop(guard);
    result
}

async fn serve(
    loaded: config::Loaded,
    loader: wxauto_sidecar::supervisor::ConfigLoader,
    options: RunOptions,
    shutdown: CancellationToken,
) -> Result<(), Failure> {
    app::run(loaded, loader, options, shutdown, |_| {})
        .await
        .map_err(|error| Failure::runtime(format!("wxauto-sidecar: {error}")))
}

async fn demo(listen: Option<SocketAddr>) -> ExitCode {
    let cancel = CancellationToken::new();
    eprintln!("wxauto-sidecar demo: starting three simulated wxauto instances");
    let (text, env) = match wxauto_sidecar::simulator::demo::start_instances(&cancel).await {
        Ok(demo) => demo,
        Err(error) => {
            eprintln!("wxauto-sidecar: cannot start the simulators: {error}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let loader = app::builtin_loader(text, env);
    let loaded = match loader() {
        Ok(loaded) => loaded,
        Err(errors) => {
            eprintln!("wxauto-sidecar: the built-in demo config is invalid (a bug):\n{errors}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let _guard = match logging::init("info", Some(&loaded.config.logging)) {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("wxauto-sidecar: cannot open the log directory: {error}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let addr = listen.unwrap_or(loaded.config.server.listen);
    eprintln!("  sidecar metrics  http://{addr}/metrics");
    eprintln!("  monitor API      http://{addr}/api/v1/health");
    eprintln!("  status page      http://{addr}/");
    eprintln!(
        "  lifecycle        ENABLED for the demo: anyone who reaches {addr} may POST /-/reload, /api/v1/reload and /api/v1/restart"
    );
    let options = RunOptions {
        listen,
        enable_lifecycle: true,
        watch: false,
        ..RunOptions::new()
    };
    let result = serve(loaded, loader, options, CancellationToken::new()).await;
    cancel.cancel();
    exit(result)
}

async fn simulate(listen: SocketAddr, config: SimConfig, chatter: std::time::Duration) -> ExitCode {
    let _guard = logging::init("info", None);
    let generation = config.api_generation.key();
    let simulator = Simulator::new(config);
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("wxauto-sidecar: cannot listen on {listen}: {error}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let cancel = CancellationToken::new();
    if !chatter.is_zero() {
        simulator.spawn_chatter(chatter, cancel.clone());
    }
    eprintln!(
        "wxauto simulator on http://{listen} (listen/add reads {generation:?}; control surface \
         under /_sim/)"
    );
    let stop = cancel.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    match simulator.serve(listener, cancel).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("wxauto-sidecar: simulator failed: {error}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}
