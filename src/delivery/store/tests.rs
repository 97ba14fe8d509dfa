//! The store's own tests, on real SQLite files in temp dirs.

use super::*;

fn new_message(id: &str, chat: &str, epoch: u32) -> NewMessage {
    NewMessage {
        message: InboundMessage {
            instance_id: "wx".to_owned(),
            chat: chat.to_owned(),
            message_id: id.to_owned(),
            msg_type: "friend".to_owned(),
            sender: "alice".to_owned(),
            content: format!("text {id}"),
            epoch,
            ..InboundMessage::default()
        },
        rule_id: "r".to_owned(),
        platform_id: "p".to_owned(),
        reply_at_sender: false,
    }
}

async fn open(path: &Path) -> Store {
    Store::open(path, Synchronous::Normal, StoreGauges::default())
        .await
        .expect("store opens")
}

/// Checkpoints run off the writer (its automatic checkpoint is off), and they keep the
/// WAL from growing: the log is reused from its start once a checkpoint has copied it.
/// Without the checkpoint thread the WAL would hold every page written here (about
/// 20 x 100 pages); with it, about two rounds' worth at most.
#[tokio::test]
async fn the_checkpoint_thread_keeps_the_wal_small() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wal.db");
    let store = open(&path).await;
    store
        .write(|conn| {
            conn.execute_batch("CREATE TABLE scratch (b BLOB)")?;
            Ok(())
        })
        .await
        .unwrap();
    let wal = dir.path().join("wal.db-wal");
    let round_bytes: u64 = 400_000;
    for round in 0..20 {
        let before = store.writer.checkpoints();
        store
            .write(move |conn| {
                conn.execute("DELETE FROM scratch", [])?;
                conn.execute(
                    "INSERT INTO scratch (b) VALUES (zeroblob(?1))",
                    params![i64::try_from(round_bytes).unwrap()],
                )?;
                Ok(())
            })
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while store.writer.checkpoints() == before {
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint after round {round}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let size = tokio::fs::metadata(&wal).await.unwrap().len();
    assert!(
        size < 3 * round_bytes,
        "the WAL grew to {size} bytes over 20 rounds of {round_bytes}"
    );
}

/// A file written by the first release (schema version 1) keeps its rows, their states
/// and their dedupe, and gets correct counts from the new triggers.
#[tokio::test]
async fn version_1_files_migrate_with_their_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        for (id, state) in [("a", "pending"), ("b", "dead"), ("c", "delivered")] {
            conn.execute(
                "INSERT INTO messages (instance_id, message_id, synthetic_id, chat, sender, \
                 msg_type, content, received_ms, rule_id, platform_id, reply_at_sender, \
                 state, created_ms, updated_ms) \
                 VALUES ('wx', ?1, 0, 'c', 's', 'friend', 'x', 1, 'r', 'p', 0, ?2, 5, 7)",
                params![id, state],
            )
            .unwrap();
        }
    }
    let store = open(&path).await;
    let counts = store.counts().await.unwrap();
    assert_eq!(
        (counts.pending, counts.dead, counts.delivered),
        (1, 1, 1),
        "{counts:?}"
    );
    // Old rows are epoch 0: the same id again is a duplicate there, new in epoch 1.
    let inserted = store
        .insert_batch(vec![new_message("a", "c", 0), new_message("a", "c", 1)])
        .await
        .unwrap();
    assert_eq!(inserted, vec![false, true]);
    let dead = store.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message_id, "b");
    assert_eq!(
        dead[0].dead_ms, 7,
        "a migrated dead row died at its last update"
    );
}

/// Rebuilding `messages` (step 4) keeps the rows of tables that reference it.
#[tokio::test]
async fn the_messages_rebuild_keeps_media_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v3.db");
    {
        let conn = Connection::open(&path).unwrap();
        for step in &MIGRATIONS[..3] {
            conn.execute_batch(step).unwrap();
        }
        conn.pragma_update(None, "user_version", 3).unwrap();
        conn.execute(
            "INSERT INTO messages (id, instance_id, message_id, synthetic_id, chat, sender, \
             msg_type, content, received_ms, rule_id, platform_id, reply_at_sender, \
             created_ms, updated_ms) \
             VALUES (7, 'wx', 'img', 0, 'c', 's', 'friend', '', 1, 'r', 'p', 0, 5, 5)",
            [],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO media (message_row, file_path, updated_ms) VALUES (7, 'C:\\a.png', 5)",
            [],
        )
        .unwrap();
    }
    let store = open(&path).await;
    let media: i64 = store
        .read(|conn| {
            Ok(conn.query_row(
                "SELECT COUNT(*) FROM media JOIN messages ON messages.id = media.message_row",
                [],
                |row| row.get(0),
            )?)
        })
        .await
        .unwrap();
    assert_eq!(media, 1);
}

/// The trigger-kept counts match a full count after every kind of transition.
#[tokio::test]
async fn counts_follow_every_transition() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("c.db")).await;
    let rows: Vec<NewMessage> = (0..6)
        .map(|n| new_message(&format!("m{n}"), &format!("chat{n}"), 0))
        .collect();
    store.insert_batch(rows).await.unwrap();
    let check = |store: &Store| {
        let store = store.clone();
        async move {
            let fast = store.counts().await.unwrap();
            let slow = store
                .read(|conn| {
                    let count = |sql: &str| -> Result<u64, StoreError> {
                        Ok(conn.query_row(sql, [], |row| row.get::<_, i64>(0))? as u64)
                    };
                    Ok(StoreCounts {
                        pending: count(
                            "SELECT COUNT(*) FROM messages WHERE state IN ('pending', \
                             'delivering', 'replying') OR (state = 'reply_pending' AND \
                             reply_attempts = 0)",
                        )?,
                        failed: count(
                            "SELECT COUNT(*) FROM messages WHERE state = 'failed' OR \
                             (state = 'reply_pending' AND reply_attempts > 0)",
                        )?,
                        delivered: count(
                            "SELECT COUNT(*) FROM messages WHERE state = 'delivered'",
                        )?,
                        dead: count("SELECT COUNT(*) FROM messages WHERE state = 'dead'")?,
                    })
                })
                .await
                .unwrap();
            assert_eq!(fast, slow);
            fast
        }
    };
    assert_eq!(check(&store).await.pending, 6);
    let now = now_ms();
    let mut jobs = Vec::new();
    while let Some(job) = store.claim(now).await.unwrap() {
        jobs.push(job);
    }
    assert_eq!(jobs.len(), 6);
    store.mark_delivered(jobs[0].id).await.unwrap();
    store
        .mark_retry(jobs[1].id, Stage::Platform, now + 60_000, "x".to_owned())
        .await
        .unwrap();
    store
        .store_reply(jobs[2].id, "r".to_owned(), SendMode::Normal)
        .await
        .unwrap();
    store
        .mark_retry(jobs[2].id, Stage::Reply, now + 60_000, "y".to_owned())
        .await
        .unwrap();
    store.mark_dead(jobs[3].id, "z".to_owned()).await.unwrap();
    store.mark_dead(jobs[4].id, "z".to_owned()).await.unwrap();
    let counts = check(&store).await;
    assert_eq!(
        (counts.pending, counts.failed, counts.delivered, counts.dead),
        (1, 2, 1, 2)
    );
    assert_eq!(store.retry_dead(Some(vec![jobs[3].id])).await.unwrap(), 1);
    assert_eq!(check(&store).await.dead, 1);
    assert_eq!(store.purge_dead(None).await.unwrap(), 1);
    let counts = check(&store).await;
    assert_eq!(counts.dead, 0);
    let later = now_ms() + 1_000;
    store.prune(later, later).await.unwrap();
    assert_eq!(check(&store).await.delivered, 0);
}

/// A retried dead letter starts over; one whose platform already answered only re-sends
/// its reply (calling the platform again would answer the person twice).
#[tokio::test]
async fn retried_dead_letters_resume_where_they_failed() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("d.db")).await;
    store
        .insert_batch(vec![new_message("p", "a", 0), new_message("q", "b", 0)])
        .await
        .unwrap();
    let now = now_ms();
    let first = store.claim(now).await.unwrap().unwrap();
    let second = store.claim(now).await.unwrap().unwrap();
    store
        .mark_dead(first.id, "platform said 400".to_owned())
        .await
        .unwrap();
    store
        .store_reply(second.id, "hi".to_owned(), SendMode::Normal)
        .await
        .unwrap();
    store
        .mark_dead(second.id, "reply failed".to_owned())
        .await
        .unwrap();
    let dead = store.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0].last_error.as_deref(), Some("platform said 400"));
    assert!(!dead[0].reply_pending);
    assert!(dead[1].reply_pending);
    assert_eq!(dead[0].key, "wx:p");

    assert_eq!(store.retry_dead(None).await.unwrap(), 2);
    let now = now_ms();
    let again: Vec<Job> = [
        store.claim(now).await.unwrap(),
        store.claim(now).await.unwrap(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let platform = again.iter().find(|job| job.id == first.id).unwrap();
    assert_eq!((platform.stage, platform.attempts), (Stage::Platform, 1));
    let reply = again.iter().find(|job| job.id == second.id).unwrap();
    assert_eq!(reply.stage, Stage::Reply);
    assert_eq!(reply.reply_text.as_deref(), Some("hi"));
    assert_eq!(reply.reply_attempts, 1);
    assert!(store.dead_letters(10).await.unwrap().is_empty());
}

/// Batched claims take at most one row per chat, always the chat's oldest open row, never
/// a row of a chat that has one in flight or one waiting for its retry; completions sent
/// together (one commit) all land.
#[tokio::test]
async fn batched_claims_take_each_chats_head_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("b.db")).await;
    let chats = ["a", "b", "c", "d"];
    let rows: Vec<NewMessage> = (0..40)
        .map(|n| new_message(&format!("m{n}"), chats[n % chats.len()], 0))
        .collect();
    store.insert_batch(rows).await.unwrap();
    let now = now_ms();
    // Chat d's head failed and waits for a retry: the whole chat waits behind it.
    let first = store.claim_batch(now, 4).await.unwrap();
    assert_eq!(first.len(), 4, "one head per chat");
    let d = first.iter().find(|job| job.message.chat == "d").unwrap();
    store
        .mark_retry(d.id, Stage::Platform, now + 3_600_000, "later".to_owned())
        .await
        .unwrap();
    let mut in_flight: HashMap<String, i64> = first
        .iter()
        .filter(|job| job.message.chat != "d")
        .map(|job| (job.message.chat.clone(), job.id))
        .collect();
    let mut done: HashMap<String, Vec<i64>> = HashMap::new();
    for round in 0.. {
        assert!(round < 100, "the queue drains");
        let jobs = store.claim_batch(now, 8).await.unwrap();
        for job in &jobs {
            assert_ne!(job.message.chat, "d", "a chat waits behind its failed head");
            assert!(
                in_flight.insert(job.message.chat.clone(), job.id).is_none(),
                "two rows of chat {} in flight",
                job.message.chat
            );
        }
        if in_flight.is_empty() {
            break;
        }
        // Finish every other chat's row, all at once (they share commits).
        let finishing: Vec<(String, i64)> = in_flight
            .iter()
            .filter(|(chat, _)| round % 2 == 0 || chat.as_str() != "a")
            .map(|(chat, id)| (chat.clone(), *id))
            .collect();
        let marks: Vec<_> = finishing
            .iter()
            .map(|(_, id)| {
                let (store, id) = (store.clone(), *id);
                tokio::spawn(async move { store.mark_delivered(id).await })
            })
            .collect();
        for mark in marks {
            mark.await.unwrap().unwrap();
        }
        for (chat, id) in finishing {
            in_flight.remove(&chat);
            done.entry(chat).or_default().push(id);
        }
    }
    for chat in ["a", "b", "c"] {
        let ids = &done[chat];
        assert_eq!(ids.len(), 10, "chat {chat}");
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "chat {chat}: {ids:?}");
    }
    let counts = store.counts().await.unwrap();
    assert_eq!(
        (counts.delivered, counts.failed, counts.pending),
        (30, 1, 9)
    );
}

/// A write that fails inside a batch is rolled back alone; the writes committed with it
/// stand.
#[tokio::test]
async fn a_failing_write_does_not_take_its_batch_down() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("f.db")).await;
    store
        .insert_batch(vec![new_message("x", "a", 0), new_message("y", "b", 0)])
        .await
        .unwrap();
    let jobs = store.claim_batch(now_ms(), 2).await.unwrap();
    let failing = store.write(|conn| {
        conn.execute("UPDATE messages SET state = 'delivered'", [])?;
        conn.execute("INSERT INTO no_such_table VALUES (1)", [])?;
        Ok(())
    });
    let (failed, first, second) = tokio::join!(
        failing,
        store.mark_delivered(jobs[0].id),
        store.mark_retry(jobs[1].id, Stage::Platform, 0, "e".to_owned()),
    );
    assert!(failed.is_err());
    first.unwrap();
    second.unwrap();
    let counts = store.counts().await.unwrap();
    assert_eq!((counts.delivered, counts.failed), (1, 1), "{counts:?}");
}

/// The clean-stop marker: a new store is clean, a run that was not marked is not.
#[tokio::test]
async fn the_clean_stop_marker_tells_a_kill_from_a_clean_stop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.db");
    let store = open(&path).await;
    assert!(
        store.begin_run().await.unwrap(),
        "a new store has nothing to recover"
    );
    drop(store);
    // Killed: never marked.
    let store = open(&path).await;
    assert!(!store.begin_run().await.unwrap());
    store.mark_clean_stop().await.unwrap();
    drop(store);
    let store = open(&path).await;
    assert!(store.begin_run().await.unwrap());
    drop(store);
    let store = open(&path).await;
    assert!(
        !store.begin_run().await.unwrap(),
        "each run clears the marker"
    );
}

#[tokio::test]
async fn chat_tables_sessions_and_history_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let store = open(&path).await;
    let chats = vec![
        StoredChat {
            chat: "群 A".to_owned(),
            active: true,
            fixed: false,
            added_ms: 1_000,
            last_message_ms: Some(2_000),
            message_count: 3,
            error_count: 1,
            baseline: Some("b-7".to_owned()),
        },
        StoredChat {
            chat: "bob".to_owned(),
            active: false,
            fixed: false,
            added_ms: 5,
            last_message_ms: None,
            message_count: 0,
            error_count: 0,
            baseline: None,
        },
    ];
    store
        .save_chats("wx".to_owned(), chats.clone())
        .await
        .unwrap();
    let session = UpstreamSession {
        epoch: 3,
        started_ms: Some(42),
    };
    store.save_session("wx".to_owned(), session).await.unwrap();
    drop(store);
    let store = open(&path).await;
    let (loaded, loaded_session) = store.load_listener("wx".to_owned()).await.unwrap();
    let mut expected = chats;
    expected.sort_by(|a, b| a.chat.cmp(&b.chat));
    assert_eq!(loaded, expected);
    assert_eq!(loaded_session, session);
    let (none, default) = store.load_listener("other".to_owned()).await.unwrap();
    assert!(none.is_empty());
    assert_eq!(default, UpstreamSession::default());

    store
        .insert_batch(vec![
            new_message("1", "群 A", 3),
            new_message("2", "群 A", 3),
            new_message("3", "群 A", 2),
        ])
        .await
        .unwrap();
    let history = store
        .chat_history(
            "wx".to_owned(),
            "群 A".to_owned(),
            3,
            vec!["1".to_owned(), "3".to_owned(), "9".to_owned()],
        )
        .await
        .unwrap();
    assert_eq!(
        history.known_ids,
        vec!["1".to_owned()],
        "3 is of another epoch"
    );
    let contents: Vec<&str> = history.tail.iter().map(|(_, c)| c.as_str()).collect();
    assert_eq!(contents, ["text 1", "text 2", "text 3"]);
}
