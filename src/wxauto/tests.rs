//! Unit tests of the wxauto client: endpoint labels, redaction, capped downloads.

use reqwest::StatusCode;

use super::*;

#[test]
fn every_endpoint_indexes_its_own_metric_label() {
    for (index, endpoint) in Endpoint::ALL.into_iter().enumerate() {
        assert_eq!(endpoint as usize, index, "{endpoint:?}");
    }
    assert_eq!(Endpoint::Health.label(), "health");
    assert_eq!(Endpoint::SendTyping.label(), "send_typing");
    assert_eq!(Endpoint::GetAllMessages.label(), "get_all_messages");
}

/// A chat this account does not have is refused with HTTP 500 and code 3001: a polling
/// failure with that answer stops the instance, a call about one chat does not. Without an
/// envelope (a proxy's 502, a crashed server), with 2001 or with 5000 (an uncaught exception
/// in the server), both stop it.
#[test]
fn a_refusal_about_one_chat_is_not_an_instance_failure() {
    let http = |status, code| WxautoError::HttpStatus {
        endpoint: "listen_add",
        status,
        code,
        message: "添加监听失败".to_owned(),
    };
    let refused = http(500, Some(3001));
    assert!(refused.is_instance_failure());
    assert!(!refused.is_instance_failure_for_chat());
    assert!(http(500, Some(5000)).is_instance_failure_for_chat());
    assert!(!http(500, Some(3003)).is_instance_failure_for_chat());
    assert!(!http(404, Some(3001)).is_instance_failure_for_chat());
    assert!(http(502, None).is_instance_failure_for_chat());
    assert!(http(500, Some(2001)).is_instance_failure_for_chat());
    let api_code = |code| WxautoError::ApiCode {
        endpoint: "listen_add",
        code,
        message: String::new(),
    };
    assert!(api_code(2001).is_instance_failure_for_chat());
    assert!(!api_code(3001).is_instance_failure_for_chat());
    for transport in [
        WxautoError::Timeout {
            endpoint: "listen_add",
        },
        WxautoError::Connect {
            endpoint: "listen_add",
            reason: "refused".to_owned(),
        },
        WxautoError::Auth {
            endpoint: "listen_add",
            message: String::new(),
        },
    ] {
        assert!(transport.is_instance_failure_for_chat(), "{transport}");
    }
}

#[test]
fn a_key_echoed_across_the_cut_is_still_redacted() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut registry = crate::metrics::Registry::default();
    let metrics = Metrics::register(&mut registry);
    let key = "k3y-0123456789abcdef";
    let client = Client::new(
        "wx",
        "http://127.0.0.1:1",
        Secret::new(key),
        Duration::from_secs(1),
        metrics,
    )
    .unwrap();
    // The key starts at character 195, so a cut at 200 would split it.
    let echoed = format!("{}{key} rejected", "x".repeat(195));
    let cleaned = client.clean(&echoed);
    assert!(!cleaned.contains(&key[..5]), "{cleaned}");
    assert!(cleaned.contains(crate::secret::REDACTED));
    assert!(cleaned.chars().count() <= 200);
}

/// A loopback server answering `/api/file/download` by the requested path.
async fn file_server() -> String {
    use axum::body::Body;
    use axum::response::IntoResponse;
    async fn download(axum::Json(body): axum::Json<Value>) -> axum::response::Response {
        let ok = |content_type: &'static str, body: Body| {
            (
                StatusCode::OK,
                [(axum::http::header::CONTENT_TYPE, content_type)],
                body,
            )
                .into_response()
        };
        match body["file_path"].as_str().unwrap_or_default() {
            "raw" => ok("image/png", Body::from(vec![1u8; 100])),
            "json-file" => ok("application/json", Body::from(r#"{"a": 1}"#)),
            "refused" => ok(
                "application/json",
                Body::from(r#"{"code": 3003, "message": "bad k3y-secret-0001", "data": null}"#),
            ),
            _ => (
                StatusCode::NOT_FOUND,
                axum::Json(
                    serde_json::json!({"code": 3003, "message": "文件不存在", "data": null}),
                ),
            )
                .into_response(),
        }
    }
    let app = axum::Router::new().route("/api/file/download", axum::routing::post(download));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

/// A raw HTTP/1.1 server that answers every request with a chunked body of `chunks` × 64
/// bytes (no `Content-Length`), so only the running count can stop the read.
async fn chunked_server(chunks: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                // Headers, then the small JSON body (its length is in the headers).
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request);
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let length = head
                            .lines()
                            .find_map(|line| {
                                let (name, value) = line.split_once(':')?;
                                name.eq_ignore_ascii_case("content-length")
                                    .then(|| value.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if body.len() >= length {
                            break;
                        }
                    }
                }
                let mut answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                    Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                    .to_vec();
                for _ in 0..chunks {
                    answer.extend_from_slice(b"40\r\n");
                    answer.extend_from_slice(&[2u8; 64]);
                    answer.extend_from_slice(b"\r\n");
                }
                answer.extend_from_slice(b"0\r\n\r\n");
                let _ = socket.write_all(&answer).await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn downloads_are_bytes_capped_or_classified_errors() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut registry = crate::metrics::Registry::default();
    let metrics = Metrics::register(&mut registry);
    let key = "k3y-secret-0001";
    let client = |base: &str| {
        Client::new(
            "wx",
            base,
            Secret::new(key),
            Duration::from_secs(5),
            metrics.clone(),
        )
        .unwrap()
    };
    let streaming = client(&chunked_server(10).await);
    let client = client(&file_server().await);
    assert_eq!(
        client.download_file("raw", 1000).await,
        Ok(Download::Bytes(vec![1u8; 100]))
    );
    assert_eq!(
        client.download_file("raw", 99).await,
        Ok(Download::TooLarge { size: Some(100) })
    );
    assert_eq!(
        streaming.download_file("any", 300).await,
        Ok(Download::TooLarge { size: None })
    );
    assert_eq!(
        streaming.download_file("any", 640).await,
        Ok(Download::Bytes(vec![2u8; 640]))
    );
    assert_eq!(
        client.download_file("json-file", 1000).await,
        Ok(Download::Bytes(br#"{"a": 1}"#.to_vec()))
    );
    let refused = client.download_file("refused", 1000).await.unwrap_err();
    assert!(
        matches!(refused, WxautoError::ApiCode { code: 3003, .. }),
        "{refused:?}"
    );
    assert!(!refused.to_string().contains(key), "{refused}");
    let missing = client.download_file("gone", 1000).await.unwrap_err();
    assert!(
        matches!(
            missing,
            WxautoError::HttpStatus {
                status: 404,
                code: Some(3003),
                ..
            }
        ),
        "{missing:?}"
    );
    let text = { crate::metrics::encode(&registry, true).0 };
    assert!(
        text.contains(r#"endpoint="file_download",outcome="error""#),
        "counted under its own endpoint label"
    );
}
