//! Unit tests of the status page: content negotiation, escaping, the rendered sections.

use super::render::esc;
use super::*;

#[test]
fn browsers_prefer_html_and_other_clients_do_not() {
    let chrome =
        "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8";
    assert!(prefers_html(Some(chrome)));
    assert!(prefers_html(Some("text/html")));
    assert!(!prefers_html(Some("*/*")));
    assert!(!prefers_html(None));
    assert!(!prefers_html(Some("application/json")));
    assert!(!prefers_html(Some("application/json, text/html;q=0.5")));
    assert!(!prefers_html(Some("text/html;q=0")));
}

#[test]
fn user_text_is_escaped() {
    assert_eq!(
        esc("<script>\"a\" & 'b'</script>"),
        "&lt;script&gt;&quot;a&quot; &amp; &#39;b&#39;&lt;/script&gt;"
    );
}

#[test]
fn the_body_shows_the_document_and_escapes_chat_names_and_errors() {
    let health = serde_json::json!({
        "timestamp": "2026-12-01T10:00:00.000Z",
        "health_score": 74,
        "overall_status": "warning",
        "deductions": {"listener": 0, "clients": 10, "listeners": 6, "error_rate": 10},
        "message_listener": {"running": true, "uptime_formatted": "0:01:00"},
        "api_clients": [
            {"instance_id": "wx-a", "enabled": true, "state": "up", "last_check_time": 1.8e9,
             "error_count": 0, "last_error": null},
            {"instance_id": "wx-b", "enabled": true, "state": "down", "last_check_time": null,
             "error_count": 3, "last_error": "connect <refused>"},
        ],
        "api_clients_summary": {"total_count": 2, "connected_count": 1,
                                "disabled_instances": ["wx-off<i>"]},
        "listeners": [
            {"instance_id": "wx-a", "who": "测试群<b>", "active": true, "fixed": false,
             "message_count": 2, "error_count": 0, "last_message_time": 1.8e9},
            {"instance_id": "wx-a", "who": "old", "active": false, "fixed": false,
             "message_count": 0, "error_count": 0, "last_message_time": null},
        ],
        "listeners_summary": {"total_count": 2, "active_count": 1},
        "statistics": {"recent_errors_count": 3, "config_reloads": 1, "config_reload_failures": 0},
        "recent_errors": [{"timestamp": "2026-12-01T09:59:00.000Z", "error_type": "client.connect",
                           "instance_id": "wx-b", "error_message": "<img src=x>"}],
        "config": {"last_reload_successful": true, "last_reload_success_time": 1.8e9,
                   "config_hash": "00000000000000ff"},
    });
    let model = Model {
        health,
        delivery: Some(StoreCounts {
            pending: 2,
            failed: 1,
            delivered: 9,
            dead: 4,
        }),
        processes: Some(serde_json::json!([
            {"name": "wxauto", "state": "running", "pid": 42, "restarts": 1,
             "uptime_formatted": "0:05:00", "memory_usage_mb": 12.345, "last_error": null},
            {"name": "bot<1>", "state": "fatal", "pid": null, "last_error": "exit <3>"},
        ])),
        lifecycle: false,
    };
    let body = render_body(&model, Lang::Zh);
    for expected in [
        "id=\"score\" title=\"健康分\">74</div>",
        "data-status=\"warning\">警告</span>",
        "<li class=\"lost\" data-deduction=\"clients\">",
        "<b>−10</b>",
        "data-state=\"up\">在线</span>",
        "data-state=\"down\">离线</span>",
        "<tr data-instance=\"wx-off&lt;i&gt;\"><td><b>wx-off&lt;i&gt;</b></td><td><span class=\"badge disabled\" data-state=\"disabled\">已停用</span>",
        "<td class=\"num\">1 / 1</td>",
        "测试群&lt;b&gt;",
        "connect &lt;refused&gt;",
        "&lt;img src=x&gt;",
        "<dd id=\"delivery-pending\">3</dd>",
        "<dd id=\"delivery-dead\">4</dd>",
        "<tr data-process=\"wxauto\"><td><b>wxauto</b></td>",
        "data-state=\"running\">running</span>",
        "<td class=\"num\">12.3 MB</td>",
        "<tr data-process=\"bot&lt;1&gt;\">",
        "<span class=\"badge down\" data-state=\"fatal\">",
        "exit &lt;3&gt;",
        "href=\"?lang=en\"",
        "未启用",
    ] {
        assert!(body.contains(expected), "missing {expected:?} in {body}");
    }
    assert!(!body.contains("<img"), "unescaped user text");
    let english = render_body(&model, Lang::En);
    assert!(english.contains("data-status=\"warning\">Warning</span>"));
    assert!(english.contains("href=\"?lang=zh\""));
    assert!(page(Lang::En, &english).starts_with("<!doctype html>"));
}
