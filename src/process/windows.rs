//! Windows: each child gets its own console process group (`CREATE_NEW_PROCESS_GROUP`, so
//! CTRL_BREAK reaches it and its children) and a Job Object with kill-on-close, so the whole
//! tree dies with `TerminateJobObject` or when the sidecar's handle closes, even if the sidecar
//! is killed. `scripts/check-windows.sh` runs it under Wine (the tests below, exit codes,
//! restart after `taskkill /F`, stop with the sidecar, kill-on-close); CTRL_BREAK is not
//! exercised there.
//!
//! The only `unsafe` in the crate: the Win32 calls below, each on a handle this module owns.

#![allow(unsafe_code)]

use std::io;
use std::sync::Arc;

use tokio::process::{Child, Command};
use windows_sys::Win32::Foundation::{CloseHandle, HANDLE, WAIT_OBJECT_0};
use windows_sys::Win32::System::Console::{CTRL_BREAK_EVENT, GenerateConsoleCtrlEvent};
use windows_sys::Win32::System::JobObjects::{
    AssignProcessToJobObject, CreateJobObjectW, JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE,
    JOBOBJECT_BASIC_ACCOUNTING_INFORMATION, JOBOBJECT_EXTENDED_LIMIT_INFORMATION,
    JobObjectBasicAccountingInformation, JobObjectBasicProcessIdList,
    JobObjectExtendedLimitInformation, QueryInformationJobObject, SetInformationJobObject,
    TerminateJobObject,
};
use windows_sys::Win32::System::Threading::{CREATE_NEW_PROCESS_GROUP, WaitForSingleObject};

use crate::config::StopSignal;

/// Starts the child in a new console process group.
pub(super) fn configure(command: &mut Command) {
    command.creation_flags(CREATE_NEW_PROCESS_GROUP);
}

/// What a stop sends, for the log: always CTRL_BREAK (`stop_signal` is a unix setting).
pub(super) fn stop_signal_name(_signal: StopSignal) -> &'static str {
    "CTRL_BREAK"
}

/// An owned job handle; closing it kills every process still in the job.
#[derive(Debug)]
struct Job(HANDLE);

// SAFETY: a job handle is a kernel object reference usable from any thread.
unsafe impl Send for Job {}
// SAFETY: as above; the calls made through `&Job` are thread-safe Win32 calls.
unsafe impl Sync for Job {}

impl Drop for Job {
    fn drop(&mut self) {
        // SAFETY: `self.0` is a job handle this type created and nobody else closes.
        unsafe {
            CloseHandle(self.0);
        }
    }
}

/// The job of one child.
#[derive(Debug)]
pub(super) struct Group {
    job: Arc<Job>,
    pid: u32,
}

/// What the sampler needs: the job, to list its processes.
#[derive(Debug, Clone)]
pub(super) struct Members {
    job: Arc<Job>,
}

impl Group {
    /// Creates a kill-on-close job and puts `child` in it. A grandchild spawned before this
    /// runs (microseconds after the spawn) would escape the job. A child that has already ended
    /// (`cmd /c exit 3` can, on a busy machine) cannot join and keeps an empty job: its run
    /// ended, it did not fail to start, and `Child::wait` still has its exit code.
    pub(super) fn attach(child: &Child) -> io::Result<Self> {
        let pid = child
            .id()
            .ok_or_else(|| io::Error::other("the child has no pid"))?;
        let process = child
            .raw_handle()
            .ok_or_else(|| io::Error::other("the child has no handle"))?;
        // SAFETY: null attributes and name are allowed; the result is checked.
        let handle = unsafe { CreateJobObjectW(std::ptr::null(), std::ptr::null()) };
        if handle.is_null() {
            return Err(io::Error::last_os_error());
        }
        let job = Job(handle);
        let mut limits = JOBOBJECT_EXTENDED_LIMIT_INFORMATION::default();
        limits.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE;
        // SAFETY: the pointer and size describe `limits`, alive for the call.
        let set = unsafe {
            SetInformationJobObject(
                job.0,
                JobObjectExtendedLimitInformation,
                (&raw const limits).cast(),
                size_of::<JOBOBJECT_EXTENDED_LIMIT_INFORMATION>() as u32,
            )
        };
        if set == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both handles are valid: the job above, the child's process handle.
        let assigned = unsafe { AssignProcessToJobObject(job.0, process as HANDLE) };
        if assigned == 0 {
            let error = io::Error::last_os_error();
            // An ended process is refused with ERROR_ACCESS_DENIED, as a real denial would be.
            if !has_ended(process as HANDLE) {
                return Err(error);
            }
        }
        Ok(Self {
            job: Arc::new(job),
            pid,
        })
    }

    /// For sampling.
    pub(super) fn members(&self) -> Members {
        Members {
            job: Arc::clone(&self.job),
        }
    }

    /// CTRL_BREAK to the child's console process group (the configured unix signal does not
    /// apply). Fails when the sidecar has no console (e.g. as a service); the stop timeout then
    /// ends in `kill`.
    pub(super) fn signal(&self, _signal: StopSignal) -> io::Result<()> {
        // SAFETY: plain call with the group id (the child's pid).
        let sent = unsafe { GenerateConsoleCtrlEvent(CTRL_BREAK_EVENT, self.pid) };
        if sent == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Terminates every process in the job.
    pub(super) fn kill(&self) -> io::Result<()> {
        // SAFETY: the job handle is valid while `self` lives.
        let done = unsafe { TerminateJobObject(self.job.0, 1) };
        if done == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether no process is left in the job.
    pub(super) fn is_empty(&self) -> bool {
        let mut info = JOBOBJECT_BASIC_ACCOUNTING_INFORMATION::default();
        // SAFETY: the pointer and size describe `info`, alive for the call.
        let ok = unsafe {
            QueryInformationJobObject(
                self.job.0,
                JobObjectBasicAccountingInformation,
                (&raw mut info).cast(),
                size_of::<JOBOBJECT_BASIC_ACCOUNTING_INFORMATION>() as u32,
                std::ptr::null_mut(),
            )
        };
        ok == 0 || info.ActiveProcesses == 0
    }
}

/// Whether the process behind `process` has ended (its handle is signalled).
fn has_ended(process: HANDLE) -> bool {
    // SAFETY: a valid process handle, waited on with a zero timeout.
    unsafe { WaitForSingleObject(process, 0) == WAIT_OBJECT_0 }
}

impl Drop for Group {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// `JOBOBJECT_BASIC_PROCESS_ID_LIST` with room for 256 ids.
#[repr(C)]
struct PidList {
    assigned: u32,
    listed: u32,
    ids: [usize; 256],
}

impl Members {
    /// The processes in the job (the first 256).
    pub(super) fn pids(&self) -> Vec<u32> {
        let mut list = PidList {
            assigned: 0,
            listed: 0,
            ids: [0; 256],
        };
        // SAFETY: the pointer and size describe `list`, alive for the call.
        let ok = unsafe {
            QueryInformationJobObject(
                self.job.0,
                JobObjectBasicProcessIdList,
                (&raw mut list).cast(),
                size_of::<PidList>() as u32,
                std::ptr::null_mut(),
            )
        };
        if ok == 0 {
            return Vec::new();
        }
        let listed = (list.listed as usize).min(list.ids.len());
        list.ids[..listed]
            .iter()
            .filter_map(|id| u32::try_from(*id).ok())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use windows_sys::Win32::System::Threading::INFINITE;

    use super::*;

    /// `cmd /c exit 3` can end before the sidecar puts it in its job; the supervision step of
    /// `scripts/check-windows.sh` saw that as `cannot start "cmd": Access denied` and no exit
    /// code. Here the child has surely ended before `attach`.
    #[tokio::test]
    async fn a_child_that_ended_before_joining_its_job_keeps_its_exit_code() {
        let mut command = Command::new("cmd");
        command.args(["/c", "exit", "3"]);
        configure(&mut command);
        let mut child = command.spawn().expect("cmd starts");
        let process = child.raw_handle().expect("not waited for yet");
        // SAFETY: the child's process handle, open while `child` lives.
        unsafe { WaitForSingleObject(process as HANDLE, INFINITE) };

        let group = Group::attach(&child).expect("an ended child is not a failed start");
        assert!(group.is_empty());
        assert_eq!(group.members().pids(), Vec::<u32>::new());
        let status = child.wait().await.expect("waited");
        assert_eq!(status.code(), Some(3));
    }

    #[tokio::test]
    async fn a_running_child_joins_its_job_and_dies_with_it() {
        let mut command = Command::new("cmd");
        // `pause` waits for a key on a stdin that never sends one.
        command
            .args(["/c", "pause"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null());
        configure(&mut command);
        let mut child = command.spawn().expect("cmd starts");
        let group = Group::attach(&child).expect("joined");
        assert!(!group.is_empty());
        assert!(
            group
                .members()
                .pids()
                .contains(&child.id().expect("running"))
        );
        drop(group);
        let status = child.wait().await.expect("waited");
        assert_eq!(status.code(), Some(1), "TerminateJobObject's exit code");
    }
}
