//! `ReplyRouter`: the `ReplySender` delivery uses; forwards replies and downloads to the
//! command channel of the instance's running actor.

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::listener::InstanceCommand;
use crate::message::{
    BoxFuture, Download, DownloadError, Reply, ReplyError, ReplySender, ReplyTicket,
};

/// How the supervisor reaches the actors to send replies; implements `ReplySender`.
///
/// An enabled instance whose actor is not running yet (start-up, a crash-restart backoff)
/// answers `InstanceDown`, so the reply waits; only an instance the config does not have
/// answers `NoInstance`, which spends the reply's attempts.
#[derive(Debug, Default)]
pub struct ReplyRouter {
    senders: RwLock<HashMap<String, mpsc::Sender<InstanceCommand>>>,
    enabled: RwLock<HashSet<String>>,
}

impl ReplyRouter {
    /// Sets which instances the active config enables.
    pub fn set_enabled(&self, ids: impl IntoIterator<Item = String>) {
        let mut enabled = match self.enabled.write() {
            Ok(enabled) => enabled,
            Err(poisoned) => poisoned.into_inner(),
        };
        *enabled = ids.into_iter().collect();
    }

    fn is_enabled(&self, instance_id: &str) -> bool {
        match self.enabled.read() {
            Ok(enabled) => enabled.contains(instance_id),
            Err(poisoned) => poisoned.into_inner().contains(instance_id),
        }
    }

    pub(super) fn set(&self, instance_id: &str, sender: Option<mpsc::Sender<InstanceCommand>>) {
        let mut senders = match self.senders.write() {
            Ok(senders) => senders,
            Err(poisoned) => poisoned.into_inner(),
        };
        match sender {
            Some(sender) => senders.insert(instance_id.to_owned(), sender),
            None => senders.remove(instance_id),
        };
    }

    pub(super) fn get(&self, instance_id: &str) -> Option<mpsc::Sender<InstanceCommand>> {
        let senders = match self.senders.read() {
            Ok(senders) => senders,
            Err(poisoned) => poisoned.into_inner(),
        };
        senders.get(instance_id).cloned()
    }
}

impl ReplySender for ReplyRouter {
    fn send_reply(&self, reply: Reply, wait: Duration) -> BoxFuture<'_, Result<(), ReplyError>> {
        Box::pin(async move {
            let id = reply.instance_id.clone();
            let sender = self.get(&id).ok_or_else(|| {
                if self.is_enabled(&id) {
                    ReplyError::InstanceDown(id.clone())
                } else {
                    ReplyError::NoInstance(id.clone())
                }
            })?;
            let deadline = tokio::time::Instant::now() + wait;
            let ticket = ReplyTicket::default();
            let (respond, mut answer) = oneshot::channel();
            let command = InstanceCommand::Reply {
                reply,
                ticket: ticket.clone(),
                respond,
            };
            match tokio::time::timeout_at(deadline, sender.send(command)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(ReplyError::NoInstance(id)),
                // Never queued, so never sent.
                Err(_) => return Err(ReplyError::NotTaken(id, wait)),
            }
            let outcome = match tokio::time::timeout_at(deadline, &mut answer).await {
                Ok(outcome) => outcome,
                // Queued behind a long poll: give up unless the actor has started sending, in
                // which case the outcome must be known before anyone tries again.
                Err(_) if ticket.abandon() => return Err(ReplyError::NotTaken(id, wait)),
                Err(_) => answer.await,
            };
            outcome.map_err(|_| ReplyError::NoInstance(id))?
        })
    }

    fn download_file(
        &self,
        instance_id: &str,
        file_path: &str,
        max_bytes: u64,
    ) -> BoxFuture<'_, Result<Download, DownloadError>> {
        let (id, file_path) = (instance_id.to_owned(), file_path.to_owned());
        Box::pin(async move {
            let sender = self.get(&id).ok_or_else(|| {
                if self.is_enabled(&id) {
                    DownloadError::InstanceDown(id.clone())
                } else {
                    DownloadError::NoInstance(id.clone())
                }
            })?;
            let (respond, answer) = oneshot::channel();
            sender
                .send(InstanceCommand::Download {
                    file_path,
                    max_bytes,
                    respond,
                })
                .await
                .map_err(|_| DownloadError::NoInstance(id.clone()))?;
            answer.await.map_err(|_| DownloadError::NoInstance(id))?
        })
    }
}
