"""What a school network's review of the server asks: what other sites' pages may make a visitor's browser do,
the page's security headers, and request bodies built to cost the server far more than they cost the sender."""

from __future__ import annotations

import base64
import json
import sqlite3

import pytest
from serverkit import FakePredictor, digit_png, keep_grad_mode  # noqa: F401 (autouse fixture)

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from digitrec.server import create_app  # noqa: E402


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "feedback.sqlite"


@pytest.fixture
def client(db_path):
    with TestClient(create_app(FakePredictor(), feedback_db=db_path)) as c:
        yield c


def stored(db_path) -> int:
    with sqlite3.connect(db_path) as con:
        return con.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]


def correction() -> dict:
    return {"files": {"file": ("digit.png", digit_png(), "image/png")}, "data": {"label": "3"}}


# ------------------------------------------------------------------------------------ other sites' pages


@pytest.mark.parametrize(
    "headers",
    [
        {"sec-fetch-site": "cross-site", "origin": "http://evil.example"},
        {"sec-fetch-site": "same-site", "origin": "http://testserver:8001"},  # another port of the same host
        {"origin": "http://evil.example"},  # a browser that sends no Sec-Fetch-Site
        {"origin": "null"},  # a sandboxed frame or a file:// page
    ],
)
def test_a_correction_posted_by_another_sites_page_is_refused_and_stores_nothing(client, db_path, headers):
    """A page on any site could make a visitor's browser post corrections here (a multipart POST needs no CORS
    preflight): shown in Chromium, a page at http://localhost:18951 stored one on http://127.0.0.1:18950."""
    response = client.post("/api/feedback", headers=headers, **correction())
    assert response.status_code == 403
    assert response.json() == {
        "detail": "a page on another site may not send requests here; use the page this server serves."
    }
    assert stored(db_path) == 0
    # the fast path for plain uploads is behind the same guard
    predict = client.post("/api/predict", headers=headers, files=correction()["files"])
    assert predict.status_code == 403


@pytest.mark.parametrize(
    "headers",
    [
        {"sec-fetch-site": "same-origin", "origin": "http://testserver"},  # the page itself
        {"sec-fetch-site": "same-origin", "origin": "https://digits.school.example"},  # behind a proxy
        {"origin": "http://TestServer"},  # an older browser on the page itself
        {"sec-fetch-site": "none"},  # typed by the user
        {},  # curl, scripts
    ],
)
def test_the_page_itself_and_clients_that_are_no_browser_may_post(client, db_path, headers):
    assert client.post("/api/feedback", headers=headers, **correction()).status_code == 201
    assert client.post("/api/predict", headers=headers, files=correction()["files"]).status_code == 200
    assert stored(db_path) == 1


def test_the_page_forbids_framing_sniffing_and_content_from_elsewhere(client):
    """The page had no Content-Security-Policy, X-Frame-Options, X-Content-Type-Options or Referrer-Policy."""
    page = client.get("/")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "'unsafe-inline'" not in policy and "'unsafe-eval'" not in policy
    for response in (page, client.get("/static/app.js"), client.get("/healthz"), client.get("/nothing")):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"
    fast = client.post("/api/predict", files=correction()["files"])
    assert fast.status_code == 200 and fast.headers["x-frame-options"] == "DENY"
    # /docs runs Swagger UI's inline script: the page's policy is the page's only
    assert "content-security-policy" not in client.get("/docs").headers


# ------------------------------------------------------------------------------------ costly bodies


@pytest.mark.parametrize("filler", ["0", "{}", "[]", '"a"'])
def test_json_of_thousands_of_small_values_is_refused_before_it_is_parsed(client, filler):
    """5 MB of [0,0,...] or [{},{},...] beside a valid image held the event loop, and every other request, for
    0.2-1 s while it was parsed, into 20-130 MB of objects; our JSON holds a few fields."""
    image = base64.b64encode(digit_png()).decode()
    body = json.dumps({"image": image, "x": "VALUES"}).replace(
        '"VALUES"', "[" + ",".join([filler] * 100_000) + "]"
    )
    response = client.post("/api/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["detail"] == (
        'the JSON holds more than 64 values; send an object with "image" and, for /api/feedback, '
        '"label" and "predicted".'
    )


def test_json_with_the_fields_we_read_and_a_data_url_is_still_read(client, db_path):
    image = "data:image/png;base64," + base64.b64encode(digit_png()).decode()
    body = json.dumps({"image": image, "label": 3, "predicted": 7, "note": "a, b, [c]"})
    response = client.post("/api/feedback", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 201
    assert stored(db_path) == 1


def test_stats_name_the_database_file_but_not_the_folders_above_it(client, db_path):
    """/api/stats gave any visitor the database's absolute path: /home/<the operator's user name>/.local/..."""
    response = client.get("/api/stats")
    assert response.json()["feedback"]["database"] == "feedback.sqlite"
    assert str(db_path.parent) not in response.text
