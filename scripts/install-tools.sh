#!/usr/bin/env bash
# Install the test tools: `prometheus` and `promtool`, from Debian's `prometheus`
# package, and headless `chromium` (the status page test), from Debian's `chromium`.
# Idempotent: does nothing when all three are on PATH.
# Runs apt-get directly as root, through sudo otherwise (when sudo exists).
# The package's own daemon is never left running: the tests start their own
# Prometheus on a free loopback port, and a packaged one would hold :9090.
set -euo pipefail

PACKAGES=()
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  PACKAGES+=(prometheus)
fi
if ! command -v chromium >/dev/null 2>&1; then
  PACKAGES+=(chromium)
fi
if [ "${#PACKAGES[@]}" -eq 0 ]; then
  echo "install-tools: prometheus, promtool and chromium already installed ($(promtool --version 2>&1 | head -n 1))"
  exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
  else
    echo "install-tools: need root or sudo to apt-get install ${PACKAGES[*]}" >&2
    exit 1
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-tools: apt-get not found; install ${PACKAGES[*]} yourself (prometheus/promtool 2.x, chromium)" >&2
  exit 1
fi

# Keep invoke-rc.d from starting the packaged service during the install
# (policy-rc.d exit 101 = "action forbidden"), unless a policy already exists.
POLICY=/usr/sbin/policy-rc.d
ADDED_POLICY=0
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
  "${SUDO[@]}" chmod 755 "$POLICY"
  ADDED_POLICY=1
fi
cleanup() {
  if [ "$ADDED_POLICY" = 1 ]; then "${SUDO[@]}" rm -f "$POLICY"; fi
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
# Wait for another apt/dpkg run (a second install script, unattended upgrades) instead of failing.
APT=(apt-get -o DPkg::Lock::Timeout=600)
install() {
  "${SUDO[@]}" "${APT[@]}" install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}
# Refresh the package lists when the package is unknown, or when the install
# fails on stale lists (a mirror that no longer has the listed version).
if ! apt-cache show "${PACKAGES[@]}" >/dev/null 2>&1; then
  "${SUDO[@]}" "${APT[@]}" update -qq
fi
if ! install; then
  "${SUDO[@]}" "${APT[@]}" update -qq
  install
fi

# If a service manager started the packaged daemon anyway, stop and disable it.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  "${SUDO[@]}" systemctl disable --now prometheus.service >/dev/null 2>&1 || true
elif command -v service >/dev/null 2>&1; then
  "${SUDO[@]}" service prometheus stop >/dev/null 2>&1 || true
fi
# Debian's init script keeps a pid file; stop only that daemon, by its pid.
PIDFILE=/run/prometheus/prometheus.pid
if [ -f "$PIDFILE" ]; then
  pid="$(cat "$PIDFILE" 2>/dev/null || true)"
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "prometheus" ]; then
    "${SUDO[@]}" kill "$pid" || true
  fi
fi

command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v chromium >/dev/null
echo "install-tools: installed ${PACKAGES[*]} ($(promtool --version 2>&1 | head -n 1); $(chromium --version 2>/dev/null | head -n 1))"
