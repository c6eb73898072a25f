"""What a school network's review of the server asks: what other sites' pages may make a visitor's browser do,
the page's security headers, and request bodies built to cost the server far more than they cost the sender."""

from __future__ import annotations

import base64
import json
import sqlite3

import numpy as np
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
    assert client.get("/static/index.html").headers["content-security-policy"] == policy  # the same page
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


# ------------------------------------------------------------------------------------ the feedback database


def padded_png(size: int) -> bytes:
    """A digit PNG padded to `size` bytes with a private chunk, which every decoder skips: stored as sent."""
    import os
    import struct
    import zlib

    png = digit_png()
    pad = os.urandom(size - len(png) - 12)
    chunk = struct.pack(">I", len(pad)) + b"prVt" + pad + struct.pack(">I", zlib.crc32(b"prVt" + pad))
    return png[:-12] + chunk + png[-12:]  # before IEND


def test_corrections_past_the_databases_limit_are_507_and_store_nothing(tmp_path):
    """Each correction keeps the image as sent, up to 5 MB, and nothing limited the database: 20 corrections of
    a digit padded to 5 MB took 2 s and 105 MB, so one client could fill the server's disk at 50 MB/s."""
    from digitrec.feedback import FeedbackStore

    path = tmp_path / "feedback.sqlite"
    app = create_app(FakePredictor(), feedback_db=FeedbackStore(path, max_mb=2))
    image = padded_png(300_000)
    with TestClient(app) as client:
        answers = [
            client.post("/api/feedback", files={"file": ("d.png", image, "image/png")}, data={"label": "3"})
            for _ in range(10)
        ]
        assert client.post("/api/predict", files={"file": ("d.png", image, "image/png")}).status_code == 200
    codes = [answer.status_code for answer in answers]
    assert codes == [201] * 6 + [507] * 4  # 6 x 0.3 MB fit in 2 MB, with SQLite's pages around them
    assert answers[-1].json() == {
        "detail": "the feedback database has reached its limit of 2 MB, so the correction was not stored; the "
        "server's operator can export the corrections and start a new database, or raise --feedback-max-mb."
    }
    assert stored(path) == 6
    assert path.stat().st_size <= 2 * 1024 * 1024


def test_a_full_disk_is_named_as_such(tmp_path, monkeypatch):
    """SQLite says SQLITE_FULL for a full disk too: that was a 500."""
    import shutil
    import sqlite3 as sqlite

    from digitrec.errors import FeedbackFullError
    from digitrec.feedback import FeedbackStore

    store = FeedbackStore(tmp_path / "feedback.sqlite", max_mb=1)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4096))
    with pytest.raises(FeedbackFullError, match="^the disk that holds the feedback database is full"):
        store.add(label=3, image=padded_png(2_000_000), input28=np.zeros((28, 28), np.uint8))
    with sqlite.connect(store.path) as con:
        assert con.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 0


def test_a_disk_that_fills_as_the_correction_is_committed_is_507_too(tmp_path, monkeypatch):
    """SQLite writes a small correction's new pages to the file only at COMMIT, so a full disk (measured on a
    256 KB tmpfs: "database or disk is full" from the commit) raised past add's check of the INSERT: a 500."""
    import shutil

    from digitrec.feedback import FeedbackStore

    path = tmp_path / "feedback.sqlite"
    store = FeedbackStore(path)
    connect = FeedbackStore._connect

    class FullAtCommit:
        """A connection whose COMMIT meets a full disk, as SQLite reports it."""

        def __init__(self, con: sqlite3.Connection):
            self.con = con

        def __getattr__(self, name: str):
            return getattr(self.con, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc_info) -> None:
            self.con.rollback()
            if exc_info[0] is None:
                full = sqlite3.OperationalError("database or disk is full")
                full.sqlite_errorcode = 13  # SQLITE_FULL
                raise full

    monkeypatch.setattr(FeedbackStore, "_connect", lambda self: FullAtCommit(connect(self)))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage._replace(free=0))
    with TestClient(create_app(FakePredictor(), feedback_db=store)) as client:
        answer = client.post(
            "/api/feedback", files={"file": ("d.png", digit_png(), "image/png")}, data={"label": "3"}
        )
    assert answer.status_code == 507
    assert answer.json()["detail"].startswith("the disk that holds the feedback database is full")
    assert stored(path) == 0


def test_stats_name_the_database_file_but_not_the_folders_above_it(client, db_path):
    """/api/stats gave any visitor the database's absolute path: /home/<the operator's user name>/.local/..."""
    response = client.get("/api/stats")
    assert response.json()["feedback"]["database"] == "feedback.sqlite"
    assert str(db_path.parent) not in response.text


# ------------------------------------------------------------------------------------ feedback export


def store_with_a_three(tmp_path):
    from digitrec.feedback import FeedbackStore

    store = FeedbackStore(tmp_path / "feedback.sqlite")
    store.add(label=3, image=digit_png(), input28=np.zeros((28, 28), np.uint8))
    return store


@pytest.mark.parametrize("name", ["3/1.png", "originals/1.png"])
def test_an_export_replaces_a_link_left_in_its_folder_instead_of_writing_through_it(tmp_path, name):
    """In a folder others may write (/tmp), a link left at 3/1.png sent the export's bytes into the file it
    pointed to: shown overwriting another file with a PNG."""
    from digitrec.feedback import export_png

    victim = tmp_path / "victim.txt"
    victim.write_text("the operator's file\n")
    out = tmp_path / "shared"
    (out / name).parent.mkdir(parents=True)
    (out / name).symlink_to(victim)
    assert export_png(store_with_a_three(tmp_path), out, originals=True) == 1
    assert victim.read_text() == "the operator's file\n"
    assert not (out / name).is_symlink() and (out / name).read_bytes().startswith(b"\x89PNG")
    assert sorted(path.name for path in (out / name).parent.iterdir()) == ["1.png"]  # no temporary left


def test_an_export_refuses_a_label_folder_that_is_a_link(tmp_path):
    from digitrec.errors import DigitrecError
    from digitrec.feedback import export_png

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "3").symlink_to(theirs)
    with pytest.raises(DigitrecError, match="3 is a symbolic link, so the export does not write into it"):
        export_png(store_with_a_three(tmp_path), tmp_path / "shared")
    assert list(theirs.iterdir()) == []
