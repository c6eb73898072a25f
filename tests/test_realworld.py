"""The real-world set generator, the robust augmentation and calibration: seeded, well-formed, and measuring right."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from digitrec import realworld
from digitrec.augment_real import negative_bank, robust_augment
from digitrec.calibrate import choose_threshold, expected_calibration_error, fit_temperature
from digitrec.errors import DigitrecError
from digitrec.realworld import SETS, WRITTEN_LIST, WRITTEN_NAME, generate, write_set

FAKE_MNIST = (np.random.default_rng(0).integers(0, 255, (50, 28, 28)).astype(np.uint8), np.arange(50) % 10)


@pytest.mark.parametrize("name", SETS)
def test_sets_are_deterministic_decodable_and_labelled(name):
    first = list(generate(name, 4, seed=3, mnist=FAKE_MNIST))
    again = list(generate(name, 4, seed=3, mnist=FAKE_MNIST))
    other = list(generate(name, 4, seed=4, mnist=FAKE_MNIST))
    assert [s.data for s in first] == [s.data for s in again]
    assert [s.data for s in first] != [s.data for s in other]
    for sample in first:
        image = Image.open(io.BytesIO(sample.data))
        image.load()
        assert min(image.size) >= 8
        if name == "negatives":
            assert sample.label is None and sample.kind.startswith("negative-")
        elif name in realworld.TWO_LINE_SETS:
            top, bottom = sample.label.split("\n")
            assert top.isdigit() and bottom.isdigit() and len(top) >= 2 and len(bottom) >= 2
        else:
            assert sample.label.isdigit()
        if name == "numbers":
            assert len(sample.boxes) == len(sample.label) >= 2
            assert all(0 <= x < image.width and 0 <= y < image.height for x, y, _, _ in sample.boxes)
        elif name not in ("negatives", *realworld.TWO_LINE_SETS):
            assert len(sample.label) == 1


@pytest.mark.parametrize("gap", [-9.0, 0.0, 6.0])
def test_close_lines_stand_the_gap_apart_in_their_ink_rows(gap):
    """close-lines: the bottom line's first ink row lies `gap` rows under the top line's last (above it when
    negative), and every stroke of both lines is on the page."""
    top, bottom = np.zeros((60, 40), np.float32), np.zeros((70, 50), np.float32)
    top[5:50, 3:30] = 1.0  # ink rows 5-49
    bottom[8:66, 10:45] = 0.5  # ink rows 8-65
    page = realworld._close_together(top, bottom, gap)
    rows = np.flatnonzero(page.max(axis=1) > 0.1)
    assert rows[0] == 5 and rows[-1] == 49 + gap + 57  # bottom's 58 ink rows start at row 49 + gap
    shared_rows = max(0.0, 1 - gap)  # rows both lines ink, 20 columns wide: there the darker ink wins
    assert page.sum() == pytest.approx(top.sum() + bottom.sum() - 0.5 * 20 * shared_rows)
    assert "close-lines" not in realworld.DEFAULT_SETS


def test_write_set_names_a_photo_of_two_numbers_by_both(tmp_path):
    (path,) = write_set("lines", 1, tmp_path, seed=2)
    top, bottom = next(generate("lines", 1, seed=2)).label.split("\n")
    assert path.stem.split("_")[1] == f"{top}-{bottom}"


def test_write_set_names_files_by_label(tmp_path):
    paths = write_set("pen-photo", 3, tmp_path)
    assert len(paths) == 3 and all(p.exists() and p.stem.split("_")[1].isdigit() for p in paths)


def test_write_set_replaces_the_files_an_earlier_write_left(tmp_path):
    """A second --write into the same folder left 44 files for 5, `00001_1.jpg` beside `00001_9.png`."""
    write_set("pen-photo", 12, tmp_path, seed=1)
    (tmp_path / "notes.txt").write_text("mine")
    paths = write_set("pen-photo", 5, tmp_path, seed=0)
    assert sorted(tmp_path.iterdir()) == sorted([*paths, tmp_path / "notes.txt", tmp_path / WRITTEN_LIST])
    assert [p.name for p in paths] == [p.name for p in write_set("pen-photo", 5, tmp_path / "fresh")]


def test_write_set_never_removes_a_users_file_named_like_its_own(tmp_path):
    """Any 00001_7.png in the folder was taken for an earlier --write's and removed, a user's own photo too."""
    mine = tmp_path / "00001_7.png"
    mine.write_bytes(b"my photo")
    with pytest.raises(
        DigitrecError, match=r"holds 00001_7.png named like the images eval-real --write writes"
    ):
        write_set("pen-photo", 3, tmp_path)
    assert sorted(tmp_path.iterdir()) == [mine] and mine.read_bytes() == b"my photo"
    # a list edited to name another file does not make write_set remove it
    (tmp_path / "notes.txt").write_text("mine")
    mine.rename(tmp_path / "elsewhere.png")
    write_set("pen-photo", 3, tmp_path)
    listed = tmp_path / WRITTEN_LIST
    listed.write_text(json.dumps({"files": [*json.loads(listed.read_text())["files"], "notes.txt"]}))
    write_set("pen-photo", 2, tmp_path, seed=1)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "elsewhere.png").exists()
    assert len([p for p in tmp_path.iterdir() if WRITTEN_NAME.fullmatch(p.name)]) == 2


def test_a_write_stopped_half_way_is_replaced_by_the_next(tmp_path, monkeypatch):
    """The files are listed before they are written, so an interrupted --write does not block the next one."""
    real_write = Path.write_bytes
    calls = []

    def stop_after_two(self, data):
        calls.append(self)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        write_set("pen-photo", 5, tmp_path, seed=3)
    monkeypatch.undo()
    assert len([p for p in tmp_path.iterdir() if WRITTEN_NAME.fullmatch(p.name)]) == 2
    paths = write_set("pen-photo", 4, tmp_path, seed=4)
    assert sorted(p for p in tmp_path.iterdir() if WRITTEN_NAME.fullmatch(p.name)) == sorted(paths)


def test_robust_augment_keeps_shape_range_and_is_seeded():
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 6:22, 12:16] = 1.0  # a batch of "1"s
    out1 = robust_augment(x, torch.Generator().manual_seed(0))
    out2 = robust_augment(x, torch.Generator().manual_seed(0))
    out3 = robust_augment(x, torch.Generator().manual_seed(1))
    assert out1.shape == x.shape and out1.min() >= 0 and out1.max() <= 1
    assert torch.equal(out1, out2) and not torch.equal(out1, out3)
    changed = (out1 - x).abs().flatten(1).mean(1)
    assert (changed > 0.01).float().mean() > 0.9  # nearly every image is altered, each differently
    assert len(torch.unique(changed)) > 60


def test_negative_bank_holds_non_digits_shaped_like_preprocessed_input():
    bank = negative_bank(size=300)
    assert bank.shape == (300, 1, 28, 28)
    assert torch.allclose(bank.flatten(1).amax(1)[bank.flatten(1).amax(1) > 0], torch.tensor(1.0))


def test_temperature_scaling_recovers_a_known_temperature():
    rng = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 10, generator=rng) * 2
    labels = torch.distributions.Categorical(logits=true_logits).sample()
    assert fit_temperature(true_logits * 3, labels) == pytest.approx(3.0, rel=0.1)


def test_ece_is_small_when_calibrated_and_large_when_overconfident():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.5, 1.0, 20000)
    correct = rng.random(20000) < confidence
    probs = np.zeros((20000, 2))
    predicted = np.where(correct, 0, 1)
    probs[:, 0] = confidence
    probs[:, 1] = 1 - confidence
    labels = predicted
    assert expected_calibration_error(probs, labels) < 0.02
    overconfident = np.stack([np.full(20000, 0.99), np.full(20000, 0.01)], 1)
    assert expected_calibration_error(overconfident, labels) > 0.15


def test_threshold_rejects_at_most_the_allowed_share_of_digits():
    rng = np.random.default_rng(0)
    digits, negatives = rng.beta(20, 1, 10000), rng.beta(2, 5, 1000)
    cut = choose_threshold(digits, max_digit_rejection=0.01)
    assert (digits < cut).mean() <= 0.0101 and (negatives < cut).mean() > 0.95


class _Stub:
    """A stand-in predictor: every digit read as `digit` (None: all rejected), every line as `lines` says."""

    def __init__(self, digit, lines):
        self.digit, self.lines = digit, lines

    def predict_tensor(self, batch):
        probabilities = np.full(10, 0.1) if self.digit is None else np.eye(10)[self.digit]
        answer = SimpleNamespace(digit=self.digit, rejected=self.digit is None, probabilities=probabilities)
        return [answer] * len(batch)

    def read(self, data):
        return SimpleNamespace(number=self.lines.get(data, ""))


@pytest.mark.parametrize("digit", [3, None])
def test_eval_real_lists_every_miss_by_the_index_write_set_names(monkeypatch, digit):
    monkeypatch.setattr(realworld, "_mnist_test", lambda: FAKE_MNIST)
    sets = ("pen-photo", "numbers", "negatives")
    pens, numbers, negatives = (list(generate(name, 12, seed=1, mnist=FAKE_MNIST)) for name in sets)
    lines = {s.data: s.label if i % 2 else "12" for i, s in enumerate(numbers)}  # every other line read right
    printed: list[str] = []
    results = realworld.eval_real(
        _Stub(digit, lines), count=12, seed=1, sets=sets, log=printed.append, show_misses=2
    )
    read = None if digit is None else str(digit)
    assert "3" in [s.label for s in pens]  # some digits are read right
    assert results["pen-photo"]["misses"] == [
        {"index": i, "truth": s.label, "read": read} for i, s in enumerate(pens) if s.label != read
    ]
    assert results["numbers"]["misses"] == [
        {"index": i, "truth": s.label, "read": "12"} for i, s in enumerate(numbers) if i % 2 == 0
    ]
    expected_negatives = [
        {"index": i, "truth": None, "kind": s.kind.removeprefix("negative-"), "read": "3"}
        for i, s in enumerate(negatives)
    ]
    assert results["negatives"]["misses"] == ([] if digit is None else expected_negatives)
    shown = [line for line in printed if line.startswith("  ")]
    assert len(shown) == (6 if digit is not None else 4)  # two under each set with misses
    first = results["numbers"]["misses"][0]
    assert f"  {first['index']:05d}  truth {first['truth']}  read 12" in shown


class _Scripted:
    """A stand-in predictor that knows each sample's image: of every three digits it reads one right, rejects one
    (its probabilities still pointing at the truth) and misreads one; the naive pipeline's image of every other
    digit is read right; numbers are read as `lines` says; every fourth non-digit is taken for a 3."""

    def __init__(self, samples, lines):
        from digitrec.preprocess import preprocess

        self.lines, self.answers = lines, {}
        for i, s in enumerate(samples):
            if s.label is None:
                self.answers[preprocess(s.data).tobytes()] = (3, i % 4 != 0, 3)
            elif s.label.isdigit() and len(s.label) == 1:
                y = int(s.label)
                self.answers[preprocess(s.data).tobytes()] = [
                    (y, False, y),
                    (None, True, y),
                    ((y + 1) % 10, False, (y + 1) % 10),
                ][i % 3]
                self.answers[realworld.naive_preprocess(s.data).tobytes()] = (
                    None,
                    False,
                    y if i % 2 == 0 else (y + 5) % 10,
                )

    def predict_tensor(self, batch):
        out = []
        for image in batch.numpy():
            digit, rejected, top = self.answers[image[0].tobytes()]
            out.append(
                SimpleNamespace(
                    digit=None if rejected else digit, rejected=rejected, probabilities=np.eye(10)[top]
                )
            )
        return out

    def read(self, data):
        return SimpleNamespace(number=self.lines.get(data, ""))


def test_eval_real_scores_correct_rejected_before_rejection_naive_and_exact_numbers(monkeypatch):
    monkeypatch.setattr(realworld, "_mnist_test", lambda: FAKE_MNIST)
    sets = ("pen-photo", "numbers", "negatives")
    pens, numbers, negatives = (list(generate(name, 12, seed=2, mnist=FAKE_MNIST)) for name in sets)
    lines = {s.data: s.label if i % 2 else "12" for i, s in enumerate(numbers)}
    # `read` of the non-digits: every third read as a number
    read_negatives = {s.data: "7" if i % 3 == 0 else "" for i, s in enumerate(negatives)}
    printed: list[str] = []
    results = realworld.eval_real(
        _Scripted(pens + negatives, lines | read_negatives), count=12, seed=2, sets=sets, log=printed.append
    )
    pen = results["pen-photo"]
    assert (pen["accuracy"], pen["rejected"], pen["accuracy_no_reject"]) == pytest.approx(
        (4 / 12, 4 / 12, 8 / 12)
    )
    assert pen["naive_accuracy"] == pytest.approx(6 / 12) and pen["n"] == 12
    exact = np.mean([lines[s.data] == s.label for s in numbers])
    count_right = np.mean([len(lines[s.data]) == len(s.label) for s in numbers])
    assert exact == 0.5 and count_right > exact  # some misread lines still have the right number of digits
    assert (results["numbers"]["exact"], results["numbers"]["digit_count_right"]) == pytest.approx(
        (exact, count_right)
    )
    assert results["negatives"]["rejected"] == pytest.approx(9 / 12)
    assert results["negatives"]["read_no_number"] == pytest.approx(8 / 12)
    assert any(line.startswith("negatives") and "; read as no number 67%, n=12)" in line for line in printed)
    kinds = {s.kind for s in negatives}
    assert results["negatives"]["per_kind"] == pytest.approx(
        {k: np.mean([i % 4 != 0 for i, s in enumerate(negatives) if s.kind == k]) for k in kinds}
    )


def test_eval_real_reads_photos_of_two_numbers_only_when_asked(monkeypatch):
    """`lines`: a photo counts when both numbers are read exactly; the digit count per line; not a default set."""
    monkeypatch.setattr(realworld, "_mnist_test", lambda: FAKE_MNIST)
    photos = list(generate("lines", 8, seed=1, mnist=FAKE_MNIST))
    answers = {}
    for i, s in enumerate(photos):
        top, bottom = s.label.split("\n")
        # right; one line lost; the right digit counts with a digit wrong; the two lines read as one
        answers[s.data] = [
            s.label,
            top,
            f"{top}\n{'0' if bottom[0] != '0' else '1'}{bottom[1:]}",
            top + bottom,
        ][i % 4]
    printed: list[str] = []
    results = realworld.eval_real(_Stub(3, answers), count=8, seed=1, sets=("lines",), log=printed.append)
    assert results["lines"]["exact"] == 0.25 and results["lines"]["digit_count_right"] == 0.5
    assert printed[0].startswith(
        "lines         25.00% photos of two numbers read exactly   (50.00% with the right"
    )
    assert "lines" not in realworld.DEFAULT_SETS and "lines" in realworld.SETS


def test_table_photo_lays_the_page_on_a_table_and_is_no_default_set():
    """A phone photo of a sheet on a desk shows the desk at its corners or all round it (the failure a review's
    phone photos found: 0-8 of 20 such digits read right)."""
    white = io.BytesIO()
    Image.new("RGB", (300, 400), (250, 250, 250)).save(white, "PNG")
    for seed in range(10):
        photo = np.asarray(
            Image.open(io.BytesIO(realworld.on_table(white.getvalue(), np.random.default_rng(seed))))
        )
        gray = photo.mean(axis=2) / 255
        height, width = gray.shape
        assert gray[height // 2, width // 2] > 0.9  # the page, in the middle
        assert (
            min(gray[2, 2], gray[2, -3], gray[-3, 2], gray[-3, -3]) < 0.7
        )  # the table, at a corner at least
    assert "table-photo" in SETS and "table-photo" not in realworld.DEFAULT_SETS
