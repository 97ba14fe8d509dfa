//! Watcher tests: event relevance on synthetic events, then the real watcher on temp files for
//! every way editors and Kubernetes replace a file, the debounce, and the hash poll fallback.
//!
//! Outcomes are awaited by polling a counter against a deadline; sleeps only let things settle.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use notify::event::{CreateKind, DataChange, Flag, ModifyKind, RemoveKind, RenameMode};

use super::*;

const DEADLINE: Duration = Duration::from_secs(10);
const DEBOUNCE: Duration = Duration::from_millis(100);
/// How long one arming write waits for its signal before writing again.
const ARM_WAIT: Duration = Duration::from_millis(300);

// === relevance (synthetic events) ===

fn event(kind: EventKind, paths: &[&str]) -> Event {
    paths.iter().fold(Event::new(kind), |event, path| {
        event.add_path(PathBuf::from(path))
    })
}

#[test]
fn relevance_of_events() {
    let targets = Targets::new(&[
        PathBuf::from("/etc/wx/config.yaml"),
        PathBuf::from("/etc/wx/keys.txt"),
        PathBuf::from("/run/secrets/api.key"),
    ]);
    let write = EventKind::Modify(ModifyKind::Data(DataChange::Any));
    let cases: &[(&str, Event, bool)] = &[
        ("write", event(write, &["/etc/wx/config.yaml"]), true),
        (
            "write of a key file",
            event(write, &["/run/secrets/api.key"]),
            true,
        ),
        (
            "rename over (vim, VS Code, mv)",
            event(
                EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
                &["/etc/wx/.config.yaml.swp", "/etc/wx/config.yaml"],
            ),
            true,
        ),
        (
            "delete",
            event(
                EventKind::Remove(RemoveKind::File),
                &["/etc/wx/config.yaml"],
            ),
            true,
        ),
        (
            "ConfigMap ..data swap",
            event(
                EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                &["/etc/wx/..data"],
            ),
            true,
        ),
        (
            "ConfigMap timestamped dir",
            event(
                EventKind::Create(CreateKind::Folder),
                &["/etc/wx/..2026_11_29_14_00_00.1"],
            ),
            true,
        ),
        ("path-less event", event(EventKind::Any, &[]), true),
        (
            "queue overflow",
            Event::new(EventKind::Other).set_flag(Flag::Rescan),
            true,
        ),
        (
            "close after write",
            event(
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                &["/etc/wx/config.yaml"],
            ),
            true,
        ),
        (
            "open (our own hashing)",
            event(
                EventKind::Access(AccessKind::Open(AccessMode::Any)),
                &["/etc/wx/config.yaml"],
            ),
            false,
        ),
        (
            "close after read",
            event(
                EventKind::Access(AccessKind::Close(AccessMode::Read)),
                &["/etc/wx/config.yaml"],
            ),
            false,
        ),
        (
            "unrelated file",
            event(write, &["/etc/wx/other.yaml"]),
            false,
        ),
        (
            "same name elsewhere",
            event(write, &["/tmp/config.yaml"]),
            false,
        ),
        (
            "editor backup",
            event(write, &["/etc/wx/config.yaml~"]),
            false,
        ),
        (
            "dot file",
            event(write, &["/etc/wx/.config.yaml.swp"]),
            false,
        ),
        (
            "..data in an unwatched dir",
            event(write, &["/etc/other/..data"]),
            false,
        ),
    ];
    for (name, event, expected) in cases {
        assert_eq!(targets.relevant(event), *expected, "{name}: {event:?}");
    }
}

#[test]
fn bare_file_names_watch_the_working_directory() {
    let targets = Targets::new(&[PathBuf::from("config.yaml")]);
    let cwd = std::env::current_dir()
        .and_then(std::fs::canonicalize)
        .expect("cwd");
    assert_eq!(targets.dirs(), std::slice::from_ref(&cwd));
    // Events carry the absolute path notify derived from the watched one.
    let write = EventKind::Modify(ModifyKind::Data(DataChange::Any));
    let absolute = cwd.join("config.yaml");
    assert!(targets.relevant(&event(write, &[absolute.to_str().expect("utf-8")])));
}

#[test]
fn relative_and_dotted_paths_compare_canonically() {
    let dir = tempfile::tempdir().expect("tempdir");
    let canonical = std::fs::canonicalize(dir.path()).expect("canonicalize");
    std::fs::create_dir(canonical.join("sub")).expect("mkdir");
    // `dir/sub/../config.yaml` names the same directory as `dir`.
    let dotted = canonical.join("sub").join("..").join("config.yaml");
    let targets = Targets::new(&[dotted]);
    assert_eq!(targets.dirs(), std::slice::from_ref(&canonical));
    let write = EventKind::Modify(ModifyKind::Data(DataChange::Any));
    let path = canonical.join("config.yaml");
    assert!(targets.relevant(&event(write, &[path.to_str().expect("utf-8")])));
    // A directory that does not exist is still made absolute.
    let missing = Targets::new(&[PathBuf::from("no-such-dir-here/config.yaml")]);
    assert!(missing.dirs()[0].is_absolute(), "{:?}", missing.dirs());
}

#[test]
fn directories_are_deduplicated() {
    let targets = Targets::new(&[
        PathBuf::from("/a/config.yaml"),
        PathBuf::from("/a/key"),
        PathBuf::from("/b/key"),
    ]);
    assert_eq!(targets.dirs(), [PathBuf::from("/a"), PathBuf::from("/b")]);
}

#[test]
fn losing_the_directory_is_detected() {
    let targets = Targets::new(&[PathBuf::from("/etc/wx/config.yaml")]);
    let removed = event(EventKind::Remove(RemoveKind::Folder), &["/etc/wx"]);
    assert!(targets.lost_dir(&removed));
    let file_removed = event(
        EventKind::Remove(RemoveKind::File),
        &["/etc/wx/config.yaml"],
    );
    assert!(!targets.lost_dir(&file_removed));
}

// === the real watcher ===

/// A running watcher on `config.yaml` in a fresh temp dir, counting `on_change` calls.
struct Fixture {
    dir: tempfile::TempDir,
    file: PathBuf,
    count: Arc<AtomicUsize>,
    handle: WatchHandle,
    events: EventSender,
    cancel: CancellationToken,
    writes: usize,
}

impl Fixture {
    async fn start(backend: Backend, options: WatchOptions) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("config.yaml");
        std::fs::write(&file, "version: 0\n").expect("write");
        Self::start_on(dir, vec![file.clone()], file, backend, options).await
    }

    async fn start_on(
        dir: tempfile::TempDir,
        files: Vec<PathBuf>,
        file: PathBuf,
        backend: Backend,
        options: WatchOptions,
    ) -> Self {
        let count = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&count);
        let on_change: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let cancel = CancellationToken::new();
        let tuning = Tuning {
            backend,
            recreate_delay: Duration::from_millis(50),
            poll_watcher_interval: Duration::from_millis(50),
        };
        let (handle, events) = spawn_with(files, options, tuning, on_change, cancel.clone()).await;
        Self {
            dir,
            file,
            count,
            handle,
            events,
            cancel,
            writes: 0,
        }
    }

    /// Event-driven tests: a short debounce, and a poll too slow to interfere.
    async fn events_only() -> Self {
        Self::start(
            Backend::Native,
            WatchOptions {
                debounce: DEBOUNCE,
                poll_interval: Duration::from_secs(3600),
                poll_only: false,
            },
        )
        .await
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// New content every time, so hashes always differ.
    fn next_content(&mut self) -> String {
        self.writes += 1;
        format!("version: {}\n", self.writes)
    }

    /// Waits until the count exceeds `baseline`; false at the deadline.
    async fn signalled_after(&self, baseline: usize) -> bool {
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if self.count() > baseline {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Waits until no signal arrived for `quiet`, and returns the count then.
    async fn settle(&self, quiet: Duration) -> usize {
        let mut last = self.count();
        loop {
            tokio::time::sleep(quiet).await;
            let now = self.count();
            if now == last {
                return now;
            }
            last = now;
        }
    }

    /// Proves the watch is armed: rewrites the file until a signal arrives, then lets the
    /// trailing events settle. Returns the count to compare against.
    async fn arm(&mut self) -> usize {
        let deadline = Instant::now() + DEADLINE;
        loop {
            assert!(Instant::now() < deadline, "the watcher never armed");
            let baseline = self.count();
            let content = self.next_content();
            std::fs::write(&self.file, content).expect("write");
            let wait_until = Instant::now() + ARM_WAIT;
            while Instant::now() < wait_until && self.count() == baseline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if self.count() > baseline {
                return self.settle(DEBOUNCE * 3).await;
            }
        }
    }

    /// Asserts that a plain write is still seen (the watch survived whatever came before).
    async fn assert_still_watching(&mut self) {
        let baseline = self.settle(DEBOUNCE * 3).await;
        let content = self.next_content();
        std::fs::write(&self.file, content).expect("write");
        assert!(
            self.signalled_after(baseline).await,
            "no signal for a write after the change"
        );
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[tokio::test]
async fn a_change_before_the_watch_is_armed_is_signalled() {
    // A current-thread runtime: the watcher task has not run yet when the file changes, so no
    // event reports the change and the poll is an hour away.
    let mut fixture = Fixture::events_only().await;
    let content = fixture.next_content();
    std::fs::write(&fixture.file, content).expect("write");
    assert!(fixture.signalled_after(0).await, "the change was missed");
}

#[tokio::test]
async fn in_place_write_is_signalled() {
    let mut fixture = Fixture::events_only().await;
    let baseline = fixture.arm().await;
    // Truncate and write through the same inode.
    let content = fixture.next_content();
    std::fs::write(&fixture.file, content).expect("write");
    assert!(fixture.signalled_after(baseline).await);
}

#[tokio::test]
async fn a_relative_config_path_is_watched_by_events() {
    // `--config target/<tmp>/config.yaml` from the package root (cargo runs unit tests there):
    // a relative path with a parent, as `--config my-config.yaml` is one with an empty parent.
    // The hash poll is an hour away, so only a matched native event can signal.
    std::fs::create_dir_all("target").expect("target dir");
    let dir = tempfile::Builder::new()
        .prefix("watch-relative-")
        .tempdir_in("target")
        .expect("tempdir");
    let name = dir.path().file_name().expect("name").to_owned();
    let relative = Path::new("target").join(name).join("config.yaml");
    assert!(relative.is_relative());
    std::fs::write(&relative, "version: 0\n").expect("write");
    let options = WatchOptions {
        debounce: DEBOUNCE,
        poll_interval: Duration::from_secs(3600),
        poll_only: false,
    };
    let mut fixture = Fixture::start_on(
        dir,
        vec![relative.clone()],
        relative,
        Backend::Native,
        options,
    )
    .await;
    let baseline = fixture.arm().await;
    let tmp = fixture.dir.path().join(".config.yaml.tmp");
    std::fs::write(&tmp, fixture.next_content()).expect("write tmp");
    std::fs::rename(&tmp, &fixture.file).expect("rename");
    assert!(
        fixture.signalled_after(baseline).await,
        "rename over missed"
    );
    fixture.assert_still_watching().await;
}

#[tokio::test]
async fn rename_over_is_signalled_and_the_watch_survives() {
    let mut fixture = Fixture::events_only().await;
    let baseline = fixture.arm().await;
    // What vim, VS Code and `mv tmp config.yaml` do: a new inode takes the name.
    let tmp = fixture.dir.path().join(".config.yaml.tmp");
    let content = fixture.next_content();
    std::fs::write(&tmp, content).expect("write tmp");
    std::fs::rename(&tmp, &fixture.file).expect("rename");
    assert!(fixture.signalled_after(baseline).await);
    fixture.assert_still_watching().await;
}

#[tokio::test]
async fn delete_then_create_is_signalled_and_the_watch_survives() {
    let mut fixture = Fixture::events_only().await;
    let baseline = fixture.arm().await;
    std::fs::remove_file(&fixture.file).expect("remove");
    assert!(
        fixture.signalled_after(baseline).await,
        "no signal for the delete"
    );
    let baseline = fixture.settle(DEBOUNCE * 3).await;
    let content = fixture.next_content();
    std::fs::write(&fixture.file, content).expect("create");
    assert!(
        fixture.signalled_after(baseline).await,
        "no signal for the create"
    );
    fixture.assert_still_watching().await;
}

#[cfg(unix)]
#[tokio::test]
async fn configmap_data_swap_is_signalled() {
    use std::os::unix::fs::symlink;

    // The layout kubelet writes: config.yaml -> ..data/config.yaml, ..data -> ..<timestamp>.
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    std::fs::create_dir(root.join("..2026_x")).expect("mkdir");
    std::fs::write(root.join("..2026_x/config.yaml"), "version: x\n").expect("write");
    symlink("..2026_x", root.join("..data")).expect("symlink ..data");
    symlink("..data/config.yaml", root.join("config.yaml")).expect("symlink config");
    let file = root.join("config.yaml");
    let options = WatchOptions {
        debounce: DEBOUNCE,
        poll_interval: Duration::from_secs(3600),
        poll_only: false,
    };
    let mut fixture =
        Fixture::start_on(dir, vec![file.clone()], file, Backend::Native, options).await;

    // Arm through the symlink: writes land in ..2026_x, which is not watched, so arm by
    // touching a `..` entry of the watched directory instead.
    let deadline = Instant::now() + DEADLINE;
    let baseline = loop {
        assert!(Instant::now() < deadline, "the watcher never armed");
        let before = fixture.count();
        let sentinel = root.join("..sentinel");
        std::fs::write(&sentinel, fixture.next_content()).expect("write sentinel");
        std::fs::remove_file(&sentinel).expect("remove sentinel");
        let wait_until = Instant::now() + ARM_WAIT;
        while Instant::now() < wait_until && fixture.count() == before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if fixture.count() > before {
            break fixture.settle(DEBOUNCE * 3).await;
        }
    };

    // The atomic swap: new data dir, new symlink, rename it over ..data, drop the old dir.
    std::fs::create_dir(root.join("..2026_y")).expect("mkdir");
    std::fs::write(root.join("..2026_y/config.yaml"), "version: y\n").expect("write");
    symlink("..2026_y", root.join("..data_tmp")).expect("symlink");
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).expect("swap");
    std::fs::remove_dir_all(root.join("..2026_x")).expect("remove old");
    assert!(fixture.signalled_after(baseline).await);
    assert_eq!(
        std::fs::read_to_string(root.join("config.yaml")).expect("read"),
        "version: y\n"
    );
}

#[tokio::test]
async fn a_burst_of_writes_is_debounced() {
    let mut fixture = Fixture::events_only().await;
    let baseline = fixture.arm().await;
    for _ in 0..20 {
        let content = fixture.next_content();
        std::fs::write(&fixture.file, content).expect("write");
    }
    assert!(fixture.signalled_after(baseline).await);
    let total = fixture.settle(DEBOUNCE * 5).await;
    let signals = total - baseline;
    assert!(signals <= 3, "{signals} signals for one burst of 20 writes");
}

#[tokio::test]
async fn hash_poll_sees_changes_without_any_events() {
    let mut fixture = Fixture::start(
        Backend::Off,
        WatchOptions {
            // Irrelevant here: no event ever arrives.
            debounce: Duration::from_secs(3600),
            poll_interval: Duration::from_millis(50),
            poll_only: false,
        },
    )
    .await;
    let content = fixture.next_content();
    std::fs::write(&fixture.file, content).expect("write");
    assert!(fixture.signalled_after(0).await, "no signal for a change");
    // A missing file hashes as "absent", which is a change too.
    let baseline = fixture.count();
    std::fs::remove_file(&fixture.file).expect("remove");
    assert!(
        fixture.signalled_after(baseline).await,
        "no signal for a delete"
    );
}

#[tokio::test]
async fn poll_watcher_backend_sees_changes() {
    let mut fixture = Fixture::start(
        Backend::Poll,
        WatchOptions {
            debounce: DEBOUNCE,
            poll_interval: Duration::from_secs(3600),
            poll_only: false,
        },
    )
    .await;
    let baseline = fixture.arm().await;
    let tmp = fixture.dir.path().join("tmp");
    std::fs::write(&tmp, fixture.next_content()).expect("write");
    std::fs::rename(&tmp, &fixture.file).expect("rename");
    assert!(fixture.signalled_after(baseline).await);
}

#[tokio::test]
async fn set_files_retargets_the_watch() {
    let mut fixture = Fixture::events_only().await;
    fixture.arm().await;
    let other = tempfile::tempdir().expect("tempdir");
    let key = other.path().join("api.key");
    std::fs::write(&key, "key-0\n").expect("write");
    fixture
        .handle
        .set_files(vec![fixture.file.clone(), key.clone()]);

    // Arm again on the new directory by writing the key until a signal arrives.
    let deadline = Instant::now() + DEADLINE;
    let mut n = 0;
    loop {
        assert!(Instant::now() < deadline, "the key file is never watched");
        let before = fixture.count();
        n += 1;
        std::fs::write(&key, format!("key-{n}\n")).expect("write key");
        let wait_until = Instant::now() + ARM_WAIT;
        while Instant::now() < wait_until && fixture.count() == before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if fixture.count() > before {
            break;
        }
    }
    // The config file is still watched too.
    fixture.assert_still_watching().await;
}

#[tokio::test]
async fn a_watcher_error_recreates_it_and_signals_once() {
    // No real events, so every signal here comes from the recreation.
    let fixture = Fixture::start(
        Backend::Off,
        WatchOptions {
            debounce: DEBOUNCE,
            poll_interval: Duration::from_secs(3600),
            poll_only: false,
        },
    )
    .await;
    // Errors in a row, as a failing watcher reports them: one recreation, one signal.
    for _ in 0..3 {
        fixture
            .events
            .send(Err(notify::Error::generic("simulated failure")))
            .expect("task alive");
    }
    assert!(fixture.signalled_after(0).await, "no speculative signal");
    let signals = fixture.settle(Duration::from_millis(300)).await;
    assert_eq!(signals, 1, "one recreation, one speculative signal");
}

#[tokio::test]
async fn cancel_stops_the_task() {
    let fixture = Fixture::events_only().await;
    fixture.cancel.cancel();
    // The task drops its receiver when it ends; then sending fails.
    let deadline = Instant::now() + DEADLINE;
    while fixture.events.send(Ok(Event::new(EventKind::Any))).is_ok() {
        assert!(Instant::now() < deadline, "the watcher task did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Paused time: a burst of events signals once, `debounce` after its last event; a burst that
/// never goes quiet signals `MAX_DEBOUNCE_FACTOR` debounce periods after its first event.
#[tokio::test(start_paused = true)]
async fn debounce_waits_for_quiet_and_caps_a_burst_that_never_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, "version: 0\n").expect("write");
    let signals = Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let record = Arc::clone(&signals);
    let on_change: Arc<dyn Fn() + Send + Sync> =
        Arc::new(move || record.lock().unwrap().push(Instant::now()));
    let debounce = Duration::from_secs(1);
    let options = WatchOptions {
        debounce,
        poll_interval: Duration::from_secs(3600),
        poll_only: false,
    };
    let tuning = Tuning {
        backend: Backend::Off,
        recreate_delay: Duration::from_secs(3600),
        poll_watcher_interval: Duration::from_secs(3600),
    };
    let cancel = CancellationToken::new();
    let (_handle, events) = spawn_with(
        vec![file.clone()],
        options,
        tuning,
        on_change,
        cancel.clone(),
    )
    .await;
    let modified = || Ok(Event::new(EventKind::Modify(ModifyKind::Any)).add_path(file.clone()));
    let taken = || std::mem::take(&mut *signals.lock().unwrap());

    // Three events 600 ms apart: each one moves the signal to a debounce after it.
    let start = Instant::now();
    for _ in 0..3 {
        events.send(modified()).expect("task alive");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(taken().is_empty(), "signalled inside the burst");
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let at: Vec<Duration> = taken().iter().map(|at| *at - start).collect();
    assert_eq!(
        at,
        [Duration::from_millis(2200)],
        "one signal, a debounce after the last event"
    );

    // Events every 600 ms for 12 s: quiet never comes, the cap does.
    let start = Instant::now();
    for _ in 0..20 {
        events.send(modified()).expect("task alive");
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    let at: Vec<Duration> = taken().iter().map(|at| *at - start).collect();
    assert_eq!(
        at.first(),
        Some(&(debounce * MAX_DEBOUNCE_FACTOR)),
        "the burst was not capped: {at:?}"
    );
    cancel.cancel();
}
