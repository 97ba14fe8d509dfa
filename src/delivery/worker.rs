//! Delivery workers: claim rows in batches (as many as there are free worker slots), call
//! each row's platform or send its reply on a task of its own, record the outcome; sleep until
//! new work, a free slot, an unblocked chat or the next retry is due.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::config::{BackoffConfig, DeliveryConfig};
use crate::event::ErrorKind;
use crate::message::{Reply, ReplyError};

use super::Inner;
use super::media::{self, Prepared};
use super::platforms::{Attempt, PlatformError};
use super::store::{Job, Stage, StoreError};

/// Upper bound of an idle sleep, a safety net for a missed wake-up.
const IDLE_POLL: Duration = Duration::from_secs(5);
/// Pause after the store failed, so a broken disk does not spin a core.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// The claim loop: keeps up to `workers` rows in flight, claiming as many rows as there are
/// free slots in one write, and runs each on a task of its own. Returns once cancelled and
/// every row in hand is finished (or left in flight for the next start).
pub(super) async fn run(inner: Arc<Inner>, workers: usize) {
    let slots = Arc::new(Semaphore::new(workers.max(1)));
    tracing::debug!(workers, "Delivery workers started.");
    loop {
        // Register interest before looking, so a wake-up between the look and the wait is
        // not lost.
        let notified = inner.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if inner.cancel.is_cancelled() {
            break;
        }
        let free = slots.available_permits();
        if free == 0 {
            // Every slot is busy: a finishing row notifies.
            tokio::select! {
                () = notified => continue,
                () = inner.cancel.cancelled() => break,
            }
        }
        let now = inner.now_ms();
        let jobs = match inner.store.claim_batch(now, free).await {
            Ok(jobs) => jobs,
            Err(err) => {
                inner.storage_error(&err);
                sleep_or_cancel(&inner, STORE_RETRY).await;
                continue;
            }
        };
        let claimed = jobs.len();
        for job in jobs {
            // Only this loop takes permits and it claimed no more than were free, so this
            // does not wait; the semaphore is never closed.
            let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                break;
            };
            let task_inner = Arc::clone(&inner);
            inner.tracker.spawn(async move {
                process(&task_inner, job).await;
                drop(permit);
                // A slot is free, and the chat's next row may be claimable now.
                task_inner.notify.notify_waiters();
            });
        }
        if claimed > 0 {
            continue;
        }
        let wait = match inner.store.next_due(now).await {
            Ok(Some(due)) => Duration::from_millis(u64::try_from(due - now).unwrap_or(0)),
            Ok(None) => IDLE_POLL,
            Err(err) => {
                inner.storage_error(&err);
                STORE_RETRY
            }
        };
        tokio::select! {
            () = notified => {}
            () = tokio::time::sleep(wait.min(IDLE_POLL)) => {}
            () = inner.cancel.cancelled() => break,
        }
    }
    tracing::debug!("Delivery workers stopped claiming.");
}

async fn process(inner: &Inner, job: Job) {
    match job.stage {
        Stage::Platform => deliver(inner, job).await,
        Stage::Reply => send_reply(inner, job).await,
    }
}

/// The platform stage of a `delivering` row.
async fn deliver(inner: &Inner, mut job: Job) {
    let routing = inner.routing();
    let config = inner.config();
    let platform = match routing.platform(&job.platform_id) {
        Some(platform) => Arc::clone(platform),
        // A reload removed the platform this row was routed to: route it again.
        None => match routing.matching_rule(&job.message) {
            Ok(rule) => {
                let Some(platform) = routing.platform(&rule.platform).map(Arc::clone) else {
                    return dead_platform(inner, &job, "its platform is gone").await;
                };
                let (id, rule_id, platform_id, reply_at_sender) = (
                    job.id,
                    rule.id.clone(),
                    rule.platform.clone(),
                    rule.reply_at_sender,
                );
                persist(inner, || {
                    inner
                        .store
                        .reroute(id, rule_id.clone(), platform_id.clone(), reply_at_sender)
                })
                .await;
                job.rule_id = rule_id;
                job.platform_id = platform_id;
                job.reply_at_sender = reply_at_sender;
                platform
            }
            Err(_) => {
                return dead_platform(inner, &job, "no rule routes it after a reload").await;
            }
        },
    };

    let attachments = match media::prepare(inner, &mut job, &config).await {
        Prepared::Ready(attachments) => attachments,
        Prepared::Wait {
            file_path,
            next_attempt_ms,
            note,
        } => {
            persist(inner, || {
                inner.store.mark_waiting_for_media(
                    job.id,
                    file_path.clone(),
                    next_attempt_ms,
                    note.clone(),
                )
            })
            .await;
            return;
        }
        Prepared::Store(err) => {
            inner.storage_error(&err);
            let next = inner.now_ms() + i64::try_from(STORE_RETRY.as_millis()).unwrap_or(1000);
            let text = format!("media: {err}");
            persist(inner, || {
                inner
                    .store
                    .mark_retry(job.id, Stage::Platform, next, text.clone())
            })
            .await;
            return;
        }
    };

    let started = Instant::now();
    let attempt = Attempt {
        number: job.attempts,
        store: &inner.store,
        platform_id: &platform.id,
        attachments: &attachments,
    };
    let result = tokio::time::timeout(
        config.attempt_timeout,
        platform.deliver(&job.message, attempt),
    )
    .await
    .unwrap_or_else(|_| {
        Err(PlatformError::retry(
            ErrorKind::Timeout,
            format!(
                "no answer within the attempt budget of {}",
                humantime::format_duration(config.attempt_timeout)
            ),
        ))
    });
    inner
        .metrics
        .observe_duration(&platform.id, started.elapsed().as_secs_f64());

    let msg = &job.message;
    match result {
        Ok(reply) => {
            inner.metrics.delivery(&platform.id, "success");
            tracing::debug!(instance_id = %msg.instance_id, platform = %platform.id,
                attempt = job.attempts, "Message delivered.");
            match reply {
                None => {
                    persist(inner, || inner.store.mark_delivered(job.id)).await;
                }
                Some(text) => {
                    let mode = platform.send_mode;
                    if !persist(inner, || {
                        inner.store.store_reply(job.id, text.clone(), mode)
                    })
                    .await
                    {
                        // Shutting down with the store failing: the row stays `delivering` and
                        // the next start delivers it again, reply included.
                        return;
                    }
                    job.reply_text = Some(text);
                    job.reply_mode = mode;
                    job.reply_attempts = 1;
                    job.stage = Stage::Reply;
                    send_reply(inner, job).await;
                }
            }
        }
        Err(err) => {
            let text = format!(
                "platform {} attempt {}: {}",
                platform.id, job.attempts, err.message
            );
            inner.record(err.kind, Some(&msg.instance_id), &text);
            if let Some(wait) = retry_after(&config, job.attempts, err.permanent) {
                inner.metrics.delivery(&platform.id, "retry");
                let next = inner.now_ms() + millis(wait);
                tracing::info!(instance_id = %msg.instance_id, platform = %platform.id,
                    attempt = job.attempts, error = %err.message, "Delivery failed; will retry.");
                persist(inner, || {
                    inner
                        .store
                        .mark_retry(job.id, Stage::Platform, next, text.clone())
                })
                .await;
            } else {
                inner.metrics.delivery(&platform.id, "dead");
                tracing::warn!(instance_id = %msg.instance_id, platform = %platform.id,
                    attempts = job.attempts, permanent = err.permanent, error = %err.message,
                    "Message dead-lettered.");
                persist(inner, || inner.store.mark_dead(job.id, text.clone())).await;
            }
        }
    }
}

/// The reply stage of a `replying` row: the platform is not called again.
async fn send_reply(inner: &Inner, job: Job) {
    let config = inner.config();
    let msg = &job.message;
    let Some(text) = job.reply_text.clone() else {
        // A replying row always has its text; treat a missing one as nothing to send.
        persist(inner, || inner.store.mark_replied(job.id)).await;
        return;
    };
    let at = if job.reply_at_sender && msg.is_group() {
        vec![msg.sender_display().to_owned()]
    } else {
        Vec::new()
    };
    let reply = Reply {
        instance_id: msg.instance_id.clone(),
        chat: msg.chat.clone(),
        text: text.clone(),
        at,
        mode: job.reply_mode,
    };
    // No timeout around the call: the router abandons a reply the instance has not started to
    // send within the budget (so it is never sent behind our back), and once it has started
    // the actor's request timeout bounds it. A timeout here could drop a reply that then goes
    // out anyway, and the retry would send it twice.
    let result = match inner
        .replies
        .send_reply(reply, config.attempt_timeout)
        .await
    {
        Ok(()) => Ok(()),
        Err(ReplyError::InstanceDown(instance)) => {
            // WeChat restarts take minutes; the listener already recorded the outage once.
            // Wait for the instance without spending the reply's attempts or adding errors.
            let wait = config
                .backoff
                .initial
                .max(Duration::from_secs(1))
                .min(config.backoff.max);
            tracing::debug!(instance_id = %instance, "Reply waits for its instance to come back.");
            let next = inner.now_ms() + i64::try_from(wait.as_millis()).unwrap_or(1000);
            let note = format!("waiting for instance {instance} to come back");
            persist(inner, || {
                inner
                    .store
                    .mark_waiting_for_instance(job.id, next, note.clone())
            })
            .await;
            return;
        }
        Err(err) => {
            let kind = match &err {
                ReplyError::NoInstance(_) | ReplyError::InstanceDown(_) => ErrorKind::Connect,
                ReplyError::Upstream(_) => ErrorKind::ApiCode,
                ReplyError::NotTaken(..) => ErrorKind::Timeout,
            };
            Err((kind, err.to_string()))
        }
    };
    match result {
        Ok(()) => {
            inner.metrics.reply(&msg.instance_id, "success");
            inner.record_sent(msg, &text);
            persist(inner, || inner.store.mark_replied(job.id)).await;
        }
        Err((kind, err)) => {
            inner.metrics.reply(&msg.instance_id, "error");
            let text = format!("reply attempt {}: {err}", job.reply_attempts);
            inner.record(kind, Some(&msg.instance_id), &text);
            if let Some(wait) = retry_after(&config, job.reply_attempts, false) {
                let next = inner.now_ms() + millis(wait);
                tracing::info!(instance_id = %msg.instance_id, attempt = job.reply_attempts,
                    error = %err, "Reply failed; will retry.");
                persist(inner, || {
                    inner
                        .store
                        .mark_retry(job.id, Stage::Reply, next, text.clone())
                })
                .await;
            } else {
                tracing::warn!(instance_id = %msg.instance_id, attempts = job.reply_attempts,
                    error = %err, "Reply dead-lettered.");
                persist(inner, || inner.store.mark_dead(job.id, text.clone())).await;
            }
        }
    }
}

async fn dead_platform(inner: &Inner, job: &Job, why: &str) {
    // No `wxauto_deliveries_total` sample: the platform label is no longer configured.
    let text = format!("platform {}: {why}", job.platform_id);
    inner.record(ErrorKind::Reload, Some(&job.message.instance_id), &text);
    persist(inner, || inner.store.mark_dead(job.id, text.clone())).await;
}

/// Commits a state change, retrying while the store fails; gives up (returning false) only
/// on shutdown, which leaves the row in flight for the next start to recover.
async fn persist<F, Fut>(inner: &Inner, op: F) -> bool
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), StoreError>>,
{
    loop {
        match op().await {
            Ok(()) => return true,
            Err(err) => {
                inner.storage_error(&err);
                if inner.cancel.is_cancelled() {
                    return false;
                }
                sleep_or_cancel(inner, STORE_RETRY).await;
            }
        }
    }
}

async fn sleep_or_cancel(inner: &Inner, duration: Duration) {
    tokio::select! {
        () = tokio::time::sleep(duration) => {}
        () = inner.cancel.cancelled() => {}
    }
}

/// Capped exponential backoff for the retry after attempt `attempt` (1-based), with up to
/// 20 % jitter downwards so that a recovering platform is not hit by every row at once.
pub(super) fn delay(backoff: &BackoffConfig, attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(31);
    let capped = backoff
        .initial
        .saturating_mul(1u32 << doublings)
        .min(backoff.max);
    capped.mul_f64(1.0 - fastrand::f64() * 0.2)
}

/// When a row whose attempt `attempt` (1-based) just failed is tried again: after `delay`, or
/// never (`None`, dead-lettered) when the failure is permanent or that was the last of
/// `max_attempts`.
pub(super) fn retry_after(
    config: &DeliveryConfig,
    attempt: u32,
    permanent: bool,
) -> Option<Duration> {
    (!permanent && attempt < config.max_attempts).then(|| delay(&config.backoff, attempt))
}

fn millis(wait: Duration) -> i64 {
    i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let backoff = BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
        };
        let check = |attempt: u32, nominal_ms: u64| {
            let got = delay(&backoff, attempt);
            let nominal = Duration::from_millis(nominal_ms);
            assert!(
                got <= nominal && got >= nominal.mul_f64(0.8),
                "{attempt}: {got:?}"
            );
        };
        check(1, 100);
        check(2, 200);
        check(3, 400);
        check(4, 800);
        check(5, 1000);
        check(40, 1000);
    }

    #[test]
    fn a_failure_is_retried_until_the_last_attempt_and_a_permanent_one_never() {
        let config = DeliveryConfig {
            workers: 1,
            max_attempts: 3,
            backoff: BackoffConfig {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(3),
            },
            attempt_timeout: Duration::from_secs(5),
        };
        let within = |attempt: u32, nominal: Duration| {
            let wait = retry_after(&config, attempt, false)
                .unwrap_or_else(|| panic!("attempt {attempt} of 3 is retried"));
            assert!(
                wait <= nominal && wait >= nominal.mul_f64(0.8),
                "{attempt}: {wait:?}"
            );
        };
        within(1, Duration::from_secs(1));
        within(2, Duration::from_secs(2));
        // The last attempt failed: dead, whatever the backoff would say.
        assert_eq!(retry_after(&config, 3, false), None);
        assert_eq!(retry_after(&config, 4, false), None);
        // Permanent (a 4xx): dead after any attempt.
        assert_eq!(retry_after(&config, 1, true), None);
        // One attempt allowed: no retry at all.
        let once = DeliveryConfig {
            max_attempts: 1,
            ..config
        };
        assert_eq!(retry_after(&once, 1, false), None);
    }
}
