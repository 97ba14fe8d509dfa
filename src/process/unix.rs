//! Unix: each child leads its own process group (`process_group(0)`, i.e. `setpgid(0, 0)` in
//! the child); stops and kills go to the whole group with `kill(-pgid, sig)`.

use std::io;

use rustix::process::{Pid, Signal, kill_process_group, test_kill_process_group};
use tokio::process::{Child, Command};

use crate::config::StopSignal;

/// Puts the child in a new process group whose id is its pid.
pub(super) fn configure(command: &mut Command) {
    command.process_group(0);
}

/// What a stop sends, for the log: the configured signal.
pub(super) fn stop_signal_name(signal: StopSignal) -> &'static str {
    signal.as_str()
}

/// The process group of one child. Dropping it kills whatever is left of the group, so a
/// supervisor task that panics or is dropped leaves no orphans behind.
#[derive(Debug)]
pub(super) struct Group {
    pgid: Pid,
}

/// What the sampler needs to find the group's members (the group id). `Clone` only, like the
/// Windows one (a job handle).
#[derive(Debug, Clone)]
pub(super) struct Members {
    pgid: i32,
}

impl Group {
    /// The group `child` leads.
    pub(super) fn attach(child: &Child) -> io::Result<Self> {
        let pid = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .and_then(Pid::from_raw)
            .ok_or_else(|| io::Error::other("the child has no pid"))?;
        Ok(Self { pgid: pid })
    }

    /// For sampling.
    pub(super) fn members(&self) -> Members {
        Members {
            pgid: self.pgid.as_raw_nonzero().get(),
        }
    }

    /// Sends the stop signal to every process of the group. A group that is gone already is
    /// not an error.
    pub(super) fn signal(&self, signal: StopSignal) -> io::Result<()> {
        let signal = match signal {
            StopSignal::Term => Signal::TERM,
            StopSignal::Int => Signal::INT,
            StopSignal::Hup => Signal::HUP,
            StopSignal::Quit => Signal::QUIT,
            StopSignal::Kill => Signal::KILL,
            StopSignal::Usr1 => Signal::USR1,
            StopSignal::Usr2 => Signal::USR2,
        };
        ignore_gone(kill_process_group(self.pgid, signal))
    }

    /// SIGKILL to the whole group.
    pub(super) fn kill(&self) -> io::Result<()> {
        ignore_gone(kill_process_group(self.pgid, Signal::KILL))
    }

    /// Whether no live (non-zombie) process is left in the group.
    pub(super) fn is_empty(&self) -> bool {
        #[cfg(target_os = "linux")]
        {
            self.members().pids().is_empty()
        }
        #[cfg(not(target_os = "linux"))]
        {
            test_kill_process_group(self.pgid).is_err()
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if test_kill_process_group(self.pgid).is_ok() {
            let _ = kill_process_group(self.pgid, Signal::KILL);
        }
    }
}

fn ignore_gone(result: rustix::io::Result<()>) -> io::Result<()> {
    match result {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(errno) => Err(errno.into()),
    }
}

impl Members {
    /// The live (non-zombie) processes of the group. Linux reads `/proc/*/stat`; elsewhere only
    /// the leader is known.
    pub(super) fn pids(&self) -> Vec<u32> {
        #[cfg(target_os = "linux")]
        {
            group_pids_linux(self.pgid)
        }
        #[cfg(not(target_os = "linux"))]
        {
            let alive =
                Pid::from_raw(self.pgid).is_some_and(|pid| test_kill_process_group(pid).is_ok());
            match u32::try_from(self.pgid) {
                Ok(pid) if alive => vec![pid],
                _ => Vec::new(),
            }
        }
    }
}

/// Every pid whose `/proc/<pid>/stat` names `pgid` as its process group and is not a zombie.
#[cfg(target_os = "linux")]
#[allow(
    clippy::disallowed_methods,
    reason = "/proc is in memory; read per stop and per scrape of a group"
)]
fn group_pids_linux(pgid: i32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some((state, group)) = parse_stat(&stat)
            && group == pgid
            && state != "Z"
            && state != "X"
        {
            pids.push(pid);
        }
    }
    pids
}

/// `(state, pgrp)` from a `/proc/<pid>/stat` line; the command name may contain spaces and
/// parentheses, so fields are counted from the last `)`.
#[cfg(target_os = "linux")]
pub(super) fn parse_stat(stat: &str) -> Option<(&str, i32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_command_names() {
        assert_eq!(
            parse_stat("42 (my (odd) cmd) S 1 40 40 0 -1"),
            Some(("S", 40))
        );
        assert_eq!(parse_stat("7 (z) Z 1 7 7"), Some(("Z", 7)));
        assert_eq!(parse_stat("garbage"), None);
    }
}
