//! The health probe and the connectivity transitions: up (re-adding the chat table and, after
//! an unclean stop, re-reading it), down (one error per outage), and a new upstream session
//! when the server restarted or the instance was seen down.

use std::time::SystemTime;

use super::InstanceActor;
use super::chat::unix_ms;
use crate::event::{Component, ErrorKind};
use crate::monitor::Connectivity;
use crate::wxauto::{HealthInfo, WxautoError};

/// How far the server start time derived from `/api/health` `uptime` may move (whole seconds,
/// the network, the clock) before it counts as a server restart.
const RESTART_TOLERANCE_MS: i64 = 5_000;

/// Why a probe failed.
#[derive(Debug, Clone, thiserror::Error)]
pub(super) enum ProbeError {
    #[error(transparent)]
    Upstream(#[from] WxautoError),
    #[error("WeChat is not connected (wechat_status {0:?}) and initialize did not connect it")]
    Offline(String),
}

impl ProbeError {
    pub(super) fn kind(&self) -> ErrorKind {
        match self {
            Self::Upstream(error) => error.kind(),
            Self::Offline(_) => ErrorKind::Offline,
        }
    }
}

impl InstanceActor {
    /// Probes `GET /api/health`; initialises WeChat if it is not connected; on a transition to
    /// up re-adds every active chat, and while up tries the refused ones again.
    pub(super) async fn probe_and_recover(&mut self) -> Result<(), ProbeError> {
        let result = self.probe().await;
        self.last_check = Some(SystemTime::now());
        let info = result?;
        self.observe_session(&info).await;
        if self.connectivity != Connectivity::Up {
            let was = self.connectivity;
            self.connectivity = Connectivity::Recovering;
            self.publish();
            self.restore_chats().await?;
            if self.recover_pending {
                // Before the first drain: the re-read messages are older than anything the
                // listen caches hold now, and go into the store (and to platforms) first.
                self.save_chats().await;
                self.recover().await?;
                self.recover_pending = false;
            }
            self.connectivity = Connectivity::Up;
            // The outage (and its one error) ends with the first message poll answered
            // (`poll_answered`): /api/health needs no key, so a rejected key passes the probe
            // and fails every poll.
            tracing::debug!(instance_id = %self.instance.id, was = ?was, "Probe passed; polling.");
        } else {
            self.retry_refused_chats().await?;
        }
        Ok(())
    }

    /// A message poll was answered: the instance is up for real, and an outage is over (the
    /// next one records its error again, and the backoff starts from its first step).
    pub(super) fn poll_answered(&mut self) {
        if !self.polled_once {
            self.polled_once = true;
            tracing::info!(instance_id = %self.instance.id, "Instance is up.");
        } else if self.in_outage {
            tracing::info!(instance_id = %self.instance.id, "Instance recovered.");
        }
        if self.in_outage {
            self.in_outage = false;
            self.outage_recorded = false;
            self.schedule.recovered();
        }
    }

    pub(super) async fn probe(&mut self) -> Result<HealthInfo, ProbeError> {
        let info = self.client.health().await?;
        if info.is_connected() {
            self.initialized = true;
            return Ok(info);
        }
        self.initialized = false;
        tracing::info!(
            instance_id = %self.instance.id,
            wechat_status = %info.wechat_status,
            "WeChat is not connected; initializing."
        );
        self.client.initialize().await?;
        let info = self.client.health().await?;
        if info.is_connected() {
            self.initialized = true;
            Ok(info)
        } else {
            Err(ProbeError::Offline(info.wechat_status))
        }
    }

    /// Starts a new epoch when the upstream session changed: the server restarted (its start
    /// time, now − uptime, moved) or this actor saw the instance down (WeChat may have
    /// restarted, which resets its runtime ids without restarting the server).
    pub(super) async fn observe_session(&mut self, info: &HealthInfo) {
        let started_ms = info.started_ms(unix_ms(SystemTime::now()));
        let restarted = match (self.session.started_ms, started_ms) {
            (Some(before), Some(now)) => server_restarted(before, now),
            _ => false,
        };
        let mut session = self.session;
        if restarted || self.was_down {
            session.epoch = session.epoch.saturating_add(1);
            tracing::info!(
                instance_id = %self.instance.id,
                epoch = session.epoch,
                reason = if restarted { "server restarted" } else { "instance was down" },
                "New upstream session: message ids are deduplicated within it only."
            );
        }
        self.was_down = false;
        session.started_ms = started_ms.or(session.started_ms);
        if session == self.session {
            return;
        }
        if let Err(error) = self.sink.save_session(&self.instance.id, session).await {
            tracing::warn!(instance_id = %self.instance.id, "Cannot store the upstream session: {error}");
        }
        self.session = session;
    }

    /// Marks the instance down. Only the start of an outage records an error; retries of a
    /// known-down instance show in `wxauto_api_requests_total` alone.
    pub(super) fn go_down(&mut self, message: &str, kind: ErrorKind) {
        // An outage lasts until a message poll is answered: a probe that passes while the
        // re-adds or the polls fail (a rejected key, where only /api/health is unauthenticated;
        // a server whose message reads fail) is still the same outage, with one error and one
        // epoch.
        // Down while its supervised process restarts is expected: no new outage error.
        let expected = self.monitor.processes().expected_down(&self.instance.id);
        if !self.outage_recorded && !expected {
            self.outage_recorded = true;
            self.monitor.record_error(
                Component::Client,
                kind,
                Some(&self.instance.id),
                &format!("instance down: {message}"),
            );
        } else {
            tracing::debug!(instance_id = %self.instance.id, "Instance still down: {message}");
        }
        self.connectivity = Connectivity::Down;
        if !self.in_outage {
            self.in_outage = true;
            self.was_down = true;
        }
    }
}

/// Whether the server start time moved by more than the tolerance. `abs_diff`, because the
/// times come from upstream answers: any two `i64`s must compare without overflow.
fn server_restarted(before_ms: i64, now_ms: i64) -> bool {
    now_ms.abs_diff(before_ms) > RESTART_TOLERANCE_MS.unsigned_abs()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the fuzz suite's health property: an uptime near `u64::MAX / 1000` puts the
    /// start time near `i64::MIN`, and `(now - before).abs()` overflowed (a panic in debug
    /// builds, a wrong answer in release).
    #[test]
    fn start_times_from_absurd_uptimes_compare_without_overflow() {
        assert!(server_restarted(i64::MIN, i64::MAX));
        assert!(server_restarted(i64::MAX, i64::MIN));
        assert!(!server_restarted(i64::MIN, i64::MIN + 5_000));
        assert!(server_restarted(0, 5_001));
        assert!(!server_restarted(1_000, -4_000));
    }
}
