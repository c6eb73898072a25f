"""The drawing pad on phones: all of it on the first screen, held upright or sideways, and tall enough to write a
number in with a finger (the number pad was 298x106 CSS px at 360x640, and ended 27 px below a 740x360 screen)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from serverkit import FakePredictor, keep_grad_mode, live_server  # noqa: F401 (autouse fixture)
from test_browser import browser_page, draw

from digitrec.server import create_app

SCREENS = [(360, 640), (390, 844), (412, 915), (640, 360), (740, 360), (844, 390), (915, 412), (768, 1024)]


@pytest.mark.parametrize("mode", ["digit", "number"])
@pytest.mark.parametrize("width,height", SCREENS, ids=[f"{w}x{h}" for w, h in SCREENS])
def test_on_a_phone_the_pad_is_on_the_first_screen_and_tall_enough(tmp_path, width, height, mode):
    app = create_app(FakePredictor(), feedback_db=tmp_path / "feedback.sqlite")
    phone = {
        "viewport": {"width": width, "height": height},
        "device_scale_factor": 2,
        "is_mobile": True,
        "has_touch": True,
    }
    with browser_page(app, **phone) as (page, errors, expect):
        if mode == "number":
            page.click("#mode-number")
            page.evaluate("window.scrollTo(0, 0)")
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        box = page.locator("#pad-wrap").bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= width, box
        assert box["y"] >= 0 and box["y"] + box["height"] <= height, box  # no scrolling to reach its foot
        assert box["height"] >= 150, box  # room for a finger's digits
        # the canvas has the shape it is shown in: the ink is not stretched (the pad's 2 px border aside)
        shown = page.locator("#pad").bounding_box()
        canvas = page.evaluate("() => [pad.width, pad.height]")
        assert abs(canvas[0] / canvas[1] / (shown["width"] / shown["height"]) - 1) < 0.03, (canvas, shown)
        # a finger's targets: the modes and tools at least 44 CSS px high (33 and 42 before)
        for button in page.locator(".mode, .tool").all():
            if button.is_visible():
                assert button.bounding_box()["height"] >= 44
        assert errors == []


INK = """() => { const d = ctx.getImageData(0, 0, pad.width, pad.height).data; let n = 0, right = 0;
           for (let i = 0; i < d.length; i += 4) if (d[i] < 128) { n++; right = Math.max(right, (i / 4) % pad.width); }
           return [n, right, pad.width]; }"""  # dark pixels, the rightmost one's column, the canvas width


@contextlib.contextmanager
def _sideways_number_pad(tmp_path) -> Iterator[tuple[Any, list[str], Any, list[str]]]:
    """A phone held sideways (640x360) in the number mode: (page, errors, expect, the /api/read requests sent)."""
    app = create_app(FakePredictor(), feedback_db=tmp_path / "feedback.sqlite")
    with browser_page(app, viewport={"width": 640, "height": 360}, device_scale_factor=2) as (
        page,
        errors,
        expect,
    ):
        page.click("#mode-number")
        reads: list[str] = []
        page.on("request", lambda request: reads.append(request.url) if "/api/read" in request.url else None)
        yield page, errors, expect, reads


def _idle(page) -> None:
    """Wait until no read is on its way or waiting to be sent."""
    page.wait_for_function("() => !state.inFlight && !state.dirty")
    page.wait_for_timeout(300)


def test_turning_the_phone_keeps_the_number_whole_and_reads_it_again(tmp_path):
    """Ink across a sideways phone's number pad (1,120 canvas px wide) stays on the pad once it is upright, is read
    again there, and keeps its size when the phone is turned back and forth (it shrank by 0.625 each time)."""
    with _sideways_number_pad(tmp_path) as (page, errors, expect, reads):
        draw(page, [(0.05, 0.2), (0.05, 0.8)])
        draw(page, [(0.95, 0.2), (0.95, 0.8)])
        expect(page.locator("#number")).not_to_have_text("–", timeout=10_000)
        _idle(page)
        before = page.evaluate(INK)
        sent = len(reads)
        page.set_viewport_size({"width": 360, "height": 640})
        page.wait_for_function("() => pad.width === 700")
        _idle(page)
        # the turned pad's drawing is read again (its boxes were in the old shape)
        assert len(reads) == sent + 1
        after = page.evaluate(INK)
        assert after[1] < after[2] - 5 and after[0] > 0.3 * before[0]  # the right-hand stroke is still on it
        shown = page.locator("#pad").bounding_box()
        assert abs(after[2] / 400 / (shown["width"] / shown["height"]) - 1) < 0.03
        for _ in range(2):  # back and forth: the ink, now on the narrower pad, keeps its size
            page.set_viewport_size({"width": 640, "height": 360})
            page.wait_for_function("() => pad.width === 1120")
            page.set_viewport_size({"width": 360, "height": 640})
            page.wait_for_function("() => pad.width === 700")
        _idle(page)
        again = page.evaluate(INK)
        assert abs(again[0] - after[0]) < 0.05 * after[0] and abs(again[1] - after[1]) <= 2
        # Undo on a pad of the same shape shrinks nothing, even ink at its very edge
        draw(page, [(0.99, 0.3), (0.99, 0.7)])
        edge = page.evaluate(INK)[1]
        draw(page, [(0.5, 0.4), (0.5, 0.6)])
        page.click("#undo")
        page.wait_for_timeout(300)
        assert page.evaluate(INK)[1] == edge
        assert errors == []


def test_turning_the_phone_does_not_read_a_photo_again(tmp_path):
    """A photo's boxes are in its own pixels: a turned phone draws them again, it does not send the photo again."""
    from test_browser import photo_of_seventeen

    with _sideways_number_pad(tmp_path) as (page, errors, expect, reads):
        page.set_input_files("#upload", str(photo_of_seventeen(tmp_path / "17.png")))
        expect(page.locator("#number")).not_to_have_text("–", timeout=10_000)
        _idle(page)
        sent = len(reads)
        boxes = "() => boxCtx.getImageData(0, 0, boxes.width, boxes.height).data.filter((v, i) => i % 4 == 3 && v).length"
        assert page.evaluate(boxes) > 0
        page.set_viewport_size({"width": 360, "height": 640})
        page.wait_for_function("() => pad.width === 700")
        _idle(page)
        assert len(reads) == sent and page.evaluate(boxes) > 0  # not read again, its boxes drawn again
        assert errors == []


def test_a_short_desktop_window_keeps_the_number_beside_the_pad(tmp_path):
    """The one-column layout is for touch screens held sideways: a desktop window 540 px high kept the number's
    card beside the pad, and lost it below the screen once short screens of any kind took one column."""
    app = create_app(FakePredictor(), feedback_db=tmp_path / "feedback.sqlite")
    with browser_page(app, viewport={"width": 1280, "height": 540}) as (page, errors, expect):
        page.click("#mode-number")
        page.evaluate("window.scrollTo(0, 0)")
        assert page.locator("#number").bounding_box()["y"] < 540
        assert errors == []
