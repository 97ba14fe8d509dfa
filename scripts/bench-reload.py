#!/usr/bin/env python3
"""Config reload latency: from a write of the config file to the new config being live.

Starts `wxauto-sidecar simulate` and a sidecar on a config file in a temp dir (loopback only),
then rewrites the file ROUNDS times, toggling `listener.poll_interval` between 1s and 2s so the
content hash changes, and polls /metrics every 10 ms until `wxauto_config_hash` changes.
A second phase writes and then calls `POST /-/reload`, which skips the watcher's debounce: the
difference between the two is the debounce plus event delivery.

Usage: scripts/bench-reload.py [--bin target/release/wxauto-sidecar] [--rounds 20]
Prints one greppable line per phase:
  reload_latency phase=watcher rounds=20 min_ms=... median_ms=... p90_ms=... max_ms=...
Standard library only. Every wait is bounded; both processes are stopped on exit.
"""

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

API_KEY = "bench-key-0123456789"
INSTANCE = "wx-bench"
POLL_EVERY = 0.010  # seconds between /metrics scrapes while waiting
ROUND_TIMEOUT = 10.0  # seconds before a round counts as missed
START_TIMEOUT = 15.0
PAUSE = 0.2  # between rounds, so each write starts a fresh debounce


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method, url, timeout=2.0):
    """Returns (status, body); status 0 when the server cannot be reached."""
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except (urllib.error.URLError, OSError):
        return 0, ""


def wait_until(what, check, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise SystemExit(f"bench-reload: timed out waiting for {what}")


def config_hash(base):
    status, body = http("GET", f"{base}/metrics")
    if status != 200:
        return None
    for line in body.splitlines():
        if line.startswith("wxauto_config_hash "):
            return line.split()[1]
    return None


def config_text(sim_port, poll_interval):
    return (
        "server:\n  enable_lifecycle: true\n"
        f"listener:\n  poll_interval: {poll_interval}\n"
        "instances:\n"
        f"  - id: {INSTANCE}\n"
        f"    base_url: http://127.0.0.1:{sim_port}\n"
        "    api_key_env: BENCH_WXAUTO_KEY\n"
    )


def write_by_rename(path, text):
    tmp = os.path.join(os.path.dirname(path), ".config.yaml.tmp")
    with open(tmp, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(tmp, path)


def measure(base, path, sim_port, rounds, state, via_http):
    """Runs `rounds` write → live rounds and returns the latencies in milliseconds."""
    latencies = []
    for _ in range(rounds):
        before = config_hash(base)
        state["poll"] = "2s" if state["poll"] == "1s" else "1s"
        started = time.monotonic()
        write_by_rename(path, config_text(sim_port, state["poll"]))
        if via_http:
            status, body = http("POST", f"{base}/-/reload", timeout=ROUND_TIMEOUT)
            if status != 200:
                raise SystemExit(f"bench-reload: POST /-/reload answered {status}: {body}")
        deadline = started + ROUND_TIMEOUT
        while True:
            now_hash = config_hash(base)
            if now_hash is not None and now_hash != before:
                latencies.append((time.monotonic() - started) * 1000.0)
                break
            if time.monotonic() > deadline:
                raise SystemExit("bench-reload: a reload was missed (no hash change in 10 s)")
            time.sleep(POLL_EVERY)
        time.sleep(PAUSE)
    return latencies


def report(phase, latencies):
    ordered = sorted(latencies)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    print(
        f"reload_latency phase={phase} rounds={len(ordered)} "
        f"min_ms={ordered[0]:.1f} median_ms={statistics.median(ordered):.1f} "
        f"p90_ms={p90:.1f} max_ms={ordered[-1]:.1f}"
    )


def stop(process):
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", default="target/release/wxauto-sidecar")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    if not (1 <= args.rounds <= 1000):
        raise SystemExit("bench-reload: --rounds must be 1..1000")
    binary = os.path.abspath(args.bin)
    if not os.access(binary, os.X_OK):
        raise SystemExit(f"bench-reload: {binary} is not an executable (cargo build --release?)")

    workdir = tempfile.mkdtemp(prefix="bench-reload-")
    sim = sidecar = None
    try:
        sim_port, port = free_port(), free_port()
        env = dict(os.environ, WXAUTO_SIM_API_KEY=API_KEY, BENCH_WXAUTO_KEY=API_KEY)
        env.pop("WXAUTO_SIDECAR_CONFIG", None)
        logs = open(os.path.join(workdir, "processes.log"), "w", encoding="utf-8")
        sim = subprocess.Popen(
            [binary, "simulate", "--listen", f"127.0.0.1:{sim_port}"],
            cwd=workdir, env=env, stdout=logs, stderr=logs,
        )
        wait_until(
            "the simulator",
            lambda: http("GET", f"http://127.0.0.1:{sim_port}/api/health")[0] == 200,
            START_TIMEOUT,
        )
        os.mkdir(os.path.join(workdir, "conf"))
        path = os.path.join(workdir, "conf", "config.yaml")
        state = {"poll": "1s"}
        write_by_rename(path, config_text(sim_port, state["poll"]))
        sidecar = subprocess.Popen(
            [binary, "--config", path, "--listen", f"127.0.0.1:{port}"],
            cwd=workdir, env=env, stdout=logs, stderr=logs,
        )
        base = f"http://127.0.0.1:{port}"
        up = f'wxauto_client_up{{instance_id="{INSTANCE}"}} 1'
        wait_until(
            "the sidecar to be ready and connected",
            lambda: sidecar.poll() is None and up in http("GET", f"{base}/metrics")[1],
            START_TIMEOUT,
        )
        # One unrecorded round first: it also proves the watch is armed.
        measure(base, path, sim_port, 1, state, via_http=False)
        report("watcher", measure(base, path, sim_port, args.rounds, state, via_http=False))
        time.sleep(1.0)  # let the watcher's trailing (no-op) reloads of the last phase pass
        report("http", measure(base, path, sim_port, args.rounds, state, via_http=True))
        if sidecar.poll() is not None:
            raise SystemExit("bench-reload: the sidecar exited during the run")
    finally:
        stop(sidecar)
        stop(sim)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
