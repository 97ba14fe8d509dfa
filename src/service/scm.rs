//! The Service Control Manager side of the service mode (Windows only): install, uninstall, and
//! the dispatcher that runs the sidecar as a service and reports its state to the SCM.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use windows_service::service::{
    ServiceAccess, ServiceControl, ServiceControlAccept, ServiceErrorControl, ServiceExitCode,
    ServiceInfo, ServiceStartType, ServiceState, ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};

use super::{
    Request, Response, STOP_WAIT_HINT, ServiceBody, ServiceError, absolute_config,
    launch_arguments, record_failure, record_panics, respond, working_dir,
};

const SERVICE_TYPE: ServiceType = ServiceType::OWN_PROCESS;

/// `ERROR_FAILED_SERVICE_CONTROLLER_CONNECT`: the process was not started by the SCM.
const NOT_STARTED_BY_SCM: i32 = 1063;

/// What `service_main` needs; the dispatcher's callback is a plain function, so it is handed
/// over through this slot (set once, taken once).
struct Launch {
    name: String,
    config: PathBuf,
    body: ServiceBody,
}

static LAUNCH: Mutex<Option<Launch>> = Mutex::new(None);
/// The sidecar's exit code, or why the service could not run, for `run_dispatcher` to return.
static OUTCOME: Mutex<Option<Result<u8, ServiceError>>> = Mutex::new(None);

/// What the service thread waits for.
enum Event {
    StopRequested,
    Finished(u8),
}

fn scm(action: &'static str) -> impl FnOnce(windows_service::Error) -> ServiceError {
    move |source| ServiceError::Scm { action, source }
}

/// Registers the service: the SCM will start this executable as `service run --config <abs>`.
pub fn install(name: &str, config: &Path, auto_start: bool) -> Result<(), ServiceError> {
    let config = absolute_config(config)?;
    let executable = std::env::current_exe().map_err(|source| ServiceError::Config {
        path: PathBuf::from("<current executable>"),
        source,
    })?;
    let manager = ServiceManager::local_computer(
        None::<&str>,
        ServiceManagerAccess::CONNECT | ServiceManagerAccess::CREATE_SERVICE,
    )
    .map_err(scm(
        "connect to the Service Control Manager (run as Administrator)",
    ))?;
    let info = ServiceInfo {
        name: name.into(),
        display_name: name.into(),
        service_type: SERVICE_TYPE,
        start_type: if auto_start {
            ServiceStartType::AutoStart
        } else {
            ServiceStartType::OnDemand
        },
        error_control: ServiceErrorControl::Normal,
        executable_path: executable,
        launch_arguments: launch_arguments(name, &config),
        dependencies: Vec::new(),
        // LocalSystem; README shows how to change the account.
        account_name: None,
        account_password: None,
    };
    let service = manager
        .create_service(&info, ServiceAccess::CHANGE_CONFIG)
        .map_err(scm("create the service"))?;
    service
        .set_description(format!(
            "wxauto-sidecar: supervised wxauto listener, metrics and monitor API ({})",
            config.display()
        ))
        .map_err(scm("set the service description"))?;
    Ok(())
}

/// Stops the service if it runs (waiting up to the stop hint), then deletes it.
pub fn uninstall(name: &str) -> Result<(), ServiceError> {
    let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)
        .map_err(scm(
            "connect to the Service Control Manager (run as Administrator)",
        ))?;
    let service = manager
        .open_service(
            name,
            ServiceAccess::QUERY_STATUS | ServiceAccess::STOP | ServiceAccess::DELETE,
        )
        .map_err(scm("open the service"))?;
    let status = service.query_status().map_err(scm("query the service"))?;
    if status.current_state != ServiceState::Stopped {
        service.stop().map_err(scm("stop the service"))?;
        let deadline = Instant::now() + STOP_WAIT_HINT;
        while Instant::now() < deadline {
            let state = service
                .query_status()
                .map_err(scm("query the service"))?
                .current_state;
            if state == ServiceState::Stopped {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    service.delete().map_err(scm("delete the service"))?;
    Ok(())
}

/// `service run`: connects to the SCM and runs `body` as the service `name` until it stops.
/// The working directory becomes the config's directory (relative `data/` paths land there).
pub fn run_dispatcher(name: &str, config: PathBuf, body: ServiceBody) -> Result<(), ServiceError> {
    let config = absolute_config(&config)?;
    if let Some(dir) = working_dir(&config) {
        std::env::set_current_dir(dir).map_err(|source| ServiceError::Config {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    *lock(&LAUNCH) = Some(Launch {
        name: name.to_owned(),
        config,
        body,
    });
    if let Err(error) = entry::start(name) {
        let not_scm = matches!(
            &error,
            windows_service::Error::Winapi(io) if io.raw_os_error() == Some(NOT_STARTED_BY_SCM)
        );
        return Err(if not_scm {
            ServiceError::NotAService
        } else {
            ServiceError::Scm {
                action: "start the service dispatcher",
                source: error,
            }
        });
    }
    match lock(&OUTCOME).take() {
        Some(Ok(0)) | None => Ok(()),
        Some(Ok(code)) => Err(ServiceError::Exited(code)),
        Some(Err(error)) => Err(error),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

// The macro's extern "system" callback contains the one unsafe block of this crate (parsing the
// SCM's argument vector), inside windows-service.
#[allow(unsafe_code)]
mod entry {
    windows_service::define_windows_service!(ffi_service_main, service_main);

    fn service_main(_arguments: Vec<std::ffi::OsString>) {
        super::service_main();
    }

    /// Blocks until the service stopped; fails at once when not started by the SCM.
    pub(super) fn start(name: &str) -> windows_service::Result<()> {
        windows_service::service_dispatcher::start(name, ffi_service_main)
    }
}

/// The service thread: register the control handler, report Running, run the sidecar on its
/// own thread, report StopPending on a stop request and Stopped with the exit code at the end.
fn service_main() {
    let Some(launch) = lock(&LAUNCH).take() else {
        return;
    };
    // A service's stderr goes nowhere: panics go to the failure file beside the config.
    record_panics(&launch.config);
    let outcome = serve(launch);
    *lock(&OUTCOME) = Some(outcome);
}

fn serve(launch: Launch) -> Result<u8, ServiceError> {
    let Launch { name, config, body } = launch;
    let (events, received) = mpsc::channel();
    let shutdown = CancellationToken::new();
    let handler = {
        let shutdown = shutdown.clone();
        let events = events.clone();
        move |control: ServiceControl| -> ServiceControlHandlerResult {
            let request = match control {
                ServiceControl::Stop => Request::Stop,
                ServiceControl::Shutdown => Request::Shutdown,
                ServiceControl::Interrogate => Request::Interrogate,
                _ => Request::Other,
            };
            match respond(request, &shutdown) {
                Response::Stopping => {
                    let _ = events.send(Event::StopRequested);
                    ServiceControlHandlerResult::NoError
                }
                Response::Handled => ServiceControlHandlerResult::NoError,
                Response::NotImplemented => ServiceControlHandlerResult::NotImplemented,
            }
        }
    };
    let status = service_control_handler::register(&name, handler)
        .map_err(scm("register the service control handler"))?;
    let report = |state: ServiceState, checkpoint: u32, exit: ServiceExitCode| {
        let accepted = if state == ServiceState::Running {
            ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN
        } else {
            ServiceControlAccept::empty()
        };
        status.set_service_status(ServiceStatus {
            service_type: SERVICE_TYPE,
            current_state: state,
            controls_accepted: accepted,
            exit_code: exit,
            checkpoint,
            wait_hint: if state == ServiceState::StopPending {
                STOP_WAIT_HINT
            } else {
                Duration::ZERO
            },
            process_id: None,
        })
    };
    report(ServiceState::Running, 0, ServiceExitCode::Win32(0))
        .map_err(scm("report the service as running"))?;

    let finished = events;
    let (spawn_failed, failed_config) = (finished.clone(), config.clone());
    let spawned = std::thread::Builder::new()
        .name("sidecar".to_owned())
        .spawn(move || {
            // A panic is a runtime failure; it must still end in Stopped, not a hung service.
            // The panic hook wrote the panic itself; the exit line goes below it.
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                body(config.clone(), shutdown)
            }))
            .unwrap_or_else(|_| {
                let message = "wxauto-sidecar: the sidecar panicked (see the panic above)";
                let _ = record_failure(&config, 2, message);
                2
            });
            let _ = finished.send(Event::Finished(code));
        });
    if let Err(error) = spawned {
        let message = format!("wxauto-sidecar: cannot start the sidecar's thread: {error}");
        let _ = record_failure(&failed_config, 2, &message);
        let _ = spawn_failed.send(Event::Finished(2));
    }
    let mut checkpoint = 0;
    let code = loop {
        match received.recv() {
            Ok(Event::StopRequested) => {
                checkpoint += 1;
                // Best effort: the SCM only uses it to show progress.
                let _ = report(
                    ServiceState::StopPending,
                    checkpoint,
                    ServiceExitCode::Win32(0),
                );
            }
            Ok(Event::Finished(code)) => break code,
            // Unreachable: the control handler keeps a sender for the process's lifetime.
            Err(_) => break 2,
        }
    };
    let exit = if code == 0 {
        ServiceExitCode::Win32(0)
    } else {
        ServiceExitCode::ServiceSpecific(u32::from(code))
    };
    report(ServiceState::Stopped, 0, exit).map_err(scm("report the service as stopped"))?;
    Ok(code)
}
