"""The pair classifier (pairs.py): its training pieces, its NumPy forward pass, and how `read` uses it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import randomize_batch_norm

from digitrec import pairs as pairs_module
from digitrec.checkpoint import save_tensors
from digitrec.errors import CheckpointError, DigitrecError
from digitrec.pairs import (
    CLASSES,
    NO_PAIR,
    digits_line,
    load_pair_scorer,
    make_pairs,
    one_blob,
    pair_cnn,
    train_pairs,
)
from digitrec.segment import split_and_read, split_by_recognition


@pytest.fixture
def tiny_data(idx_folder, monkeypatch):
    monkeypatch.setenv("DIGITREC_DATA", str(idx_folder))
    return idx_folder


def test_the_pieces_are_the_same_for_the_same_seed_and_hold_pairs_and_others():
    """Drawn from the real MNIST training digits (the tiny set's blob templates are no digits)."""
    images, labels = make_pairs(60, seed=3, workers=1)
    assert images.shape == (60, 28, 28) and images.dtype == np.uint8
    assert labels.min() >= 0 and labels.max() <= NO_PAIR
    assert (labels < NO_PAIR).any() and (labels == NO_PAIR).any()
    assert images.reshape(60, -1).max(axis=1).min() > 0  # every piece holds ink
    again, again_labels = make_pairs(60, seed=3, workers=1)
    assert np.array_equal(images, again) and np.array_equal(labels, again_labels)
    other, _ = make_pairs(60, seed=4, workers=1)
    assert not np.array_equal(images, other)


def test_digits_line_overlaps_its_glyphs_by_the_gap_and_one_blob_sees_them_joined():
    """The training pieces' lines: three 10 px wide glyphs, each starting 4 px before the last one ends."""
    glyphs = [np.ones((20, 10), np.float32) for _ in range(3)]
    line, lefts = digits_line(glyphs, 20, -0.2, np.random.default_rng(0))
    assert lefts == [0, 6, 12] and line.shape == (28, 22)
    # Every glyph is whole in its columns; 20 rows each, at most 8 apart in a 28-row line, so they share rows
    # where they overlap and make one blob.
    assert all(line[:, x : x + 10].max(axis=0).min() == 1.0 for x in lefts)
    assert one_blob(line > 0.5)
    apart, _ = digits_line(glyphs[:2], 20, 0.3, np.random.default_rng(0))
    assert not one_blob(apart > 0.5) and not one_blob(np.zeros((5, 5), bool))


def test_the_numpy_pair_network_matches_torch(tmp_path):
    torch.manual_seed(0)
    model = randomize_batch_norm(pair_cnn().eval())
    path = tmp_path / "pairs.safetensors"
    save_tensors(path, dict(model.state_dict()), {"arch": "pair_cnn", "classes": CLASSES})
    x = np.random.default_rng(0).random((7, 28, 28)).astype(np.float32)
    scorer = load_pair_scorer(path)
    assert scorer is not None
    got = scorer(x)
    with torch.no_grad():
        want = torch.log_softmax(model(torch.from_numpy(x)[:, None]), dim=1).numpy()
    assert got.shape == (7, CLASSES)
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(np.exp(got).sum(axis=1), 1.0, atol=1e-5)


def test_a_checkpoint_that_is_not_a_pair_classifier_is_refused(tmp_path):
    path = tmp_path / "digits.safetensors"
    save_tensors(path, {"w": torch.zeros(2)}, {"arch": "fast_cnn"})
    with pytest.raises(CheckpointError, match="not a pair classifier"):
        load_pair_scorer(path)


def test_train_pairs_writes_a_scorer_read_can_use(tiny_data, tmp_path):
    lines: list[str] = []
    path = train_pairs(tmp_path / "p.safetensors", count=600, epochs=1, batch_size=64, log=lines.append)
    assert any("held-out accuracy" in line for line in lines)
    held_out = 600 // 20  # the 5% held out: its accuracies are whole counts of it, not float32 means
    metrics = json.loads(path.with_suffix(".json").read_text())["metrics"]
    for key in ("val_accuracy", "val_pair_accuracy", "val_other_read_as_pair"):
        assert any(metrics[key] == k / n for n in range(1, held_out + 1) for k in range(n + 1)), key
    scorer = load_pair_scorer(path)
    assert scorer is not None
    out = scorer(np.zeros((2, 28, 28), np.float32))
    assert out.shape == (2, CLASSES) and np.isfinite(out).all()


def test_train_pairs_refuses_a_count_that_leaves_no_batch_before_drawing(tiny_data, tmp_path, monkeypatch):
    """`--count 100` drew its pieces, then stopped in a traceback from the learning-rate schedule (no step)."""
    monkeypatch.setattr(pairs_module, "make_pairs", None)  # nothing may be drawn
    with pytest.raises(
        DigitrecError, match="--count 100 leaves 95 training pieces .* use --count 269 or more"
    ):
        train_pairs(tmp_path / "p.safetensors", count=100, epochs=1)
    assert not (tmp_path / "p.safetensors").exists()


def _blob_of_two() -> np.ndarray:
    """Two bars joined by a bridge, wider than tall: one blob a single-digit reader would rather read whole."""
    mask = np.zeros((50, 64), dtype=bool)
    mask[:, :10] = True
    mask[:, 54:] = True
    mask[20:30, 10:54] = True
    return mask


def _wide(glyph: np.ndarray) -> bool:
    """Is this 28x28 piece the whole blob (64 x 50 px) rather than a part of it (at most 54 x 50)?"""
    ink = glyph > 0.3
    return bool(ink.any(0).sum() > 1.15 * ink.any(1).sum())


def test_a_blob_the_pair_classifier_reads_as_a_pair_comes_back_as_two_digits():
    mask = _blob_of_two()

    def whole_is_sure(glyphs):  # the digit classifier: the whole blob is one confident digit, cuts read badly
        return np.array([0.95 if _wide(g) else 0.2 for g in glyphs])

    def pair_18_when_wide(glyphs):
        out = np.full((len(glyphs), CLASSES), -20.0)
        for k, g in enumerate(glyphs):
            if _wide(g):
                out[k, 18], out[k, NO_PAIR] = np.log(0.9), np.log(0.1)
            else:
                out[k, NO_PAIR] = 0.0
        return out

    assert len(split_by_recognition(mask, 50, whole_is_sure)) == 1
    found = split_and_read(mask, 50, whole_is_sure, pairs=pair_18_when_wide)
    assert [reading for _, _, reading in found] == [(1, pytest.approx(0.9)), (8, pytest.approx(0.9))]
    (x_left, left, _), (x_right, right, _) = found
    assert x_left < x_right and left.sum() + right.sum() == mask.sum()  # the halves share out the ink

    def never_a_pair(glyphs):
        out = np.full((len(glyphs), CLASSES), -20.0)
        out[:, NO_PAIR] = 0.0
        return out

    same = split_and_read(mask, 50, whole_is_sure, pairs=never_a_pair)
    assert [reading for _, _, reading in same] == [None]


def test_a_piece_read_clearly_as_one_digit_takes_a_doubtful_pair_reading_only_when_it_is_sure():
    """The pair classifier, unsure among many pairs, leaves little to "no pair"; the digit classifier's
    confidence in one digit then keeps the piece whole (an 8 read as "86" no more)."""
    mask = _blob_of_two()

    def whole_is_sure(glyphs):
        return np.array([0.95 if _wide(g) else 0.2 for g in glyphs])

    def pair_18(probability, no_pair):
        def score(glyphs):
            out = np.full((len(glyphs), CLASSES), np.log((1 - probability - no_pair) / 99))
            out[:, 18], out[:, NO_PAIR] = np.log(probability), np.log(no_pair)
            return out

        return score

    # One digit: log .95 + log .3 = -1.26 beats log .4 + 0.5 log(1 - .95) = -2.41 (without the doubt, -0.92).
    doubtful = split_and_read(mask, 50, whole_is_sure, pairs=pair_18(0.4, 0.3))
    assert [reading for _, _, reading in doubtful] == [None]
    # A pair: log .9 + 0.5 log .05 = -1.60 beats log .95 + log .02 = -3.96.
    sure = split_and_read(mask, 50, whole_is_sure, pairs=pair_18(0.9, 0.02))
    assert [reading for _, _, reading in sure] == [(1, pytest.approx(0.9)), (8, pytest.approx(0.9))]


def test_read_reports_the_pair_classifiers_digits(monkeypatch):
    from digitrec.predict import Predictor

    predictor = Predictor.pretrained(backend="numpy")
    image = np.full((80, 100), 255, np.uint8)
    image[15:65, 12:22] = 0
    image[15:65, 66:76] = 0
    image[35:45, 22:66] = 0  # a wide "H": one blob

    def pair_47(glyphs):
        out = np.full((len(glyphs), CLASSES), -20.0)
        wide = np.array([_wide(g) for g in glyphs])
        out[wide, 47] = 0.0
        out[~wide, NO_PAIR] = 0.0
        return out

    monkeypatch.setattr(pairs_module, "load_pair_scorer", lambda path=None: pair_47)
    result = predictor.read(image)
    assert result.number == "47"
    assert [d.confidence for d in result.digits] == [pytest.approx(1.0)] * 2
    assert result.digits[0].box[0] < result.digits[1].box[0]
    predictor.read_pairs = False
    assert predictor.read(image).number != "47"  # without it, no reading comes from the pair classifier


def test_read_and_eval_real_use_the_pair_classifier_named_by_pairs(tmp_path, monkeypatch, capsys):
    """A model `digitrec train-pairs` wrote could not be used: read, eval-real and serve loaded the bundled one."""
    from PIL import Image

    from digitrec.cli import main
    from digitrec.predict import Predictor

    own = tmp_path / "own-pairs.safetensors"
    own.write_bytes(pairs_module.pretrained_pairs_path().read_bytes())
    asked: list[object] = []
    real = pairs_module.load_pair_scorer

    def spy(path=None):
        asked.append(path)
        return real(path)

    monkeypatch.setattr(pairs_module, "load_pair_scorer", spy)
    image = tmp_path / "47.png"
    Image.fromarray(np.where(_blob_of_two(), 0, 255).astype(np.uint8)).save(image)
    assert main(["read", str(image), "--pairs", str(own), "--backend", "numpy"]) == 0
    assert asked and set(asked) == {own}
    asked.clear()
    assert main(["read", str(image), "--backend", "numpy"]) == 0
    assert set(asked) == {None}  # the bundled one
    capsys.readouterr()
    predictor = Predictor.pretrained(backend="numpy")
    predictor.use_pairs(own)
    assert predictor.portable().pairs_path == own  # the server's read workers run this copy
    asked.clear()
    args = ["eval-real", "--sets", "numbers", "--count", "2", "--pairs", str(own), "--backend", "numpy"]
    assert main(args) == 0 and set(asked) == {own}


@pytest.mark.parametrize("what", ["missing", "a digit model", "an image", "a folder", "a device"])
def test_a_pairs_file_that_cannot_be_used_is_refused_before_reading(what, tmp_path, capsys):
    """An image or a folder given as --pairs was told of `digitrec train` and a run folder's model.safetensors."""
    from PIL import Image

    from digitrec.cli import main
    from digitrec.predict import pretrained_path

    image = tmp_path / "7.png"
    Image.new("L", (40, 40), 255).save(image)
    pairs = {
        "missing": tmp_path / "nope.safetensors",
        "a digit model": pretrained_path(),
        "an image": image,
        "a folder": tmp_path,
        "a device": "/dev/zero",
    }[what]
    assert main(["read", str(image), "--pairs", str(pairs), "--backend", "numpy"]) == 2
    err = capsys.readouterr().err
    said = (
        "does not exist; `digitrec train-pairs` writes one."
        if what == "missing"
        else "is not a file but a device, pipe or socket; pass the .safetensors file `digitrec train-pairs` wrote"
        if what == "a device"
        else "is not a pair classifier"
    )
    assert f"{pairs}" in err and said in err and "Traceback" not in err
    assert "`digitrec train`" not in err and "model.safetensors" not in err


def test_serve_passes_pairs_to_the_server(tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    from digitrec import server
    from digitrec.cli import main

    given: dict[str, object] = {}
    monkeypatch.setattr(server, "serve", lambda model, **kwargs: given.update(kwargs))
    assert main(["serve", "--pairs", str(tmp_path / "p.safetensors")]) == 0
    assert given["pairs"] == str(tmp_path / "p.safetensors")


def test_train_pairs_replaces_only_an_earlier_pair_classifier(tmp_path, capsys):
    """`train-pairs --out notes.txt` wrote safetensors over the user's text (and notes.json beside it), and `--out
    RUN/model.safetensors` replaced a run's digit model, its metrics and report left describing it: after the
    whole training, with no word."""
    import shutil

    from digitrec.cli import _refuse_replacing_with_pairs, main
    from digitrec.pairs import pretrained_pairs_path

    run = tmp_path / "run"
    run.mkdir()
    (run / "last.safetensors").write_bytes(b"a run's resume checkpoint")
    notes = tmp_path / "notes.safetensors"
    notes.write_text("my notes")
    lone_json = tmp_path / "data.json"
    lone_json.write_text("{}")
    for out, said in [
        (run / "model.safetensors", f"--out {run / 'model.safetensors'} is in the run folder {run}, "),
        (notes, f"--out {notes}: {notes} already exists and is not a pair classifier"),
        (tmp_path / "data.safetensors", f"{lone_json} already exists, with no pair classifier beside it"),
    ]:
        assert main(["train-pairs", "--out", str(out), "--count", "300", "--epochs", "1"]) == 2
        assert said in capsys.readouterr().err
    assert notes.read_text() == "my notes" and lone_json.read_text() == "{}"
    with pytest.raises(SystemExit):
        main(["train-pairs", "--out", str(tmp_path / "notes.txt")])
    assert "is not a .safetensors name" in capsys.readouterr().err
    earlier = tmp_path / "pairs.safetensors"
    shutil.copy(pretrained_pairs_path(), earlier)
    shutil.copy(pretrained_pairs_path().with_suffix(".json"), earlier.with_suffix(".json"))
    _refuse_replacing_with_pairs(earlier)  # an earlier pair classifier is replaced, as make pretrained does
