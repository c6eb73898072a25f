"""Helpers for the server tests: a small deterministic predictor, test images, and a live uvicorn on 127.0.0.1."""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

from digitrec.predict import DigitBox, Prediction, ReadResult, holds_no_ink

# What the tests' clients send in Host: a loopback name, as a browser on the server's machine sends it. The app
# answers only such names unless told others (`allowed_hosts`); Starlette's TestClient sends "testserver".
BASE_URL = "http://localhost:8000"


@pytest.fixture(autouse=True)
def keep_grad_mode():
    """Restore autograd after each test: Predictor.load switches it off for the whole thread, and later tests
    in the same process (training ones) need it on. Test modules that load a real Predictor import this."""
    enabled = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(enabled)


@dataclass
class FakePredictor:
    """Says 7 for anything with ink and is not sure about a blank page, through a real (linear) torch model.

    The model's logit for 7 grows with the amount of ink, so saliency maps are meaningful: every ink pixel
    supports the answer. `delay_s` makes each batch slow, so concurrent requests must queue and batch.
    """

    name: str = "fake"
    version: str = "test-1"
    meta: dict = field(default_factory=lambda: {"metrics": {"test_accuracy": 0.9912}, "recipe": "fake"})
    temperature: float = 1.0
    reject_below: float = 0.5
    delay_s: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        linear = nn.Linear(784, 10)
        with torch.no_grad():
            linear.weight.zero_()
            linear.bias.zero_()
            linear.weight[7] = 0.1
        self.model = nn.Sequential(nn.Flatten(), linear).eval()

    def backend(self, batch: np.ndarray) -> np.ndarray:
        """Logits for float32 (N, 1, 28, 28), as every Predictor backend gives them (saliency maps use it)."""
        with torch.no_grad():
            return self.model(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))).numpy()

    def predict_tensor(self, batch: torch.Tensor) -> list[Prediction]:
        assert batch.shape[1:] == (1, 28, 28) and batch.dtype == torch.float32
        self.batch_sizes.append(len(batch))
        if self.delay_s:
            time.sleep(self.delay_s)
        with torch.no_grad():
            probabilities = torch.softmax(self.model(batch) / self.temperature, dim=1)
        out = []
        for p, blank in zip(probabilities.tolist(), holds_no_ink(batch.numpy()).tolist()):
            best = int(np.argmax(p))
            rejected = blank or p[best] < self.reject_below
            top = sorted(enumerate(p), key=lambda kv: -kv[1])[:3]
            out.append(Prediction(None if rejected else best, p[best], p, top, rejected, blank))
        return out

    def read(self, image: bytes) -> ReadResult:
        from digitrec.preprocess import open_image

        width, height = open_image(image).size  # bad images raise the ImageError the real read() raises
        return ReadResult(
            "42",
            [
                DigitBox(4, 0.98, (0, 0, width // 2, height)),
                DigitBox(2, 0.4, (width // 2, 0, width - width // 2, height), doubtful=True),
            ],
        )


def digit_png(size: int = 200, blank: bool = False, fmt: str = "PNG") -> bytes:
    """A dark "7" drawn on white paper, as a phone photo or a canvas export would give."""
    image = Image.new("L", (size, size), 255)
    if not blank:
        draw = ImageDraw.Draw(image)
        s = size / 200
        draw.line([(50 * s, 40 * s), (150 * s, 40 * s), (85 * s, 165 * s)], fill=0, width=int(16 * s))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@contextmanager
def live_server(app, **config) -> Iterator[str]:
    """Run `app` on uvicorn in a thread on a free 127.0.0.1 port; yields the base URL. `config`: more uvicorn.Config
    arguments (e.g. http=digitrec.guards.guarded_http_protocol(1.0))."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", **config)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start within 20 s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a tiny (wrong) data chunk: what a decompression bomb declares."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _cannot_load() -> None:
    raise RuntimeError("this model cannot be loaded here")


class UnloadableReader:
    """A portable predictor that no worker can load (as a model file damaged since the server loaded it)."""

    read_pairs = False

    def __reduce__(self):
        return (_cannot_load, ())


class FakePortablePredictor(FakePredictor):
    """FakePredictor whose portable form fails in the reading workers."""

    def portable(self) -> UnloadableReader:
        return UnloadableReader()
