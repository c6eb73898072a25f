"""The web page and REST API: `create_app(predictor)` builds the FastAPI app, `serve(...)` runs it on uvicorn."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import DigitrecError, ImageError, ImageTooLargeError
from .feedback import FeedbackStore

STATIC_DIR = Path(__file__).parent / "static"
MAX_BODY_BYTES = 5 * 1024 * 1024
MAX_PIXELS = 40_000_000
MAX_BATCH = 64
IMAGE_HINT = 'send the image as the multipart field "file", or as JSON {"image": "<base64 PNG or JPEG>"}'


# ---------------------------------------------------------------------------------------------------------------
# Response shapes (they are what /docs shows)


class TopEntry(BaseModel):
    digit: int
    probability: float


class PredictResponse(BaseModel):
    digit: int | None = Field(description="the digit read, or null when the model is not sure (rejected)")
    confidence: float = Field(
        description="calibrated probability of `digit` (of the top class when rejected)"
    )
    probabilities: list[float] = Field(description="ten calibrated probabilities, for digits 0 to 9")
    rejected: bool = Field(description="true when the image is probably not a digit or too ambiguous to read")
    top: list[TopEntry] = Field(default_factory=list, description="the three most likely digits")
    input: list[list[float]] | None = Field(
        None, description="with ?explain=true: the 28x28 image the model saw, 0-1"
    )
    saliency: list[list[float]] | None = Field(
        None,
        description="with ?explain=true: 28x28 occlusion saliency in [-1, 1]; positive pixels supported the answer",
    )


class DigitOut(BaseModel):
    digit: int
    confidence: float = Field(
        description="calibrated probability of `digit`; low values mark doubtful digits"
    )
    box: tuple[int, int, int, int] = Field(description="x, y, width, height in the uploaded image's pixels")


class ReadResponse(BaseModel):
    number: str = Field(description="the digits left to right")
    digits: list[DigitOut]


class FeedbackResponse(BaseModel):
    id: int
    label: int
    total: int = Field(description="corrections stored so far")


class HealthResponse(BaseModel):
    status: str
    model: str
    version: str
    test_accuracy: float | None


# ---------------------------------------------------------------------------------------------------------------
# Plumbing: body limit, image decoding, batching


class BodySizeLimit:
    """Pure ASGI middleware: answer 413 as soon as a request body passes `max_bytes`, before anyone parses it."""

    def __init__(self, app: Callable, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send)
            return
        # Read the (small) body here so chunked uploads are bounded too, then replay it to the app.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(send)
                return
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Callable) -> None:
        mb = self.max_bytes / 1024 / 1024
        body = json.dumps({"detail": f"the request is larger than {mb:g} MB; send a smaller image."}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def open_image(data: bytes):
    """Decode uploaded bytes with preprocess.open_image (as the CLI does), refusing over 40 megapixels first.

    The pixel count comes from the header alone, so a huge image is refused before it is decoded.
    """
    from PIL import Image

    from .preprocess import open_image as decode

    if not data:
        raise ImageError("the image is empty; " + IMAGE_HINT + ".")
    try:
        width, height = Image.open(io.BytesIO(data)).size
    except Image.DecompressionBombError:  # Pillow refuses to even open it (over about 179 megapixels)
        raise ImageTooLargeError(
            f"the image has far more than the {MAX_PIXELS // 1_000_000} megapixels we accept; scale it down and "
            "send it again."
        ) from None
    except Exception:  # noqa: BLE001 - not an image at all: decode() below says so in its own words
        width = height = 0
    if width * height > MAX_PIXELS:
        raise ImageTooLargeError(
            f"the image is {width}x{height} ({width * height / 1e6:.0f} megapixels), more than the "
            f"{MAX_PIXELS // 1_000_000} megapixels we accept; scale it down and send it again."
        )
    return decode(data)


def _prediction_dict(prediction: Any) -> dict[str, Any]:
    """A Prediction as JSON-ready values (plain floats, top as objects)."""
    top = []
    for entry in getattr(prediction, "top", None) or []:
        digit, probability = entry if isinstance(entry, tuple) else (entry["digit"], entry["probability"])
        top.append({"digit": int(digit), "probability": float(probability)})
    return {
        "digit": None if prediction.digit is None else int(prediction.digit),
        "confidence": float(prediction.confidence),
        "probabilities": [float(p) for p in prediction.probabilities],
        "rejected": bool(prediction.rejected),
        "top": top,
    }


class Batcher:
    """Runs the model once for all requests that arrived while it was busy.

    There is no timer: an idle server runs a request alone at once, and under load every batch takes whatever
    queued up during the previous one, so batching adds no latency and grows with the load.
    """

    def __init__(self, predictor: Any, executor: ThreadPoolExecutor, max_batch: int = MAX_BATCH):
        self.predictor = predictor
        self.executor = executor
        self.max_batch = max_batch
        self.pending: list[tuple[np.ndarray, asyncio.Future]] = []
        self.running = False
        self.task: asyncio.Task | None = None  # held so the event loop cannot garbage-collect a running drain
        self.batches = 0
        self.items = 0
        self.largest = 0

    async def predict(self, pixels: np.ndarray) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((pixels, future))
        if not self.running:
            self.running = True
            self.task = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.pending:
                batch, self.pending = self.pending[: self.max_batch], self.pending[self.max_batch :]
                self.batches += 1
                self.items += len(batch)
                self.largest = max(self.largest, len(batch))
                try:
                    predictions = await loop.run_in_executor(self.executor, self._run, [p for p, _ in batch])
                except Exception as exc:  # a bug in the model: every waiting request gets it, none hangs
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), prediction in zip(batch, predictions, strict=True):
                    if not future.done():  # the client may have gone away
                        future.set_result(prediction)
        finally:
            self.running = False

    def _run(self, images: list[np.ndarray]) -> list[Any]:
        import torch

        batch = torch.from_numpy(np.stack(images).astype(np.float32, copy=False)).unsqueeze(1)
        return self.predictor.predict_tensor(batch)


# ---------------------------------------------------------------------------------------------------------------
# The app


def to_model_input(data: bytes) -> np.ndarray:
    """Uploaded bytes -> the 28x28 float32 image the model sees (module level, so worker processes can run it)."""
    from .preprocess import preprocess

    return np.asarray(preprocess(open_image(data)), dtype=np.float32).reshape(28, 28)


def _import_preprocess() -> None:
    """Run once in each worker process at start-up, so the first request does not pay for the imports."""
    from . import preprocess  # noqa: F401


def create_app(
    predictor: Any,
    *,
    feedback_db: str | Path | None = None,
    preprocess_processes: int = 0,
) -> FastAPI:
    """Build the app around a loaded Predictor (the model is loaded once, by the caller).

    Images go through digitrec.preprocess, the same code the CLI uses. `feedback_db` defaults to
    ~/.local/share/digitrec/feedback.sqlite ($DIGITREC_FEEDBACK_DB overrides it). With
    `preprocess_processes` > 0, decoding and preprocessing run in that many worker processes, so they use
    every core instead of queueing behind Python's GIL; with 0 (tests, tiny machines) they run on threads.
    """
    store = FeedbackStore(feedback_db)
    # The model runs on one thread, fed by the batcher; everything else blocking runs on a few more threads.
    model_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="digitrec-model")
    io_pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 2), thread_name_prefix="digitrec-io")
    if preprocess_processes > 0:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: forking a process that holds torch's and uvicorn's threads can deadlock the child.
        image_pool: Any = ProcessPoolExecutor(
            preprocess_processes, mp_context=multiprocessing.get_context("spawn")
        )
    else:
        image_pool = io_pool
    batcher = Batcher(predictor, model_pool)
    counters = {"predict": 0, "read": 0, "feedback": 0, "rejected": 0, "client_errors": 0}
    started = time.time()
    meta = getattr(predictor, "meta", {}) or {}
    model_name = str(getattr(predictor, "name", "model"))
    model_version = str(getattr(predictor, "version", ""))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if image_pool is not io_pool:  # start the workers now, not on the first user's request
            loop = asyncio.get_running_loop()
            await asyncio.gather(
                *(loop.run_in_executor(image_pool, _import_preprocess) for _ in range(preprocess_processes))
            )
        yield
        for pool in {image_pool, io_pool, model_pool}:
            pool.shutdown(wait=False, cancel_futures=True)

    app = _fastapi(
        title="digitrec",
        version=model_version or "0",
        description=(
            "Read handwritten digits. Send an image as the multipart field `file`, as JSON "
            '`{"image": "<base64 PNG or JPEG>"}`, or as a raw `image/*` body. Errors are JSON `{"detail": "..."}`.'
        ),
        lifespan=lifespan,
    )
    app.add_middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES)

    # -- errors: always JSON {"detail": one sentence}, never an HTML traceback --------------------------------

    def _error(status: int, detail: str) -> JSONResponse:
        if status < 500:
            counters["client_errors"] += 1
        return JSONResponse({"detail": detail}, status_code=status)

    @app.exception_handler(ImageTooLargeError)
    async def _too_large(request: Request, exc: ImageTooLargeError):
        return _error(413, str(exc))

    @app.exception_handler(DigitrecError)
    async def _user_error(request: Request, exc: DigitrecError):
        return _error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "request"
        return _error(422, f"{where}: {first.get('msg', 'invalid value')}.")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        detail = str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = (
                f"there is nothing at {request.url.path}; the page is at / and the API is described at /docs."
            )
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}; see /docs for the methods each endpoint takes."
        return _error(exc.status_code, detail)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        return _error(500, "internal error while handling the request; it has been logged.")

    # -- reading the request -----------------------------------------------------------------------------------

    async def read_upload(request: Request) -> tuple[bytes, dict[str, Any]]:
        """Return (image bytes, other fields) from multipart, JSON (base64) or a raw image/* body."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            async with request.form(max_files=2, max_fields=10) as form:
                upload = form.get("file")
                if upload is None or isinstance(upload, str):
                    raise HTTPException(400, f"the form has no file field named 'file'; {IMAGE_HINT}.")
                data = await upload.read()
                fields = {key: value for key, value in form.items() if isinstance(value, str)}
            return data, fields
        if content_type == "application/json":
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise HTTPException(400, f"the body is not valid JSON; {IMAGE_HINT}.") from None
            if not isinstance(body, dict) or not isinstance(body.get("image"), str):
                raise HTTPException(400, f'the JSON has no string field "image"; {IMAGE_HINT}.')
            encoded = body.pop("image")
            if encoded.startswith("data:"):  # a data URL, as canvas.toDataURL() gives
                encoded = encoded.partition(",")[2]
            try:
                data = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise HTTPException(400, 'the "image" field is not valid base64.') from None
            return data, body
        if content_type.startswith("image/") or content_type == "application/octet-stream":
            return await request.body(), dict(request.query_params)
        raise HTTPException(415, f"unsupported content type {content_type or '(none)'!r}; {IMAGE_HINT}.")

    async def to_input(data: bytes) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(image_pool, to_model_input, data)

    # -- endpoints ---------------------------------------------------------------------------------------------

    upload_body = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {"file": {"type": "string", "format": "binary"}},
                    },
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {
                            "image": {"type": "string", "description": "base64 PNG/JPEG or data URL"}
                        },
                    },
                },
                "image/*": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }
    error_responses: dict[int | str, dict[str, Any]] = {
        400: {"description": "not an image, truncated, or malformed request"},
        413: {"description": "body over 5 MB or image over 40 megapixels"},
        415: {"description": "unsupported content type"},
    }

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/healthz", response_model=HealthResponse, tags=["service"], summary="The model being served")
    async def healthz() -> dict[str, Any]:
        """The loaded model: name, version and its test accuracy (fraction 0-1)."""
        accuracy = (meta.get("metrics") or {}).get("test_accuracy")
        return {
            "status": "ok",
            "model": model_name,
            "version": model_version,
            "test_accuracy": None if accuracy is None else float(accuracy),
        }

    @app.post(
        "/api/predict",
        summary="Read one digit",
        response_model=PredictResponse,
        tags=["digits"],
        openapi_extra=upload_body,
        responses=error_responses,
    )
    async def predict(
        request: Request,
        explain: bool = Query(False, description="also return the 28x28 input and a saliency map"),
    ) -> dict[str, Any]:
        """Read one handwritten digit."""
        data, _ = await read_upload(request)
        pixels = await to_input(data)
        prediction = await batcher.predict(pixels)
        counters["predict"] += 1
        counters["rejected"] += bool(prediction.rejected)
        result = _prediction_dict(prediction)
        if explain:
            result["input"] = np.round(pixels, 3).tolist()
            if getattr(predictor, "model", None) is not None:  # an ONNX/int8 backend has no gradients to show
                from .explain import occlusion_saliency

                target = (
                    result["digit"]
                    if result["digit"] is not None
                    else int(np.argmax(result["probabilities"]))
                )
                saliency = await asyncio.get_running_loop().run_in_executor(
                    model_pool, occlusion_saliency, predictor.model, pixels, target
                )
                result["saliency"] = np.round(saliency, 3).tolist()
        return result

    @app.post(
        "/api/read",
        summary="Read a whole number",
        response_model=ReadResponse,
        tags=["digits"],
        openapi_extra=upload_body,
        responses=error_responses,
    )
    async def read(request: Request) -> dict[str, Any]:
        """Read a whole handwritten number, left to right, with a box around each digit."""
        data, _ = await read_upload(request)

        def work():
            return predictor.read(open_image(data))

        result = await asyncio.get_running_loop().run_in_executor(io_pool, work)
        counters["read"] += 1
        return {
            "number": result.number,
            "digits": [
                {
                    "digit": int(d.digit),
                    "confidence": float(d.confidence),
                    "box": tuple(int(v) for v in d.box),
                }
                for d in result.digits
            ],
        }

    @app.post(
        "/api/feedback",
        summary="Store a correction",
        response_model=FeedbackResponse,
        status_code=201,
        tags=["feedback"],
        responses=error_responses,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["file", "label"],
                            "properties": {
                                "file": {"type": "string", "format": "binary"},
                                "label": {"type": "integer", "minimum": 0, "maximum": 9},
                                "predicted": {"type": "integer", "minimum": 0, "maximum": 9},
                            },
                        }
                    },
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["image", "label"],
                            "properties": {
                                "image": {"type": "string"},
                                "label": {"type": "integer", "minimum": 0, "maximum": 9},
                                "predicted": {"type": "integer", "minimum": 0, "maximum": 9},
                            },
                        }
                    },
                },
            }
        },
    )
    async def feedback(request: Request) -> dict[str, Any]:
        """Store a correction: this image shows digit `label` (the model said `predicted`)."""
        data, fields = await read_upload(request)
        label = _digit_field(fields, "label", required=True)
        predicted = _digit_field(fields, "predicted", required=False)
        pixels = await to_input(data)

        def work():
            row_id = store.add(
                label=label,
                predicted=predicted,
                image=data,
                input28=pixels,
                model_name=model_name,
                model_version=model_version,
            )
            return row_id, store.count()

        row_id, total = await asyncio.get_running_loop().run_in_executor(io_pool, work)
        counters["feedback"] += 1
        return {"id": row_id, "label": label, "total": total}

    @app.get("/api/stats", tags=["service"], summary="Requests, batches and corrections so far")
    async def stats() -> dict[str, Any]:
        """What this server has done since it started, and the corrections stored so far."""
        by_label = await asyncio.get_running_loop().run_in_executor(io_pool, store.counts_by_label)
        return {
            "model": model_name,
            "version": model_version,
            "uptime_s": round(time.time() - started, 1),
            "requests": dict(counters),
            "batches": {
                "count": batcher.batches,
                "images": batcher.items,
                "largest": batcher.largest,
                "mean_size": round(batcher.items / batcher.batches, 2) if batcher.batches else 0.0,
            },
            "feedback": {
                "total": sum(by_label.values()),
                "by_label": {str(k): v for k, v in by_label.items()},
                "database": str(store.path),
            },
        }

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.state.feedback = store
    app.state.batcher = batcher
    return app


def _fastapi(**kwargs: Any) -> FastAPI:
    """A FastAPI app whose /docs page works offline when fastapi-offline is installed (it bundles Swagger UI)."""
    try:
        from fastapi_offline import FastAPIOffline
    except ImportError:  # /docs then loads Swagger UI from a CDN, as FastAPI does by default
        return FastAPI(**kwargs)
    return FastAPIOffline(**kwargs)


def _digit_field(fields: dict[str, Any], name: str, required: bool) -> int | None:
    """A digit 0-9 from a form or JSON field, or a 422 saying what is wrong."""
    value = fields.get(name)
    if value is None or value == "":
        if required:
            raise HTTPException(422, f'the field "{name}" is missing; send the correct digit, 0 to 9.')
        return None
    try:
        digit = int(value)
    except (TypeError, ValueError):
        digit = -1
    if (
        isinstance(value, bool)
        or not 0 <= digit <= 9
        or (isinstance(value, float) and not value.is_integer())
    ):
        raise HTTPException(422, f'the field "{name}" must be a digit from 0 to 9, got {value!r}.')
    return digit


def serve(
    model: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    feedback_db: str | Path | None = None,
    access_log: bool = False,
    backend: str = "torch",
) -> None:
    """Load the model once, then serve the page and the API until interrupted (backend: torch or onnx)."""
    import torch
    import uvicorn

    from .predict import Predictor

    # One intra-op thread: the model runs on one thread fed by the batcher while others decode and preprocess;
    # torch's default (one thread per core) makes them fight over the cores and is several times slower.
    torch.set_num_threads(1)
    predictor = Predictor.load(model, backend=backend) if model else Predictor.pretrained(backend=backend)
    app = create_app(predictor, feedback_db=feedback_db, preprocess_processes=os.cpu_count() or 1)
    print(
        f"digitrec: serving {predictor.name} {predictor.version} on http://{host}:{port}/  (API docs: /docs)",
        flush=True,
    )
    # limit_concurrency bounds memory: each request may hold up to 5 MB; past it clients get 503 and retry.
    uvicorn.run(app, host=host, port=port, access_log=access_log, limit_concurrency=256, log_level="info")
