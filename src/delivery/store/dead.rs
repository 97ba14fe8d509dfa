//! Dead letters: listing, retrying and purging them, and pruning old rows.

use super::*;

impl Store {
    /// The oldest dead letters first, at most `limit`.
    pub(crate) async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, instance_id, message_id, epoch, chat, platform_id, attempts, \
                 reply_attempts, reply_text IS NOT NULL, last_error, created_ms, \
                 COALESCE(dead_ms, updated_ms) FROM messages WHERE state = 'dead' \
                 ORDER BY id LIMIT ?1",
            )?;
            let rows = stmt
                .query_map(params![i64::try_from(limit).unwrap_or(i64::MAX)], |row| {
                    let instance_id: String = row.get(1)?;
                    let message_id: String = row.get(2)?;
                    let epoch: u32 = row.get(3)?;
                    let key = InboundMessage {
                        instance_id: instance_id.clone(),
                        message_id: message_id.clone(),
                        epoch,
                        ..InboundMessage::default()
                    }
                    .idempotency_key();
                    Ok(DeadLetter {
                        id: row.get(0)?,
                        instance_id,
                        message_id,
                        key,
                        chat: row.get(4)?,
                        platform_id: row.get(5)?,
                        attempts: row.get(6)?,
                        reply_attempts: row.get(7)?,
                        reply_pending: row.get(8)?,
                        last_error: row.get(9)?,
                        created_ms: row.get(10)?,
                        dead_ms: row.get(11)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    /// Puts dead rows (all, or those of `ids`) back in the queue with fresh attempt budgets:
    /// a row whose platform already answered only re-sends its reply (`reply_pending`), any
    /// other is delivered to its platform again (`pending`). Returns how many.
    pub(crate) async fn retry_dead(&self, ids: Option<Vec<i64>>) -> Result<u64, StoreError> {
        self.write(move |conn| {
            let now = now_ms();
            let sql = "UPDATE messages SET \
                 state = CASE WHEN reply_text IS NOT NULL THEN 'reply_pending' ELSE 'pending' END, \
                 attempts = CASE WHEN reply_text IS NOT NULL THEN attempts ELSE 0 END, \
                 reply_attempts = 0, next_attempt_ms = ?1, claimed_ms = NULL, dead_ms = NULL, \
                 updated_ms = ?1 WHERE state = 'dead'";
            let n = match ids {
                None => conn.execute(sql, params![now])?,
                Some(ids) => {
                    let mut stmt = conn.prepare(&format!("{sql} AND id = ?2"))?;
                    let mut n = 0;
                    for id in ids {
                        n += stmt.execute(params![now, id])?;
                    }
                    n
                }
            };
            Ok(u64::try_from(n).unwrap_or(u64::MAX))
        })
        .await
    }

    /// Deletes dead rows (all, or those of `ids`); returns how many.
    pub(crate) async fn purge_dead(&self, ids: Option<Vec<i64>>) -> Result<u64, StoreError> {
        self.write(move |conn| {
            let sql = "DELETE FROM messages WHERE state = 'dead'";
            let n = match ids {
                None => conn.execute(sql, [])?,
                Some(ids) => {
                    let mut stmt = conn.prepare(&format!("{sql} AND id = ?1"))?;
                    let mut n = 0;
                    for id in ids {
                        n += stmt.execute(params![id])?;
                    }
                    n
                }
            };
            Ok(u64::try_from(n).unwrap_or(u64::MAX))
        })
        .await
    }

    /// Deletes delivered rows delivered before `delivered_cutoff_ms` and dead rows that died
    /// before `dead_cutoff_ms`; returns how many of each.
    pub(crate) async fn prune(
        &self,
        delivered_cutoff_ms: i64,
        dead_cutoff_ms: i64,
    ) -> Result<(u64, u64), StoreError> {
        self.write(move |conn| {
            let delivered = conn.execute(
                "DELETE FROM messages WHERE state = 'delivered' AND delivered_ms < ?1",
                params![delivered_cutoff_ms],
            )?;
            let dead = conn.execute(
                "DELETE FROM messages WHERE state = 'dead' AND dead_ms < ?1",
                params![dead_cutoff_ms],
            )?;
            Ok((
                u64::try_from(delivered).unwrap_or(u64::MAX),
                u64::try_from(dead).unwrap_or(u64::MAX),
            ))
        })
        .await
    }
}
