#!/usr/bin/env bash
# Check the Windows build on a Debian machine: cross-check and build x86_64-pc-windows-gnu with
# Debian's Rust (rustc-web, whose rust-web-src lets -Zbuild-std build std for the target), then
# run under Wine the unit tests of the Windows-only code and the .exe: --version, check-config on
# the example config, the demo answering /metrics, the service under Wine's Service Control
# Manager and process supervision (Job Objects).
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
# `debian_cargo SUBCOMMAND ARGS...`; the target's flags go right after the subcommand, so ARGS
# may end in `-- <test filters>`.
debian_cargo() {
  env RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 \
    CARGO_TARGET_X86_64_PC_WINDOWS_GNU_LINKER=x86_64-w64-mingw32-gcc \
    /usr/bin/cargo "$1" -Zbuild-std=std,panic_abort --target "$TARGET" --target-dir "$OUT" "${@:2}"
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

# Unit tests under Wine: those of the Windows-only code (`process::windows`: the Job Object) and
# the service's (among them a panic recorded in service-error.log). The library's test binary for
# the target, run by cargo through Wine with the stand-in DLL beside it. Fails when no test ran
# (filters that match nothing would pass).
wine_unit_tests() {
  local log=$OUT/unit-tests.log deps=$OUT/$TARGET/debug/deps
  mkdir -p "$deps" && cp "$RUN_DIR/bcryptprimitives.dll" "$deps/" || return 1
  CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER="timeout 120 $WINE" \
    debian_cargo test --lib -- process::windows:: service:: </dev/null >"$log" 2>&1
  local rc=$?
  grep -E '^(warning|error)|^test |^test result' "$log" | head -n 40
  [ "$rc" -eq 0 ] && no_crate_warnings "$log" && grep -Eq '^test result: ok\. [1-9]' "$log"
}

# === the service and supervision under Wine ===

# Polls `$@` once a second until it succeeds or `$1` seconds have passed.
wait_until() {
  local seconds=$1
  shift
  local deadline=$((SECONDS + seconds))
  until "$@"; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 1
  done
}

# `metric_at PORT REGEX`: /metrics on PORT has a line matching REGEX.
metric_at() {
  curl -fsS --max-time 5 "http://127.0.0.1:$1/metrics" 2>/dev/null | grep -Eq "$2"
}

# `sc query NAME` through Wine; prints the answer.
sc_query() {
  timeout 60 "$WINE" sc query "$1" </dev/null 2>/dev/null
}

# `service_state NAME STATE`: the SCM reports the service in STATE (e.g. 1  STOPPED).
service_state() {
  sc_query "$1" | grep -Eq "STATE +: $2"
}

# Starts `wxauto-sidecar.exe simulate` on PORT with KEY, in the background, logging to FILE.
# Sets $SIMULATOR to its pid (the `timeout` wrapper).
start_simulator() {
  (cd "$RUN_DIR" && exec timeout 300 "$WINE" ./wxauto-sidecar.exe simulate --listen "127.0.0.1:$1" \
    --api-key "$2" --chatter 1s </dev/null >"$3" 2>&1) &
  SIMULATOR=$!
}

# `prepare_run NAME KEY`: a fresh $RUN_DIR/NAME holding wx.key (KEY) and the head of a config
# (listen address, one instance wx-main on the simulator's port) for the caller to extend. Sets
# $DIR, $SIM_PORT (for the simulator) and $PORT (the sidecar's).
prepare_run() {
  DIR=$RUN_DIR/$1
  rm -rf "$DIR" && mkdir -p "$DIR" || return 1
  SIM_PORT=$(free_port)
  PORT=$(free_port)
  printf '%s' "$2" >"$DIR/wx.key"
  cat >"$DIR/config.yaml" <<YAML
server:
  listen: 127.0.0.1:$PORT
instances:
  - id: wx-main
    base_url: http://127.0.0.1:$SIM_PORT
    api_key_file: wx.key
YAML
}

# The service under Wine's Service Control Manager: `service install`, `sc start` (the
# sidecar polls a simulator and serves /metrics), `sc stop` (graceful: stop pending, then
# stopped with exit code 0 and the clean-stop marker in the log), a start with an invalid
# config (stopped with the service-specific exit code 1, the reason in service-error.log beside
# the config), `service uninstall`. Wine ends its services when the last other process of the
# prefix exits (Windows does not), so the simulator, run by the same .exe, keeps the prefix up.
SERVICE=wxauto-sidecar-check
wine_service() {
  local key=service-check-key
  prepare_run service "$key" || return 1
  local dir=$DIR sim_port=$SIM_PORT port=$PORT
  start_simulator "$sim_port" "$key" "$dir/simulator.log"
  cat >>"$dir/config.yaml" <<YAML
fixed_listeners:
  - chat: 文件传输助手
    instances: ["*"]
YAML
  local ok=1
  local log
  if wine_exe service install --config service/config.yaml --name "$SERVICE" &&
    timeout 60 "$WINE" sc start "$SERVICE" </dev/null >/dev/null &&
    wait_until 60 metric_at "$port" '^wxauto_client_up\{instance_id="wx-main"\} 1' &&
    wait_until 30 metric_at "$port" '^wxauto_messages_processed_total\{instance_id="wx-main"\} [1-9]' &&
    echo "running as a service: /metrics on $port, messages received from the simulator" &&
    timeout 60 "$WINE" sc stop "$SERVICE" </dev/null >/dev/null &&
    wait_until 30 service_state "$SERVICE" '1 +STOPPED' &&
    sc_query "$SERVICE" | grep -Eq 'WIN32_EXIT_CODE +: 0 ' &&
    log=$(ls "$dir"/data/logs/*.log) &&
    grep -F 'Clean stop recorded.' "$log" &&
    echo "sc stop: stopped with exit code 0 after the graceful shutdown" &&
    printf 'instances: []\nlistener:\n  poll_interval: fast\n' >"$dir/config.yaml" &&
    timeout 60 "$WINE" sc start "$SERVICE" </dev/null >/dev/null &&
    wait_until 30 service_state "$SERVICE" '1 +STOPPED' &&
    sc_query "$SERVICE" | grep -Eq 'WIN32_EXIT_CODE +: 1066 ' &&
    sc_query "$SERVICE" | grep -Eq 'SERVICE_EXIT_CODE +: 1 ' &&
    grep -F 'exit code 1 (invalid configuration)' "$dir/service-error.log" &&
    grep -F 'poll_interval' "$dir/service-error.log" &&
    echo "invalid config: service-specific exit code 1, the reason in service-error.log" &&
    wine_exe service uninstall --name "$SERVICE" &&
    ! sc_query "$SERVICE" >/dev/null; then
    ok=0
  else
    sc_query "$SERVICE"
    tail -n 20 "$dir"/data/logs/*.log "$dir/service-error.log" 2>/dev/null
    wine_exe service uninstall --name "$SERVICE" 2>/dev/null
  fi
  kill "$SIMULATOR" 2>/dev/null
  "$WINESERVER" -k 2>/dev/null || true
  wait "$SIMULATOR" 2>/dev/null
  return "$ok"
}

# Some process has a command line matching `$1`.
running() {
  pgrep -f "$1" >/dev/null
}

# No process has a command line matching `$1`.
gone() {
  ! running "$1"
}

# Linux pid of the Wine process of this prefix whose command line starts with the .exe and then
# `$1` (another checkout's run on the same machine has the same command line).
exe_pid() {
  local pid
  for pid in $(pgrep -f "^[^ ]*wxauto-sidecar\.exe $1"); do
    if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qxF "WINEPREFIX=$WINEPREFIX"; then
      echo "$pid"
      return 0
    fi
  done
  return 1
}

# `check NAME CMD...`: one link of a chain. Runs CMD and says `ok: NAME`; when it fails, says
# `FAILED: NAME`, CMD's own output and what `$EVIDENCE` (a command the step sets) shows now.
check() {
  local name=$1 began=$SECONDS output rc
  shift
  output=$("$@" 2>&1)
  rc=$?
  if [ "$rc" -eq 0 ]; then
    echo "ok: $name ($((SECONDS - began)) s)"
    return 0
  fi
  echo "FAILED: $name (exit status $rc after $((SECONDS - began)) s)"
  [ -z "$output" ] || printf '%s\n' "$output" | tail -n 20 | sed 's/^/  output: /'
  [ -z "${EVIDENCE:-}" ] || "$EVIDENCE" 2>&1 | sed 's/^/  saw: /'
  return 1
}

# `process_pid PORT NAME`: the pid /api/v1/processes on PORT reports for NAME (fails without one).
process_pid() {
  curl -fsS --max-time 5 "http://127.0.0.1:$1/api/v1/processes" |
    python3 -c 'import json, sys; print(next(p["pid"] for p in json.load(sys.stdin)["data"] if p["name"] == sys.argv[1] and p["pid"]))' "$2"
}

# What the supervision step shows when a link fails: the sidecar's process and instance series,
# its process list, the Wine processes of the run, and the end of the sidecar's log.
supervision_evidence() {
  curl -fsS --max-time 5 "http://127.0.0.1:$PORT/metrics" |
    grep -E '^wxauto_(process_(up|state|restarts_total|last_exit_code)|client_up)' ||
    echo "(no /metrics on $PORT)"
  curl -fsS --max-time 5 "http://127.0.0.1:$PORT/api/v1/processes" || echo "(no /api/v1/processes)"
  echo
  pgrep -af 'wxauto-sidecar\.exe|cmd(\.exe)? |taskkill' || echo "(no sidecar, cmd or taskkill process)"
  tail -n 15 "$DIR"/run*.log 2>/dev/null
}

# Process supervision on Windows (a console run): the sidecar starts the simulator as its
# wxauto server in its own process group and Job Object; a child's exit code is reported
# (`cmd /c exit 3`); `taskkill /F` of the server is followed by a restart; Ctrl-C stops the
# sidecar cleanly and the server with it (CTRL_BREAK reaches no console under the test, so the
# stop ends in TerminateJobObject after stop_timeout); a sidecar killed outright takes its server
# with it (the job's kill-on-close). Each link says `ok:` or `FAILED:` with what it saw.
wine_supervision() {
  local key=supervision-check-key
  prepare_run supervision "$key" || return 1
  local dir=$DIR sim_port=$SIM_PORT port=$PORT
  cat >>"$dir/config.yaml" <<YAML
processes:
  - name: wxauto-api
    command: ../wxauto-sidecar.exe
    args: [simulate, --listen, "127.0.0.1:$sim_port", --api-key, $key, --chatter, 1s]
    instance: wx-main
    restart: always
    backoff: { initial: 1s, max: 2s }
    stop_timeout: 3s
  - name: exits-3
    command: cmd
    args: [/c, exit, "3"]
    restart: never
YAML
  local server_alive="simulate --listen 127.0.0.1:$sim_port"
  local ok=1 sidecar pid first rc
  local EVIDENCE=supervision_evidence
  (cd "$dir" && exec timeout 300 "$WINE" ../wxauto-sidecar.exe run --config config.yaml \
    </dev/null >"$dir/run1.log" 2>&1) &
  sidecar=$!
  if check "the supervised server is polled (client_up 1)" \
    wait_until 60 metric_at "$port" '^wxauto_client_up\{instance_id="wx-main"\} 1' &&
    check "cmd /c exit 3 is reported as exit code 3" \
      wait_until 10 metric_at "$port" '^wxauto_process_last_exit_code\{process="exits-3"\} 3' &&
    check "exits-3 (restart: never) is in state exited" \
      metric_at "$port" '^wxauto_process_state\{process="exits-3",state="exited"\} 1' &&
    first=$(process_pid "$port" wxauto-api || true) &&
    check "/api/v1/processes reports the server's pid (${first:-none})" test -n "$first" &&
    check "taskkill /F /PID $first" timeout 60 "$WINE" taskkill /F /PID "$first" </dev/null &&
    check "the server is restarted (restarts_total 1)" \
      wait_until 30 metric_at "$port" '^wxauto_process_restarts_total\{process="wxauto-api"\} 1' &&
    check "the restarted server is up" \
      wait_until 30 metric_at "$port" '^wxauto_process_up\{process="wxauto-api"\} 1' &&
    check "the restarted server is polled (client_up 1)" \
      wait_until 30 metric_at "$port" '^wxauto_client_up\{instance_id="wx-main"\} 1' &&
    pid=$(exe_pid run || true) &&
    check "Ctrl-C to the sidecar (Linux pid ${pid:-none})" kill -INT "$pid"; then
    wait "$sidecar"
    rc=$?
    if check "the sidecar exits with code 0 after Ctrl-C (it exited $rc)" test "$rc" -eq 0 &&
      check "the clean stop is recorded" grep -F 'Clean stop recorded.' "$dir/run1.log" &&
      check "the server is stopped with CTRL_BREAK" grep -F 'signal="CTRL_BREAK"' "$dir/run1.log" &&
      check "the server stopped with the sidecar" gone "$server_alive"; then
      ok=0
    fi
  fi
  if [ "$ok" -eq 0 ]; then
    ok=1
    (cd "$dir" && exec timeout 300 "$WINE" ../wxauto-sidecar.exe run --config config.yaml \
      </dev/null >"$dir/run2.log" 2>&1) &
    sidecar=$!
    if check "second run: the server is up" \
      wait_until 60 metric_at "$port" '^wxauto_process_up\{process="wxauto-api"\} 1' &&
      check "second run: the server process exists" running "$server_alive" &&
      pid=$(exe_pid run || true) &&
      check "the sidecar killed outright (SIGKILL to Linux pid ${pid:-none})" kill -KILL "$pid" &&
      check "its server is gone too (Job Object kill-on-close)" wait_until 20 gone "$server_alive"; then
      ok=0
    fi
  fi
  "$WINESERVER" -k 2>/dev/null || true
  kill "$sidecar" 2>/dev/null
  { wait "$sidecar"; } 2>/dev/null
  return "$ok"
}

step "install Debian packages (${PACKAGES[*]})" install_packages
step "cargo check --target $TARGET --all-targets (no warnings)" cross_check
step "cargo build --target $TARGET (wxauto-sidecar.exe)" build_exe
if [ -f "$EXE" ]; then
  step "build the ProcessPrng stand-in for Wine" build_stub_dll
  step "create the Wine prefix (target/windows/wineprefix)" wine_prefix
  step "wine: wxauto-sidecar.exe --version" wine_version
  step "wine: unit tests of process::windows and service" wine_unit_tests
  step "wine: check-config on examples/config.yaml" wine_check_config
  step "wine: demo answers /metrics" wine_demo_metrics
  step "wine: the service under the Service Control Manager" wine_service
  step "wine: a supervised process is restarted and stopped with the sidecar" wine_supervision
fi

if [ "$failed" -gt 0 ]; then
  printf 'failed step: %s\n' "${failures[@]}"
fi
echo "check-windows: ${passed} passed, ${failed} failed in $((SECONDS - START)) s"
[ "$failed" -eq 0 ]
