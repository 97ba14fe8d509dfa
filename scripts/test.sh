#!/usr/bin/env bash
# The project's test command (README: "Run every test"). It installs what it needs on a fresh
# Debian machine (promtool, prometheus and chromium, via scripts/install-tools.sh), then runs the style
# gates, every Rust test (the status page in headless chromium among them), and the monitoring
# checks against the real demo binary.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-tools.sh
cargo fmt --check
cargo clippy --all-targets -- -D warnings
# WXAUTO_REQUIRE_TOOLS makes tests that need promtool or chromium fail instead of skipping.
WXAUTO_REQUIRE_TOOLS=1 cargo test --all-targets
bash scripts/check-monitoring.sh target/debug/wxauto-sidecar
