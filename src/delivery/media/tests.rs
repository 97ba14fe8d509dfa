//! Unit tests of the media step: file names, saving, pruning, the download log.

use std::time::SystemTime;

use super::*;

#[test]
fn names_collide_into_numbered_files() {
    let dir = tempfile::tempdir().unwrap();
    let (first, hash) = save(dir.path(), "微信图片_1.png", b"one").unwrap();
    let (second, _) = save(dir.path(), "微信图片_1.png", b"two").unwrap();
    let (third, _) = save(dir.path(), "微信图片_1.png", b"three").unwrap();
    let (bare, _) = save(dir.path(), "README", b"x").unwrap();
    let (bare2, _) = save(dir.path(), "README", b"y").unwrap();
    let names: Vec<String> = [&first, &second, &third, &bare, &bare2]
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "微信图片_1.png",
            "微信图片_1_1.png",
            "微信图片_1_2.png",
            "README",
            "README_1"
        ]
    );
    assert_eq!(fs::read(&second).unwrap(), b"two");
    assert_eq!(
        hash,
        "7692c3ad3540bb803c020b3aee66cd8887123234ea0c6e7143c0add73ff431ed"
    );
}

#[test]
fn windows_paths_become_safe_names() {
    assert_eq!(
        file_name(r"C:\Users\me\Documents\wxauto文件\微信图片_20261201.png"),
        "微信图片_20261201.png"
    );
    assert_eq!(file_name(r"C:\x\a:b?.txt"), "a_b_.txt");
    assert_eq!(file_name(r"C:\x\.."), "file");
    assert_eq!(file_name(""), "file");
}

#[test]
fn paths_are_found_in_content_and_media_text_is_empty() {
    assert_eq!(
        windows_path("图片 D:\\wx\\a b.jpg\n"),
        Some("D:\\wx\\a b.jpg")
    );
    assert_eq!(windows_path("no path here"), None);
    let mut msg = InboundMessage {
        instance_id: "wx".to_owned(),
        chat: "alice".to_owned(),
        message_id: "1".to_owned(),
        synthetic_id: false,
        msg_type: "friend".to_owned(),
        sender: "alice".to_owned(),
        sender_remark: None,
        content: r"C:\wx\a.png".to_owned(),
        mtype: Some("image".to_owned()),
        file_path: None,
        received_at: chrono::Utc::now(),
        epoch: 0,
    };
    assert_eq!(text_of(&msg), "");
    msg.mtype = None;
    assert_eq!(text_of(&msg), r"C:\wx\a.png");
    msg.mtype = Some("voice".to_owned());
    msg.content = "明天见".to_owned();
    assert_eq!(text_of(&msg), "明天见");
}

#[test]
fn content_types_follow_the_extension() {
    assert_eq!(content_type("a.PNG"), "image/png");
    assert_eq!(content_type("a.jpeg"), "image/jpeg");
    assert_eq!(content_type("report.pdf"), "application/pdf");
    assert_eq!(content_type("noext"), "application/octet-stream");
}

#[test]
fn prune_removes_only_files_older_than_retention() {
    let dir = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    let old = dir.path().join("old.png");
    let fresh = dir.path().join("fresh.png");
    let edge = dir.path().join("six_days.png");
    for path in [&old, &fresh, &edge] {
        fs::write(path, b"x").unwrap();
    }
    let set_age = |path: &Path, days: u64| {
        let file = File::options().write(true).open(path).unwrap();
        file.set_modified(now - Duration::from_secs(days * DAY_SECS))
            .unwrap();
    };
    set_age(&old, 8);
    set_age(&edge, 6);
    fs::create_dir(dir.path().join("sub")).unwrap();
    assert_eq!(prune_dir(dir.path(), 7, now).unwrap(), 1);
    assert!(!old.exists());
    assert!(fresh.exists() && edge.exists());
    assert!(dir.path().join("sub").exists());
    assert_eq!(prune_dir(&dir.path().join("missing"), 7, now).unwrap(), 0);
}

#[test]
fn file_log_moves_an_earlier_day_aside() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("file_processing.log");
    fs::write(&path, "old line\n").unwrap();
    let two_days_ago = SystemTime::now() - Duration::from_secs(2 * DAY_SECS);
    File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(two_days_ago)
        .unwrap();
    let log = FileLog::new(dir.path(), 7);
    log.write("new line");
    assert_eq!(fs::read_to_string(&path).unwrap(), "new line\n");
    let date = DateTime::<Local>::from(two_days_ago).date_naive();
    let dated = dir
        .path()
        .join(crate::logging::DailyFile::file_name(FILE_LOG_PREFIX, date));
    assert_eq!(fs::read_to_string(dated).unwrap(), "old line\n");
}
