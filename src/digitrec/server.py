"""The web page and REST API: `create_app(predictor)` builds the FastAPI app, `serve(...)` runs it on uvicorn."""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import gc
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from .errors import CheckpointError, DigitrecError, FeedbackFullError, ImageTooLargeError, shortened
from .feedback import DEFAULT_MAX_MB, FeedbackStore
from .guards import (
    BODY_TIMEOUT_S,
    BROWSER_HEADERS,
    HEADER_TIMEOUT_S,
    BodySizeLimit,
    BrowserGuard,
    HostGuard,
    guarded_http_protocol,
    send_error,
)
from .hosts import ANY, AllowedHosts, is_loopback, listen_host
from .imageworkers import (
    IMAGE_HINT,
    ImageWorkers,
    freeze_heap,
    read_limited,
    read_numbers,
    to_model_input,
)

if TYPE_CHECKING:
    import uvicorn

    from .predict import Prediction

STATIC_DIR = Path(__file__).parent / "static"
MAX_BODY_BYTES = 5 * 1024 * 1024
MAX_BATCH = 64


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
    blank: bool = Field(
        False, description="true when the image holds no ink at all (rejected, whatever the model says)"
    )
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
    doubtful: bool = Field(
        description="confidence below the model's reject threshold: /api/predict would have answered rejected "
        "(a letter, a scribble, a bad cut); `digit` is still the most likely digit"
    )
    line: int = Field(0, description="the line of writing the digit stands in, 0 for the top one")


class ReadResponse(BaseModel):
    number: str = Field(
        description="the digits left to right; a photo of several lines of digits, one under another, gives "
        "one number per line, joined by newlines"
    )
    lines: list[str] = Field(description="the number of each line of writing, top to bottom")
    digits: list[DigitOut]
    rejected_lines: int = Field(
        0,
        description="lines of marks left out because most of their digits were doubtful (noise, letters, a "
        "drawing)",
    )


class FeedbackResponse(BaseModel):
    id: int
    label: int
    total: int = Field(description="corrections stored so far")


class ErrorResponse(BaseModel):
    detail: str = Field(description="one sentence: what went wrong and what to do")


class HealthResponse(BaseModel):
    status: str
    model: str
    version: str = Field(description='the model: "sha256:" and the first 12 hex digits of its file')
    test_accuracy: float | None = Field(description="this model's MNIST test accuracy (an int8 export's own)")


# ---------------------------------------------------------------------------------------------------------------
# Plumbing: image decoding, batching


def _closed_form(content_type: str, body: bytes) -> bool:
    """Does a multipart body hold its closing delimiter ("--BOUNDARY--", before any epilogue), as a whole form does?"""
    from python_multipart.multipart import parse_options_header

    boundary = parse_options_header(content_type)[1].get(b"boundary", b"")
    return b"--" + boundary + b"--" in body


def simple_multipart_file(content_type: bytes, body: bytes) -> bytes | None:
    """The file of a multipart form whose only part is the file field "file" (what the page and curl -F send).

    None for anything else (more parts, another field name, no filename, odd framing): those go to the full
    form parser. A delimiter cannot occur inside a part (RFC 2046), so two delimiters frame exactly one part.
    Headers are read with python-multipart's parse_options_header, the parser Starlette's form parser uses, so
    both paths agree on a part's name and filename (a quoted filename may hold "; name=file").
    """
    from python_multipart.multipart import parse_options_header

    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        return None
    boundary = params.get(b"boundary", b"")
    delimiter = b"--" + boundary
    if not 0 < len(boundary) <= 70 or not body.startswith(delimiter + b"\r\n") or body.count(delimiter) != 2:
        return None
    end = body.rfind(b"\r\n" + delimiter + b"--")
    head_end = body.find(b"\r\n\r\n", len(delimiter))
    if end < 0 or body[end + len(delimiter) + 4 :] not in (b"", b"\r\n") or not 0 < head_end <= end:
        return None
    dispositions = []
    for line in body[len(delimiter) + 2 : head_end].split(b"\r\n"):
        header, _, value = line.partition(b":")
        if header.strip().lower() == b"content-disposition":
            dispositions.append(parse_options_header(value))
    if len(dispositions) != 1:
        return None
    disposition, options = dispositions[0]
    # a part without a filename is a text field, not an upload
    if disposition != b"form-data" or options.get(b"name") != b"file" or b"filename" not in options:
        return None
    return body[head_end + 4 : end]


def decode_base64(text: str) -> bytes:
    """Base64 as people send it: line breaks (the `base64` command wraps at 76 columns), a trailing newline,
    padding left off, or the URL-safe alphabet (- and _). Any other character raises binascii.Error."""
    compact = "".join(text.split()).rstrip("=").translate(_URL_SAFE)
    return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)


_URL_SAFE = str.maketrans("-_", "+/")


def _prediction_dict(prediction: Prediction) -> dict[str, Any]:
    """A Prediction as the API's JSON (plain numbers, top as objects; `predict --json` is Prediction.to_dict)."""
    return {
        "digit": None if prediction.digit is None else int(prediction.digit),
        "confidence": float(prediction.confidence),
        "probabilities": [float(p) for p in prediction.probabilities],
        "rejected": bool(prediction.rejected),
        "blank": bool(prediction.blank),
        "top": [{"digit": int(digit), "probability": float(p)} for digit, p in prediction.top],
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


def create_app(
    predictor: Any,
    *,
    feedback_db: str | Path | FeedbackStore | None = None,
    preprocess_processes: int = 0,
    allowed_hosts: str | Iterable[str] | AllowedHosts = (),
) -> FastAPI:
    """Build the app around a loaded Predictor (the model is loaded once, by the caller).

    Images go through digitrec.preprocess, the same code the CLI uses. `feedback_db` (a path, or a FeedbackStore
    already open) defaults to ~/.local/share/digitrec/feedback.sqlite ($DIGITREC_FEEDBACK_DB overrides it). With
    `preprocess_processes` > 0, decoding and preprocessing run in that many worker processes, so they use
    every core instead of queueing behind Python's GIL, and so do the numbers /api/read reads, in as many
    processes of their own, when the model runs there without torch (`Predictor.portable`); with 0 (tests,
    tiny machines) they run on threads.

    Requests are answered only when their Host header is a loopback name (localhost, 127.0.0.1, [::1], any
    port) or one of `allowed_hosts` (a list or a comma-separated string of names, ".example.org" for it and its
    subdomains, "*" for any host); others get 400. That keeps DNS-rebinding pages out: name here the host names
    browsers reach the app by, behind a proxy the one it passes on in Host.
    """
    allowed = allowed_hosts if isinstance(allowed_hosts, AllowedHosts) else AllowedHosts(allowed_hosts)
    store = feedback_db if isinstance(feedback_db, FeedbackStore) else FeedbackStore(feedback_db)
    # The model runs on one thread, fed by the batcher; everything else blocking runs on a few more threads.
    model_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="digitrec-model")
    io_pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 2), thread_name_prefix="digitrec-io")
    # /api/read costs up to a second or two of CPU per photo: on threads of its own, so that corrections,
    # /api/stats (and threaded preprocessing) never queue behind a class's worth of reads (they waited up to 18 s)
    read_pool = ThreadPoolExecutor(
        max_workers=min(4, os.cpu_count() or 2), thread_name_prefix="digitrec-read"
    )
    workers = ImageWorkers(preprocess_processes) if preprocess_processes > 0 else None
    # Reading a number is mostly Python, which threads share one core for (2 threads read 60 photos 1.3x as fast
    # as one, 2 processes 2.3x); its own pool, so that a digit's preprocessing never queues behind a class's reads.
    twin = predictor.portable() if preprocess_processes > 0 and hasattr(predictor, "portable") else None
    # One read per task: a read costs tens of milliseconds to seconds, so reads sent together would each wait for
    # the slowest, and one worker could hold eight while another idled.
    readers = (
        ImageWorkers(preprocess_processes, max_chunk=1, work=read_numbers, reader=twin)
        if twin is not None
        else None
    )
    batcher = Batcher(predictor, model_pool)
    counters = {"predict": 0, "read": 0, "feedback": 0, "rejected": 0, "client_errors": 0, "server_errors": 0}
    started = time.time()
    meta = getattr(predictor, "meta", {}) or {}
    model_name = str(getattr(predictor, "name", "model"))
    # the model's own identity (its file's SHA-256), not digitrec's version, which is the same for every model
    model_version = str(getattr(predictor, "model_id", "") or getattr(predictor, "version", ""))
    model_accuracy = _own_test_accuracy(meta, int(getattr(predictor, "tta_views", 1)))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal readers
        if workers is not None:
            await workers.start()
        if readers is not None:
            try:
                await readers.start()
            except Exception as exc:  # noqa: BLE001 - e.g. a model file a worker cannot load: read on threads
                logging.getLogger("digitrec.server").warning(
                    "the reading workers did not start (%s: %s); numbers are read on threads instead",
                    type(exc).__name__,
                    exc,
                )
                readers.shutdown()
                readers = app.state.read_workers = None
        processes = [pool for pool in (workers, readers) if pool is not None]
        yield
        for pool in processes:
            pool.shutdown()
        for threads in (io_pool, read_pool, model_pool):
            threads.shutdown(wait=False, cancel_futures=True)

    app = _fastapi(
        title="digitrec",
        version=model_version or "0",
        description=(
            "Read handwritten digits. Send an image as the multipart field `file`, as JSON "
            '`{"image": "<base64 PNG or JPEG>"}`, or as a raw `image/*` body. Errors are JSON `{"detail": "..."}`.'
        ),
        lifespan=lifespan,
    )

    # -- errors: always JSON {"detail": one sentence}, never an HTML traceback --------------------------------

    def count_error(status: int) -> None:
        counters["client_errors" if status < 500 else "server_errors"] += 1

    def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
        count_error(status)
        if status == 503:  # a 503 here passes: say when to try again
            headers = {**(headers or {}), "Retry-After": "1"}
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    def _error_for(exc: Exception) -> JSONResponse:
        """The JSON answer to an exception raised while handling a request: the app's handlers and the fast
        path below both answer through this."""
        if isinstance(exc, ClientGone):  # nobody reads this answer; nginx's code for it
            return _error(499, "the client closed the connection before the answer was ready.")
        if isinstance(exc, ImageTooLargeError):
            return _error(413, str(exc))
        if isinstance(exc, FeedbackFullError):
            return _error(507, str(exc))
        if isinstance(exc, DigitrecError):
            return _error(400, str(exc))
        if isinstance(exc, BrokenProcessPool):
            return _error(503, "the image workers are restarting; send the request again in a moment.")
        return _error(500, "internal error while handling the request; it has been logged.")

    async def _mapped(request: Request, exc: Exception) -> JSONResponse:
        return _error_for(exc)

    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette's ServerErrorMiddleware answers with this, outside every middleware, BrowserGuard's headers
        # too: they are added here (README: every response carries them)
        response = _error_for(exc)
        response.headers.update({name.decode(): value.decode() for name, value in BROWSER_HEADERS})
        return response

    # each by name: the handler of Exception answers from Starlette's ServerErrorMiddleware, which then re-raises
    # for uvicorn to log a traceback (a client that left is no error of the app)
    for kind in (ClientGone, ImageTooLargeError, DigitrecError, BrokenProcessPool):
        app.add_exception_handler(kind, _mapped)
    app.add_exception_handler(Exception, _unexpected)

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
        headers = dict(exc.headers or {})  # Starlette's own, as a 405's Allow
        if exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}; see /docs for the methods each endpoint takes."
            # RFC 9110: Allow lists the methods the path takes. Starlette's names those of the first route that
            # matched the path, so /healthz's GET left out its HEAD, a route of its own.
            methods = {
                method
                for route in app.router.routes
                if isinstance(route, Route)
                and route.methods
                and route.matches(request.scope)[0] != Match.NONE
                for method in route.methods
            }
            if methods:
                headers["Allow"] = ", ".join(sorted(methods))
        return _error(exc.status_code, detail, headers)

    # -- reading the request -----------------------------------------------------------------------------------

    async def read_upload(request: Request) -> tuple[bytes, dict[str, Any]]:
        """Return (image bytes, other fields) from multipart, JSON (base64) or a raw image/* body: a form's and a
        query string's fields are strings, JSON's are the values the JSON holds."""
        content_type = _content_type(request)
        if content_type == "multipart/form-data":
            # read whole first: the form parser reads it from there, and a form cut short is told so below
            body = await request.body()
            try:
                form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
            except StarletteHTTPException as exc:  # Starlette's own words, some in two sentences: say ours
                raise HTTPException(400, _unreadable_form(str(exc.detail))) from None
            try:
                uploads = form.getlist("file")
                if not uploads and not _closed_form(request.headers.get("content-type", ""), body):
                    raise HTTPException(
                        400,
                        "the multipart form is cut short (its closing boundary never came); send it whole.",
                    )
                if not uploads:
                    raise HTTPException(400, f"the form has no file field named 'file'; {IMAGE_HINT}.")
                if len(uploads) > 1:
                    raise HTTPException(
                        400, f"the form has {len(uploads)} fields named 'file'; send one image per request."
                    )
                upload = uploads[0]
                if isinstance(upload, str):
                    raise HTTPException(
                        400,
                        "the form's field 'file' is text, not a file (its part has no filename=\"...\"); "
                        f"{IMAGE_HINT}.",
                    )
                data = await upload.read()
                fields = _fields_once(form.multi_items())
            finally:
                await form.close()
            return data, fields
        if content_type == "application/json":
            raw = await request.body()
            # Decoding 5 MB of JSON made of small values ([0,0,...] or [{},{},...]) holds the event loop, and so
            # every other request, for 0.2 to 1 s and builds 100 MB of objects; ours holds a few fields. A value
            # after the first is preceded by a comma or opens an array or object (base64 has none of them).
            if sum(raw.count(mark) for mark in (b",", b"[", b"{")) > MAX_JSON_VALUES:
                raise HTTPException(
                    400,
                    f"the JSON holds more than {MAX_JSON_VALUES} values; send an object with {IMAGE_FIELDS}.",
                )
            try:
                # one decoder, made once: json.loads(..., object_pairs_hook=...) builds a new one per request
                body = _JSON_FIELDS_ONCE.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
            # ValueError: also a number of over 4,300 digits (and bytes that are not UTF-8); RecursionError:
            # arrays nested thousands deep
            except (ValueError, RecursionError):
                raise HTTPException(400, f"the body is not valid JSON; {IMAGE_HINT}.") from None
            if isinstance(body, dict) and isinstance(body.get("image"), _Repeated):
                raise HTTPException(
                    400,
                    f'the JSON has {len(body["image"])} fields named "image"; send one image per request.',
                )
            if not isinstance(body, dict) or not isinstance(body.get("image"), str):
                raise HTTPException(400, f'the JSON has no string field "image"; {IMAGE_HINT}.')
            encoded = body.pop("image")
            if encoded[:5].lower() == "data:":  # a data URL, as canvas.toDataURL() gives (any case: RFC 3986)
                encoded = encoded.partition(",")[2]
            try:
                data = decode_base64(encoded)
            except (binascii.Error, ValueError):
                raise HTTPException(400, 'the "image" field is not valid base64.') from None
            return data, body
        if content_type.startswith("image/") or content_type == "application/octet-stream":
            return await request.body(), _fields_once(request.query_params.multi_items())
        raise HTTPException(
            415, f"unsupported content type {shortened(repr(content_type or '(none)'))}; {IMAGE_HINT}."
        )

    async def to_input(data: bytes, request: Request) -> np.ndarray:
        """The 28x28 model input of an upload, from the image workers where they run; a photo whose client left
        while it waited there is dropped (while_connected)."""
        if workers is not None:
            return await while_connected(request, workers(data))
        return await asyncio.get_running_loop().run_in_executor(io_pool, to_model_input, data)

    def plain_answer(prediction: Any) -> Response:
        """The answer to /api/predict without ?explain: counted, and written straight to JSON from plain ints,
        floats and bools instead of being validated again against PredictResponse (the shape /docs shows)."""
        counters["predict"] += 1
        counters["rejected"] += bool(prediction.rejected)
        result = _prediction_dict(prediction) | {"input": None, "saliency": None}
        return Response(json.dumps(result, separators=(",", ":")), media_type="application/json")

    async def fast_predict(scope: dict, body: bytes, send: Callable, receive: Callable) -> bool:
        """POST /api/predict with a plain upload, answered without the router, dependencies and form parser.

        This is the request the page sends on every stroke and what load benchmarks send: one image as the
        form field "file" (or a raw image/* body), no query string. It answers exactly as the endpoint below,
        errors included; every other request (JSON, ?explain=true, odd forms) goes through FastAPI.
        """
        if scope["path"] != "/api/predict" or scope["method"] != "POST" or scope.get("query_string"):
            return False
        content_type = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
        if content_type.partition(b";")[0].strip().lower().startswith(b"image/"):
            data: bytes | None = body
        else:
            data = simple_multipart_file(content_type, body)
        if data is None:
            return False
        response: Response
        try:
            response = plain_answer(await batcher.predict(await to_input(data, Request(scope, receive))))
        except Exception as exc:  # noqa: BLE001 - answered as the app's handlers answer
            if not isinstance(exc, (DigitrecError, BrokenProcessPool, ClientGone)):
                logging.getLogger("digitrec.server").exception("error while reading an uploaded digit")
            response = _error_for(exc)
        await response(scope, _no_more_body, send)
        return True

    app.add_middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES, fast_path=fast_predict, counted=count_error)
    # a cross-site POST is refused before its body is read
    app.add_middleware(BrowserGuard, counted=count_error)
    # outermost (added last): a request sent to a name this server does not answer reaches nothing else
    app.add_middleware(HostGuard, allowed=allowed, counted=count_error)
    # around everything: a request a forced quit cuts short is told so in JSON, as every other error is
    app.add_middleware(AnswerWhenStopped, counted=count_error)

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
        400: {
            "description": "not an image, an image format not read, truncated, or a malformed request; or a Host "
            "header this server does not answer (`--allowed-hosts`)"
        },
        403: {"description": "sent by a page on another site (Sec-Fetch-Site or Origin says so)"},
        408: {
            "description": "the headers or the body were not sent in time (`--header-timeout`, `--body-timeout`)"
        },
        413: {"description": "body over 5 MB or image over 40 megapixels"},
        415: {"description": "unsupported content type"},
        500: {"description": "a bug; it has been logged"},
        503: {
            "description": "every connection slot is taken or the image workers are restarting (Retry-After: 1)"
        },
    }
    for answer in error_responses.values():
        answer["model"] = ErrorResponse
    # FastAPI's own 422 entry shows its list-of-errors shape; our handler answers one sentence like every error
    predict_responses = error_responses | {
        422: {
            "description": "explain is not a boolean (true/false, 1/0, yes/no, on/off)",
            "model": ErrorResponse,
        }
    }
    feedback_responses = error_responses | {
        422: {
            "description": "label or predicted is not one digit 0-9 or was sent twice, or the image holds no ink",
            "model": ErrorResponse,
        },
        507: {
            "description": "the database is at its size limit (`--feedback-max-mb`) or its disk is full",
            "model": ErrorResponse,
        },
    }

    static_files = RevalidatedFiles(directory=STATIC_DIR)

    @app.get("/", include_in_schema=False)
    async def index(request: Request) -> Response:
        return await static_files.get_response("index.html", request.scope)  # 304 while unchanged, as /static

    # HEAD on /healthz (and /api/stats below): load balancers and uptime checks probe with it (FastAPI adds HEAD
    # to no GET route; those hidden from the schema, / among them, get it at the end of create_app)
    @app.head("/healthz", include_in_schema=False)
    @app.get("/healthz", response_model=HealthResponse, tags=["service"], summary="The model being served")
    async def healthz() -> dict[str, Any]:
        """The loaded model: name, version (its file's SHA-256 prefix) and its test accuracy (fraction 0-1)."""
        return {
            "status": "ok",
            "model": model_name,
            "version": model_version,
            "test_accuracy": model_accuracy,
        }

    @app.post(
        "/api/predict",
        summary="Read one digit",
        response_model=PredictResponse,
        tags=["digits"],
        openapi_extra=upload_body,
        responses=predict_responses,
    )
    async def predict(
        request: Request,
        explain: bool = Query(False, description="also return the 28x28 input and a saliency map"),
    ) -> Any:
        """Read one handwritten digit."""
        data, _ = await read_upload(request)
        pixels = await to_input(data, request)
        prediction = await batcher.predict(pixels)
        if not explain:
            return plain_answer(prediction)
        counters["predict"] += 1
        counters["rejected"] += bool(prediction.rejected)
        result = _prediction_dict(prediction)
        result["input"] = _three_decimals(pixels)
        from .explain import occlusion_saliency

        target = result["digit"] if result["digit"] is not None else int(np.argmax(result["probabilities"]))
        saliency = await asyncio.get_running_loop().run_in_executor(
            model_pool, occlusion_saliency, predictor.backend, pixels, target
        )
        result["saliency"] = _three_decimals(saliency)
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
            return read_limited(predictor, data)  # as the reading workers read

        if readers is not None:
            result = await while_connected(request, readers(data))
        else:
            result = await asyncio.get_running_loop().run_in_executor(read_pool, work)
        counters["read"] += 1
        return result.to_dict()

    @app.post(
        "/api/feedback",
        summary="Store a correction",
        response_model=FeedbackResponse,
        status_code=201,
        tags=["feedback"],
        responses=feedback_responses,
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
                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            "parameters": [
                {
                    "name": name,
                    "in": "query",
                    "required": False,
                    "description": f"with a raw image/* body only: {what}, one character 0-9",
                    "schema": {"type": "string", "pattern": "^[0-9]$"},
                }
                for name, what in (
                    ("label", "the correct digit (then required)"),
                    ("predicted", "what the model said"),
                )
            ],
        },
    )
    async def feedback(request: Request) -> dict[str, Any]:
        """Store a correction: this image shows digit `label` (the model said `predicted`)."""
        data, fields = await read_upload(request)
        from_json = _content_type(request) == "application/json"
        misplaced = [name for name in ("label", "predicted") if name in request.query_params]
        if misplaced and _content_type(request) in ("application/json", "multipart/form-data"):
            # read from the query only beside a raw image body: `?label=2` with a form's label=1 stored the 1
            where = "JSON" if from_json else "form"
            raise HTTPException(
                422,
                f"{misplaced[0]} is in the query string, which is read only with a raw image body; "
                f"send it in the {where} with the image.",
            )
        label = _digit_field(fields, "label", required=True, from_json=from_json)
        predicted = _digit_field(fields, "predicted", required=False, from_json=from_json)
        pixels = await to_input(data, request)
        from .predict import holds_no_ink

        # a blank canvas would teach a fine-tune that nothing at all is this digit
        if holds_no_ink(pixels).all():
            raise HTTPException(
                422,
                "the image holds no ink, so there is no digit to learn from; send an image with the digit in it.",
            )

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

    @app.head("/api/stats", include_in_schema=False)
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
            "preprocessing": {
                "processes": workers.processes if workers else 0,
                "chunks": workers.chunks if workers else 0,
                "pool_rebuilds": workers.rebuilds if workers else 0,
            },
            "reading": {  # /api/read's worker processes (none: it reads on threads in the server's process)
                "processes": readers.processes if readers else 0,
                "chunks": readers.chunks if readers else 0,
                "pool_rebuilds": readers.rebuilds if readers else 0,
            },
            # this process's garbage collector: objects frozen at start-up, collections per generation since
            "gc": {
                "frozen_objects": gc.get_freeze_count(),
                "collections": [generation["collections"] for generation in gc.get_stats()],
            },
            "feedback": {
                "total": sum(by_label.values()),
                "by_label": {str(k): v for k, v in by_label.items()},
                "database": store.path.name,  # not its folder: a home directory names the operator
            },
        }

    # and on the pages FastAPI adds itself (/docs, /redoc, /docs/oauth2-redirect): a HEAD there was 405 too
    for route in app.routes:
        if (
            isinstance(route, Route)
            and not route.include_in_schema
            and route.methods
            and "GET" in route.methods
        ):
            route.methods.add("HEAD")
    app.mount("/static", static_files, name="static")
    app.state.feedback = store
    app.state.batcher = batcher
    app.state.image_workers = workers
    app.state.read_workers = readers
    return app


async def _no_more_body() -> dict:
    return {"type": "http.disconnect"}


def _own_test_accuracy(meta: dict[str, Any], views: int = 1) -> float | None:
    """The served model's MNIST test accuracy: an int8 export's measured at export, else its checkpoint's (a float
    export answers as its checkpoint does; the export checks that). The export measures one view per image, so a
    model scored in several (tta.py) keeps its checkpoint's figure, which is of the views the server runs."""
    export = meta.get("export") or {}
    accuracy = (meta.get("metrics") or {}).get("test_accuracy")
    if export.get("precision") == "int8" and export.get("onnx_accuracy") is not None and views == 1:
        accuracy = export["onnx_accuracy"]
    # six places: checkpoints written before accuracies were exact fractions hold float32 means (0.9915000200271606)
    return None if accuracy is None else round(float(accuracy), 6)


def _content_type(request: Request) -> str:
    """The request's media type, lower case, without parameters ("multipart/form-data", "application/json")."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _fastapi(**kwargs: Any) -> FastAPI:
    """A FastAPI app whose /docs page works offline when fastapi-offline is installed (it bundles Swagger UI)."""
    try:
        from fastapi_offline import FastAPIOffline
    except ImportError:  # /docs then loads Swagger UI from a CDN, as FastAPI does by default
        return FastAPI(**kwargs)
    return FastAPIOffline(**kwargs)


MAX_FORM_FILES = 2
MAX_FORM_FIELDS = 10
MAX_JSON_VALUES = 64
IMAGE_FIELDS = '"image" and, for /api/feedback, "label" and "predicted"'


class _Repeated(list):
    """The values of a field a request sent more than once (label=1 and label=2): which one it meant is unknown."""


class _FilePart:
    """A form field sent as a file (curl -F label=@seven.txt) where a text field belongs."""


_FILE_PART = _FilePart()


def _fields_once(pairs: Any) -> dict[str, Any]:
    """A form's, a query string's or a JSON object's (name, value) pairs as a dict; a name that comes more than
    once maps to a _Repeated list of its values rather than to its last value, so that a field read from it is
    refused instead of silently taking one of them. A form's files are _FILE_PART: read_upload reads the image's
    own, and a text field sent as a file is refused as that, not as missing."""
    fields: dict[str, Any] = {}
    for key, value in pairs:
        if not isinstance(key, str):
            continue
        if not isinstance(value, (str, int, float, bool, list, dict, type(None))):
            value = _FILE_PART  # an uploaded file
        if key in fields:
            previous = fields[key]
            fields[key] = previous if isinstance(previous, _Repeated) else _Repeated([previous])
            fields[key].append(value)
        else:
            fields[key] = value
    return fields


_JSON_FIELDS_ONCE = json.JSONDecoder(object_pairs_hook=_fields_once)


def _unreadable_form(reason: str) -> str:
    """One sentence for a multipart body Starlette's parser refused (its reason, in its words, is given)."""
    if reason.startswith("Too many files"):
        reason = f"more than {MAX_FORM_FILES} files"
    elif reason.startswith("Too many fields"):
        reason = f"more than {MAX_FORM_FIELDS} fields"
    else:
        reason = reason.rstrip(".").replace(". ", "; ")
        reason = reason[:1].lower() + reason[1:]
    return f"the multipart form cannot be read ({reason}); {IMAGE_HINT}."


# how often a request waiting for the image workers asks if its client is there
DISCONNECT_POLL_SECONDS = 0.25


# The page and its files are asked for again each time, answered 304 while unchanged: without it a browser kept
# a cached app.js for a while after an upgrade and paired it with the new index.html.
REVALIDATE = {"Cache-Control": "no-cache"}


class RevalidatedFiles(StaticFiles):
    """StaticFiles whose answers say Cache-Control: no-cache (their ETag makes the check cheap)."""

    async def get_response(self, path: str, scope: Any) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(REVALIDATE)
        return response


STOPPED_DETAIL = "the server stopped before it answered; send the request again once it is back."


class AnswerWhenStopped:
    """A request cut short by a forced quit (a second Ctrl-C) is answered 503 in JSON, as every error here is,
    instead of uvicorn's plain-text 500 "Internal Server Error" (which reads as a bug in the app).

    uvicorn cancels the requests still running when it is forced to stop; nothing else cancels a request's task
    (a client that leaves is noticed by while_connected, which raises ClientGone). An answer already begun is
    left as it is, and the cancellation goes on to uvicorn, which closes the connection."""

    def __init__(self, app: Any, counted: Callable[[int], None]):
        self.app, self.counted = app, counted

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except asyncio.CancelledError:
            if not started:  # outside BrowserGuard, as HostGuard is: its headers are sent here
                self.counted(503)
                await send_error(send, 503, STOPPED_DETAIL, [(b"connection", b"close"), *BROWSER_HEADERS])
            raise


class ClientGone(Exception):
    """The client closed its connection while its request waited for the image workers."""


async def while_connected(request: Request, work: Awaitable[Any]) -> Any:
    """`work`'s result, or ClientGone once the client has closed its connection: `work` is then cancelled, so a
    photo still queued for the image workers is dropped unread instead of taking a worker from those waiting
    (eight abandoned 40-megapixel reads held a small one back 16 s)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ClientGone
    except asyncio.CancelledError:
        task.cancel()
        raise


def _digit_field(fields: dict[str, Any], name: str, required: bool, from_json: bool) -> int | None:
    """A digit 0-9 from a field, or a 422 saying what is wrong: in JSON an integer 0 to 9 (not 4.0, "4" or true),
    in a form or query string exactly one ASCII character 0-9 (not " 3 ", "+3", "0_3", "3.0" or a fullwidth 3),
    and sent once (label=1 and label=2 together are refused, not read as 2)."""
    value = fields.get(name)
    if isinstance(value, _Repeated):
        raise HTTPException(422, f'the field "{name}" was sent {len(value)} times; send it once.')
    if value is _FILE_PART:
        raise HTTPException(
            422,
            f'the field "{name}" was sent as a file; send the digit as text (curl -F {name}=7, not {name}=@file).',
        )
    if value is None or (value == "" and not from_json):  # a JSON "" is a string, refused below
        if required:
            raise HTTPException(  # where it goes, too: an image sent as the body takes it in the query
                422,
                f'the field "{name}" is missing; send the correct digit, 0 to 9, as a form field, in the JSON '
                f"object, or as ?{name}= in the query when the image is the body.",
            )
        return None
    if from_json:
        if type(value) is int and 0 <= value <= 9:  # type(): a bool is an int too
            return value
        raise HTTPException(
            422,
            f'the field "{name}" must be a digit from 0 to 9 as a JSON integer, got {shortened(json.dumps(value))}.',
        )
    if isinstance(value, str) and len(value) == 1 and value in "0123456789":
        return int(value)
    raise HTTPException(
        422, f'the field "{name}" must be one digit from 0 to 9, got {shortened(repr(value))}.'
    )


BACKEND_NAMES = {"OnnxBackend": "ONNX Runtime", "TorchBackend": "PyTorch", "NumpyBackend": "NumPy"}


def _three_decimals(values: np.ndarray) -> list[Any]:
    """Nested lists of `values` to three decimals, as JSON writes them: rounded as float64, since a float32's
    0.001 is 0.0010000000474974513 in JSON (the explained answer was 1.8 times its size)."""
    return np.round(np.asarray(values, dtype=np.float64), 3).tolist()


def load_for_serving(model: str | Path | None, backend: str = "auto") -> Any:
    """The Predictor `serve` answers with. backend "auto" is ONNX Runtime where it and the ONNX exporter are
    installed (the checkpoint is exported once and cached; the export checks that its probabilities match), and
    PyTorch otherwise: with batches of a few requests ONNX Runtime's forward pass costs half of eager PyTorch's
    on one thread, and a server's CPU is what its throughput is made of."""
    import importlib.util

    from .predict import Predictor, check_backend, is_onnx, pretrained_path

    check_backend(model, backend)

    def load(kind: str) -> Any:
        return Predictor.load(model, backend=kind) if model else Predictor.pretrained(backend=kind)

    if backend != "auto":
        return load(backend)
    if is_onnx(model):
        return load("onnx")
    if not all(importlib.util.find_spec(name) for name in ("onnxruntime", "onnx")):
        return load("torch")
    try:
        from .export import cached_onnx

        # the first start exports the checkpoint (a few seconds); say so rather than seem to hang
        cached_onnx(model or pretrained_path(), log=lambda message: print(f"digitrec: {message}", flush=True))
        return load("onnx")
    except CheckpointError:  # a missing or damaged checkpoint serves on no backend: say that, not "PyTorch"
        raise
    # no export here, or no cache to keep it
    except (DigitrecError, RuntimeError, ImportError, OSError) as exc:
        print(
            f"digitrec: serving on PyTorch, because the ONNX export could not be made or cached "
            f"({str(exc).rstrip('.')}); "
            "pass --backend torch to skip trying.",
            flush=True,
        )
        return load("torch")


def bind_listening_socket(host: str, port: int) -> socket.socket:
    """Bind `host:port` the way uvicorn does (SO_REUSEADDR, so a port left in TIME_WAIT counts as free) and return
    the socket for uvicorn to listen on; raise one DigitrecError sentence if it cannot be bound (taken, not ours,
    no such address), before the model and the workers load, instead of uvicorn's log lines after them.

    Binding it here also tells the banner which port `--port 0` was given.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn picks it
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        raise DigitrecError(
            f"cannot listen on {host!r}: no such host or address here; try 127.0.0.1."
        ) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise DigitrecError(
                f"port {port} on {host} is already in use; stop what is using it or pass another --port."
            ) from None
        if exc.errno == errno.EACCES:
            raise DigitrecError(
                f"this user may not listen on port {port} (ports below 1024 need privileges); pass --port 8000."
            ) from None
        raise DigitrecError(
            f"cannot listen on {host}:{port} ({exc.strerror}); pass another --host or --port."
        ) from None
    return sock


def serving_hosts(host: str, bound: str, allowed_hosts: str | Iterable[str] | None) -> AllowedHosts:
    """The Host names `serve --host HOST [--allowed-hosts ...]` answers, listening on the address `bound`.

    Loopback names always, and `host` itself: the banner's URL must work (`--host myhost`, a name that resolves
    to a loopback address, or `--host 0.0.0.0`, which a browser on this machine can open; neither is a name a
    rebinding page can send). Without `allowed_hosts` (None), a server listening on a loopback address answers
    nothing else, which shuts out DNS-rebinding pages, and one listening elsewhere (0.0.0.0, a LAN address: a
    class reaching it by whatever name or address their network gives it) answers any name, as Jupyter does.
    With `allowed_hosts`, those names too.
    """
    if allowed_hosts is None:
        allowed = AllowedHosts() if is_loopback(listen_host(bound) or "") else AllowedHosts(ANY)
    else:
        allowed = AllowedHosts(allowed_hosts)
    name = listen_host(host) if host else None
    if name is not None:
        allowed.names.add(name)
    return allowed


def listen_url(host: str, port: int) -> str:
    """The address a browser takes for `host:port`: an IPv6 address in brackets (http://[::1]:8000/, not the
    http://::1:8000/ the banner used to print)."""
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(
    model: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    feedback_db: str | Path | None = None,
    access_log: bool = False,
    backend: str = "auto",
    header_timeout: float = HEADER_TIMEOUT_S,
    body_timeout: float = BODY_TIMEOUT_S,
    feedback_max_mb: float = DEFAULT_MAX_MB,
    allowed_hosts: str | Iterable[str] | None = None,
    pairs: str | Path | None = None,
) -> None:
    """Load the model once, then serve the page and the API until interrupted (backend: auto, torch or onnx).

    A client must send each request's headers within `header_timeout` seconds, and then its body within
    `body_timeout` seconds, or its connection is closed. Corrections that would take the feedback database past
    `feedback_max_mb` are refused with 507. `allowed_hosts`: see serving_hosts (None: the default it picks).
    `pairs`: the pair classifier /api/read asks about overlapping digits (None: the bundled one).
    """
    with bind_listening_socket(host, port) as sock:  # closed if the model cannot load
        allowed = serving_hosts(host, sock.getsockname()[0], allowed_hosts)
        # opened first: a --feedback-db it cannot use is said before the model loads (or is exported)
        store = FeedbackStore(feedback_db, max_mb=feedback_max_mb)
        import torch
        import uvicorn

        # One intra-op thread: the model runs on one thread fed by the batcher while others decode and preprocess;
        # torch's default (one thread per core) makes them fight over the cores and is several times slower.
        torch.set_num_threads(1)
        predictor = load_for_serving(model, backend)
        if pairs is not None:
            predictor.use_pairs(pairs)
        app = create_app(
            predictor, feedback_db=store, preprocess_processes=os.cpu_count() or 1, allowed_hosts=allowed
        )
        engine = BACKEND_NAMES.get(type(predictor.backend).__name__, "PyTorch")
        port = sock.getsockname()[1]  # the one the system picked, for --port 0
        sock.listen(2048)  # uvicorn's backlog: a browser opened at the banner waits for uvicorn, not refused
        print(
            f"digitrec: serving {predictor.name} ({predictor.model_id or predictor.version}) on {engine} at {listen_url(host, port)}  (API docs: /docs)",
            flush=True,
        )
        from .predict import uncalibrated_note

        note = uncalibrated_note(predictor, model)
        if note:
            print(f"digitrec: note: {note}", flush=True)
        if allowed.any:
            print(
                "digitrec: answering any Host name"
                + (" (--allowed-hosts *)" if allowed_hosts is not None else f" (listening on {host})")
                + "; --allowed-hosts NAMES answers only those and shuts out DNS-rebinding pages",
                flush=True,
            )
        freeze_heap()
        # limit_concurrency bounds memory: each request may hold up to 5 MB; past it clients get 503 and retry.
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            access_log=access_log,
            limit_concurrency=256,
            log_level="info",
            http=guarded_http_protocol(header_timeout, body_timeout=body_timeout),
        )
        run_uvicorn(uvicorn.Server(config), sock)


def run_uvicorn(server: uvicorn.Server, sock: socket.socket) -> None:
    """What uvicorn.run does, on the socket `serve` bound: until Ctrl-C, and a forced quit (a second Ctrl-C) says
    in one line how many requests it cut short instead of a traceback for each."""
    cut_short = CancelledRequests()
    logging.getLogger("uvicorn.error").addFilter(cut_short)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C it caught again once it has stopped
        pass
    finally:
        logging.getLogger("uvicorn.error").removeFilter(cut_short)
        if cut_short.count:
            # the lifespan that stops the image workers was cancelled with the requests: end them here, at once
            for name in ("image_workers", "read_workers"):
                workers = (
                    getattr(server.config.app.state, name, None)
                    if hasattr(server.config.app, "state")
                    else None
                )
                if workers is not None:
                    workers.kill()
            print(
                f"digitrec: stopped at once; {cut_short.count} requests in flight were cut short.", flush=True
            )
    if not server.started:
        raise SystemExit(3)  # uvicorn's exit status when start-up fails


class CancelledRequests(logging.Filter):
    """Drops uvicorn's "Exception in ASGI application" for a request cancelled by a forced quit, and counts them.

    A second Ctrl-C makes uvicorn cancel every request still running, and each one logged a 50-line traceback of
    CancelledError (2,000 lines for 30 students' reads); a forced stop is no error in the app. Nothing else
    cancels a request's task, so no real error is hidden. The app's lifespan, cancelled too, is reported as a
    traceback Starlette formatted into the message: dropped as well.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
            self.count += 1
            return False
        message = record.getMessage()
        return not (message.startswith("Traceback") and message.rstrip().endswith("CancelledError"))
