#!/usr/bin/env python3
"""Delivery throughput and latency of the real binary, several builds side by side.

For each `--bin LABEL=PATH` (e.g. `before=/tmp/main/wxauto-sidecar after=target/release/...`),
in the same run and on the same machine:

1. Backlog phase: two `wxauto-sidecar simulate` instances, CHATS fixed-listener chats each,
   MESSAGES messages injected round-robin over all chats. The local webhook holds every
   request at a gate until the sidecar has stored all of them (`wxauto_messages_pending` ==
   MESSAGES), then opens: throughput is MESSAGES over the time from the opening to the last
   first-time arrival. Per-chat order (first arrivals) and duplicates are checked.
2. Latency phase: RATE messages/s per instance for LAT_SECONDS, the listener polling every
   POLL. A small proxy in front of each simulator records when each destructive read
   (`listen/get`, `get-next-new`) answer leaves for the sidecar: "taken". The webhook records
   the arrival: "platform". Reported: p50/p99/max of platform - taken.

The webhook is an asyncio HTTP/1.1 server in its own process (keep-alive, 204 answers). Clock:
CLOCK_MONOTONIC, shared by all processes on Linux.

Usage:
  scripts/bench-delivery.py --bin before=/path/a --bin after=/path/b [--rounds 3]
      [--messages 2000] [--chats 10] [--workers 4] [--synchronous normal]
Prints greppable lines:
  delivery_backlog bin=after round=1 messages=2000 seconds=... msgs_per_s=... dups=0 order=ok
  delivery_latency bin=after round=1 samples=... p50_ms=... p99_ms=... max_ms=...
Standard library only. Every wait is bounded; every process is stopped on exit.
"""

import argparse
import asyncio
import http.client
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

API_KEY = "bench-key-0123456789"
START_TIMEOUT = 20.0
PHASE_TIMEOUT = 120.0


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def post(url, body=None, timeout=5.0):
    data = json.dumps(body or {}).encode()
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read().decode()


def wait_until(what, check, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise SystemExit(f"bench-delivery: timed out waiting for {what}")


# === the webhook (its own process) ===


def webhook_main(port, ready):
    state = {"open": asyncio.Event(), "records": []}

    async def handle(reader, writer):
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status, answer = b"204 No Content", b""
                if path == "/_open":
                    state["open"].set()
                elif path == "/_close":
                    state["open"] = asyncio.Event()
                    state["records"] = []
                elif path == "/_records":
                    status = b"200 OK"
                    answer = json.dumps(state["records"]).encode()
                elif path == "/_count":
                    status = b"200 OK"
                    answer = str(len(state["records"])).encode()
                else:
                    await state["open"].wait()
                    message = json.loads(body)
                    state["records"].append(
                        [time.monotonic(), headers.get("idempotency-key", ""), message["chat"],
                         message["content"]]
                    )
                writer.write(
                    b"HTTP/1.1 " + status + b"\r\nContent-Length: "
                    + str(len(answer)).encode() + b"\r\n\r\n" + answer
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=256)
        ready.set()
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# === the taken-time proxy (threads in this process) ===


class TakenProxy:
    """Forwards to a simulator; records when a destructive read's messages leave for the sidecar."""

    def __init__(self, upstream_port):
        self.port = free_port()
        self.taken = {}
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def forward(self):
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=10)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                conn.close()
                destructive = "listen/get" in self.path or "get-next-new" in self.path
                contents = []
                if destructive and response.status == 200:
                    contents = re.findall(r'"content":"((?:lat|bk)/[^"]*)"', data.decode())
                # One write with TCP_NODELAY: a header write and a body write would meet the
                # client's delayed ACK (Nagle) and add about 40 ms after "taken".
                head = f"HTTP/1.1 {response.status} {response.reason}\r\n"
                for name, value in response.getheaders():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                        head += f"{name}: {value}\r\n"
                head += f"Content-Length: {len(data)}\r\n\r\n"
                self.wfile.write(head.encode("latin-1") + data)
                self.wfile.flush()
                if contents:
                    now = time.monotonic()
                    with proxy.lock:
                        for content in contents:
                            proxy.taken.setdefault(content, now)

            do_GET = forward
            do_POST = forward

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


# === one run of one binary ===


def metric(text, name):
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def percentile(values, p):
    values = sorted(values)
    index = min(len(values) - 1, max(0, round(p / 100 * len(values) + 0.5) - 1))
    return values[index]


def run_once(label, binary, args, round_no, hook_port):
    work = tempfile.mkdtemp(prefix="bench-delivery-")
    procs = []
    proxies = []
    try:
        sims = []
        for n in range(2):
            port = free_port()
            log = open(os.path.join(work, f"sim{n}.log"), "w")
            procs.append(
                subprocess.Popen(
                    [args.sim_bin, "simulate", "--listen", f"127.0.0.1:{port}",
                     "--api-key", API_KEY],
                    stdout=log, stderr=log, cwd=work,
                )
            )
            sims.append(port)
        for port in sims:
            wait_until("a simulator", lambda p=port: get(f"http://127.0.0.1:{p}/_sim/state"),
                       START_TIMEOUT)
            proxies.append(TakenProxy(port))
        chats = [f"chat-{c:02d}" for c in range(args.chats)]
        text = (
            f"listener:\n  poll_interval: {args.poll}\n  health_check_interval: 5s\n"
            "instances:\n"
        )
        for n, proxy in enumerate(proxies):
            text += (
                f"  - id: wx-{n}\n    base_url: http://127.0.0.1:{proxy.port}\n"
                f"    api_key_env: BENCH_KEY\n"
            )
        text += (
            "platforms:\n  - id: hook\n    type: webhook\n"
            f"    url: http://127.0.0.1:{hook_port}/hook\n    timeout: 60s\n"
            "rules:\n  - id: all\n    instance: \"*\"\n    chat: \"*\"\n    platform: hook\n"
            f"delivery:\n  workers: {args.workers}\n  attempt_timeout: 90s\n"
            "fixed_listeners:\n"
        )
        for chat in chats:
            text += f"  - chat: {chat}\n    instances: [\"*\"]\n"
        text += f"storage:\n  path: data/bench.db\n  synchronous: {args.synchronous}\n"
        config = os.path.join(work, "sidecar.yaml")
        with open(config, "w") as handle:
            handle.write(text)
        port = free_port()
        log = open(os.path.join(work, "sidecar.log"), "w")
        env = dict(os.environ, BENCH_KEY=API_KEY)
        procs.append(
            subprocess.Popen(
                [binary, "--config", config, "--listen", f"127.0.0.1:{port}", "--log-level",
                 "warn"],
                stdout=log, stderr=log, cwd=work, env=env,
            )
        )
        sidecar = f"http://127.0.0.1:{port}"
        wait_until("the sidecar", lambda: get(f"{sidecar}/-/ready"), START_TIMEOUT)
        post(f"http://127.0.0.1:{hook_port}/_close")

        def listened():
            return all(
                len(json.loads(get(f"http://127.0.0.1:{p}/_sim/state")).get("listened", []))
                >= len(chats)
                for p in sims
            )

        wait_until("every chat listened", listened, START_TIMEOUT)

        # Backlog phase.
        per_instance = args.messages // 2
        for n in range(per_instance):
            for i, port in enumerate(sims):
                chat = chats[n % len(chats)]
                post(f"http://127.0.0.1:{port}/_sim/inject",
                     {"chat": chat, "sender": "bench", "content": f"bk/{i}/{chat}/{n:06d}"})
        wait_until(
            "the backlog stored",
            lambda: metric(get(f"{sidecar}/metrics"), "wxauto_messages_pending")
            == per_instance * 2,
            PHASE_TIMEOUT,
        )
        opened = time.monotonic()
        post(f"http://127.0.0.1:{hook_port}/_open")
        hook = f"http://127.0.0.1:{hook_port}"
        wait_until(
            "the backlog delivered",
            lambda: int(get(f"{hook}/_count")) >= per_instance * 2,
            PHASE_TIMEOUT,
        )
        records = json.loads(get(f"{hook}/_records", timeout=30))
        first = {}
        order_ok = True
        last_seq = {}
        for at, key, chat, content in records:
            if key in first:
                continue
            first[key] = at
            _, inst, chat_name, seq = content.split("/")
            previous = last_seq.get((inst, chat_name), -1)
            if int(seq) < previous:
                order_ok = False
            last_seq[(inst, chat_name)] = int(seq)
        done = max(first.values())
        seconds = done - opened
        dups = len(records) - len(first)
        print(
            f"delivery_backlog bin={label} round={round_no} messages={len(first)} "
            f"chats={len(chats) * 2} workers={args.workers} synchronous={args.synchronous} "
            f"seconds={seconds:.3f} msgs_per_s={len(first) / seconds:.0f} dups={dups} "
            f"order={'ok' if order_ok else 'BROKEN'}",
            flush=True,
        )

        # Latency phase.
        post(f"{hook}/_close")
        post(f"{hook}/_open")
        interval = 1.0 / args.rate
        start = time.monotonic()
        n = 0
        while time.monotonic() - start < args.lat_seconds:
            for i, port in enumerate(sims):
                chat = chats[n % len(chats)]
                post(f"http://127.0.0.1:{port}/_sim/inject",
                     {"chat": chat, "sender": "bench", "content": f"lat/{i}/{chat}/{n:06d}"})
            n += 1
            time.sleep(max(0.0, start + n * interval - time.monotonic()))
        expected = n * 2
        wait_until("the latency messages delivered",
                   lambda: int(get(f"{hook}/_count")) >= expected, PHASE_TIMEOUT)
        records = json.loads(get(f"{hook}/_records", timeout=30))
        arrived = {}
        for at, _key, _chat, content in records:
            arrived.setdefault(content, at)
        taken = {}
        for proxy in proxies:
            with proxy.lock:
                taken.update(proxy.taken)
        latencies = [
            (arrived[c] - taken[c]) * 1000 for c in arrived if c.startswith("lat/") and c in taken
        ]
        print(
            f"delivery_latency bin={label} round={round_no} samples={len(latencies)} "
            f"rate_per_instance={args.rate} poll={args.poll} "
            f"p50_ms={percentile(latencies, 50):.1f} p99_ms={percentile(latencies, 99):.1f} "
            f"max_ms={max(latencies):.1f}",
            flush=True,
        )
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for proxy in proxies:
            proxy.stop()
        if args.keep:
            print(f"bench-delivery: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", action="append", required=True, metavar="LABEL=PATH")
    parser.add_argument("--sim-bin", help="binary for `simulate` (default: the last --bin)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--chats", type=int, default=10, help="chats per instance")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--synchronous", default="normal", choices=["normal", "full"])
    parser.add_argument("--poll", default="1s", help="listener.poll_interval")
    parser.add_argument("--rate", type=float, default=20.0, help="latency phase msgs/s/instance")
    parser.add_argument("--lat-seconds", type=float, default=10.0)
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs")
    args = parser.parse_args()
    bins = []
    for spec in args.bin:
        label, _, path = spec.partition("=")
        if not path or not os.path.exists(path):
            raise SystemExit(f"bench-delivery: no binary at {path!r} (give LABEL=PATH)")
        bins.append((label, os.path.abspath(path)))
    args.sim_bin = os.path.abspath(args.sim_bin or bins[-1][1])
    hook_port = free_port()
    ready = multiprocessing.Event()
    hook = multiprocessing.Process(target=webhook_main, args=(hook_port, ready), daemon=True)
    hook.start()
    if not ready.wait(10):
        raise SystemExit("bench-delivery: the webhook did not start")
    try:
        # Interleaved, so a noisy neighbour hits every build alike.
        for round_no in range(1, args.rounds + 1):
            for label, path in bins:
                run_once(label, path, args, round_no, hook_port)
    finally:
        hook.terminate()
        hook.join(5)


if __name__ == "__main__":
    main()
