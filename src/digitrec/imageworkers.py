"""An upload's bytes -> the 28x28 input the model sees, in worker processes beside the server.

The server decodes and preprocesses uploads in a pool of worker processes (`ImageWorkers`), so that a photo's
decoding runs on every core and never stops the event loop. Each worker imports this module, where what it runs
is defined, and not the server's: NumPy, Pillow and SciPy, without FastAPI and pydantic (30 MB and 0.3 s of
start-up less per worker).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import io
import logging
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from .errors import ImageError, ImageTooLargeError

MAX_PIXELS = 40_000_000
IMAGE_HINT = (
    'send the image as the multipart field "file", as JSON {"image": "<base64 PNG or JPEG>"}, or as the body '
    "with Content-Type image/png or image/jpeg"
)


def checked_upload(data: bytes) -> bytes:
    """The uploaded bytes, once they are known not to be empty or over 40 megapixels.

    The pixel count comes from the header alone, so a huge image is refused before it is decoded; preprocess()
    and read() then decode the bytes as the CLI decodes a file (a phone photo's JPEG at a reduced scale, its
    luma only: 7 ms instead of 60 ms for 12 megapixels).
    """
    from PIL import Image

    from .preprocess import IMAGE_FORMATS, quiet_pillow

    if not data:
        raise ImageError("the image is empty; " + IMAGE_HINT + ".")
    try:
        # quiet: Pillow's warnings (a corrupt EXIF block, 1-2x its pixel limit) went to the server log
        with quiet_pillow():
            width, height = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS).size
    except Image.DecompressionBombError:  # Pillow refuses to even open it (over about 179 megapixels)
        raise ImageTooLargeError(
            f"the image has far more than the {MAX_PIXELS // 1_000_000} megapixels we accept; scale it down and "
            "send it again."
        ) from None
    except Exception:  # noqa: BLE001 - not an image we read: preprocess() says so in its own words
        width = height = 0
    if width * height > MAX_PIXELS:
        raise ImageTooLargeError(
            # to as many decimals as show it over the limit: 40001x1000 was "(40 megapixels), more than the 40"
            f"the image is {width}x{height} ({_megapixels(width * height)} megapixels), more than the "
            f"{MAX_PIXELS // 1_000_000} megapixels we accept; scale it down and send it again."
        )
    return data


def _megapixels(pixels: int) -> str:
    """A pixel count over MAX_PIXELS in megapixels, to as few decimals as show it above MAX_PIXELS's."""
    for decimals in range(7):
        if round(pixels / 1e6, decimals) > MAX_PIXELS // 1_000_000:
            return f"{pixels / 1e6:.{decimals}f}"
    return f"{pixels / 1e6:.6f}"


def to_model_input(data: bytes) -> np.ndarray:
    """Uploaded bytes -> the 28x28 float32 image the model sees (module level, so worker processes can run it)."""
    from .preprocess import preprocess

    return np.asarray(preprocess(checked_upload(data)), dtype=np.float32).reshape(28, 28)


def each(work: Callable[[bytes], Any], uploads: list[bytes]) -> list[Any]:
    """`work` on several uploads: each one's result, or the error it raised (one bad image spoils no other)."""
    out: list[Any] = []
    for data in uploads:
        try:
            out.append(work(data))
        except Exception as exc:  # noqa: BLE001 - handed back to that upload's request, which answers 4xx/5xx
            out.append(exc)
    return out


def to_model_inputs(uploads: list[bytes]) -> list[np.ndarray | Exception]:
    """Several uploads -> each one's 28x28 input, or the error it raised."""
    return each(to_model_input, uploads)


# The Predictor (NumPy backend) a reading worker reads numbers with: its pool hands it over as the worker starts.
_reader: Any = None


# /api/read's limit on one read, in seconds: the slowest photo known (a page of five scribbled-out lines) takes
# 9-10 s on one core, a photo of written numbers well under 1 s (docs/realworld.md)
READ_TIME_LIMIT_S = 30.0


def read_limited(reader: Any, data: bytes) -> Any:
    """Uploaded bytes -> the ReadResult of /api/read by `reader` (a Predictor), under READ_TIME_LIMIT_S: in a
    reading worker and on the server's threads alike."""
    from .segment import time_limit

    with time_limit(READ_TIME_LIMIT_S):
        return reader.read(checked_upload(data))


def read_number(data: bytes) -> Any:
    """Uploaded bytes -> the ReadResult of /api/read, read in this worker by its Predictor."""
    return read_limited(_reader, data)


def read_numbers(uploads: list[bytes]) -> list[Any]:
    """Several uploads -> each one's ReadResult, or the error it raised."""
    return each(read_number, uploads)


def _start_worker(server_pid: int, reader: Any = None) -> None:
    """Run once in each worker process as it starts, so the first request does not pay for the imports (nor, in
    a reading worker, for loading the pair classifier)."""
    global _reader
    # Ctrl-C in a terminal signals the whole process group, workers included: each printed a KeyboardInterrupt
    # traceback and died, and the server rebuilt its pool while it shut down. Stopping is the server's to do:
    # it ends the workers once the requests in flight are answered (ImageWorkers.shutdown). (Blocked from the
    # worker's start by ImageWorkers._in_pool; ignored from here on, whatever unblocks it.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from threadpoolctl import threadpool_limits

    from . import preprocess  # noqa: F401

    # One thread each: there is a worker per core, and NumPy's OpenBLAS would start a thread per core in every
    # one of them, which then spin waiting for each other (reads of numbers took 180 ms of CPU instead of 37).
    threadpool_limits(1)

    if reader is not None:
        from .pairs import load_pair_scorer
        from .segment import segment  # noqa: F401

        _reader = reader
        if reader.read_pairs:
            load_pair_scorer(reader.pairs_path)
    _exit_with_parent(server_pid)
    freeze_heap()


def _exit_with_parent(server_pid: int, poll_s: float = 1.0) -> None:
    """End this worker within `poll_s` seconds of the server's end, however that came.

    A server killed with SIGKILL (or by the out-of-memory killer) cannot stop its workers, and they wait for
    work forever: each kept its 80 MB, and the resource tracker beside them, until the machine restarted.
    The server's pid comes from the server: a worker still importing when the server died would otherwise
    take its new parent for the server and watch it forever.
    """
    import threading

    def watch() -> None:
        # an orphan is handed to init (or a subreaper): its parent id changes
        while os.getppid() == server_pid:
            time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, name="digitrec-parent-watch", daemon=True).start()


def _worker_pid() -> int:
    return os.getpid()


def freeze_heap() -> None:
    """Move every object alive now (modules, the model, the app) out of the garbage collector's reach.

    A full collection walks every tracked object: in the server process, with torch, FastAPI and ONNX Runtime
    loaded, that is about 200,000 objects and 110 ms with the event loop stopped (measured here), which every
    request in flight then waits for. Objects created at start-up live as long as the process, so scanning them
    finds nothing (the `gc.freeze()` recipe of the Python docs); what requests allocate is still collected.
    Steady load seldom triggers a full collection (none in 20,000 load-benchmark requests), so this removes a
    rare 110 ms stall rather than raising throughput. `serve()` and each image worker call it, `create_app()`
    does not: a test process keeps collecting its garbage.
    """
    gc.collect()
    gc.freeze()


class ImageWorkers:
    """Decoding and preprocessing in worker processes, several uploads per task when requests queue up.

    Like the Batcher there is no timer: while a worker is free an upload goes to it at once, alone; under load
    the uploads that queued up meanwhile go together, so the inter-process round trip (pickling, the pool's
    manager and feeder threads, waking the event loop) is paid once per chunk instead of once per request.

    A worker that dies (killed, out of memory) breaks a ProcessPoolExecutor for good: every later submit
    raises BrokenProcessPool. The pool is then rebuilt and the chunk sent again, once.

    `work` is what the workers do with a chunk of uploads: preprocess them (to_model_inputs), or, given a
    `reader` (a picklable Predictor), read the numbers in them (read_numbers).
    """

    def __init__(
        self,
        processes: int,
        max_chunk: int = 8,
        work: Callable[[list[bytes]], list[Any]] = to_model_inputs,
        reader: Any = None,
    ):
        import multiprocessing

        self.processes = processes
        self.max_chunk = max_chunk
        self.work, self.reader = work, reader
        # one chunk queued behind the busy workers: no idle gap between chunks
        self.max_in_flight = processes + 1
        # spawn, not fork: forking a process that holds torch's and uvicorn's threads can deadlock the child.
        self.context = multiprocessing.get_context("spawn")
        self.pool = self._new_pool()
        self.pending: collections.deque[tuple[bytes, asyncio.Future]] = collections.deque()
        self.in_flight = 0
        self.tasks: set[asyncio.Task] = set()  # held so the event loop cannot garbage-collect a running chunk
        self.chunks = 0
        self.rebuilds = 0

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self.processes,
            mp_context=self.context,
            initializer=_start_worker,
            initargs=(os.getpid(), self.reader),
        )

    async def start(self) -> None:
        """Start the workers now (spawn imports NumPy, Pillow and SciPy), not on the first user's request."""
        await asyncio.gather(*(self._in_pool(self.pool, _worker_pid) for _ in range(self.processes)))

    def shutdown(self) -> None:
        """Stop the workers before the server process ends (each finishes at most the chunk it holds).

        uvicorn re-raises the SIGTERM or SIGINT it caught once the app has shut down, so the process dies by the
        signal and the interpreter's exit hooks, which would end the pool's workers, never run: without waiting
        here every stopped server left its workers running.
        """
        self.pool.shutdown(wait=True, cancel_futures=True)

    def kill(self) -> None:
        """End the workers now, the chunks they hold dropped (a forced quit, a second Ctrl-C): at exit the pool
        would wait for every chunk queued, seconds of large photos after the server said it stopped at once."""
        if hasattr(self.pool, "terminate_workers"):  # Python 3.14 and later say it in public
            self.pool.terminate_workers()
            return
        for process in list((getattr(self.pool, "_processes", None) or {}).values()):
            process.terminate()
        self.pool.shutdown(wait=True, cancel_futures=True)

    async def __call__(self, data: bytes) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((data, future))
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        while self.pending and self.in_flight < self.max_in_flight:
            free = self.max_in_flight - self.in_flight
            size = min(self.max_chunk, -(-len(self.pending) // free))
            chunk: list[tuple[bytes, asyncio.Future]] = []
            while self.pending and len(chunk) < size:
                data, future = self.pending.popleft()
                if not future.done():  # not cancelled: its client is still waiting (server.while_connected)
                    chunk.append((data, future))
            if not chunk:
                continue
            self.in_flight += 1
            self.chunks += 1
            task = asyncio.ensure_future(self._run(chunk))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _run(self, chunk: list[tuple[bytes, asyncio.Future]]) -> None:
        try:
            try:
                results: list[Any] = await self._submit([data for data, _ in chunk])
            except Exception as exc:  # noqa: BLE001 - the pool is gone for good: every request in the chunk says so
                results = [exc] * len(chunk)
            for (_, future), result in zip(chunk, results, strict=True):
                if future.done():  # the client went away
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        finally:
            self.in_flight -= 1
            self._dispatch()

    async def _submit(self, uploads: list[bytes]) -> list[Any]:
        pool = self.pool
        try:
            return await self._in_pool(pool, self.work, uploads)
        except BrokenProcessPool:
            self._rebuild(pool)
        return await self._in_pool(self.pool, self.work, uploads)  # once; a second break is a 503

    @staticmethod
    def _in_pool(pool: ProcessPoolExecutor, function: Callable, *args: Any) -> asyncio.Future:
        """Run `function` in `pool`; a worker the pool starts for it begins deaf to Ctrl-C.

        Ctrl-C in a terminal signals the whole process group. A worker still importing when it came (start() can
        return while one is: the other ran both its tasks) printed a KeyboardInterrupt traceback, since it had
        not yet reached _start_worker. The pool starts its processes inside submit(), here, and a blocked signal
        stays blocked in a child, through exec too; in this process a Ctrl-C blocked meanwhile comes right after.
        """
        submit = asyncio.get_running_loop().run_in_executor
        if not hasattr(signal, "pthread_sigmask"):  # Windows: no process groups for Ctrl-C to reach
            return submit(pool, function, *args)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return submit(pool, function, *args)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _rebuild(self, broken: ProcessPoolExecutor) -> None:
        if self.pool is broken:  # the first chunk to notice rebuilds; the others in flight reuse the new pool
            logging.getLogger("digitrec.server").warning("an image worker died; starting a new pool")
            self.rebuilds += 1
            broken.shutdown(wait=False, cancel_futures=True)
            self.pool = self._new_pool()
