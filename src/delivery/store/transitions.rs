//! A claimed row's moves after its platform call: delivered, replied, retried, waiting
//! for its instance, rerouted or dead.

use super::*;

impl Store {
    /// Moves a `delivering` row to a new platform after a reload removed its old one.
    pub(crate) async fn reroute(
        &self,
        id: i64,
        rule_id: String,
        platform_id: String,
        reply_at_sender: bool,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            let changed = conn.execute(
                "UPDATE messages SET rule_id = ?2, platform_id = ?3, reply_at_sender = ?4, \
                 updated_ms = ?5 WHERE id = ?1 AND state = 'delivering'",
                params![id, rule_id, platform_id, reply_at_sender, now_ms()],
            )?;
            expect_one(changed, id, "reroute");
            Ok(())
        })
        .await
    }

    /// The platform took the message and answered without a reply: `delivering` → `delivered`.
    pub(crate) async fn mark_delivered(&self, id: i64) -> Result<(), StoreError> {
        self.write(move |conn| {
            let now = now_ms();
            let changed = conn.execute(
                "UPDATE messages SET state = 'delivered', delivered_ms = ?2, updated_ms = ?2, \
                 claimed_ms = NULL, last_error = NULL WHERE id = ?1 AND state = 'delivering'",
                params![id, now],
            )?;
            expect_one(changed, id, "mark_delivered");
            Ok(())
        })
        .await
    }

    /// The platform answered with a reply: store it and keep the row claimed for the reply,
    /// `delivering` → `replying` (the first reply attempt), in one statement.
    pub(crate) async fn store_reply(
        &self,
        id: i64,
        text: String,
        mode: SendMode,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            let changed = conn.execute(
                "UPDATE messages SET state = 'replying', reply_text = ?2, reply_mode = ?3, \
                 reply_attempts = 1, last_error = NULL, updated_ms = ?4 \
                 WHERE id = ?1 AND state = 'delivering'",
                params![id, text, mode_str(mode), now_ms()],
            )?;
            expect_one(changed, id, "store_reply");
            Ok(())
        })
        .await
    }

    /// The reply was sent: `replying` → `delivered`.
    pub(crate) async fn mark_replied(&self, id: i64) -> Result<(), StoreError> {
        self.write(move |conn| {
            let now = now_ms();
            let changed = conn.execute(
                "UPDATE messages SET state = 'delivered', reply_sent_ms = ?2, delivered_ms = ?2, \
                 updated_ms = ?2, claimed_ms = NULL, last_error = NULL \
                 WHERE id = ?1 AND state = 'replying'",
                params![id, now],
            )?;
            expect_one(changed, id, "mark_replied");
            Ok(())
        })
        .await
    }

    /// A retryable failure: back to the queue at `next_attempt_ms`. A platform failure goes
    /// to `failed`, a reply failure to `reply_pending` (the platform is not called again).
    pub(crate) async fn mark_retry(
        &self,
        id: i64,
        stage: Stage,
        next_attempt_ms: i64,
        error: String,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            let (to, from) = match stage {
                Stage::Platform => ("failed", "delivering"),
                Stage::Reply => ("reply_pending", "replying"),
            };
            let changed = conn.execute(
                "UPDATE messages SET state = ?2, next_attempt_ms = ?3, last_error = ?4, \
                 claimed_ms = NULL, updated_ms = ?5 WHERE id = ?1 AND state = ?6",
                params![id, to, next_attempt_ms, error, now_ms(), from],
            )?;
            expect_one(changed, id, "mark_retry");
            Ok(())
        })
        .await
    }

    /// Puts a `replying` row back to `reply_pending` without counting the attempt: the
    /// instance is down, so the reply waits for it instead of using up its budget.
    pub(crate) async fn mark_waiting_for_instance(
        &self,
        id: i64,
        next_attempt_ms: i64,
        note: String,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            let changed = conn.execute(
                "UPDATE messages SET state = 'reply_pending', \
                 reply_attempts = MAX(reply_attempts - 1, 0), next_attempt_ms = ?2, \
                 last_error = ?3, claimed_ms = NULL, updated_ms = ?4 \
                 WHERE id = ?1 AND state = 'replying'",
                params![id, next_attempt_ms, note, now_ms()],
            )?;
            expect_one(changed, id, "mark_waiting_for_instance");
            Ok(())
        })
        .await
    }

    /// Gives up on a claimed row: → `dead`. Dead rows are kept for the operator (until
    /// `storage.dead_retention_days`) and no longer block their chat.
    pub(crate) async fn mark_dead(&self, id: i64, error: String) -> Result<(), StoreError> {
        self.write(move |conn| {
            let changed = conn.execute(
                "UPDATE messages SET state = 'dead', last_error = ?2, claimed_ms = NULL, \
                 updated_ms = ?3, dead_ms = ?3 WHERE id = ?1 AND state IN ('delivering', 'replying')",
                params![id, error, now_ms()],
            )?;
            expect_one(changed, id, "mark_dead");
            Ok(())
        })
        .await
    }
}
