"""The REST API: every endpoint, every error code, batching, and a live server that survives garbage."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import httpx2 as httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw
from serverkit import BASE_URL, FakePredictor, digit_png, keep_grad_mode, live_server  # noqa: F401 (autouse fixture)

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from digitrec.imageworkers import IMAGE_HINT, MAX_PIXELS  # noqa: E402
from digitrec.server import create_app  # noqa: E402


@pytest.fixture
def predictor() -> FakePredictor:
    return FakePredictor()


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "feedback.sqlite"


@pytest.fixture
def client(predictor, db_path):
    with TestClient(create_app(predictor, feedback_db=db_path), base_url=BASE_URL) as c:
        yield c


def upload(data: bytes, name: str = "digit.png", content_type: str = "image/png") -> dict:
    return {"file": (name, data, content_type)}


# ------------------------------------------------------------------------------------------------ endpoints


def test_healthz_names_the_model_and_its_test_accuracy(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "model": "fake", "version": "test-1", "test_accuracy": 0.9912}


def test_healthz_and_feedback_name_the_model_by_its_file_not_the_package_version(tmp_path, db_path):
    """ "version" was digitrec's package version, 0.1.0 for every model, in /healthz and in every feedback row."""
    import hashlib

    from digitrec.predict import Predictor

    checkpoint = random_checkpoint(tmp_path / "model.safetensors")
    expected = "sha256:" + hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:12]
    with TestClient(create_app(Predictor.load(checkpoint), feedback_db=db_path), base_url=BASE_URL) as c:
        assert c.get("/healthz").json()["version"] == expected
        assert c.post("/api/feedback", files=upload(digit_png()), data={"label": "7"}).status_code == 201
    with sqlite3.connect(db_path) as con:
        assert con.execute("SELECT model_version FROM feedback").fetchone()[0] == expected


def test_healthz_gives_an_int8_models_own_test_accuracy(db_path):
    """An int8 ONNX model reported its source checkpoint's accuracy, not the one measured for it at export."""
    int8 = FakePredictor(
        meta={"metrics": {"test_accuracy": 0.9926}, "export": {"precision": "int8", "onnx_accuracy": 0.9911}}
    )
    with TestClient(create_app(int8, feedback_db=db_path), base_url=BASE_URL) as c:
        assert c.get("/healthz").json()["test_accuracy"] == 0.9911


def test_healthz_keeps_the_checkpoints_accuracy_for_an_int8_export_scored_in_views(db_path):
    """An int8 export of a 5-view model (`default`) reported the export's one-view accuracy (0.9958), not the
    5-view accuracy the server's Predictor answers with (its checkpoint's, 0.9956)."""
    meta = {
        "config": {"tta_views": 5},
        "metrics": {"test_accuracy": 0.9956},
        "export": {"precision": "int8", "onnx_accuracy": 0.9958},
    }
    five = FakePredictor(meta=meta)
    five.tta_views = 5
    with TestClient(create_app(five, feedback_db=db_path), base_url=BASE_URL) as c:
        assert c.get("/healthz").json()["test_accuracy"] == 0.9956


def test_healthz_gives_an_older_checkpoints_float32_accuracy_as_the_fraction_it_was(db_path):
    """Checkpoints written before accuracies were exact fractions hold float32 means: /healthz said
    0.9915000200271606 for 9,915 right of 10,000."""
    older = FakePredictor(meta={"metrics": {"test_accuracy": 0.9915000200271606}})
    with TestClient(create_app(older, feedback_db=db_path), base_url=BASE_URL) as c:
        assert c.get("/healthz").json()["test_accuracy"] == 0.9915


def test_head_probes_of_healthz_and_the_page_are_answered(client):
    """Load balancers probe with HEAD; it was 405 (on /api/stats, /docs and /redoc until 7 December)."""
    for path in ("/healthz", "/", "/api/stats", "/docs", "/redoc", "/openapi.json", "/static/app.js"):
        response = client.head(path)
        assert response.status_code == 200 and response.content == b"", path
        assert response.headers["content-type"] == client.get(path).headers["content-type"], path
    assert client.head("/api/predict").status_code == 405  # a POST endpoint still takes no HEAD
    # a 405's Allow names HEAD too: /healthz's and /api/stats's said only GET
    for path in ("/healthz", "/api/stats", "/", "/docs"):
        assert client.delete(path).headers["allow"] == "GET, HEAD", path
    assert client.get("/api/predict").headers["allow"] == "POST"
    operations = client.get("/openapi.json").json()["paths"]
    assert all("head" not in methods for methods in operations.values())  # the schema lists no HEAD


def test_page_and_its_assets_are_served_without_external_links(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<canvas id="pad"' in page.text and 'capture="environment"' in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        response = client.get(asset)
        assert response.status_code == 200 and len(response.text) > 1000
        assert "http://" not in response.text and "https://" not in response.text  # works offline
    assert "https://" not in page.text


def test_the_page_and_its_files_are_checked_again_by_the_browser_and_answered_304_when_unchanged(client):
    """With no Cache-Control a browser could keep last version's app.js after an upgrade, beside the new page."""
    for path in ("/", "/static/app.js", "/static/style.css", "/static/index.html"):
        response = client.get(path)
        assert response.headers["cache-control"] == "no-cache", path
        again = client.get(path, headers={"If-None-Match": response.headers["etag"]})
        assert again.status_code == 304, path


def test_docs_describe_every_endpoint(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/healthz", "/api/predict", "/api/read", "/api/feedback", "/api/stats"} <= set(paths)
    assert set(paths["/api/predict"]["post"]["requestBody"]["content"]) >= {
        "multipart/form-data",
        "application/json",
    }


def test_the_openapi_schema_lists_every_error_and_the_raw_feedback_body(client):
    """/api/feedback did not list its 422 and no endpoint its 408, 500 or 503; a raw image/* body with ?label=
    was accepted by /api/feedback but not described; /api/predict's 422 showed FastAPI's list-of-errors shape."""
    spec = client.get("/openapi.json").json()
    for path in ("/api/predict", "/api/read", "/api/feedback"):
        responses = spec["paths"][path]["post"]["responses"]
        assert {"400", "408", "413", "415", "500", "503"} <= set(responses), path
        assert responses["503"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    for path in ("/api/predict", "/api/feedback"):
        schema = spec["paths"][path]["post"]["responses"]["422"]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith("/ErrorResponse"), path
    feedback = spec["paths"]["/api/feedback"]["post"]
    # its 507 answers {"detail": ...} as every error does; the schema showed no body
    assert feedback["responses"]["507"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorResponse"
    )
    assert "image/*" in feedback["requestBody"]["content"]
    assert {p["name"] for p in feedback["parameters"] if p["in"] == "query"} == {"label", "predicted"}


def test_predict_multipart_reads_the_digit(client):
    response = client.post("/api/predict", files=upload(digit_png()))
    assert response.status_code == 200
    body = response.json()
    assert body["digit"] == 7 and body["rejected"] is False and body["blank"] is False
    assert len(body["probabilities"]) == 10 and sum(body["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    assert body["confidence"] == pytest.approx(max(body["probabilities"]))
    assert body["top"][0] == {"digit": 7, "probability": body["confidence"]}
    assert body["input"] is None and body["saliency"] is None  # only with ?explain=true


def test_predict_accepts_base64_json_data_urls_and_raw_bodies_alike(client):
    png = digit_png()
    expected = client.post("/api/predict", files=upload(png)).json()
    encoded = base64.b64encode(png).decode()
    for response in (
        client.post("/api/predict", json={"image": encoded}),
        client.post("/api/predict", json={"image": "data:image/png;base64," + encoded}),
        client.post(
            "/api/predict", json={"image": "DATA:image/png;base64," + encoded}
        ),  # was "not valid base64"
        client.post("/api/predict", content=png, headers={"content-type": "image/png"}),
    ):
        assert response.status_code == 200 and response.json() == expected


def test_base64_images_are_read_with_line_breaks_without_padding_or_url_safe(client):
    """The output of the `base64` command (lines of 76), a trailing newline, missing padding and the URL-safe
    alphabet were all 400 "not valid base64"."""
    png = digit_png()
    while not (base64.b64encode(png).endswith(b"=") and set(base64.urlsafe_b64encode(png)) & set(b"-_")):
        png += b"\0"  # trailing bytes after IEND: ignored by decoders; needed for padding and URL-safe characters
    variants = {
        "line breaks": base64.encodebytes(png).decode(),
        "trailing newline": base64.b64encode(png).decode() + "\n",
        "no padding": base64.b64encode(png).decode().rstrip("="),
        "url-safe": base64.urlsafe_b64encode(png).decode(),
        "data url, wrapped": "data:image/png;base64," + base64.encodebytes(png).decode(),
    }
    for name, encoded in variants.items():
        response = client.post("/api/predict", json={"image": encoded})
        assert response.status_code == 200 and response.json()["digit"] == 7, name
    for junk in ["not base64!", "abc*", "a"]:
        response = client.post("/api/predict", json={"image": junk})
        assert (
            response.status_code == 400
            and response.json()["detail"] == 'the "image" field is not valid base64.'
        )


def test_predict_reads_jpeg_photos(client):
    response = client.post(
        "/api/predict", files=upload(digit_png(size=640, fmt="JPEG"), "photo.jpg", "image/jpeg")
    )
    assert response.status_code == 200 and response.json()["digit"] == 7


def test_a_blank_page_is_rejected_as_not_a_digit(client):
    body = client.post("/api/predict", files=upload(digit_png(blank=True))).json()
    assert body["rejected"] is True and body["digit"] is None
    assert body["blank"] is True  # so that the page says so, and offers no correction the server would refuse


def test_explain_returns_the_28x28_input_and_a_saliency_map_on_the_ink(client):
    body = client.post("/api/predict?explain=true", files=upload(digit_png())).json()
    seen, saliency = np.array(body["input"]), np.array(body["saliency"])
    assert seen.shape == saliency.shape == (28, 28)
    assert 0 <= seen.min() and seen.max() == pytest.approx(1.0) and (seen > 0.5).sum() > 20
    assert saliency.max() == pytest.approx(1.0) and saliency.min() >= -1.0
    # three decimals as JSON writes them ("0.001", not float32's "0.0010000000474974513": 1.8 times the bytes)
    assert all(len(repr(float(v)).partition(".")[2]) <= 3 for v in [*seen.ravel(), *saliency.ravel()])
    # The fake model's 7 grows with every ink pixel: hiding ink always lowers it, hiding background never does.
    from scipy.ndimage import binary_dilation

    near_ink = binary_dilation(seen > 0, structure=np.ones((7, 7)))  # within one 4x4 occluding patch of ink
    assert (saliency[seen > 0.5] > 0).all() and (saliency[~near_ink] == 0).all() and saliency.min() >= 0


def test_read_returns_the_number_and_a_box_per_digit(client):
    response = client.post("/api/read", files=upload(digit_png(size=300)))
    assert response.status_code == 200
    assert response.json() == {
        "number": "42",
        "lines": ["42"],
        "digits": [
            {"digit": 4, "confidence": 0.98, "box": [0, 0, 150, 300], "doubtful": False, "line": 0},
            {"digit": 2, "confidence": 0.4, "box": [150, 0, 150, 300], "doubtful": True, "line": 0},
        ],
        "rejected_lines": 0,
    }


def two_numbers(rng: np.random.Generator, *numbers: list[int]) -> np.ndarray:
    """Ink in [0, 1]: pen-drawn numbers one under another."""
    from digitrec.realworld import crop_ink, draw_digit, number_line

    lines = [number_line([crop_ink(draw_digit(d, rng, 80)) for d in ds], rng)[0] for ds in numbers]
    width = max(line.shape[1] for line in lines)
    return np.concatenate([np.pad(line, ((0, 30), (0, width - line.shape[1]))) for line in lines])


def test_read_gives_each_line_of_a_photo_of_two_numbers(tmp_path, db_path):
    """A photo of two numbers one under another read as one jumble of both (the web page and the API alike)."""
    from digitrec.predict import Predictor

    rng = np.random.default_rng(5)
    page = two_numbers(rng, [3, 1, 4], [2, 7])
    buffer = io.BytesIO()
    Image.fromarray((255 * (0.9 - 0.8 * np.pad(page, 40))).astype(np.uint8)).save(buffer, "PNG")
    with TestClient(
        create_app(Predictor.pretrained(backend="numpy"), feedback_db=db_path), base_url=BASE_URL
    ) as client:
        body = client.post("/api/read", files=upload(buffer.getvalue())).json()
    assert body["number"] == "314\n27" and body["lines"] == ["314", "27"]
    assert [d["line"] for d in body["digits"]] == [0, 0, 0, 1, 1]


def test_numbers_are_read_in_worker_processes_with_the_answers_read_in_process(db_path):
    """/api/read ran in the server's process on threads, which share one core for its mostly-Python work; with
    worker processes it reads there, through the same model without torch (Predictor.portable)."""
    from digitrec.predict import Predictor

    rng = np.random.default_rng(5)
    page = (255 * (0.9 - 0.8 * np.pad(two_numbers(rng, [3, 1, 4], [2, 7]), 40))).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(page).save(buffer, "PNG")
    predictor = Predictor.pretrained(backend="torch")  # a PyTorch model: its workers read on NumPy
    expected = predictor.read(page).to_dict()
    with TestClient(
        create_app(predictor, feedback_db=db_path, preprocess_processes=1), base_url=BASE_URL
    ) as client:
        body = client.post("/api/read", files=upload(buffer.getvalue())).json()
        junk = client.post("/api/read", files=upload(b"junk"))
        reading = client.get("/api/stats").json()["reading"]
    assert body["number"] == "314\n27"
    assert body == json.loads(json.dumps(expected))
    assert reading == {"processes": 1, "chunks": 2, "pool_rebuilds": 0}
    assert client.app.state.read_workers.max_chunk == 1  # reads go one at a time: none waits for another
    assert junk.status_code == 400 and "image" in junk.json()["detail"]


def test_api_read_stops_a_read_past_its_time_limit_in_threads_and_in_workers(db_path, monkeypatch):
    """A read that had begun ran to its end, however long (a page of scribbled lines took 77 s until 7 December):
    the server reads under READ_TIME_LIMIT_S, on its threads and in its reading workers alike."""
    from digitrec import imageworkers
    from digitrec.predict import Predictor

    predictor = Predictor.pretrained(backend="numpy")
    monkeypatch.setattr(imageworkers, "READ_TIME_LIMIT_S", 0.0)
    with TestClient(create_app(predictor, feedback_db=db_path), base_url=BASE_URL) as client:
        answer = client.post("/api/read", files=upload(digit_png(size=300)))
    assert answer.status_code == 400
    assert answer.json()["detail"].startswith("reading this photo took over 0 s, far longer than a photo")
    # a reading worker's own call (the workers are spawned: the limit they read under is the module's)
    monkeypatch.setattr(imageworkers, "_reader", predictor.portable())
    with pytest.raises(Exception, match="reading this photo took over 0 s"):
        imageworkers.read_number(digit_png(size=300))
    monkeypatch.setattr(imageworkers, "READ_TIME_LIMIT_S", 30.0)
    assert imageworkers.read_number(digit_png(size=300)).number == "7"


def test_reading_workers_that_cannot_start_leave_reading_to_threads(db_path, caplog):
    """A reading worker that could not load its model failed the server's start-up: no page, no predictions."""
    from serverkit import FakePortablePredictor

    app = create_app(FakePortablePredictor(), feedback_db=db_path, preprocess_processes=1)
    with TestClient(app, base_url=BASE_URL) as client:
        read = client.post("/api/read", files=upload(digit_png(size=300)))
        predicted = client.post("/api/predict", files=upload(digit_png()))
        reading = client.get("/api/stats").json()["reading"]
    assert read.status_code == 200 and read.json()["number"] == "42"
    assert predicted.status_code == 200 and predicted.json()["digit"] == 7
    assert reading["processes"] == 0 and app.state.read_workers is None
    assert "the reading workers did not start (BrokenProcessPool" in caplog.text


def test_feedback_is_stored_in_sqlite_with_image_label_time_and_model(client, db_path):
    png = digit_png()
    response = client.post("/api/feedback", files=upload(png), data={"label": "3", "predicted": "7"})
    assert response.status_code == 201 and response.json() == {"id": 1, "label": 3, "total": 1}
    encoded = base64.b64encode(png).decode()
    response = client.post("/api/feedback", json={"image": encoded, "label": 1})
    assert response.status_code == 201 and response.json()["total"] == 2
    with sqlite3.connect(db_path) as con:
        rows = con.execute(
            "SELECT label, predicted, image, model_name, model_version, created_at, input28 FROM feedback ORDER BY id"
        ).fetchall()
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert [(r[0], r[1]) for r in rows] == [(3, 7), (1, None)]
    assert rows[0][2] == png and rows[0][3:5] == ("fake", "test-1") and rows[0][5].startswith("20")
    assert np.frombuffer(rows[0][6], np.uint8).reshape(28, 28).max() == 255  # the 28x28 the model saw


@pytest.mark.parametrize(
    "fields", [{}, {"label": "10"}, {"label": "seven"}, {"label": "3", "predicted": "-1"}]
)
def test_feedback_without_a_valid_digit_label_is_422(client, fields, db_path):
    response = client.post("/api/feedback", files=upload(digit_png()), data=fields)
    assert response.status_code == 422
    assert "digit" in response.json()["detail"]
    with sqlite3.connect(db_path) as con:
        assert con.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 0


def test_a_missing_label_says_where_a_label_goes_with_an_image_sent_as_the_body(client, db_path):
    """It said only "send the correct digit, 0 to 9": a raw-body upload takes it as ?label=, not in a form."""
    response = client.post("/api/feedback", content=digit_png(), headers={"content-type": "image/png"})
    assert response.status_code == 422
    assert response.json()["detail"] == (
        'the field "label" is missing; send the correct digit, 0 to 9, as a form field, in the JSON object, '
        "or as ?label= in the query when the image is the body."
    )
    assert (
        client.post(
            "/api/feedback?label=7", content=digit_png(), headers={"content-type": "image/png"}
        ).status_code
        == 201
    )


def test_a_label_in_the_query_beside_a_form_or_json_is_refused_not_ignored(client, db_path):
    """`curl -F file=@one.png -F label=1 '/api/feedback?label=2'` stored a 1: the query's label is read only with
    a raw image body, and was dropped without a word."""
    response = client.post("/api/feedback?label=2", files=upload(digit_png()), data={"label": "1"})
    assert response.status_code == 422
    assert response.json()["detail"] == (
        "label is in the query string, which is read only with a raw image body; send it in the form with the image."
    )
    body = {"image": base64.b64encode(digit_png()).decode(), "label": 1}
    response = client.post("/api/feedback?predicted=3", json=body)
    assert response.status_code == 422 and "predicted is in the query string" in response.json()["detail"]
    assert "send it in the JSON with the image" in response.json()["detail"]
    with sqlite3.connect(db_path) as con:
        assert con.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 0


def test_a_label_sent_as_a_file_is_refused_as_that_not_as_missing(client, db_path):
    """curl -F label=@seven.txt sends the label as a file part: the answer said "the field "label" is missing"."""
    files = {"file": ("digit.png", digit_png(), "image/png"), "label": ("seven.txt", b"7", "text/plain")}
    response = client.post("/api/feedback", files=files)
    assert response.status_code == 422
    assert response.json()["detail"] == (
        'the field "label" was sent as a file; send the digit as text (curl -F label=7, not label=@file).'
    )
    with sqlite3.connect(db_path) as con:
        assert con.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 0


@pytest.mark.parametrize("field", ["label", "predicted"])
def test_feedback_json_empty_string_is_refused_as_a_string_not_taken_as_missing(client, field, db_path):
    """JSON "predicted": "" was stored as no prediction (201), "label": "" said the label was missing."""
    body = {"image": base64.b64encode(digit_png()).decode(), "label": 3, field: ""}
    response = client.post("/api/feedback", json=body)
    assert response.status_code == 422
    assert (
        response.json()["detail"]
        == f'the field "{field}" must be a digit from 0 to 9 as a JSON integer, got "".'
    )


def test_a_huge_value_is_not_echoed_whole_in_the_error(client):
    """A 3 MB label came back in a 3 MB error sentence."""
    body = {"image": base64.b64encode(digit_png()).decode(), "label": "y" * 3_000_000}
    response = client.post("/api/feedback", json=body)
    detail = response.json()["detail"]
    assert response.status_code == 422 and len(detail) < 200 and "(3,000,002 characters)" in detail
    response = client.post("/api/predict", content=b"x", headers={"content-type": "text/" + "z" * 5000})
    assert response.status_code == 415 and len(response.json()["detail"]) < 400


@pytest.mark.parametrize("label", [b"Infinity", b"-Infinity", b"NaN", b"1e400", b"3.5", b"true"])
def test_feedback_json_label_that_is_no_digit_is_422(client, label, db_path):
    """Python's JSON parser takes Infinity and NaN; int(inf) raises OverflowError, which was a 500."""
    body = b'{"image": "' + base64.b64encode(digit_png()) + b'", "label": ' + label + b"}"
    response = client.post("/api/feedback", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422 and "digit" in response.json()["detail"]


@pytest.mark.parametrize("endpoint", ["/api/predict", "/api/read", "/api/feedback"])
@pytest.mark.parametrize(
    "body",
    [b'{"image": "x", "n": ' + b"7" * 5000 + b"}", b"[" * 100_000, b'{"a": ' * 50_000],
    ids=["5000-digit number", "100000 nested arrays", "50000 nested objects"],
)
def test_json_that_python_cannot_parse_is_400_not_500(client, endpoint, body):
    """Python's parser raises ValueError past 4,300 digits and RecursionError when nested too deep: were 500s.
    (Arrays and objects nested that deep are now refused for their number before the parser sees them.)"""
    response = client.post(endpoint, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["detail"].startswith(
        ("the body is not valid JSON;", "the JSON holds more than 64")
    )


@pytest.mark.parametrize("label", ["３", "٣", "0_3", "+3", " 3 ", "3.0", "03", "3\n"])
def test_a_form_label_is_exactly_one_ascii_digit(client, label, db_path):
    """int() took a fullwidth or Arabic-Indic 3, "0_3", "+3" and " 3 ": all were stored as 3."""
    response = client.post("/api/feedback", files=upload(digit_png()), data={"label": label})
    assert response.status_code == 422
    assert response.json()["detail"] == f'the field "label" must be one digit from 0 to 9, got {label!r}.'
    response = client.post(
        "/api/feedback", params={"label": label}, content=digit_png(), headers={"content-type": "image/png"}
    )
    assert response.status_code == 422
    with sqlite3.connect(db_path) as con:
        assert con.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 0


@pytest.mark.parametrize(
    "send",
    [
        lambda c, png: c.post("/api/feedback", files=upload(png), data={"label": ["1", "2"]}),
        lambda c, png: c.post(
            "/api/feedback", files=upload(png), data={"label": "1", "predicted": ["7", "9"]}
        ),
        lambda c, png: c.post(
            "/api/feedback",
            params=[("label", "1"), ("label", "2")],
            content=png,
            headers={"content-type": "image/png"},
        ),
        lambda c, png: c.post(
            "/api/feedback",
            content=b'{"image": "' + base64.b64encode(png) + b'", "label": 1, "label": 2}',
            headers={"content-type": "application/json"},
        ),
    ],
    ids=["form label twice", "form predicted twice", "query label twice", "JSON label twice"],
)
def test_a_correction_whose_label_is_sent_twice_is_422_and_stores_nothing(client, send, db_path):
    """label=1 and label=2 in one request stored the last one, 2, as the correct digit, without a word."""
    response = send(client, digit_png())
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail.startswith('the field "') and detail.endswith('" was sent 2 times; send it once.')
    with sqlite3.connect(db_path) as con:
        assert con.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 0
    assert client.post("/api/feedback", files=upload(digit_png()), data={"label": "1"}).status_code == 201


@pytest.mark.parametrize("endpoint", ["/api/predict", "/api/read", "/api/feedback"])
def test_a_json_image_sent_twice_is_named_as_sent_twice(client, endpoint, db_path):
    """With "image" given twice the JSON was said to have no string field "image" at all."""
    image = base64.b64encode(digit_png())
    response = client.post(
        endpoint,
        content=b'{"image": "' + image + b'", "image": "' + image + b'", "label": 3}',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["detail"] == 'the JSON has 2 fields named "image"; send one image per request.'
    with sqlite3.connect(db_path) as con:
        assert con.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 0
    # and bytes that are not UTF-8 are still not valid JSON
    response = client.post(
        endpoint, content=b'{"image": "\xff\xfe"}', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["detail"].startswith("the body is not valid JSON;")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(files=[("file", ("a.png", b"x", "image/png"))] * 3),
        dict(files={"file": ("a.png", b"x", "image/png")}, data={f"f{i}": "x" for i in range(11)}),
        dict(content=b"garbage", headers={"content-type": "multipart/form-data; boundary=xyz"}),
        dict(content=b"garbage", headers={"content-type": "multipart/form-data"}),
    ],
    ids=["three files", "eleven fields", "garbage body", "no boundary"],
)
@pytest.mark.parametrize("endpoint", ["/api/predict", "/api/read", "/api/feedback"])
def test_a_form_the_parser_refuses_is_one_sentence_saying_what_to_send(client, endpoint, kwargs):
    """Starlette's own words came back: "Too many files. Maximum number of files is 2." (two sentences),
    "Invalid multipart data." and "Missing boundary in multipart.", none saying what to send instead."""
    response = client.post(endpoint, **kwargs)
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert detail.startswith("the multipart form cannot be read (") and detail.endswith(IMAGE_HINT + ".")
    assert detail.count(". ") == 0  # one sentence


@pytest.mark.parametrize("label", [b"4.0", b'"4"', b"[4]", b"false"])
def test_a_json_label_is_a_json_integer(client, label, db_path):
    """A JSON 4.0 and "4" were stored as 4, though the schema says integer (and a form's 4.0 was a 422)."""
    body = b'{"image": "' + base64.b64encode(digit_png()) + b'", "label": ' + label + b"}"
    response = client.post("/api/feedback", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"] == (
        f'the field "label" must be a digit from 0 to 9 as a JSON integer, got {label.decode()}.'
    )
    body = b'{"image": "' + base64.b64encode(digit_png()) + b'", "label": 4, "predicted": 9}'
    response = client.post("/api/feedback", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 201 and response.json()["label"] == 4


def test_a_heic_upload_is_400_with_a_sentence_naming_the_format(client):
    response = client.post("/api/predict", files=upload(b"\x00\x00\x00\x18ftypheic" + bytes(100)))
    assert response.status_code == 400 and "is a HEIC photo" in response.json()["detail"]


@pytest.mark.parametrize("endpoint", ["/api/predict", "/api/read", "/api/predict?explain=true"])
def test_an_eps_upload_is_400_naming_its_format_not_handed_to_ghostscript(client, endpoint):
    """Any format Pillow knows was decoded; EPS went to Ghostscript and came back "damaged or truncated"."""
    from digitrec.preprocess import IMAGE_FORMATS_TEXT

    image = Image.new("L", (40, 40), 255)
    buffer = io.BytesIO()
    image.save(buffer, format="EPS")
    response = client.post(endpoint, files=upload(buffer.getvalue(), "digit.eps", "application/postscript"))
    assert response.status_code == 400
    assert response.json()["detail"] == (
        "the uploaded data is in the EPS format, which digitrec does not read; "
        f"convert it to {IMAGE_FORMATS_TEXT}."
    )


def test_a_huge_image_in_a_format_we_do_not_read_is_refused_for_its_format(client):
    """The pixel check opened any format Pillow knows, so a PPM header claiming 100 megapixels got a 413."""
    response = client.post("/api/predict", files=upload(b"P5\n10000 10000\n255\n" + bytes(100), "x.ppm"))
    assert response.status_code == 400 and "is in the PPM format" in response.json()["detail"]


def test_feedback_with_a_non_image_is_400_and_stores_nothing(client, db_path):
    response = client.post("/api/feedback", files=upload(b"not an image"), data={"label": "4"})
    assert response.status_code == 400
    with sqlite3.connect(db_path) as con:
        assert con.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 0


def test_a_blank_correction_is_422_and_stores_nothing(client, db_path):
    """A white canvas labelled 3 was stored, and a fine-tune then learned that an empty 28x28 image is a 3."""
    response = client.post("/api/feedback", files=upload(digit_png(blank=True)), data={"label": "3"})
    assert response.status_code == 422 and "no ink" in response.json()["detail"]
    with sqlite3.connect(db_path) as con:
        assert con.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 0


def test_stats_count_requests_batches_and_corrections(client):
    client.post("/api/predict", files=upload(digit_png()))
    client.post("/api/predict", files=upload(digit_png(blank=True)))
    client.post("/api/read", files=upload(digit_png()))
    client.post("/api/feedback", files=upload(digit_png()), data={"label": "1"})
    client.post("/api/predict", files=upload(b"junk"))
    too_large = b"x" * (6 * 1024 * 1024)  # 413 from the body-size middleware
    client.post("/api/predict", content=too_large, headers={"content-type": "image/png"})
    stats = client.get("/api/stats").json()
    assert stats["requests"] == {
        "predict": 2,
        "read": 1,
        "feedback": 1,
        "rejected": 1,
        "client_errors": 2,
        "server_errors": 0,
    }
    assert stats["batches"]["images"] == 2
    assert stats["feedback"]["total"] == 1 and stats["feedback"]["by_label"]["1"] == 1


# ------------------------------------------------------------------------------------------------ errors


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (its data is tiny): a decompression-bomb probe."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    import struct
    import zlib

    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def truncated_jpeg() -> bytes:
    data = digit_png(size=400, fmt="JPEG")
    return data[: len(data) // 2]


ERROR_CASES = {
    "body over 5 MB": (dict(files=upload(b"\0" * (5 * 1024 * 1024 + 1))), 413, "5 MB"),
    "over 40 megapixels": (  # it said "(40 megapixels), more than the 40 megapixels we accept"
        dict(files=upload(png_header_claiming(8000, 5001))),
        413,
        "the image is 8000x5001 (40.01 megapixels), more than the 40 megapixels we accept",
    ),
    "decompression bomb": (dict(files=upload(png_header_claiming(50_000, 50_000))), 413, "megapixels"),
    "not an image": (dict(files=upload(b"hello, I am text", "notes.txt", "text/plain")), 400, "not an image"),
    "truncated image": (dict(files=upload(truncated_jpeg(), "cut.jpg", "image/jpeg")), 400, "truncated"),
    "empty file": (dict(files=upload(b"")), 400, "empty"),
    "tiny image": (dict(files=upload(digit_png(size=3))), 400, "too small"),
    "no file field": (
        dict(data={"image": "x"}, files={"other": ("a.png", b"x", "image/png")}),
        400,
        "'file'",
    ),
    "form cut short": (  # its closing boundary never came: it had "no file field named 'file'"
        dict(
            content=b'--xx\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n\x89PNG',
            headers={"content-type": "multipart/form-data; boundary=xx"},
        ),
        400,
        "the multipart form is cut short (its closing boundary never came); send it whole",
    ),
    "invalid JSON": (dict(content=b"{nope", headers={"content-type": "application/json"}), 400, "JSON"),
    "JSON without image": (dict(json={"picture": "abc"}), 400, '"image"'),
    "invalid base64": (dict(json={"image": "***"}), 400, "base64"),
    "wrong content type": (dict(content=b"7", headers={"content-type": "text/plain"}), 415, "content type"),
}


@pytest.mark.parametrize("endpoint", ["/api/predict", "/api/read"])
@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_requests_get_a_json_sentence_and_a_4xx_code(client, endpoint, case):
    kwargs, status, words = ERROR_CASES[case]
    response = client.post(endpoint, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    assert isinstance(detail, str) and words in detail and detail.endswith(".")


def test_too_many_pixels_are_refused_before_decoding(client, monkeypatch):
    import PIL.Image

    side = int(MAX_PIXELS**0.5) + 10
    bomb = png_header_claiming(side, side)

    def no_decoding(*args, **kwargs):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(PIL.Image.Image, "load", no_decoding)
    response = client.post("/api/predict", files=upload(bomb))
    assert response.status_code == 413 and "scale it down" in response.json()["detail"]


def test_chunked_bodies_over_5_mb_are_cut_off_with_413(client):
    def chunks():
        for _ in range(6):
            yield b"\0" * (1024 * 1024)

    response = client.post("/api/predict", content=chunks(), headers={"content-type": "image/png"})
    assert response.status_code == 413 and "5 MB" in response.json()["detail"]


def test_unknown_paths_and_methods_are_json_errors(client):
    for response, status in ((client.get("/api/nothing"), 404), (client.get("/api/predict"), 405)):
        assert response.status_code == status
        assert response.headers["content-type"] == "application/json" and "/docs" in response.json()["detail"]
    # RFC 9110: a 405 names the methods the path takes (Starlette's Allow header was dropped)
    assert client.put("/api/predict").headers["allow"] == "POST"
    assert "GET" in client.post("/healthz").headers["allow"]


def test_a_model_crash_is_a_json_500_not_a_traceback(predictor, db_path):
    def broken(batch):
        raise RuntimeError("boom")

    predictor.predict_tensor = broken
    with TestClient(
        create_app(predictor, feedback_db=db_path), raise_server_exceptions=False, base_url=BASE_URL
    ) as c:
        response = c.post("/api/predict", files=upload(digit_png()))
        assert response.status_code == 500 and response.json() == {
            "detail": "internal error while handling the request; it has been logged."
        }
        assert c.get("/healthz").status_code == 200
        assert c.get("/api/stats").json()["requests"]["server_errors"] == 1  # was counted nowhere


def test_a_500_carries_the_browser_headers_whichever_way_the_image_came(predictor, db_path):
    """README: every response carries nosniff, DENY and no-referrer. A 500 answered by Starlette's error
    middleware (a form, JSON or /api/read) is sent outside every middleware, and had none of them; the raw
    image/* fast path's had them."""
    from digitrec.guards import BROWSER_HEADERS

    def broken(*args):
        raise RuntimeError("boom")

    predictor.predict_tensor = predictor.read = broken
    png = digit_png()
    with TestClient(
        create_app(predictor, feedback_db=db_path), raise_server_exceptions=False, base_url=BASE_URL
    ) as c:
        for path, request in [
            ("/api/predict", {"files": upload(png)}),
            ("/api/predict", {"json": {"image": base64.b64encode(png).decode()}}),
            ("/api/predict", {"content": png, "headers": {"content-type": "image/png"}}),
            ("/api/read", {"files": upload(png)}),
            ("/api/read", {"content": png, "headers": {"content-type": "image/png"}}),
        ]:
            response = c.post(path, **request)
            assert response.status_code == 500, (path, response.text)
            for name, value in BROWSER_HEADERS:  # each once: no middleware added them a second time
                assert response.headers.get_list(name.decode()) == [value.decode()], (path, request.keys())


# ------------------------------------------------------------------------------------------------ concurrency


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(db_path):
    predictor = FakePredictor(delay_s=0.05)  # a slow model: requests pile up while it works
    app = create_app(predictor, feedback_db=db_path)
    images = [digit_png(), digit_png(blank=True)] * 12

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
            responses = await asyncio.gather(
                *(http.post("/api/predict", files=upload(png)) for png in images)
            )
        return [r.json() for r in responses]

    answers = asyncio.run(run())
    assert [a["digit"] for a in answers] == [7, None] * 12
    assert max(predictor.batch_sizes) > 1 and sum(predictor.batch_sizes) == len(images)


def test_corrections_and_stats_do_not_wait_behind_slow_reads(db_path):
    """A class reading numbers keeps every /api/read thread busy for seconds; a correction or /api/stats sent
    meanwhile is answered at once instead of queueing behind them (it waited up to 18 s under 30 clients)."""
    import threading

    gate, entered = threading.Event(), threading.Semaphore(0)

    class SlowReader(FakePredictor):
        def read(self, image: bytes):
            entered.release()
            gate.wait(timeout=30)  # a long read: held until the correction below has its answer
            return super().read(image)

    app = create_app(SlowReader(), feedback_db=db_path)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL, timeout=30) as http:
            reads = [
                asyncio.ensure_future(http.post("/api/read", files=upload(digit_png()))) for _ in range(8)
            ]
            try:
                while not entered.acquire(blocking=False):  # the reads have taken their threads
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.3)  # and every other thread they can get
                correction = http.post("/api/feedback", files=upload(digit_png()), data={"label": "7"})
                stored = await asyncio.wait_for(correction, timeout=10)
                stats = await asyncio.wait_for(http.get("/api/stats"), timeout=10)
                still_reading = not gate.is_set()
            finally:
                gate.set()
            return stored, stats, still_reading, await asyncio.gather(*reads)

    stored, stats, still_reading, reads = asyncio.run(run())
    assert stored.status_code == 201 and stats.json()["feedback"]["total"] == 1 and still_reading
    assert [r.json()["number"] for r in reads] == ["42"] * 8


def test_preprocessing_in_worker_processes_gives_the_same_answers_and_errors(predictor, db_path):
    with TestClient(
        create_app(predictor, feedback_db=db_path, preprocess_processes=1), base_url=BASE_URL
    ) as c:
        assert c.post("/api/predict", files=upload(digit_png())).json()["digit"] == 7
        assert c.post("/api/predict", files=upload(b"junk")).status_code == 400
        assert c.post("/api/predict", files=upload(png_header_claiming(9000, 9000))).status_code == 413


def test_live_server_keeps_answering_while_a_client_sends_garbage(predictor, db_path):
    with live_server(create_app(predictor, feedback_db=db_path)) as url:
        port = int(url.rsplit(":", 1)[1])
        # One client opens a request, promises a big body and dribbles it; another speaks no HTTP at all.
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(
            b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: 4000000\r\n\r\n\x89PNG"
        )
        junk = socket.create_connection(("127.0.0.1", port))
        junk.sendall(bytes(range(256)) * 4 + b"\r\n\r\n")
        try:
            with httpx.Client(base_url=url, timeout=5) as http:  # a request the server does not answer fails
                for _ in range(3):
                    assert http.get("/healthz").status_code == 200
                    assert http.post("/api/predict", files=upload(digit_png())).json()["digit"] == 7
                    assert http.post("/api/predict", files=upload(b"\xff\xd8garbage")).status_code == 400
            # all of that while the dribbling client's request was still open: it has had no answer yet
            slow.setblocking(False)
            with pytest.raises(BlockingIOError):
                slow.recv(100)
            junk.settimeout(5)
            assert junk.recv(100).startswith(b"HTTP/1.1 400")
        finally:
            slow.close()
            junk.close()


# ------------------------------------------------------------------------------------------------ the real Predictor


def test_the_real_predictor_preprocess_and_saliency_work_end_to_end(tmp_path):
    """A real (randomly initialised) CNN checkpoint behind the real Predictor; the bundled model when there is one."""
    from digitrec.checkpoint import save_model
    from digitrec.models import create_model
    from digitrec.predict import Predictor, pretrained_path

    if pretrained_path().exists():
        predictor = Predictor.pretrained()
    else:
        torch = pytest.importorskip("torch")
        torch.manual_seed(0)
        save_model(
            tmp_path / "model.safetensors",
            create_model("fast_cnn").eval(),
            {"recipe": "random", "config": {"arch": "fast_cnn"}, "metrics": {"test_accuracy": 0.1}},
        )
        predictor = Predictor.load(tmp_path / "model.safetensors")
    with TestClient(create_app(predictor, feedback_db=tmp_path / "f.sqlite"), base_url=BASE_URL) as client:
        health = client.get("/healthz").json()
        assert health["model"] == predictor.name
        # to six places: the bundled checkpoint holds a float32 mean (0.9952999949455261 for 9,953 of 10,000)
        accuracy = (predictor.meta.get("metrics") or {}).get("test_accuracy")
        assert health["test_accuracy"] == round(accuracy, 6)
        body = client.post("/api/predict?explain=true", files=upload(digit_png())).json()
        assert sum(body["probabilities"]) == pytest.approx(1.0, abs=1e-5)
        assert np.array(body["saliency"]).shape == (28, 28) and np.abs(
            body["saliency"]
        ).max() == pytest.approx(1.0)
        if pretrained_path().exists():
            assert body["digit"] == 7

        # Two well separated strokes make two boxes, left to right, inside the image.
        image = Image.new("L", (400, 200), 255)
        from PIL import ImageDraw

        draw = ImageDraw.Draw(image)
        draw.line([(80, 40), (80, 160)], fill=0, width=14)
        draw.line([(260, 40), (340, 40), (290, 160)], fill=0, width=14)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        read = client.post("/api/read", files=upload(buffer.getvalue())).json()
        assert len(read["number"]) == 2 and [d["box"][0] < 200 for d in read["digits"]] == [True, False]
        if pretrained_path().exists():
            assert read["number"] == "17"


# ------------------------------------------------------------------------------------------------ slow clients


def _wait_for_close(sock: socket.socket, limit: float, dribble: bytes = b"") -> tuple[float, bytes]:
    """Send `dribble` a byte every 0.1 s (a slowloris) until the server closes; (seconds taken, what it said)."""
    started, said = time.perf_counter(), b""
    sock.settimeout(0.1)
    for index in range(int(limit * 10) + 60):  # 6 s past the limit at most
        try:
            chunk = sock.recv(4096)
            if not chunk:
                break
            said += chunk
        except TimeoutError:
            pass
        except OSError:  # reset by the server
            break
        if dribble:
            try:
                sock.sendall(dribble[index % len(dribble) : index % len(dribble) + 1])
            except OSError:
                break
    return time.perf_counter() - started, said


def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed (or reset) the connection, rather than _wait_for_close giving up on it."""
    sock.settimeout(0.5)
    try:
        return sock.recv(4096) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_clients_that_never_finish_their_headers_are_cut_off_while_others_are_served(predictor, db_path):
    from digitrec.guards import guarded_http_protocol

    limit = 1.0
    app = create_app(predictor, feedback_db=db_path)
    with live_server(app, http=guarded_http_protocol(limit)) as url:
        port = int(url.rsplit(":", 1)[1])
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: ima")  # a partial head
        silent = socket.create_connection(("127.0.0.1", port))  # connects and sends nothing at all
        try:
            with httpx.Client(base_url=url, timeout=5) as http:
                # normal clients are served meanwhile, and a kept-alive connection may idle past the limit
                assert http.post("/api/predict", files=upload(digit_png())).json()["digit"] == 7
                # the dribbler is cut off although it keeps sending: the limit is on the whole head, not on a
                # pause (and it is this server's 1 s: _wait_for_close gives up 6 s past it, before the default 10 s)
                seconds, said = _wait_for_close(slow, limit, dribble=b"ge/pngXX")
                assert said.startswith(b"HTTP/1.1 408") and _closed_by_server(slow), (seconds, said)
                seconds, said = _wait_for_close(silent, limit)
                assert said == b"" and _closed_by_server(silent), seconds  # closed with nothing to answer
                time.sleep(limit + 0.2)
                assert http.post("/api/predict", files=upload(digit_png())).json()["digit"] == 7
                assert http.get("/healthz").status_code == 200
        finally:
            slow.close()
            silent.close()


def test_clients_that_stall_their_body_are_cut_off_while_others_are_served(predictor, db_path):
    """A client that sent its headers and then stalled its body held a connection slot forever; 257 of them
    took the whole server down, /healthz included."""
    from digitrec.guards import guarded_http_protocol

    limit = 0.5
    app = create_app(predictor, feedback_db=db_path)
    with live_server(app, http=guarded_http_protocol(5.0, body_timeout=limit)) as url:
        port = int(url.rsplit(":", 1)[1])
        stalled = []
        for path in ("/api/predict", "/api/read", "/api/feedback"):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                "Content-Length: 1000\r\n\r\nabc".encode()
            )
            stalled.append(sock)
        try:
            with httpx.Client(base_url=url, timeout=5) as http:
                assert http.post("/api/predict", files=upload(digit_png())).json()["digit"] == 7
                for sock in stalled:
                    seconds, said = _wait_for_close(sock, 2.0)
                    assert said.startswith(b"HTTP/1.1 408"), said
                    assert (
                        b'"detail": "request timeout: send the whole request body within 0.5 seconds."'
                        in said
                    )
                # a body that arrives in time, in pieces, is still read
                with socket.create_connection(("127.0.0.1", port)) as sock:
                    png = digit_png()
                    sock.sendall(
                        f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                        f"Content-Length: {len(png)}\r\nConnection: close\r\n\r\n".encode()
                    )
                    for start in range(0, len(png), 500):
                        sock.sendall(png[start : start + 500])
                    _, said = _wait_for_close(sock, 2.0)
                    assert said.startswith(b"HTTP/1.1 200") and b'"digit":7' in said
                assert http.get("/healthz").status_code == 200
        finally:
            for sock in stalled:
                sock.close()


def test_past_the_connection_limit_the_503_is_json_with_retry_after(predictor, db_path):
    """uvicorn's own 503 was text/plain "Service Unavailable" without Retry-After."""
    from digitrec.guards import guarded_http_protocol

    app = create_app(predictor, feedback_db=db_path)
    # uvicorn counts the asking connection too: with a limit of 2, one other open connection fills it
    with live_server(app, http=guarded_http_protocol(5.0), limit_concurrency=2) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as other:
            other.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert other.recv(4096).startswith(b"HTTP/1.1 200")  # served, and kept alive
            with httpx.Client(base_url=url, timeout=5) as http:
                response = http.post("/api/predict", files=upload(digit_png()))
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json() == {"detail": "the server is busy with other requests; send it again in 1 s."}
        with httpx.Client(base_url=url, timeout=5) as http:  # the other connection closed: served again
            assert http.post("/api/predict", files=upload(digit_png())).json()["digit"] == 7


def test_a_request_head_over_64_kb_is_refused_with_431(predictor, db_path):
    from digitrec.guards import guarded_http_protocol

    with live_server(create_app(predictor, feedback_db=db_path), http=guarded_http_protocol(5.0)) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            try:
                for _ in range(80):
                    sock.sendall(b"X-Padding: " + b"a" * 1000 + b"\r\n")
            except OSError:
                pass  # closed by the server mid-send
            seconds, said = _wait_for_close(sock, 1.0)
        assert said.startswith(b"HTTP/1.1 431")


@pytest.mark.parametrize(
    "head",
    [
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
        b"GET /healthz?" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: 5\r\n"
        + b"X-Big: " * 10_000
        + b"\r\n\r\nabcde",
    ],
    ids=["one 70 KB header", "a 70 KB URL", "a 70 KB head with a body"],
)
def test_a_head_over_64_kb_that_arrives_in_one_piece_is_refused_with_431_too(predictor, db_path, head):
    """Only a head still incomplete after 64 KB was counted: one sent whole (a 70,000-byte header, read by
    asyncio in one piece) was served, 200."""
    from digitrec.guards import guarded_http_protocol

    with live_server(create_app(predictor, feedback_db=db_path), http=guarded_http_protocol(5.0)) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head)
            seconds, said = _wait_for_close(sock, 1.0)
        assert said.startswith(b"HTTP/1.1 431") and said.count(b"HTTP/1.1") == 1, said
        assert said.endswith(
            b'{"detail": "request header fields too large: send at most 64 KB of request line and headers."}'
        )
        with httpx.Client(base_url=url, timeout=5) as http:  # and the server goes on
            headers = {"X-Big": "a" * 60_000}  # under the limit: served
            assert http.get("/healthz", headers=headers).status_code == 200
            assert http.post("/api/predict", files=upload(digit_png())).json()["digit"] == 7


@pytest.mark.parametrize("reads", [1, 2], ids=["in one read", "in two reads"])
def test_a_head_over_64_kb_never_finished_is_refused_with_431_not_left_to_the_timeout(
    predictor, db_path, reads
):
    """Counting only what the parser had handed over (complete headers), a 100 KB header never finished was
    held until the head's deadline (408) instead of refused at 64 KB (431)."""
    from digitrec.guards import guarded_http_protocol

    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 100_000
    with live_server(create_app(predictor, feedback_db=db_path), http=guarded_http_protocol(5.0)) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            for part in (head,) if reads == 1 else (head[:50_000], head[50_000:]):
                with contextlib.suppress(OSError):  # closed by the server mid-send
                    sock.sendall(part)
                time.sleep(0.3)
            said = _wait_for_close(sock, 1.0)[1]
        assert said.startswith(b"HTTP/1.1 431"), said[:80]


def test_pipelined_requests_over_64_kb_in_one_read_are_each_answered(predictor, db_path):
    """The head's byte count took in the whole read in which a head began: 70 KB of small pipelined GETs, or a
    100 KB upload followed by the start of the next request, was refused with 431 and the answers were lost."""
    from digitrec.guards import guarded_http_protocol

    get = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    png = digit_png()
    body = png + b"\0" * (100_000 - len(png))
    post = b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
    post += b"Content-Length: %d\r\n\r\n" % len(body) + body
    last = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    with live_server(create_app(predictor, feedback_db=db_path), http=guarded_http_protocol(5.0)) as url:
        port = int(url.rsplit(":", 1)[1])
        for first, answers in [(get * 1_700, 1_700), (post, 1)]:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(first + last[:20])  # the next request's head begins in the same read
                time.sleep(0.3)
                sock.sendall(last[20:])
                sock.settimeout(10.0)
                said = b""
                while chunk := sock.recv(1 << 20):  # until the server closes, after the last answer
                    said += chunk
            assert said.count(b"HTTP/1.1 200 OK") == answers + 1 and b" 431 " not in said, said[-300:]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
        b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: five\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello: https:// to a plain-HTTP port
        b"GET / HTTP/1.1\r\nHost x\r\n\r\n",
    ],
    ids=["huge Content-Length", "Content-Length not a number", "TLS hello", "header without a colon"],
)
def test_bytes_that_are_not_http_get_a_json_400_like_every_other_error(predictor, db_path, request_bytes):
    """uvicorn answered them itself: 400, text/plain, "Invalid HTTP request received."."""
    from digitrec.guards import guarded_http_protocol

    with live_server(create_app(predictor, feedback_db=db_path), http=guarded_http_protocol(5.0)) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(request_bytes)
            seconds, said = _wait_for_close(sock, 1.0)
        head, _, body = said.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head, said
        detail = json.loads(body)["detail"]
        assert detail.startswith("the request is not valid HTTP/1.1") and detail.count(". ") == 0
        with httpx.Client(base_url=url, timeout=5) as http:
            assert http.post("/api/predict", files=upload(digit_png())).json()["digit"] == 7


def _head_of(said: bytes) -> dict[str, str]:
    """The status line and the headers of a raw answer, lower-cased names, as {"": status line, name: value}."""
    lines = said.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    return {"": lines[0]} | {
        k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])
    }


def test_answers_of_the_connection_guard_carry_the_browser_headers_too(predictor, db_path):
    """README promises nosniff, DENY and no-referrer on every response; the 431, 400, 408 and 503 written by
    the connection guard itself, before or instead of the app, had none of them."""
    from digitrec.guards import BROWSER_HEADERS, guarded_http_protocol

    expected = {name.decode(): value.decode() for name, value in BROWSER_HEADERS}
    assert set(expected) == {"x-content-type-options", "x-frame-options", "referrer-policy"}
    app = create_app(predictor, feedback_db=db_path)
    answers = {}
    with live_server(app, http=guarded_http_protocol(0.5, body_timeout=0.5)) as url:
        port = int(url.rsplit(":", 1)[1])
        for status, request in [
            ("431", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"),
            ("400", b"GET / HTTP/1.1\r\nHost x\r\n\r\n"),
            ("408", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a"),  # a head never finished
            # a body never finished
            ("408", b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 99\r\n\r\nabc"),
            ("200", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"),  # the app's
        ]:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(request)
                head = _head_of(_wait_for_close(sock, 1.0)[1])
            assert head[""].startswith(f"HTTP/1.1 {status} "), head
            answers[request] = {name: head.get(name) for name in expected}
    with live_server(app, http=guarded_http_protocol(5.0), limit_concurrency=2) as url:  # the 503
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as other:
            other.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert other.recv(4096).startswith(b"HTTP/1.1 200")  # served, and kept alive: the slot is taken
            with httpx.Client(base_url=url, timeout=5) as http:
                response = http.get("/healthz")
        assert response.status_code == 503
        answers[b"503"] = {name: response.headers.get(name) for name in expected}
    assert answers == {request: expected for request in answers}


# ------------------------------------------------------------------------------------------------ worker processes


def test_a_killed_preprocessing_worker_is_replaced_and_the_next_request_succeeds(predictor, db_path):
    import os
    import signal

    with TestClient(
        create_app(predictor, feedback_db=db_path, preprocess_processes=1), base_url=BASE_URL
    ) as c:
        assert c.post("/api/predict", files=upload(digit_png())).json()["digit"] == 7
        workers = c.app.state.image_workers
        [pid] = list(workers.pool._processes)
        os.kill(pid, signal.SIGKILL)
        response = c.post("/api/predict", files=upload(digit_png()))
        assert response.status_code == 200 and response.json()["digit"] == 7
        assert (
            c.post("/api/predict", files=upload(b"junk")).status_code == 400
        )  # errors still come back as 4xx
        assert workers.rebuilds == 1 and pid not in workers.pool._processes
        assert c.get("/api/stats").json()["preprocessing"]["pool_rebuilds"] == 1


class BrokenPool:
    """A process pool whose workers keep dying: every submit raises, as a broken ProcessPoolExecutor's does."""

    def submit(self, *args, **kwargs):
        raise BrokenProcessPool("a child process terminated abruptly")

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def test_image_workers_that_break_again_after_a_rebuild_answer_503_in_json(predictor, db_path, monkeypatch):
    with TestClient(
        create_app(predictor, feedback_db=db_path, preprocess_processes=1), base_url=BASE_URL
    ) as c:
        workers = c.app.state.image_workers
        real_pool = workers.pool
        monkeypatch.setattr(workers, "_new_pool", BrokenPool)  # the rebuilt pool breaks too
        workers.pool = BrokenPool()
        try:
            response = c.post("/api/predict", files=upload(digit_png()))
        finally:
            workers.pool = real_pool  # so that the app's shutdown stops the real worker
        assert workers.rebuilds == 1
    assert response.status_code == 503 and response.headers["content-type"] == "application/json"
    assert response.headers["retry-after"] == "1"
    assert response.json() == {
        "detail": "the image workers are restarting; send the request again in a moment."
    }


def test_uploads_that_queue_up_go_to_the_workers_in_chunks(db_path):
    predictor = FakePredictor()
    app = create_app(predictor, feedback_db=db_path, preprocess_processes=1)
    images = [digit_png(), digit_png(blank=True), b"junk"] * 8

    async def run():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
                return await asyncio.gather(*(http.post("/api/predict", files=upload(png)) for png in images))

    responses = asyncio.run(run())
    assert [r.json().get("digit", r.status_code) for r in responses] == [7, None, 400] * 8
    assert app.state.image_workers.chunks < len(images)  # several uploads per trip to the worker


# ------------------------------------------------------------------------------------------------ the fast path


def test_plain_uploads_take_the_fast_path_and_answer_exactly_as_the_full_endpoint(client, monkeypatch):
    from starlette.requests import Request as StarletteRequest

    png = digit_png()
    full = client.post(
        "/api/predict", files=upload(png), data={"note": "an extra field: the full form parser"}
    )
    blank_full = client.post("/api/predict", files=upload(digit_png(blank=True)), data={"x": "1"})

    def no_form_parsing(*args, **kwargs):
        raise AssertionError("the fast path parsed the form with Starlette")

    monkeypatch.setattr(StarletteRequest, "form", no_form_parsing)
    fast = client.post("/api/predict", files=upload(png))
    assert fast.status_code == full.status_code == 200
    assert fast.headers["content-type"] == full.headers["content-type"] == "application/json"
    assert fast.json() == full.json()
    assert client.post("/api/predict", files=upload(digit_png(blank=True))).json() == blank_full.json()
    assert (
        client.post("/api/predict", content=png, headers={"content-type": "image/png"}).json() == full.json()
    )
    for kwargs, status, words in (ERROR_CASES[name] for name in ("not an image", "empty file", "tiny image")):
        response = client.post("/api/predict", **kwargs)
        assert response.status_code == status and words in response.json()["detail"]


@pytest.mark.parametrize(
    "body, expected",
    [
        (
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\nDATA\r\n--b--\r\n',
            b"DATA",
        ),
        (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n\r\n--b--', b""),
        (b'--b\r\ncontent-disposition: form-data; filename=""; name=file\r\n\r\nA--bB\r\n--b--\r\n', None),
        (
            b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\nDATA\r\n--b--\r\n',
            None,
        ),  # a text field
        (b'--b\r\nContent-Disposition: form-data; name="other"; filename="a"\r\n\r\nDATA\r\n--b--\r\n', None),
        (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nDATA\r\n--b--\r\nX', None),
        (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nDATA', None),
        (b"", None),
    ],
)
def test_the_fast_path_reads_only_plain_single_file_forms(body, expected):
    from digitrec.server import simple_multipart_file

    assert simple_multipart_file(b"multipart/form-data; boundary=b", body) == expected
    assert simple_multipart_file(b'multipart/form-data; boundary="b"', body) == expected
    assert simple_multipart_file(b"application/json", body) is None


def _form(*parts: tuple[bytes, bytes]) -> bytes:
    """A multipart body with boundary "b" from (Content-Disposition parameters, content) pairs."""
    body = b"".join(
        b"--b\r\nContent-Disposition: form-data; " + head + b"\r\n\r\n" + data + b"\r\n"
        for head, data in parts
    )
    return body + b"--b--\r\n"


@pytest.mark.parametrize(
    "body, status, words",
    [
        (_form((b'name="other"; filename="x; name=file"', b"PNG")), 400, "no file field named 'file'"),
        (_form((b"name=file; filename*=UTF-8''a.png", b"PNG")), 400, "field 'file' is text, not a file"),
        (
            _form((b'name="file"; filename="a.png"', b"PNG"), (b'name="file"; filename="b.png"', b"PNG")),
            400,
            "2 fields named 'file'",
        ),
        (_form((b"name=file; filename=a.png", b"PNG")), 200, None),
        (_form((b'filename="a.png"; name="file"', b"PNG")), 200, None),
    ],
    ids=["name inside a quoted filename", "filename* only", "two file fields", "unquoted", "filename first"],
)
def test_odd_forms_get_the_same_answer_on_the_fast_path_and_the_full_parser(client, body, status, words):
    """A quoted filename holding "; name=file" was 200 on the fast path and 400 on the full one; of two file
    fields the second was read without a word."""
    body = body.replace(b"PNG", digit_png())
    headers = {"content-type": "multipart/form-data; boundary=b"}
    answers = [
        client.post(path, content=body, headers=headers)
        for path in ("/api/predict", "/api/predict?explain=false")
    ]
    assert [a.status_code for a in answers] == [status, status]
    assert answers[0].json() == answers[1].json()
    if words is not None:
        assert words in answers[0].json()["detail"]


def random_checkpoint(path):
    """A seeded, untrained fast_cnn_lite checkpoint at `path` (its answers do not matter, only that it loads)."""
    import torch

    from digitrec.checkpoint import save_model
    from digitrec.models import create_model

    torch.manual_seed(0)
    save_model(
        path, create_model("fast_cnn_lite").eval(), {"recipe": "random", "config": {"arch": "fast_cnn_lite"}}
    )
    return path


def test_serve_runs_a_checkpoint_on_onnx_runtime_where_it_is_installed(tmp_path, monkeypatch):
    """`serve`'s default backend: ONNX Runtime (same answers, half the CPU per batch), PyTorch without it."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import importlib.util

    import torch

    from digitrec.backends import OnnxBackend
    from digitrec.predict import TorchBackend
    from digitrec.server import load_for_serving

    monkeypatch.setenv("DIGITREC_CACHE", str(tmp_path / "cache"))
    checkpoint = random_checkpoint(tmp_path / "model.safetensors")
    served, eager = load_for_serving(checkpoint), load_for_serving(checkpoint, "torch")
    assert isinstance(served.backend, OnnxBackend) and isinstance(eager.backend, TorchBackend)
    x = torch.rand(16, 1, 28, 28)
    assert np.abs(served.probabilities(x.numpy()) - eager.probabilities(x.numpy())).max() < 1e-4

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("DIGITREC_CACHE", str(blocked / "cache"))  # nowhere to keep an export: PyTorch serves
    assert isinstance(load_for_serving(checkpoint).backend, TorchBackend)

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a)
    )
    assert isinstance(load_for_serving(checkpoint).backend, TorchBackend)


def test_serving_a_file_that_is_no_checkpoint_says_only_that(tmp_path, monkeypatch, capsys):
    """It first printed "exporting ... to ONNX once (cached ...)", then the right error."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from digitrec.errors import CheckpointError
    from digitrec.server import load_for_serving

    monkeypatch.setenv("DIGITREC_CACHE", str(tmp_path / "cache"))
    not_a_model = tmp_path / "notimage.png"
    not_a_model.write_bytes(b"just some bytes, no safetensors header")
    with pytest.raises(CheckpointError, match="is not a digitrec checkpoint"):
        load_for_serving(not_a_model)
    assert "exporting" not in capsys.readouterr().out
    assert not (tmp_path / "cache").exists()


def test_a_phone_photo_upload_gets_the_answer_the_cli_gives_for_the_same_file(tmp_path):
    """The server hands the uploaded bytes to preprocess() as the CLI hands a file: same decoding, same answer."""
    from digitrec.predict import Predictor, pretrained_path

    if not pretrained_path().exists():
        pytest.skip("needs the bundled model")
    image = Image.new("RGB", (3000, 2250), (228, 224, 212))
    ImageDraw.Draw(image).line([(1100, 600), (1900, 600), (1400, 1700)], fill=(25, 30, 80), width=70)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=88)
    photo = buffer.getvalue()
    predictor = Predictor.pretrained()
    with TestClient(create_app(predictor, feedback_db=tmp_path / "f.sqlite"), base_url=BASE_URL) as client:
        body = client.post("/api/predict", files=upload(photo, "photo.jpg", "image/jpeg")).json()
    (cli,) = predictor.predict(photo)
    assert body["digit"] == cli.digit == 7
    assert body["probabilities"] == pytest.approx(cli.probabilities, abs=1e-6)


def test_an_exported_onnx_model_still_shows_saliency_maps(tmp_path):
    """Occlusion saliency needs only forward passes, so a server of an .onnx file (no PyTorch module) shows it."""
    pytest.importorskip("onnxruntime")

    from digitrec.export import export_onnx
    from digitrec.predict import Predictor

    checkpoint = random_checkpoint(tmp_path / "model.safetensors")
    export_onnx(checkpoint, tmp_path / "model.onnx")
    predictor = Predictor.load(tmp_path / "model.onnx")
    assert predictor.model is None
    with TestClient(create_app(predictor, feedback_db=tmp_path / "f.sqlite"), base_url=BASE_URL) as client:
        body = client.post("/api/predict?explain=true", files=upload(digit_png())).json()
    saliency = np.array(body["saliency"])
    assert saliency.shape == (28, 28) and np.abs(saliency).max() == pytest.approx(1.0)


def test_serve_and_its_image_workers_keep_start_up_objects_out_of_the_garbage_collector(
    monkeypatch, predictor, db_path
):
    """A full collection over the ~190,000 objects torch and FastAPI leave would stop every request for a while."""
    import gc

    import torch
    import uvicorn

    from digitrec import server

    frozen = {}

    def run(self, sockets=None):
        frozen.update(server=gc.get_freeze_count())
        self.started = True

    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # serve's one thread would slow later tests
    try:
        server.serve(backend="torch", port=0)
    finally:
        gc.unfreeze()
    assert frozen["server"] > 10_000
    with TestClient(
        create_app(predictor, feedback_db=db_path, preprocess_processes=1), base_url=BASE_URL
    ) as c:
        assert c.app.state.image_workers.pool.submit(gc.get_freeze_count).result(timeout=60) > 1_000
        assert c.get("/api/stats").json()["gc"]["frozen_objects"] == gc.get_freeze_count() == 0


def test_serve_says_when_its_model_was_never_calibrated(monkeypatch, capsys, tmp_path):
    """A run folder fresh from `train` or `finetune` was served without a word: its uncalibrated confidences passed
    a scribble as "an 8, 85% sure". The bundled model, calibrated, gets no note."""
    import gc

    import torch
    import uvicorn

    from digitrec import server

    def run(self, sockets=None):
        self.started = True

    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # serve's one thread would slow later tests
    checkpoint = random_checkpoint(tmp_path / "model.safetensors")
    try:
        server.serve(checkpoint, backend="torch", port=0, feedback_db=tmp_path / "a.sqlite")
        uncalibrated = capsys.readouterr().out
        server.serve(backend="torch", port=0, feedback_db=tmp_path / "b.sqlite")
        bundled = capsys.readouterr().out
    finally:
        gc.unfreeze()
    assert f"digitrec: note: {checkpoint} was never calibrated" in uncalibrated
    assert "`digitrec calibrate MODEL` fixes that" in uncalibrated
    assert "serving" in bundled and "calibrated" not in bundled


def test_a_forced_quit_stops_at_once_without_a_traceback_per_request(monkeypatch, capsys, caplog, tmp_path):
    """A second Ctrl-C makes uvicorn cancel every request in flight and log each one's CancelledError traceback
    (50 lines apiece: 2,280 lines of output for 30 students' reads); now one line says how many were cut short."""
    import gc
    import logging

    import torch
    import uvicorn

    from digitrec import server

    def forced_quit(self, sockets=None):  # what uvicorn does on a second Ctrl-C with three requests running
        self.started = True
        # uvicorn.Config set its own logging up (no propagation to the root logger that caplog listens on)
        logging.getLogger("uvicorn.error").addHandler(caplog.handler)
        for _ in range(3):
            try:
                raise asyncio.CancelledError()
            except asyncio.CancelledError as exc:
                logging.getLogger("uvicorn.error").error("Exception in ASGI application\n", exc_info=exc)
        raise KeyboardInterrupt

    monkeypatch.setattr(uvicorn.Server, "run", forced_quit)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # serve's one thread would slow later tests
    # the cancelled lifespan never stopped the image workers: at exit their pool finished every queued photo
    # first (5.6 s after "stopped at once" with six large reads queued)
    killed = []
    monkeypatch.setattr(server.ImageWorkers, "kill", lambda self: killed.append(self))
    try:
        server.serve(backend="torch", port=0, feedback_db=tmp_path / "feedback.sqlite")  # the Ctrl-C ends it
    finally:
        gc.unfreeze()
    assert len(killed) >= 1  # the image workers, and the reading workers where they started
    assert not [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], asyncio.CancelledError)]
    assert "3 requests in flight were cut short" in capsys.readouterr().out
    uvicorn_errors = logging.getLogger("uvicorn.error")
    uvicorn_errors.error("Exception in ASGI application\n", exc_info=asyncio.CancelledError())
    assert caplog.records[-1].exc_info  # the filter went with the server: another app's logs are left alone
    uvicorn_errors.removeHandler(caplog.handler)


def _fault_benchmark():
    """benchmarks/fault_server.py, whose /proc helpers find a server's child processes."""
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "fault_server.py"
    spec = importlib.util.spec_from_file_location("fault_server", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fault_server"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the process table from /proc (Linux)")
def test_load_benchmark_finds_the_server_and_counts_its_cpu_time() -> None:
    """benchmarks/load_server.py's CPU accounting: the process behind a port, its CPU seconds, what they imply."""
    _fault_benchmark()
    load = sys.modules["load_server"]
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert load.listening_process(listener.getsockname()[1]) == os.getpid()
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))  # bound, not listening: no process serves it
            assert load.listening_process(other.getsockname()[1]) is None
    if socket.has_ipv6 and Path("/proc/net/tcp6").exists():
        with socket.socket(socket.AF_INET6) as listener6:
            try:
                listener6.bind(("::1", 0))
            except OSError:  # no IPv6 loopback here
                pass
            else:
                listener6.listen()
                assert load.listening_process(listener6.getsockname()[1]) == os.getpid()
    before, times_before = load.cpu_seconds(os.getpid()), os.times()
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    used, times_used = load.cpu_seconds(os.getpid()) - before, os.times()
    expected = (times_used.user - times_before.user) + (times_used.system - times_before.system)
    assert 0.25 <= used and abs(used - expected) <= 0.05  # /proc counts in clock ticks of 10 ms
    result = {
        "cpus": 2,
        "client_cpu_ms_per_request": 0.5,
        "server_cpu_ms_per_request": {"main_process": 1.0, "child_processes": 2.5, "children": 2},
    }
    assert load.cpu_line(result, 32) == (
        "CPU per request: server 3.50 ms (main process 1.00, 2 child processes 2.50), this client 0.50 ms: "
        "2 cores answer at most 500 requests/s at that cost, and 32 connections then wait at least 64.0 ms on average"
    )


def test_the_banner_gives_an_address_a_browser_opens() -> None:
    """`serve --host ::1` printed http://::1:8000/, which no browser opens."""
    from digitrec.server import listen_url

    assert listen_url("::1", 8000) == "http://[::1]:8000/"
    assert listen_url("::", 18200) == "http://[::]:18200/"
    assert listen_url("127.0.0.1", 8000) == "http://127.0.0.1:8000/"
    assert listen_url("localhost", 8000) == "http://localhost:8000/"


def _as_from_a_terminal() -> None:
    """In the child, before exec: Ctrl-C's default action, which a shell's background job (as under CI) ignores."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_serve_on_port_0_says_the_port_the_system_picked(tmp_path):
    """`serve --port 0` printed http://127.0.0.1:0/ (uvicorn bound its own socket after the banner)."""
    command = [sys.executable, "-m", "digitrec", "serve", "--port", "0", "--backend", "torch"]
    command += ["--feedback-db", str(tmp_path / "feedback.sqlite")]
    server = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, preexec_fn=_as_from_a_terminal
    )
    try:
        assert server.stdout is not None
        banner = next(line for line in server.stdout if "serving" in line)  # printed when it is listening
        address = banner.split(" at ")[1].split()[0]
        assert address.startswith("http://127.0.0.1:") and not address.endswith(":0/")
        assert httpx.get(address + "healthz", timeout=30).json()["status"] == "ok"
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()


def test_an_image_worker_whose_server_died_while_it_started_ends_by_itself():
    """A worker still importing when the server was killed took its new parent (init) for the server and
    watched it forever; `serve`'s SIGKILL test timed out under a loaded test run."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that is nobody's parent now, as a killed server's is
    code = f"from digitrec.imageworkers import _start_worker; _start_worker({gone.pid}); import time; time.sleep(60)"
    worker = subprocess.run([sys.executable, "-c", code], timeout=30, capture_output=True, text=True)
    assert worker.returncode == 0, worker.stderr


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc (Linux)")
@pytest.mark.parametrize("stop", ["SIGTERM", "Ctrl-C", "SIGKILL"])
def test_stopping_serve_stops_its_image_workers(tmp_path, stop):
    """uvicorn re-raises the SIGTERM it caught, so workers the app does not stop itself outlive the server.
    Ctrl-C in a terminal signals the whole process group: the workers too, which must leave stopping to the
    server rather than each print a KeyboardInterrupt traceback (and have the server start new ones). A server
    killed outright (SIGKILL, the out-of-memory killer) stops nothing: its workers notice it is gone."""
    fault = _fault_benchmark()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "digitrec", "serve", "--port", str(port), "--backend", "torch"]
    command += ["--feedback-db", str(tmp_path / "feedback.sqlite")]
    server = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a process group of its own, as a terminal gives a command
        preexec_fn=_as_from_a_terminal,
    )
    children: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None and time.monotonic() < deadline, "digitrec serve did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        children = fault.child_processes(server.pid)
        assert len(children) >= 2  # the image workers (one per core) and multiprocessing's resource tracker
        if stop == "Ctrl-C":
            os.killpg(server.pid, signal.SIGINT)
        else:
            server.send_signal(getattr(signal, stop))
        output = server.communicate(timeout=30)[0].decode()
        assert not fault.still_running(children, wait_s=10)
        assert "Traceback" not in output and "worker died" not in output, output
        assert ("Application shutdown complete." in output) == (stop != "SIGKILL")
    finally:
        if server.poll() is None:
            server.kill()
        for pid in fault.still_running(children, wait_s=0):  # leave no strays behind when it fails
            with contextlib.suppress(OSError):
                if b"multiprocessing" in (Path("/proc") / str(pid) / "cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)


def _sleep_then_echo(uploads):
    import time

    time.sleep(30)
    return uploads


@pytest.mark.parametrize("body", ["raw", "multipart"])
def test_a_request_cut_short_by_a_forced_quit_is_answered_503_in_json(tmp_path, body):
    """uvicorn cancels the requests still running on a second Ctrl-C, and answered each "Internal Server Error"
    as text/plain 500, the answer to a bug: now the client reads in JSON that the server stopped (503)."""
    from digitrec.server import STOPPED_DETAIL

    app = create_app(FakePredictor(delay_s=5), feedback_db=tmp_path / "feedback.sqlite")
    png = digit_png()
    if body == "raw":  # the page's fast path
        content_type, payload = b"image/png", png
    else:  # FastAPI's endpoint
        boundary = b"cutshort"
        content_type = b"multipart/form-data; boundary=" + boundary
        payload = (
            b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="d.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + png + b"\r\n--" + boundary + b"--\r\n"
        )
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/predict",
        "raw_path": b"/api/predict",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"localhost:8000"),
            (b"content-type", content_type),
            (b"content-length", str(len(payload)).encode()),
        ],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    sent: list[dict] = []

    async def main() -> None:
        bodies = [{"type": "http.request", "body": payload, "more_body": False}]

        async def receive() -> dict:
            if bodies:
                return bodies.pop()
            await asyncio.sleep(3600)  # the client stays
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        request = asyncio.ensure_future(app(scope, receive, send))
        await asyncio.sleep(1.0)  # the digit is with the (slow) model
        assert not sent
        request.cancel()  # what uvicorn does to every request still running when it is forced to quit
        with pytest.raises(asyncio.CancelledError):
            await request

    asyncio.run(main())
    start, answer = sent
    assert start["status"] == 503
    assert (b"content-type", b"application/json") in start["headers"]
    assert json.loads(answer["body"]) == {"detail": STOPPED_DETAIL}


def test_pillows_warnings_on_an_upload_stay_out_of_the_server_log():
    """A JPEG with a corrupt EXIF block and a PNG of 1-2x Pillow's pixel limit each put a two-line Pillow warning
    into the server log (from the size check before preprocessing), besides their answers."""
    import warnings

    from serverkit import png_claiming

    from digitrec.errors import ImageTooLargeError
    from digitrec.imageworkers import to_model_input

    image = Image.new("L", (200, 200), 255)
    ImageDraw.Draw(image).line([(50, 50), (150, 150)], fill=0, width=12)
    jpeg = io.BytesIO()
    image.save(jpeg, "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\xff\xff")  # cut short
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert to_model_input(jpeg.getvalue()).shape == (28, 28)
        with pytest.raises(ImageTooLargeError):
            to_model_input(png_claiming(9500, 9500))  # 90 megapixels: Pillow warns from 89
    assert [str(w.message) for w in caught] == []


def test_killed_image_workers_end_at_once_without_finishing_their_chunks():
    """A forced quit's ImageWorkers.kill: the workers' chunks are dropped, not finished (a 30 s chunk here)."""
    from digitrec.imageworkers import ImageWorkers

    async def main() -> list:
        workers = ImageWorkers(1, max_chunk=1, work=_sleep_then_echo)
        await workers.start()
        processes = list(workers.pool._processes.values())
        waiting = asyncio.ensure_future(workers(b"x"))
        await asyncio.sleep(0.5)  # the chunk is in the worker
        workers.kill()
        waiting.cancel()
        return processes

    processes = asyncio.run(main())
    assert len(processes) == 1
    processes[0].join(timeout=60)  # a hang fails here; a worker that finished its chunk would take 30 s
    # ended by a signal (exit code -SIGTERM or -SIGKILL), not a clean exit after its chunk was done
    assert not processes[0].is_alive() and processes[0].exitcode < 0, processes[0].exitcode


def test_a_request_whose_client_left_is_cancelled_and_its_photo_never_reaches_a_worker(monkeypatch):
    """Eight 40-megapixel reads sent and abandoned were all read (and counted as answered): a small read sent
    after them waited 13.5 s. A waiting request now sees its client go, and its queued photo is dropped."""
    from digitrec.imageworkers import ImageWorkers
    from digitrec.server import ClientGone, while_connected

    class Gone:
        async def is_disconnected(self) -> bool:
            return True

    async def main() -> tuple[list, bool]:
        workers = ImageWorkers(1, max_chunk=4)
        started: list = []

        async def run(chunk):  # what the pool would be given
            started.append([data for data, _ in chunk])
            await asyncio.sleep(3600)

        monkeypatch.setattr(workers, "_run", run)
        workers.max_in_flight = 1
        first = asyncio.ensure_future(workers(b"first"))  # in flight at once
        await asyncio.sleep(0)
        with pytest.raises(ClientGone):
            await while_connected(Gone(), workers(b"abandoned"))  # queued behind it, then its client left
        kept = asyncio.ensure_future(workers(b"kept"))
        await asyncio.sleep(0)
        workers.in_flight = 0  # the first chunk is done
        workers._dispatch()
        await asyncio.sleep(0)
        for task in (first, kept, *workers.tasks):
            task.cancel()
        workers.pool.shutdown()
        return started, first.cancelled()

    started, _ = asyncio.run(main())
    assert started == [[b"first"], [b"kept"]]  # the abandoned photo never went to a worker


def test_a_client_gone_is_answered_499_on_every_path_without_a_traceback(predictor, db_path, monkeypatch):
    """The page's uploads (the fast path of /api/predict) never checked for a client that had left, and on the
    other paths a ClientGone reached Starlette's error middleware, which logged a traceback for each."""
    from digitrec import server

    async def gone(request, work):
        work.close()  # the coroutine the workers would have run: never awaited
        raise server.ClientGone

    monkeypatch.setattr(server, "while_connected", gone)
    # raise_server_exceptions (the default): an exception that reached the error middleware fails the request
    with TestClient(
        create_app(predictor, feedback_db=db_path, preprocess_processes=1), base_url=BASE_URL
    ) as c:
        fast = c.post("/api/predict", files=upload(digit_png()))  # multipart "file", no query: the fast path
        slow = c.post("/api/predict?explain=true", files=upload(digit_png()))
        assert fast.status_code == slow.status_code == 499
        assert "closed the connection" in fast.json()["detail"]
        assert c.get("/api/stats").json()["requests"]["predict"] == 0
