#!/usr/bin/env bash
# Check the Windows build on a Debian machine: cross-check and build x86_64-pc-windows-gnu with
# Debian's Rust (rustc-web, whose rust-web-src lets -Zbuild-std build std for the target), then
# run the .exe under Wine: --version, check-config on the example config, and the demo
# answering /metrics.
#
#   scripts/check-windows.sh
#
# Installs the Debian packages it needs when missing (as root, or through sudo). Works without
# a terminal (CI=true, no stdin). Everything it writes stays under target/windows/: the cargo
# target dir (separate, so the host build in target/ is not invalidated), the Wine prefix, the
# stub DLL and the demo's data/. Wine processes of that prefix are killed at the end.
# Closes with `N passed, M failed`; exits 1 if any step failed.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
TARGET=x86_64-pc-windows-gnu
OUT=$ROOT/target/windows
EXE=$OUT/$TARGET/debug/wxauto-sidecar.exe
RUN_DIR=$OUT/run
PACKAGES=(rustc-web cargo-web rust-web-src gcc-mingw-w64-x86-64 binutils-mingw-w64-x86-64 wine64)
START=$SECONDS
passed=0
failed=0
failures=()

step() {
  local name="$1"
  shift
  local began=$SECONDS
  echo "=== $name"
  if "$@"; then
    passed=$((passed + 1))
    echo "--- ok: $name ($((SECONDS - began)) s)"
  else
    failed=$((failed + 1))
    failures+=("$name")
    echo "--- FAILED: $name ($((SECONDS - began)) s)"
  fi
}

# === packages ===

missing_packages() {
  local package
  for package in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
      echo "$package"
    fi
  done
}

install_packages() {
  local missing
  mapfile -t missing < <(missing_packages)
  if [ "${#missing[@]}" -eq 0 ]; then
    echo "all installed: ${PACKAGES[*]}"
    return 0
  fi
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "need root or sudo to install: ${missing[*]}" >&2
      return 1
    fi
    sudo=(sudo)
  fi
  echo "installing: ${missing[*]}"
  # Wait for another apt/dpkg run (other jobs on the machine) instead of failing on the lock.
  local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q)
  "${sudo[@]}" "${apt[@]}" update </dev/null &&
    "${sudo[@]}" "${apt[@]}" install -y --no-install-recommends "${missing[@]}" </dev/null
}

# === build ===

# Debian's cargo and rustc (not rustup's, which lacks the target's std), std built from source.
debian_cargo() {
  env RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 \
    CARGO_TARGET_X86_64_PC_WINDOWS_GNU_LINKER=x86_64-w64-mingw32-gcc \
    /usr/bin/cargo "$@" -Zbuild-std=std,panic_abort --target "$TARGET" --target-dir "$OUT"
}

# Fails on any warning in our crate as compiled for Windows: the library, the binary, the tests
# and the benches (the target's std and the dependencies are not ours to fix).
no_crate_warnings() {
  local log="$1"
  if grep -E '^warning: `wxauto-sidecar` \(.*\) generated [0-9]+ warning' "$log"; then
    grep -E -A6 '^warning' "$log" | head -n 60
    return 1
  fi
}

cross_check() {
  local log=$OUT/check.log
  mkdir -p "$OUT"
  debian_cargo check --all-targets 2>&1 | tee "$log" | grep -E '^(warning|error)' | head -n 40
  [ "${PIPESTATUS[0]}" -eq 0 ] && no_crate_warnings "$log"
}

build_exe() {
  local log=$OUT/build.log
  debian_cargo build --bin wxauto-sidecar 2>&1 | tee "$log" | grep -E '^(warning|error)' | head -n 40
  [ "${PIPESTATUS[0]}" -eq 0 ] && no_crate_warnings "$log" && [ -f "$EXE" ] && ls -l "$EXE"
}

# Wine 8 has no ProcessPrng (see scripts/windows/bcryptprimitives.c): build the stand-in.
build_stub_dll() {
  mkdir -p "$RUN_DIR"
  x86_64-w64-mingw32-gcc -shared -O2 -Wall -o "$RUN_DIR/bcryptprimitives.dll" \
    scripts/windows/bcryptprimitives.c scripts/windows/bcryptprimitives.def -ladvapi32 &&
    cp "$EXE" "$RUN_DIR/"
}

# === wine ===

WINE=$(command -v wine64 || echo /usr/lib/wine/wine64)
WINESERVER=$(command -v wineserver || echo /usr/lib/wine/wineserver)
export WINEPREFIX=$OUT/wineprefix
export WINEDEBUG=-all
# The stand-in DLL beside the .exe wins; no Mono or Gecko installer prompts.
export WINEDLLOVERRIDES="bcryptprimitives=n,b;mscoree=;mshtml="
export WINEARCH=win64
unset DISPLAY

stop_wine() {
  if [ -x "$WINESERVER" ] && [ -d "$WINEPREFIX" ]; then
    "$WINESERVER" -k 2>/dev/null || true
    # Bounded: wineserver -w waits for the server to exit.
    timeout 20 "$WINESERVER" -w 2>/dev/null || true
  fi
}
trap stop_wine EXIT

wine_prefix() {
  timeout 300 "$WINE" wineboot --init </dev/null >/dev/null 2>&1
  local rc=$?
  timeout 60 "$WINESERVER" -w 2>/dev/null || true
  [ "$rc" -eq 0 ] && [ -d "$WINEPREFIX/drive_c" ]
}

# Runs the .exe from $RUN_DIR under Wine, bounded.
wine_exe() {
  (cd "$RUN_DIR" && timeout 120 "$WINE" ./wxauto-sidecar.exe "$@" </dev/null)
}

wine_version() {
  local output
  output=$(wine_exe --version 2>&1) || {
    echo "$output"
    return 1
  }
  echo "$output"
  local version
  version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
  [[ "$output" == *"wxauto-sidecar $version"* ]]
}

wine_check_config() {
  local example=$ROOT/examples/config.yaml
  # Without any key (what CI has), then with the keys set through the environment.
  wine_exe check-config --no-secrets --config "$example" &&
    WXAUTO_API_KEY=example-wxauto-key OPENAI_API_KEY=example-openai-key \
      DIFY_API_KEY=example-dify-key COZE_API_KEY=example-coze-key wine_exe check-config --config "$example" &&
    {
      # An invalid file must exit 1 under Windows too.
      printf 'listener:\n  poll_interval: fast\ninstances: []\n' >"$RUN_DIR/bad.yaml"
      wine_exe check-config --no-secrets --config bad.yaml
      [ $? -eq 1 ]
    }
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wine_demo_metrics() {
  local port
  port=$(free_port)
  local log=$RUN_DIR/demo.log
  (cd "$RUN_DIR" && exec timeout 180 "$WINE" ./wxauto-sidecar.exe demo --listen "127.0.0.1:$port" \
    </dev/null >"$log" 2>&1) &
  local demo=$!
  local metrics=$RUN_DIR/metrics.txt
  local deadline=$((SECONDS + 120))
  local ok=1
  while [ $SECONDS -lt $deadline ]; do
    if curl -fsS --max-time 5 "http://127.0.0.1:$port/metrics" -o "$metrics" 2>/dev/null &&
      grep -q '^wxauto_health_score' "$metrics" &&
      grep -q '^wxauto_client_up{instance_id="wx-main"} 1' "$metrics"; then
      ok=0
      break
    fi
    if ! kill -0 "$demo" 2>/dev/null; then
      echo "the demo exited early:"
      break
    fi
    sleep 1
  done
  if [ "$ok" -eq 0 ]; then
    grep -E '^(wxauto_build_info|wxauto_health_score|wxauto_client_up)' "$metrics"
  else
    tail -n 40 "$log"
  fi
  # The demo runs until stopped: end every process of this prefix, then the subshell.
  "$WINESERVER" -k 2>/dev/null || true
  kill "$demo" 2>/dev/null || true
  wait "$demo" 2>/dev/null || true
  return "$ok"
}

step "install Debian packages (${PACKAGES[*]})" install_packages
step "cargo check --target $TARGET --all-targets (no warnings)" cross_check
step "cargo build --target $TARGET (wxauto-sidecar.exe)" build_exe
if [ -f "$EXE" ]; then
  step "build the ProcessPrng stand-in for Wine" build_stub_dll
  step "create the Wine prefix (target/windows/wineprefix)" wine_prefix
  step "wine: wxauto-sidecar.exe --version" wine_version
  step "wine: check-config on examples/config.yaml" wine_check_config
  step "wine: demo answers /metrics" wine_demo_metrics
fi

if [ "$failed" -gt 0 ]; then
  printf 'failed step: %s\n' "${failures[@]}"
fi
echo "check-windows: ${passed} passed, ${failed} failed in $((SECONDS - START)) s"
[ "$failed" -eq 0 ]
