"""Load benchmark of `digitrec serve`: N POST /api/predict (or /api/read) at C concurrent keep-alive connections, on 127.0.0.1 only.

    python benchmarks/load_server.py                        # starts `digitrec serve` with the bundled model
    python benchmarks/load_server.py --model runs/x/model.safetensors --requests 2000 --concurrency 32
    python benchmarks/load_server.py --url http://127.0.0.1:8000   # a server that is already running

The client is a few dozen lines of asyncio speaking HTTP/1.1 over raw sockets with a pre-built request, so
that on a small machine it takes as little CPU as possible from the server it measures. Bounded: at most
--requests requests and --time-limit seconds; it refuses any host but the loopback interface. It prints
requests/s and latency percentiles, then the server's batching figures from /api/stats.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


PAYLOAD_SIDE = 140  # the page sends its drawing as a 140x140 PNG


def digit_pngs() -> list[bytes]:
    """Ten drawings like the page sends: MNIST test digits (when MNIST is here) as 140x140 PNGs, dark on white."""
    import numpy as np
    from PIL import Image

    try:
        from digitrec.data import load_mnist

        mnist = load_mnist(download=False)
        images = [mnist.test_images[(mnist.test_labels == d).nonzero()[0, 0]].numpy() for d in range(10)]
    except Exception:  # noqa: BLE001 - no MNIST here: synthetic strokes are as costly to process
        images = []
        for d in range(10):
            a = np.zeros((28, 28), np.uint8)
            a[5:23, 12 + d % 3 : 16 + d % 3] = 255
            a[5:9, 8:20] = 255 if d % 2 else 0
            images.append(a)
    out = []
    for a in images:
        buffer = io.BytesIO()
        Image.fromarray(255 - a).resize((PAYLOAD_SIDE, PAYLOAD_SIDE), Image.Resampling.BILINEAR).save(
            buffer, format="PNG"
        )
        out.append(buffer.getvalue())
    return out


def number_photos(count: int = 20) -> list[bytes]:
    """Photos of handwritten numbers, as /api/read gets them: the first `count` of eval-real's `numbers` set (seed 0)."""
    from digitrec.realworld import generate

    return [sample.data for sample in generate("numbers", count, seed=0)]


def read_rate(photos: list[bytes], seconds: float = 3.0) -> float:
    """Predictor.read calls per second on one core in this process (the bundled model, ONNX Runtime as `serve`
    runs it where it can, else NumPy) with one BLAS thread, as the server's reading workers run: the ceiling each
    server core can reach for /api/read."""
    from threadpoolctl import threadpool_limits

    from digitrec.predict import Predictor

    try:
        predictor = Predictor.pretrained(backend="onnx")
    except Exception:  # noqa: BLE001 - no ONNX Runtime here
        predictor = Predictor.pretrained(backend="numpy")
    with threadpool_limits(1):
        predictor.read(photos[0])
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            predictor.read(photos[count % len(photos)])
            count += 1
        return count / (time.perf_counter() - started)


def preprocess_rate(pngs: list[bytes], seconds: float = 2.0) -> float:
    """preprocess() calls per second on one core in this process: the ceiling each server core can reach."""
    from digitrec.preprocess import preprocess

    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        preprocess(pngs[count % len(pngs)])
        count += 1
    return count / (time.perf_counter() - started)


def netloc(host: str, port: int) -> str:
    """host:port as a URL and a Host header write it: an IPv6 address in brackets ([::1]:8000), which the server's
    Host check reads as ::1 (unbracketed, ::1:8000 is another address, and refused)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def multipart_request(host: str, port: int, png: bytes, path: str = "/api/predict") -> bytes:
    boundary = "digitrec-load-benchmark"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="digit.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + png
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {netloc(host, port)}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(
        (int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")), 0
    )
    return status, await reader.readexactly(length)


async def run_load(
    host: str,
    port: int,
    requests: list[bytes],
    total: int,
    concurrency: int,
    time_limit: float,
    expect: bytes = b'"probabilities"',
) -> tuple[list[float], list[str], float]:
    latencies: list[float] = []
    errors: list[str] = []
    next_index = 0
    deadline = time.perf_counter() + time_limit

    async def connection() -> None:
        nonlocal next_index
        reader = writer = None
        while next_index < total and time.perf_counter() < deadline:
            index = next_index
            next_index += 1
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                started = time.perf_counter()
                writer.write(requests[index % len(requests)])
                status, body = await asyncio.wait_for(read_response(reader), timeout=30)
                latencies.append(time.perf_counter() - started)
                if status != 200 or expect not in body:
                    errors.append(f"HTTP {status}: {body[:120]!r}")
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                if writer is not None:
                    writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - started


# ---------------------------------------------------------------- CPU time per request, from /proc (Linux)


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name (which may hold spaces): state, ppid, ..., utime, stime, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def child_processes(pid: int) -> list[int]:
    """The processes whose parent is `pid` (the server's image workers and multiprocessing's tracker), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int(_stat_fields(int(entry.name))[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):  # it ended while we looked
            continue
    return found


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used, in seconds."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def listening_process(port: int) -> int | None:
    """The process holding the socket that listens on `port` (a server given by --url), if this user can see
    it: the socket's inode from /proc/net/tcp (and tcp6), then the process with that inode among its descriptors."""
    inodes = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                return int(entry.name)
        except OSError:  # another user's process, or it ended while we looked
            continue
    return None


def server_cpu(pid: int) -> dict[int, float]:
    """CPU seconds so far of the server process and each of its child processes (its image workers)."""
    out = {}
    for each in [pid, *child_processes(pid)]:
        try:
            out[each] = cpu_seconds(each)
        except (OSError, IndexError, ValueError):
            continue
    return out


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))]


def start_server(
    model: str | None, feedback_db: str, extra_args: list[str] | None = None
) -> tuple[subprocess.Popen, int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "digitrec",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--feedback-db",
        feedback_db,
    ]
    if model:
        command += ["--model", model]
    command += extra_args or []
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited during start-up:\n{server.stderr.read()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
            return server, port
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not answer /healthz within 120 s")


def _quietly(function, *args):
    """function(*args), or None where /proc cannot answer (not Linux, or another user's server)."""
    try:
        return function(*args)
    except (OSError, IndexError, ValueError):
        return None


def cpu_line(result: dict, concurrency: int) -> str:
    """CPU per request, and what it implies on this machine's cores: the most requests/s they can answer at that
    cost, and the least mean latency `concurrency` connections then see (Little's law: in flight / throughput)."""
    server = result["server_cpu_ms_per_request"]
    per_request = server["main_process"] + server["child_processes"] + result["client_cpu_ms_per_request"]
    ceiling = result["cpus"] / per_request * 1000
    return (
        f"CPU per request: server {server['main_process'] + server['child_processes']:.2f} ms (main process "
        f"{server['main_process']:.2f}, {server['children']} child processes {server['child_processes']:.2f}), "
        f"this client {result['client_cpu_ms_per_request']:.2f} ms: {result['cpus']} cores answer at most "
        f"{ceiling:.0f} requests/s at that cost, and {concurrency} connections then wait at least "
        f"{concurrency / ceiling * 1000:.1f} ms on average"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint to serve (default: the bundled model)")
    parser.add_argument("--url", help="benchmark this already running server instead (loopback only)")
    parser.add_argument(
        "--backend", choices=["torch", "onnx"], help="the server's --backend (default: the server's default)"
    )
    parser.add_argument(
        "--requests", type=int, default=2000, help="total requests (default 2000, at most 20000)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=32, help="concurrent connections (default 32, at most 256)"
    )
    parser.add_argument("--warmup", type=int, default=100, help="requests sent first and not measured")
    parser.add_argument(
        "--time-limit", type=float, default=120.0, help="stop after this many seconds (default 120)"
    )
    parser.add_argument(
        "--endpoint",
        choices=["predict", "read"],
        default="predict",
        help="POST drawings of digits to /api/predict (default), or photos of numbers to /api/read",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if not (1 <= args.requests <= 20_000 and 1 <= args.concurrency <= 256 and 0 < args.time_limit <= 600):
        parser.error("keep --requests in 1..20000, --concurrency in 1..256 and --time-limit in (0, 600]")

    server = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            parts = urlsplit(args.url)
            if parts.scheme != "http":
                parser.error(f"--url takes a URL such as http://127.0.0.1:8000, got {args.url!r}")
            if parts.hostname not in LOOPBACK:
                parser.error("this benchmark only loads servers on 127.0.0.1 (it is a load generator)")
            host, port = "127.0.0.1" if parts.hostname == "localhost" else parts.hostname, parts.port or 80
        else:
            extra = ["--backend", args.backend] if args.backend else []
            server, port = start_server(args.model, os.path.join(tmp, "feedback.sqlite"), extra)
            host = "127.0.0.1"
        base = f"http://{netloc(host, port)}"
        try:
            reading = args.endpoint == "read"
            pngs = number_photos() if reading else digit_pngs()
            requests = [multipart_request(host, port, png, f"/api/{args.endpoint}") for png in pngs]
            expect = b'"number"' if reading else b'"probabilities"'
            if args.warmup:
                asyncio.run(
                    run_load(
                        host, port, requests, args.warmup, min(args.concurrency, args.warmup), 60, expect
                    )
                )
            try:
                before = json.loads(urllib.request.urlopen(f"{base}/api/stats", timeout=10).read())
            except OSError as exc:  # URLError: nothing listens there, or not digitrec
                sys.exit(
                    f"load_server.py: no digitrec server answers at {base} ({exc}); start one with digitrec serve"
                )
            server_pid = server.pid if server is not None else _quietly(listening_process, port)
            cpu_before = _quietly(server_cpu, server_pid) if server_pid else None
            client_before = os.times()
            latencies, errors, seconds = asyncio.run(
                run_load(host, port, requests, args.requests, args.concurrency, args.time_limit, expect)
            )
            client_after = os.times()
            cpu_after = _quietly(server_cpu, server_pid) if server_pid else None
            stats = json.loads(urllib.request.urlopen(f"{base}/api/stats", timeout=10).read())
            # measured right after the load, with the server idle
            ceiling = read_rate(pngs) if reading else preprocess_rate(pngs)
            health = json.loads(urllib.request.urlopen(f"{base}/healthz", timeout=10).read())
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=30)

    done = sorted(latencies)
    batches = stats["batches"]["count"] - before["batches"]["count"]
    images = stats["batches"]["images"] - before["batches"]["images"]
    result = {
        "model": f"{health['model']} {health['version']}",
        "endpoint": f"/api/{args.endpoint}",
        "requests": len(done),
        "concurrency": args.concurrency,
        "errors": len(errors),
        "seconds": round(seconds, 3),
        "requests_per_s": round(len(done) / seconds, 1) if seconds else 0.0,
        "p50_ms": round(percentile(done, 50) * 1000, 2) if done else None,
        "p90_ms": round(percentile(done, 90) * 1000, 2) if done else None,
        "p99_ms": round(percentile(done, 99) * 1000, 2) if done else None,
        "max_ms": round(done[-1] * 1000, 2) if done else None,
        "mean_batch": round(images / batches, 2) if batches else None,
        "cpus": os.cpu_count(),
        "payload_bytes": round(sum(map(len, pngs)) / len(pngs)),
        "load_average": round(os.getloadavg()[0], 1),
        ("read_per_s_one_core" if reading else "preprocess_per_s_one_core"): round(ceiling, 1),
        # full (generation 2) garbage collections in the server process during the measured requests
        "gc_full_collections": stats.get("gc", {}).get("collections", [0, 0, 0])[2]
        - before.get("gc", {}).get("collections", [0, 0, 0])[2],
    }
    answered = len(done) + len(errors)
    if answered:
        client = (client_after.user - client_before.user) + (client_after.system - client_before.system)
        result["client_cpu_ms_per_request"] = round(client / answered * 1000, 3)
    if cpu_before and cpu_after and answered:
        used = {pid: cpu_after[pid] - cpu_before[pid] for pid in cpu_after if pid in cpu_before}
        main_ms = used.pop(server_pid, 0.0) / answered * 1000
        result["server_cpu_ms_per_request"] = {
            "main_process": round(main_ms, 3),
            "child_processes": round(sum(used.values()) / answered * 1000, 3),
            "children": len(used),
        }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"digitrec serve load benchmark: {result['model']}, {result['cpus']} CPUs, client and server on this machine, "
            + (
                f"POST /api/read with photos of numbers (~{result['payload_bytes'] // 1000} kB)"
                if reading
                else f"payload {PAYLOAD_SIDE}x{PAYLOAD_SIDE} PNG drawings (~{result['payload_bytes'] // 1000} kB)"
            )
        )
        print(
            f"{'requests':>8} {'conc':>4} {'errors':>6} {'req/s':>8} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} {'batch':>6}"
        )
        print(
            f"{result['requests']:>8} {args.concurrency:>4} {result['errors']:>6} {result['requests_per_s']:>8} "
            f"{result['p50_ms']:>7} {result['p90_ms']:>7} {result['p99_ms']:>7} {result['max_ms']:>7} {result['mean_batch']!s:>6}"
        )
        print(
            f"side by side: {'read()' if reading else 'preprocess()'} alone runs {round(ceiling, 1)}/s on one core "
            f"here, so the server reaches {result['requests_per_s'] / ceiling:.2f}x one core's "
            f"{'reading' if reading else 'preprocessing'}; load average "
            f"{result['load_average']} (other jobs on this machine slow both); full garbage collections in the "
            f"server during the run: {result['gc_full_collections']}"
        )
        if "server_cpu_ms_per_request" in result:
            print(cpu_line(result, args.concurrency))
        for error in errors[:5]:
            print("  error:", error)
    return 1 if errors or len(done) < args.requests else 0


if __name__ == "__main__":
    sys.exit(main())
