"""Fault benchmark of `digitrec serve` on 127.0.0.1: bad traffic mixed into good, bombs, huge bodies, slow clients.

    python benchmarks/fault_server.py --model runs/fast/model.safetensors
    python benchmarks/fault_server.py --good 2000 --bad 1000 --concurrency 32 --time-limit 180

It starts `digitrec serve` on a free loopback port, records the answer to each good image on the quiet
server, then sends --good good and --bad malformed requests shuffled together over --concurrency keep-alive
connections while --slow clients dribble their headers a byte at a time; then a decompression bomb and two
100 MB bodies (declared and chunked). It checks that every good request gets the quiet answer, every bad
one a 4xx within 1 s, no response is a 5xx, and the server's peak resident memory stays under 1 GB, and
prints one table. Bounded in count and time; it never talks to anything but 127.0.0.1. Exit status 1 when
a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_server import (  # noqa: E402
    child_processes,
    digit_pngs,
    multipart_request,
    read_response,
    start_server,
)

HOST = "127.0.0.1"
BAD_DEADLINE_S = 1.0
MEMORY_LIMIT_MB = 1024
HUGE_BODY = 100 * 1024 * 1024


@dataclass
class Request:
    kind: str
    raw: bytes
    expected: str | None = None  # the quiet server's answer to a good request; None for a bad one


def http(
    method: str, path: str, body: bytes = b"", content_type: str | None = None, length: int | None = None
) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(body) if length is None else length}\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    return (head + "\r\n").encode() + body


def multipart(file: bytes, path: str = "/api/predict", fields: dict[str, str] | None = None) -> bytes:
    boundary = "fault-benchmark"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in (fields or {}).items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + file
        + b"\r\n"
    )
    return http(
        "POST",
        path,
        b"".join(parts) + f"--{boundary}--\r\n".encode(),
        f"multipart/form-data; boundary={boundary}",
    )


def png_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes whose PNG header claims width x height: a decompression bomb's calling card."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
        + chunk(b"IEND", b"")
    )


def bad_requests(png: bytes, rng: random.Random) -> list[Request]:
    """One of each kind of malformed request; the mix cycles through them."""
    return [
        Request("not an image", multipart(rng.randbytes(2000))),
        Request("truncated PNG", multipart(png[: len(png) // 2])),
        Request("empty file", multipart(b"")),
        Request("bomb PNG 50000x50000", multipart(png_claiming(50_000, 50_000))),
        Request("JSON without image", http("POST", "/api/predict", b'{"picture": 1}', "application/json")),
        Request(
            "JSON bad base64",
            http("POST", "/api/predict", b'{"image": "%%%not base64%%%"}', "application/json"),
        ),
        Request("invalid JSON", http("POST", "/api/predict", b'{"image": ', "application/json")),
        Request("wrong content type", http("POST", "/api/predict", b"hello", "text/plain")),
        Request("unknown path", http("POST", "/api/nothing-here", b"x", "text/plain")),
        Request("wrong method", http("DELETE", "/api/predict")),
        Request("feedback label 12", multipart(png, "/api/feedback", {"label": "12"})),
        Request("declares 100 MB", http("POST", "/api/predict", content_type="image/png", length=HUGE_BODY)),
        Request("garbage request line", b"\x16\x03\x01 NOT HTTP AT ALL\r\n\r\n"),
    ]


def answer_of(body: bytes) -> str:
    """What a user sees of a prediction: the digit (or that it was rejected)."""
    result = json.loads(body)
    return "rejected" if result["rejected"] else str(result["digit"])


@dataclass
class Outcome:
    kind: str
    good: bool
    status: int | None
    seconds: float
    correct: bool


async def exchange(host: str, port: int, connection: list, raw: bytes, timeout: float) -> tuple[int, bytes]:
    """Send one request on the connection's keep-alive socket (reconnecting if needed) and read the answer."""
    if connection[0] is None:
        connection[:] = await asyncio.open_connection(host, port)
    reader, writer = connection
    writer.write(raw)
    await writer.drain()
    return await asyncio.wait_for(read_response(reader), timeout=timeout)


async def mixed_load(
    port: int, requests: list[Request], concurrency: int, slow: int, time_limit: float, header_timeout: float
) -> tuple[list[Outcome], dict]:
    """Good and bad requests over `concurrency` connections, with `slow` slowloris clients alongside."""
    outcomes: list[Outcome] = []
    queue = list(reversed(requests))
    deadline = time.perf_counter() + time_limit
    stop_slow = asyncio.Event()
    slow_report: dict[str, Any] = {"clients": slow, "closed_by_server": 0, "held_s": 0.0, "answers": set()}

    async def worker() -> None:
        connection: list = [None, None]
        while queue and time.perf_counter() < deadline:
            request = queue.pop()
            started = time.perf_counter()
            try:
                status, body = await exchange(HOST, port, connection, request.raw, timeout=30)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
                status, body = None, b""
            seconds = time.perf_counter() - started
            correct = (
                (status == 200 and answer_of(body) == request.expected)
                if request.expected
                else (status is not None and 400 <= status < 500 and seconds < BAD_DEADLINE_S)
            )
            outcomes.append(Outcome(request.kind, request.expected is not None, status, seconds, correct))
            if status is None or status >= 400:  # the server may close the connection after an error
                if connection[1] is not None:
                    connection[1].close()
                connection[:] = [None, None]
        if connection[1] is not None:
            connection[1].close()

    async def slowloris() -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        started = time.perf_counter()
        header = b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 10_000
        closed = asyncio.ensure_future(reader.read())  # what the server says, until it closes the connection
        closed_by_server = False
        try:
            for byte in header:
                if closed.done():
                    closed_by_server = True
                    break
                if stop_slow.is_set():
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.1)
        except OSError:
            closed_by_server = True
        held = time.perf_counter() - started
        if closed_by_server:
            slow_report["closed_by_server"] += 1
            slow_report["held_s"] = max(slow_report["held_s"], held)
        if closed.done() and not closed.cancelled() and closed.exception() is None:
            slow_report["answers"].add(closed.result()[:12].decode("latin-1"))
        else:
            closed.cancel()
        writer.close()

    mix_started = time.perf_counter()
    slow_tasks = [asyncio.create_task(slowloris()) for _ in range(slow)]
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    # give the slow clients the server's whole header timeout and a little more before they give up
    await asyncio.sleep(max(0.0, header_timeout + 2.0 - (time.perf_counter() - mix_started)))
    stop_slow.set()
    await asyncio.gather(*slow_tasks)
    return outcomes, slow_report


async def huge_body(port: int, chunked: bool) -> tuple[int | None, float, int]:
    """Stream a 100 MB body; (status, seconds to the answer, bytes sent before it came)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {HUGE_BODY}"
    writer.write(
        f"POST /api/predict HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: image/png\r\n{framing}\r\n\r\n".encode()
    )
    block = os.urandom(64 * 1024)
    frame = f"{len(block):x}\r\n".encode() + block + b"\r\n" if chunked else block
    sent, started = 0, time.perf_counter()
    answer = asyncio.create_task(read_response(reader))
    try:
        while sent < HUGE_BODY and not answer.done():
            writer.write(frame)
            await writer.drain()
            sent += len(block)
        status, _ = await asyncio.wait_for(answer, timeout=30)
    except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
        status = answer.result()[0] if answer.done() and not answer.exception() else None
    seconds = time.perf_counter() - started
    writer.close()
    return status, seconds, sent


def peak_memory_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM) from /proc, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def still_running(pids: list[int], wait_s: float = 10.0) -> list[int]:
    """Those of `pids` still running after up to `wait_s` seconds (a zombie has ended)."""

    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + wait_s
    while any(map(running, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [pid for pid in pids if running(pid)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint to serve (default: the bundled model)")
    parser.add_argument("--good", type=int, default=2000, help="good requests (default 2000, at most 20000)")
    parser.add_argument(
        "--bad", type=int, default=1000, help="malformed requests mixed in (default 1000, at most 20000)"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="connections (default 32, at most 256)")
    parser.add_argument(
        "--slow", type=int, default=8, help="slowloris clients during the mix (default 8, at most 64)"
    )
    parser.add_argument(
        "--time-limit", type=float, default=180.0, help="stop the mix after this many seconds (at most 600)"
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=3.0,
        help="the server's --header-timeout: slow clients must be cut off within it (default 3 s, at most 60)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if not (
        0 < args.header_timeout <= 60
        and 0 < args.good <= 20_000
        and 0 <= args.bad <= 20_000
        and 1 <= args.concurrency <= 256
        and 0 <= args.slow <= 64
        and 0 < args.time_limit <= 600
    ):
        parser.error(
            "keep --good/--bad within 20000, --concurrency 1..256, --slow 0..64, --time-limit (0, 600]"
        )

    rng = random.Random(0)
    children: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        server, port = start_server(
            args.model,
            os.path.join(tmp, "feedback.sqlite"),
            ["--header-timeout", str(args.header_timeout)],
        )
        try:
            pngs = digit_pngs()
            quiet = [asyncio.run(_one(port, multipart_request(HOST, port, png))) for png in pngs]
            good = [
                Request("good", multipart_request(HOST, port, png), answer_of(body))
                for png, (_, body) in zip(pngs, quiet, strict=True)
            ]
            kinds = bad_requests(pngs[0], rng)
            requests = [good[i % len(good)] for i in range(args.good)] + [
                kinds[i % len(kinds)] for i in range(args.bad)
            ]
            rng.shuffle(requests)
            started = time.perf_counter()
            outcomes, slow = asyncio.run(
                mixed_load(port, requests, args.concurrency, args.slow, args.time_limit, args.header_timeout)
            )
            mix_seconds = time.perf_counter() - started
            bomb_started = time.perf_counter()
            bomb_status, _ = asyncio.run(_one(port, multipart(png_claiming(50_000, 50_000))))
            bomb_seconds = time.perf_counter() - bomb_started
            huge = {chunked: asyncio.run(huge_body(port, chunked)) for chunked in (False, True)}
            alive = asyncio.run(_one(port, multipart_request(HOST, port, pngs[0])))[0] == 200
            memory_mb = peak_memory_mb(server.pid)
            children = child_processes(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)
    strays = still_running(children)

    rows = table(outcomes)
    extras = [
        (
            "decompression bomb, alone",
            1,
            bomb_status,
            bomb_seconds,
            bomb_status is not None and 400 <= bomb_status < 500 and bomb_seconds < BAD_DEADLINE_S,
            "",
        ),
        *[
            (
                f"100 MB body, {'chunked' if chunked else 'Content-Length'}",
                1,
                status,
                seconds,
                status == 413 and seconds < BAD_DEADLINE_S,
                f"{sent / 2**20:.1f} MB sent before the answer",
            )
            for chunked, (status, seconds, sent) in huge.items()
        ],
    ]
    all_5xx = sum(1 for o in outcomes if o.status is not None and o.status >= 500)
    checks = {
        "every good request answered correctly": all(o.correct for o in outcomes if o.good)
        and sum(o.good for o in outcomes) == args.good,
        "every bad request 4xx within 1 s": all(o.correct for o in outcomes if not o.good)
        and sum(not o.good for o in outcomes) == args.bad,
        "bomb and 100 MB bodies 4xx within 1 s": all(row[4] for row in extras),
        "no 5xx": all_5xx == 0 and all((row[2] or 0) < 500 for row in extras),
        f"server peak memory under {MEMORY_LIMIT_MB} MB": memory_mb < MEMORY_LIMIT_MB,
        "server still answers afterwards": alive,
        f"its {len(children)} child processes stop with it (SIGTERM)": bool(children) and not strays,
        f"slow clients cut off within the {args.header_timeout:g} s header timeout": slow["closed_by_server"]
        == args.slow
        and slow["held_s"] <= args.header_timeout + 1.0,
    }
    slow["answers"] = sorted(slow["answers"])
    result = {
        "rows": rows,
        "extras": [list(row) for row in extras],
        "slow_clients": slow,
        "mix_seconds": round(mix_seconds, 2),
        "peak_memory_mb": round(memory_mb, 1),
        "checks": checks,
        "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(args, rows, extras, slow, mix_seconds, memory_mb, checks)
    return 0 if all(checks.values()) else 1


async def _one(port: int, raw: bytes) -> tuple[int | None, bytes]:
    connection: list = [None, None]
    try:
        return await exchange(HOST, port, connection, raw, timeout=30)
    except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
        return None, b""
    finally:
        if connection[1] is not None:
            connection[1].close()


def table(outcomes: list[Outcome]) -> list[dict]:
    by_kind: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        by_kind[outcome.kind].append(outcome)
    rows = []
    for kind, group in sorted(by_kind.items(), key=lambda kv: (kv[0] != "good", kv[0])):
        seconds = sorted(o.seconds for o in group)
        statuses = Counter(o.status for o in group)
        rows.append(
            {
                "kind": kind,
                "count": len(group),
                "ok": sum(o.correct for o in group),
                "statuses": " ".join(
                    f"{s or 'none'}x{n}" for s, n in sorted(statuses.items(), key=lambda kv: kv[0] or 0)
                ),
                "p50_ms": round(seconds[len(seconds) // 2] * 1000, 1),
                "max_ms": round(seconds[-1] * 1000, 1),
            }
        )
    return rows


def print_report(args, rows, extras, slow, mix_seconds, memory_mb, checks) -> None:
    print(
        f"digitrec serve fault benchmark: 127.0.0.1, {os.cpu_count()} CPUs, {args.good} good + {args.bad} malformed "
        f"requests at {args.concurrency} connections with {args.slow} slow clients, in {mix_seconds:.1f} s"
    )
    print(f"{'request':<28} {'count':>6} {'ok':>6}  {'statuses':<22} {'p50 ms':>8} {'max ms':>8}")
    for row in rows:
        print(
            f"{row['kind']:<28} {row['count']:>6} {row['ok']:>6}  {row['statuses']:<22} {row['p50_ms']:>8} {row['max_ms']:>8}"
        )
    for kind, count, status, seconds, ok, note in extras:
        print(
            f"{kind:<28} {count:>6} {int(ok):>6}  {str(status) + 'x1':<22} {seconds * 1000:>8.1f} {seconds * 1000:>8.1f}  {note}"
        )
    print(
        f"slow clients: {slow['clients']} sending 1 header byte per 100 ms; closed by the server: {slow['closed_by_server']}, "
        f"after at most {slow['held_s']:.1f} s, answering {', '.join(map(repr, slow['answers'])) or 'nothing'}"
    )
    print(f"server peak resident memory (VmHWM): {memory_mb:.0f} MB")
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")


if __name__ == "__main__":
    sys.exit(main())
