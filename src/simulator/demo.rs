//! The `demo` command's instances: three simulators on loopback (one of them flaky) and the
//! built-in config that points the sidecar at them.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{SimConfig, Simulator};
use crate::config;

/// The simulated instances of the demo: `(id, key, flaky)`.
const DEMO_INSTANCES: [(&str, &str, bool); 3] = [
    ("wx-main", "demo-key-main", false),
    ("wx-sales", "demo-key-sales", false),
    ("wx-flaky", "demo-key-flaky", true),
];

/// Starts three simulators on loopback and returns the demo config text and the env lookup.
pub async fn start_instances(
    cancel: &CancellationToken,
) -> std::io::Result<(String, Vec<(String, String)>)> {
    let mut instances = String::new();
    let mut env = Vec::new();
    for (id, key, flaky) in DEMO_INSTANCES {
        let simulator = Simulator::new(SimConfig {
            api_key: key.to_owned(),
            name: id.to_owned(),
            flaky,
            ..SimConfig::default()
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        simulator.spawn_chatter(Duration::from_millis(1500), cancel.clone());
        tokio::spawn(simulator.serve(listener, cancel.clone()));
        let var = format!("DEMO_KEY_{}", id.replace('-', "_").to_uppercase());
        instances.push_str(&format!(
            "  - id: {id}\n    base_url: http://{addr}\n    api_key_env: {var}\n"
        ));
        env.push((var, key.to_owned()));
        eprintln!("  simulated wxauto instance {id:<9} http://{addr}  (control: /_sim/state)");
    }
    let text = format!(
        "# Built-in demo configuration.\n\
         server:\n  listen: {listen}\n  enable_lifecycle: true\n\
         listener:\n  poll_interval: 1s\n  health_check_interval: 5s\n  listener_timeout: 2m\n  \
         request_timeout: 3s\n  backoff: {{ initial: 1s, max: 10s }}\n\
         instances:\n{instances}\
         fixed_listeners:\n  - chat: 文件传输助手\n    instances: [\"*\"]\n\
         platforms:\n  - id: faq\n    type: keyword\n    keywords:\n      \
         - keywords: [\"你好\", \"在吗\"]\n        match_type: contains\n        \
         replies: [\"您好，我是自动回复演示。\"]\n      \
         - keywords: [\"订单\"]\n        match_type: contains\n        \
         replies: [\"演示：您的订单已发货。\"]\n\
         rules:\n  - id: everything-to-faq\n    instance: \"*\"\n    chat: \"*\"\n    platform: faq\n\
         health:\n  window: 10m\n  report_interval: 10s\n",
        listen = config::DEFAULT_LISTEN,
    );
    Ok((text, env))
}
