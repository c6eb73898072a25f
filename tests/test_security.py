"""What a school network's review of the server asks: what other sites' pages may make a visitor's browser do,
the page's security headers, and request bodies built to cost the server far more than they cost the sender."""

from __future__ import annotations

import base64
import json
import re
import sqlite3

import numpy as np
import pytest
from serverkit import BASE_URL, FakePredictor, digit_png, keep_grad_mode  # noqa: F401 (autouse fixture)

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from digitrec.server import create_app  # noqa: E402


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "feedback.sqlite"


@pytest.fixture
def client(db_path):
    with TestClient(create_app(FakePredictor(), feedback_db=db_path), base_url=BASE_URL) as c:
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
        {"sec-fetch-site": "same-site", "origin": "http://localhost:8001"},  # another port of the same host
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
        {"sec-fetch-site": "same-origin", "origin": "http://localhost:8000"},  # the page itself
        {"sec-fetch-site": "same-origin", "origin": "https://digits.school.example"},  # behind a proxy
        {"origin": "http://LocalHost:8000"},  # an older browser on the page itself
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
    # and at an address that ends otherwise (Starlette serves the page at it; it came without its policy)
    for address in ("/static/index.html/", "/static/./index.html", "/static//index.html"):
        same = client.get(address)
        assert same.status_code == 200 and same.headers["content-security-policy"] == policy, address
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
    with TestClient(app, base_url=BASE_URL) as client:
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
    with TestClient(create_app(FakePredictor(), feedback_db=store), base_url=BASE_URL) as client:
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


# ------------------------------------------------------------------------------------ DNS rebinding


def rebound_detail(host: str) -> str:
    return (
        f"this server does not answer to the host name {host!r}; if that is the name you reach it by, restart "
        f"digitrec serve with --allowed-hosts {host} (an app of your own: create_app(..., allowed_hosts=[{host!r}]))."
    )


REQUESTS = [  # every kind of path: the page, static files, the API (and its fast path), docs, a 404
    ("GET", "/", {}),
    ("HEAD", "/", {}),
    ("GET", "/static/app.js", {}),
    ("GET", "/static/index.html", {}),
    ("GET", "/healthz", {}),
    ("GET", "/api/stats", {}),
    ("OPTIONS", "/api/predict", {}),
    ("POST", "/api/predict", {"files": correction()["files"]}),  # answered by the fast path
    ("POST", "/api/predict?explain=true", {"files": correction()["files"]}),
    ("POST", "/api/feedback", correction()),
    ("GET", "/docs", {}),
    ("GET", "/openapi.json", {}),
    ("GET", "/nothing", {}),
]


def test_a_rebound_host_is_refused_on_every_path_and_stores_nothing(db_path):
    """DNS rebinding: a page at http://evil.example:8000 whose name the attacker re-resolves to 127.0.0.1 is
    same-origin with the server there, so the visitor's browser let it read /api/stats and post corrections (its
    requests say Sec-Fetch-Site: same-origin); only its Host header tells it apart."""
    app = create_app(FakePredictor(), feedback_db=db_path)
    headers = {"sec-fetch-site": "same-origin", "origin": "http://evil.example:8000"}
    with TestClient(app, base_url="http://evil.example:8000") as rebound:
        for method, path, extra in REQUESTS:
            response = rebound.request(method, path, headers=headers, **extra)
            assert response.status_code == 400, (method, path)
            assert response.headers["content-type"] == "application/json"
            assert response.headers["x-frame-options"] == "DENY"
            if method != "HEAD":
                assert response.json() == {"detail": rebound_detail("evil.example")}, (method, path)
        stats = rebound.get("/api/stats", headers={"host": "localhost:8000"}).json()
    assert stats["requests"]["client_errors"] == len(REQUESTS)
    assert stored(db_path) == 0


HOSTS_AT_THE_DEFAULT = [
    # loopback names, any port, in any case, IPv6 in brackets: answered
    ("localhost", 200),
    ("localhost:8000", 200),
    ("LocalHost:8000", 200),
    ("localhost.:8000", 200),  # the fully qualified form
    ("127.0.0.1", 200),
    ("127.0.0.1:8000", 200),
    ("127.0.0.2:8000", 200),  # all of 127.0.0.0/8 is loopback
    ("[::1]", 200),
    ("[::1]:8000", 200),
    ("[0:0:0:0:0:0:0:1]:8000", 200),
    # names a rebinding page has, and Host headers that are no host name: refused
    ("evil.example", 400),
    ("evil.example:8000", 400),
    ("localhost.evil.example:8000", 400),
    ("127.0.0.1.evil.example", 400),
    ("192.168.1.10:8000", 400),
    ("[fd00::1]:8000", 400),
    ("testserver", 400),
    ("::1:8000", 400),  # IPv6 without brackets: the address ::1:8000, not port 8000 of ::1
    ("[::1", 400),
    ("localhost:http", 400),
    ("localhost:8000:8000", 400),
    ("", 400),
]


def test_at_the_default_only_loopback_names_are_answered(db_path):
    app = create_app(FakePredictor(), feedback_db=db_path)
    with TestClient(app, base_url=BASE_URL) as client:
        got = [
            (host, client.get("/api/stats", headers={"host": host}).status_code)
            for host, _ in HOSTS_AT_THE_DEFAULT
        ]
        assert got == HOSTS_AT_THE_DEFAULT
        malformed = client.get("/healthz", headers={"host": "[::1"})
    assert malformed.json() == {
        "detail": "the request's Host header is missing, repeated or not a host name; send the name or address "
        "you reached this server by."
    }


def test_allowed_hosts_names_are_answered_and_others_are_not(db_path):
    """A teacher's machine behind a proxy that passes Host on, or reached by its name on the school network."""
    app = create_app(
        FakePredictor(),
        feedback_db=db_path,
        allowed_hosts="digits.school.example, .lan,[fd00::1],192.168.1.10",
    )
    expected = {
        "digits.school.example": 200,
        "DIGITS.school.example.:443": 200,
        "lan": 200,
        "pc42.lan:8000": 200,
        "a.b.lan": 200,
        "[fd00::1]:8000": 200,
        "[fd00:0::1]": 200,
        "192.168.1.10:8000": 200,
        "localhost:8000": 200,  # loopback names stay answered
        "[::1]:8000": 200,
        "school.example": 400,
        "other.school.example": 400,
        "evillan": 400,
        "lan.evil.example": 400,
        "[fd00::2]": 400,
        "192.168.1.11": 400,
    }
    with TestClient(app, base_url=BASE_URL) as client:
        got = {host: client.get("/healthz", headers={"host": host}).status_code for host in expected}
        assert got == expected
        assert client.get("/", headers={"host": "pc42.lan.evil.example"}).json() == {
            "detail": rebound_detail("pc42.lan.evil.example")
        }
    # a list is the same as the comma-separated string, and "*.lan" the same as ".lan"
    listed = create_app(FakePredictor(), feedback_db=db_path, allowed_hosts=["*.lan"])
    with TestClient(listed, base_url="http://pc42.lan:8000") as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/healthz", headers={"host": "evil.example"}).status_code == 400


@pytest.mark.parametrize("allowed", ["*", ["*"], "digits.school.example,*"])
def test_a_star_answers_every_host(db_path, allowed):
    app = create_app(FakePredictor(), feedback_db=db_path, allowed_hosts=allowed)
    with TestClient(app, base_url="http://evil.example:8000") as client:
        for host in ("evil.example:8000", "testserver", "[fd00::1]", "localhost"):
            assert client.get("/healthz", headers={"host": host}).status_code == 200
        assert client.post("/api/feedback", **correction()).status_code == 201


@pytest.mark.parametrize(
    "allowed, message",
    [
        ("digits.school.example:8000", "'digits.school.example:8000' names a port; list the host name alone"),
        (
            "http://digits.school.example/",
            "'http://digits.school.example/' is a URL; list its host name alone",
        ),
        ("a,,b", "'a,,b' has an empty entry"),
        ("*.", "'*.' is not a host name"),
        ("evil*.example", "'evil*.example' is not a host name"),
        (["ok.example", 3], "allowed hosts are names given as strings, and 3 is not one"),  # AttributeError
        (3, "allowed hosts are names given as strings, and 3 is not one"),  # TypeError
    ],
)
def test_create_app_refuses_an_allowed_host_that_is_no_host_name(db_path, allowed, message):
    from digitrec.errors import DigitrecError

    with pytest.raises(DigitrecError, match="^" + re.escape(message)):
        create_app(FakePredictor(), feedback_db=db_path, allowed_hosts=allowed)


def test_a_websocket_handshake_with_a_rebound_host_is_closed_as_a_policy_violation(db_path):
    """The app has no WebSocket route; a handshake sent to another name is closed with 1008 before routing."""
    from starlette.websockets import WebSocketDisconnect

    app = create_app(FakePredictor(), feedback_db=db_path)
    with TestClient(app, base_url=BASE_URL) as client:
        # websocket_connect's own default is ws://testserver, whatever base_url says
        with (
            pytest.raises(WebSocketDisconnect) as rebound,
            client.websocket_connect("ws://evil.example:8000/ws"),
        ):
            pass
        with pytest.raises(WebSocketDisconnect) as local, client.websocket_connect("ws://localhost:8000/ws"):
            pass
    assert rebound.value.code == 1008
    assert local.value.code == 1000  # no such route: Starlette's own close


def raw_request(url: str, request: bytes) -> bytes:
    import socket

    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_on_a_live_server_a_missing_or_repeated_host_header_is_refused(db_path):
    """HTTP/1.0 lets a request leave Host out, and uvicorn passes a repeated Host on: a browser sends neither,
    and which of two names a request meant is unknown."""
    from serverkit import live_server

    with live_server(create_app(FakePredictor(), feedback_db=db_path)) as url:
        for request in (
            b"GET /api/stats HTTP/1.0\r\n\r\n",
            b"GET /api/stats HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
            b"GET /api/stats HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
        ):
            assert raw_request(url, request).startswith(b"HTTP/1.1 400 "), request
        ok = raw_request(url, b"GET /api/stats HTTP/1.1\r\nHost: [::1]:8000\r\nConnection: close\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200 ")


# ------------------------------------------------------------------------------------ serve's default and flag


@pytest.fixture
def served_app(monkeypatch, tmp_path):
    """`main(["serve", ...])` up to uvicorn: returns a function that runs it and gives the app it would serve
    (the FakePredictor instead of a model, no worker processes, no uvicorn)."""
    import torch

    from digitrec import server
    from digitrec.cli import main

    apps = []
    real_create_app = server.create_app
    predictor = FakePredictor()
    predictor.model_id = "sha256:fake"  # the banner names it
    monkeypatch.setattr(server, "load_for_serving", lambda model, backend: predictor)
    monkeypatch.setattr(
        server,
        "create_app",
        lambda predictor, **kw: real_create_app(predictor, **kw | {"preprocess_processes": 0}),
    )
    monkeypatch.setattr(
        server, "run_uvicorn", lambda uvicorn_server, sock: apps.append(uvicorn_server.config.app)
    )
    monkeypatch.setattr(server, "freeze_heap", lambda: None)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)

    def serve(*argv: str):
        feedback = ["--feedback-db", str(tmp_path / "feedback.sqlite")]
        assert main(["serve", "--port", "0", *feedback, *argv]) == 0
        return apps.pop()

    return serve


def answers(app, hosts: list[str]) -> dict[str, int]:
    with TestClient(app, base_url=BASE_URL) as client:
        return {host: client.get("/healthz", headers={"host": host}).status_code for host in hosts}


def test_serve_on_loopback_answers_only_loopback_names_by_default(served_app):
    hosts = ["localhost:8000", "127.0.0.1:8000", "[::1]:8000", "evil.example:8000", "192.168.1.10:8000"]
    for argv in ([], ["--host", "127.0.0.1"], ["--host", "localhost"]):
        assert answers(served_app(*argv), hosts) == dict(zip(hosts, [200, 200, 200, 400, 400])), argv


def test_serve_on_every_interface_answers_any_host_by_default_and_only_those_named_with_the_flag(served_app):
    """A teacher serving a class on 0.0.0.0: students reach it by whatever name or address their network gives
    it, so every Host is answered, as Jupyter does; --allowed-hosts narrows that to the names given."""
    hosts = ["localhost:8000", "pc42.lan:8000", "192.168.1.10:8000", "evil.example:8000"]
    assert answers(served_app("--host", "0.0.0.0"), hosts) == dict.fromkeys(hosts, 200)
    narrowed = served_app("--host", "0.0.0.0", "--allowed-hosts", "pc42.lan,192.168.1.10")
    assert answers(narrowed, hosts) == dict(zip(hosts, [200, 200, 200, 400]))
    # on loopback the flag adds names (a reverse proxy that passes Host on)
    proxied = served_app("--allowed-hosts", "digits.school.example")
    assert answers(proxied, ["digits.school.example", "localhost", "evil.example"]) == {
        "digits.school.example": 200,
        "localhost": 200,
        "evil.example": 400,
    }
    assert answers(served_app("--allowed-hosts", "*"), ["evil.example:8000"]) == {"evil.example:8000": 200}


def test_serve_answers_the_name_given_to_host_when_allowed_hosts_narrows_it(served_app):
    """The banner's URL names --host: with --allowed-hosts, that name is answered too."""
    app = served_app("--host", "localhost", "--allowed-hosts", "digits.school.example")
    assert answers(app, ["localhost:8000", "digits.school.example", "evil.example"]) == {
        "localhost:8000": 200,
        "digits.school.example": 200,
        "evil.example": 400,
    }
    # `--host 0.0.0.0` prints http://0.0.0.0:PORT/, which a browser on the same machine opens
    app = served_app("--host", "0.0.0.0", "--allowed-hosts", "pc42.lan")
    assert answers(app, ["0.0.0.0:8000", "pc42.lan", "evil.example"]) == {
        "0.0.0.0:8000": 200,
        "pc42.lan": 200,
        "evil.example": 400,
    }


def test_serve_says_when_it_answers_any_host_name(served_app, capsys):
    """A server on 0.0.0.0 without --allowed-hosts answers any name (a class reaches it by whatever name its
    network gives it), which lets a DNS-rebinding page through: the banner says so, and what to pass."""
    hint = "--allowed-hosts NAMES answers only those and shuts out DNS-rebinding pages"
    served_app("--host", "0.0.0.0")
    assert f"digitrec: answering any Host name (listening on 0.0.0.0); {hint}" in capsys.readouterr().out
    served_app("--host", "0.0.0.0", "--allowed-hosts", "*")
    assert f"digitrec: answering any Host name (--allowed-hosts *); {hint}" in capsys.readouterr().out
    for argv in (["--host", "0.0.0.0", "--allowed-hosts", "pc42.lan"], ["--host", "127.0.0.1"]):
        served_app(*argv)
        printed = capsys.readouterr().out
        assert "digitrec: serving" in printed and "any Host name" not in printed


def test_serve_answers_a_host_name_that_resolves_to_loopback_without_allowed_hosts():
    """`serve --host vm` (a name in /etc/hosts for 127.0.1.1, as Debian writes the machine's own name) printed
    http://vm:8000/ and answered that URL with 400: a loopback bind answered loopback names only."""
    from digitrec.hosts import host_of
    from digitrec.server import serving_hosts

    allowed = serving_hosts("vm", "127.0.1.1", None)
    assert allowed.allows(host_of("vm:8000")) and allowed.allows(host_of("localhost:8000"))
    assert not allowed.allows(host_of("evil.example:8000"))


@pytest.mark.parametrize(
    "value, message",
    [
        ("digits.school.example:8000", "'digits.school.example:8000' names a port; list the host name alone"),
        ("http://pc42.lan:8000", "'http://pc42.lan:8000' is a URL; list its host name alone (pc42.lan)"),
        ("pc42.lan,,x", "'pc42.lan,,x' has an empty entry"),
        ("*evil", "'*evil' is not a host name; list host names such as digits.school.example"),
    ],
)
def test_a_bad_allowed_hosts_is_one_sentence_before_anything_loads(value, message):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "digitrec", "serve", "--port", "0", "--allowed-hosts", value],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"digitrec serve: error: argument --allowed-hosts: {message}" in result.stderr
    assert "serving" not in result.stdout
