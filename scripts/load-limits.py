#!/usr/bin/env python3
"""HTTP limits under load: a scrape while idle connections and a slowloris client are held.

Starts the sidecar (no instances, default limits: header_read_timeout 10s, max_connections
512) on a loopback port under a 1024 file-descriptor limit (systemd's default), then:
  1. opens IDLE idle TCP connections and one slowloris client (one header byte every 0.5 s);
  2. scrapes /metrics SCRAPES times with a 2 s timeout and records the latencies;
  3. opens connections beyond max_connections and times their 503;
  4. waits for the slowloris and the idle connections to be closed and records when.

Usage: scripts/load-limits.py [--bin target/debug/wxauto-sidecar] [--idle 500] [--scrapes 20]
Prints greppable lines:
  load_limits scrape ok=20/20 min_ms=... median_ms=... max_ms=...
  load_limits refused count=... median_ms=...
  load_limits slowloris closed_after_s=...
  load_limits idle closed=500/500 median_after_s=...
Standard library only, loopback only. Every wait is bounded (about 30 s in total); the
sidecar is stopped on exit.
"""

import argparse
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

START_TIMEOUT = 15.0
CLOSE_TIMEOUT = 20.0  # how long to wait for the server to close held connections


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fd_limit_1024():
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


def wait_ready(url, proc):
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the sidecar exited during startup ({proc.returncode})")
        try:
            with urllib.request.urlopen(url + "/-/ready", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    sys.exit("the sidecar did not become ready")


def closed_within(sock, timeout):
    """Seconds until the peer closed `sock` (EOF or reset), or None."""
    sock.settimeout(timeout)
    started = time.monotonic()
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return time.monotonic() - started
    except (ConnectionResetError, BrokenPipeError):
        return time.monotonic() - started
    except socket.timeout:
        return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", default="target/debug/wxauto-sidecar")
    parser.add_argument("--idle", type=int, default=500)
    parser.add_argument("--scrapes", type=int, default=20)
    args = parser.parse_args()
    if args.idle > 900:
        sys.exit("--idle is capped at 900 (the sidecar runs under a 1024-fd limit)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))

    work = tempfile.mkdtemp(prefix="wxauto-load-")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = os.path.join(work, "config.yaml")
    with open(config, "w") as file:
        file.write("instances: []\n")
    log = open(os.path.join(work, "stderr.log"), "w")
    proc = subprocess.Popen(
        [os.path.abspath(args.bin), "--config", config, "--listen", f"127.0.0.1:{port}"],
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=log,
        preexec_fn=fd_limit_1024,
    )
    held = []
    try:
        wait_ready(url, proc)
        opened = time.monotonic()
        for _ in range(args.idle):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        slow = socket.create_connection(("127.0.0.1", port), timeout=2)
        slow_started = time.monotonic()
        slow_closed = {}

        def drip():
            head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
            try:
                for byte in head:
                    slow.sendall(bytes([byte]))
                    time.sleep(0.5)
            except OSError:
                slow_closed["at"] = time.monotonic() - slow_started

        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()

        latencies = []
        for _ in range(args.scrapes):
            started = time.monotonic()
            try:
                with urllib.request.urlopen(url + "/metrics", timeout=2) as response:
                    response.read()
                    if response.status == 200:
                        latencies.append((time.monotonic() - started) * 1000)
            except OSError as error:
                print(f"scrape failed: {error}", file=sys.stderr)
            time.sleep(0.05)
        if latencies:
            print(
                f"load_limits scrape ok={len(latencies)}/{args.scrapes} idle={args.idle} "
                f"min_ms={min(latencies):.1f} median_ms={statistics.median(latencies):.1f} "
                f"max_ms={max(latencies):.1f}"
            )
        else:
            print(f"load_limits scrape ok=0/{args.scrapes}")

        # Fill the remaining slots (512 minus IDLE minus the slowloris), then every further
        # connection is answered 503 at once.
        extra = [
            socket.create_connection(("127.0.0.1", port), timeout=2)
            for _ in range(max(0, 512 - args.idle - 1))
        ]
        time.sleep(0.2)
        refused = []
        for _ in range(5):
            started = time.monotonic()
            sock = socket.create_connection(("127.0.0.1", port), timeout=2)
            extra.append(sock)
            try:
                if sock.recv(64).startswith(b"HTTP/1.1 503"):
                    refused.append((time.monotonic() - started) * 1000)
            except OSError:
                pass
        if refused:
            print(
                f"load_limits refused count={len(refused)} "
                f"median_ms={statistics.median(refused):.1f}"
            )
        for sock in extra:
            sock.close()

        dripper.join(timeout=CLOSE_TIMEOUT)
        if "at" not in slow_closed:
            after = closed_within(slow, 1)
            if after is not None:
                slow_closed["at"] = time.monotonic() - slow_started
        if "at" in slow_closed:
            print(f"load_limits slowloris closed_after_s={slow_closed['at']:.1f}")
        else:
            print("load_limits slowloris closed_after_s=never")

        closed_at = []
        for sock in held:
            remaining = max(0.1, CLOSE_TIMEOUT - (time.monotonic() - opened))
            if closed_within(sock, remaining) is not None:
                closed_at.append(time.monotonic() - opened)
        median = f"{statistics.median(closed_at):.1f}" if closed_at else "n/a"
        print(f"load_limits idle closed={len(closed_at)}/{args.idle} median_after_s={median}")
        with urllib.request.urlopen(url + "/metrics", timeout=2) as response:
            assert response.status == 200
    finally:
        for sock in held:
            sock.close()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
