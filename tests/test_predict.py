"""Predictor and the predict / read commands: right answers from the bundled model, rejection, bad files in a batch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from test_segment import line_image

from digitrec.checkpoint import save_model
from digitrec.cli import main
from digitrec.errors import DigitrecError
from digitrec.models import create_model
from digitrec.pairs import pretrained_pairs_path
from digitrec.predict import Predictor, pretrained_path
from digitrec.realworld import generate


@pytest.fixture(scope="module")
def pretrained() -> Predictor:
    return Predictor.pretrained()


@pytest.fixture
def untrained_path(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "model.safetensors"
    save_model(
        path,
        create_model("fast_cnn"),
        {"recipe": "test", "config": {"arch": "fast_cnn"}, "temperature": 2.0, "reject_below": 0.3},
    )
    return path


def write_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def pen_photos(count: int, seed: int = 11):
    return list(generate("pen-photo", count, seed))


def test_bundled_model_is_small_and_says_it_is_calibrated_and_accurate(pretrained):
    assert pretrained_path().stat().st_size < 2 * 1024 * 1024
    # with the pair classifier `read` asks too, everything bundled stays under 2 MB
    assert pretrained_path().stat().st_size + pretrained_pairs_path().stat().st_size < 2 * 1024 * 1024
    assert pretrained.temperature != 1.0 and 0 < pretrained.reject_below < 1
    assert pretrained.meta["metrics"]["test_accuracy"] >= 0.994


def test_bundled_model_is_calibrated_and_accurate_on_mnist(real_mnist):
    """The figures the bundled checkpoint states are measured again on the 10,000 MNIST test images: its
    accuracy, scored as its recipe evaluates (bfloat16, as `digitrec evaluate` does: 9953 right, as stated, on
    the machine this test was written on, from the float16 weights bundled), and its calibration, the expected
    calibration error with its temperature (`digitrec calibrate` measures test_ece the same way), far below the
    model's own at T = 1."""
    from digitrec.calibrate import expected_calibration_error, fit_temperature, softmax
    from digitrec.checkpoint import load_model
    from digitrec.config import TrainConfig
    from digitrec.evaluate import recipe_logits

    model, meta = load_model(pretrained_path())
    config = TrainConfig.from_checkpoint(meta, pretrained_path())
    images, labels = real_mnist.data.test_images, real_mnist.data.test_labels
    with torch.inference_mode():
        logits = recipe_logits(model, images, config)
    right = int((logits.argmax(1) == labels.long()).sum())
    stated = meta["metrics"]["test_accuracy"]
    # bfloat16 kernels differ between CPUs (AMX or not), so an image or two either way is allowed
    assert abs(right - round(stated * len(labels))) <= 2 and stated >= 0.994, (right, stated)
    temperature = meta["temperature"]
    ece = expected_calibration_error(softmax(logits.numpy(), temperature), labels.numpy())
    assert ece == pytest.approx(meta["calibration"]["test_ece"], abs=0.001) and ece < 0.005
    assert expected_calibration_error(softmax(logits.numpy()), labels.numpy()) > 5 * ece
    assert fit_temperature(logits, labels) == pytest.approx(temperature, rel=0.15)


def test_the_bundled_model_names_the_checkpoint_it_was_fine_tuned_from_as_make_pretrained_does(pretrained):
    """Its metadata named /work/main/src/digitrec/pretrained/robust.safetensors, a path on the machine that made
    it, so its model card sent every other user to a file they do not have."""
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    source = pretrained.meta["finetuned_from"]
    assert not Path(source).is_absolute() and f"finetune --model {source} " in makefile


def test_bundled_model_reads_photographed_digits(pretrained):
    samples = pen_photos(100)
    predictions = pretrained.predict([s.data for s in samples])
    right = sum(p.digit == int(s.label) for p, s in zip(predictions, samples))
    assert right >= 94  # a rejected digit counts as wrong; the naive pipeline gets about 15


def test_predictions_are_well_formed(pretrained):
    (p,) = pretrained.predict(pen_photos(1)[0].data, top_k=4)
    assert (
        len(p.top) == 4 and [d for d, _ in p.top] == sorted(range(10), key=lambda d: -p.probabilities[d])[:4]
    )
    assert sum(p.probabilities) == pytest.approx(1.0, abs=1e-5) and p.confidence == pytest.approx(p.top[0][1])


def test_blank_pages_and_non_digits_are_rejected(pretrained):
    blank = np.full((120, 120), 215, np.uint8)
    noise = (np.random.default_rng(0).random((120, 120)) * 255).astype(np.uint8)
    for p in pretrained.predict([blank, noise]):
        assert p.rejected and p.digit is None


def test_read_takes_lines_of_noise_for_no_digits_and_keeps_a_number_beside_them(pretrained):
    """`read` gave a photo of noise as lines of doubtful 4s ("4484444444 / 8438244444358 / ..."), some digits
    confident: a line in which most digits read alone are doubtful is now left out, and counted."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (300, 800), dtype=np.uint8)
    blobs = ndimage.gaussian_filter(rng.normal(0, 1, (600, 600)), 3)
    blobs = ((blobs - blobs.min()) / (blobs.max() - blobs.min()) * 255).astype(np.uint8)
    for image in (noise, blobs):
        result = pretrained.read(image)
        assert result.number == "" and result.digits == [] and result.rejected_lines >= 1
        assert result.to_dict()["rejected_lines"] == result.rejected_lines
    # a number under a band of noise (paper round it: a band from edge to edge would be a table beside the
    # sheet, which preprocess.page_alone paints over): the number stays, on line 0, and the noise is left out
    line, _ = line_image([3, 0, 7], gap=0.3)
    page = np.full((line.shape[0] * 3 + 20, line.shape[1] + 20), 255, np.uint8)
    page[10 : 10 + line.shape[0], 10:-10] = rng.integers(0, 256, line.shape, dtype=np.uint8)
    page[-10 - line.shape[0] : -10, 10:-10] = line
    result = pretrained.read(page)
    assert result.number == "307" and {d.line for d in result.digits} == {0}
    assert result.rejected_lines >= 1


def test_a_line_read_as_one_doubtful_pair_is_left_out_unless_the_threshold_is_lowered(
    monkeypatch, untrained_path
):
    """A pair reading is sure from PAIR_DOUBT (0.2) or the reject threshold if lower: `--reject-below 0` left
    out a "58" read as one pair at 0.1, though it is meant to keep every reading."""
    from digitrec import segment
    from digitrec.predict import PAIR_DOUBT

    image = np.zeros((28, 28), np.float32)
    halves = [segment.Piece((0, 0, 10, 20), image, (5, 0.1)), segment.Piece((8, 0, 10, 20), image, (8, 0.1))]
    monkeypatch.setattr(segment, "segment", lambda *args, **kwargs: halves)
    page = np.full((40, 40), 255, np.uint8)
    assert 0.1 < PAIR_DOUBT
    left_out = Predictor.load(untrained_path).read(page)
    assert (left_out.number, left_out.rejected_lines) == ("", 1)
    kept = Predictor.load(untrained_path, reject_below=0.0).read(page)
    assert (kept.number, kept.rejected_lines) == ("58", 0)


@pytest.mark.parametrize(
    "pair_confidence, alone, number",
    [
        (0.1, ["sure"], "583"),  # a doubtful pair and a sure digit: one reading of two sure, half: kept
        (0.3, ["doubtful", "doubtful"], ""),  # a sure pair and two doubtful digits: one of three, left out
    ],
)
def test_a_line_is_kept_when_half_its_readings_are_sure_a_pair_counting_once(
    pair_confidence, alone, number, monkeypatch
):
    from digitrec import segment

    def model(batch: np.ndarray) -> np.ndarray:  # sure of a 3 where the glyph holds ink, of nothing elsewhere
        logits = np.zeros((len(batch), 10), np.float32)
        logits[batch.reshape(len(batch), -1).max(axis=1) > 0, 3] = 20.0
        return logits

    ink, none = np.ones((28, 28), np.float32), np.zeros((28, 28), np.float32)
    pieces = [
        segment.Piece((0, 0, 10, 20), none, (5, pair_confidence)),
        segment.Piece((8, 0, 10, 20), none, (8, pair_confidence)),
    ] + [segment.Piece((20 + 12 * i, 0, 10, 20), ink if a == "sure" else none) for i, a in enumerate(alone)]
    monkeypatch.setattr(segment, "segment", lambda *args, **kwargs: pieces)
    result = Predictor(model, {"reject_below": 0.5}).read(np.full((40, 80), 255, np.uint8))
    assert (result.number, result.rejected_lines) == (number, 0 if number else 1)


def test_a_blank_input_is_rejected_even_when_the_model_is_sure_of_a_digit():
    def sure_it_is_a_one(batch: np.ndarray) -> np.ndarray:
        logits = np.zeros((len(batch), 10), np.float32)
        logits[:, 1] = 20.0
        return logits

    predictor = Predictor(sure_it_is_a_one, {"reject_below": 0.5})
    x = np.zeros((2, 1, 28, 28), np.float32)
    x[1, :, 5:23, 12:16] = 1  # the second has a stroke of ink, the first none
    blank, stroke = predictor.predict_tensor(x)
    assert blank.confidence > 0.99 and blank.rejected and blank.digit is None
    assert not stroke.rejected and stroke.digit == 1


def test_reject_below_is_configurable(untrained_path):
    predictor = Predictor.load(untrained_path)
    assert predictor.temperature == 2.0 and predictor.reject_below == 0.3
    x = torch.zeros(3, 1, 28, 28)
    x[:, :, 5:23, 12:16] = 1
    assert all(not p.rejected for p in Predictor.load(untrained_path, reject_below=0.0).predict_tensor(x))
    assert all(
        p.rejected and p.digit is None
        for p in Predictor.load(untrained_path, reject_below=1.0).predict_tensor(x)
    )


def test_temperature_softens_probabilities(untrained_path):
    predictor = Predictor.load(untrained_path)
    x = torch.rand(4, 1, 28, 28)
    soft = predictor.probabilities(x.numpy())
    predictor.temperature = 1.0
    sharp = predictor.probabilities(x.numpy())
    assert (soft.max(1) < sharp.max(1)).all() and (soft.argmax(1) == sharp.argmax(1)).all()


def test_read_returns_the_number_and_boxes(pretrained):
    image, boxes = line_image([4, 0, 7, 3], gap=0.3, seed=2)
    result = pretrained.read(image)
    assert result.number == "4073"
    assert len(result.digits) == 4 and all(abs(d.box[0] - b[0]) < 10 for d, b in zip(result.digits, boxes))


def test_read_generated_numbers(pretrained):
    samples = list(generate("numbers", 30, seed=5))
    right = sum(pretrained.read(s.data).number == s.label for s in samples)
    assert right >= 15  # a regression guard only: 57% on this seed, 75% on eval-real; the target is 95%


def test_cli_predict_keeps_going_past_bad_files(tmp_path, capsys, untrained_path):
    good = write_png(tmp_path / "good.png", line_image([5], gap=0.3)[0])
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    code = main(
        [
            "predict",
            str(good),
            str(tmp_path / "missing.png"),
            str(tmp_path / "broken.jpg"),
            "--model",
            str(untrained_path),
            "--json",
            "--top-k",
            "2",
            "--show-steps",
            str(tmp_path / "steps"),
        ]
    )
    rows = json.loads(capsys.readouterr().out)
    assert code == 0 and [r["path"] for r in rows] == [
        str(good),
        str(tmp_path / "missing.png"),
        str(tmp_path / "broken.jpg"),
    ]
    assert set(rows[0]) == {"path", "digit", "confidence", "top", "rejected", "blank"}
    assert len(rows[0]["top"]) == 2 and rows[0]["blank"] is False
    assert "does not exist" in rows[1]["error"] and "error" in rows[2]
    assert (tmp_path / "steps" / "good.steps.png").exists()


def test_show_steps_gives_each_image_its_own_file(tmp_path, untrained_path):
    """x.png and x.jpg, and 1.png in two folders, wrote the same <stem>.steps.png: the last one won."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    files = [
        write_png(tmp_path / "x.png", line_image([5], gap=0.3)[0]),
        write_png(tmp_path / "a" / "1.png", line_image([7], gap=0.3)[0]),
        write_png(tmp_path / "b" / "1.png", line_image([2], gap=0.3)[0]),
    ]
    Image.open(files[0]).save(tmp_path / "x.jpg")
    files.insert(1, tmp_path / "x.jpg")
    assert (
        main(
            ["predict", *map(str, files), "--model", str(untrained_path), "--show-steps", str(tmp_path / "s")]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "1-2.steps.png",
        "1.steps.png",
        "x-2.steps.png",
        "x.steps.png",
    ]


def test_a_steps_picture_that_cannot_be_saved_loses_no_answer(tmp_path, capsys, untrained_path, monkeypatch):
    """An image named with 250 letters made a steps file name over 255 bytes: the OSError ended the whole run
    (exit 2) and printed no answer for any file; a full disk did the same."""
    import errno

    import digitrec.predict

    long = write_png(tmp_path / f"{'a' * 250}.png", line_image([7], gap=0.3)[0])
    short = write_png(tmp_path / "b.png", line_image([5], gap=0.3)[0])
    steps = tmp_path / "steps"
    assert (
        main(["predict", str(short), str(long), "--model", str(untrained_path), "--show-steps", str(steps)])
        == 0
    )
    assert capsys.readouterr().out.count("digit") == 2
    assert sorted(len(p.name.encode()) <= 255 for p in steps.iterdir()) == [True, True]

    def full(steps, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    # an undecodable byte in a short name stays in its steps file's name (the cut dropped it: caf.steps.png)
    odd = tmp_path / "odd"
    odd.mkdir()
    write_png(Path(os.fsdecode(os.fsencode(odd) + b"/caf\xe9.png")), line_image([3], gap=0.3)[0])
    args = ["predict", str(odd), "--model", str(untrained_path), "--json", "--show-steps", str(steps / "odd")]
    assert main(args) == 0  # JSON: the name escaped (the text answer is for the terminal, tested below)
    assert [os.fsencode(p.name) for p in (steps / "odd").iterdir()] == [b"caf\xe9.steps.png"]
    assert "preprocessing steps:" in capsys.readouterr().err

    monkeypatch.setattr(digitrec.predict, "save_steps", full)
    code = main(
        [
            "predict",
            str(short),
            str(long),
            "--model",
            str(untrained_path),
            "--json",
            "--show-steps",
            str(steps),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0 and [row["path"] for row in json.loads(captured.out)] == [str(short), str(long)]
    assert (
        f"cannot save the steps of {short} to {steps / 'b.steps.png'} (No space left on device)"
        in captured.err
    )
    assert "preprocessing steps:" not in captured.err  # none was saved: no line pointing at them


def test_cli_fails_only_when_every_file_failed(tmp_path, capsys, untrained_path):
    assert (
        main(["predict", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--model", str(untrained_path)])
        == 1
    )
    out = capsys.readouterr().out
    assert out.count("does not exist") == 2 and "Traceback" not in out


def test_a_folder_that_cannot_be_listed_is_named_and_the_other_images_still_read(
    tmp_path, capsys, monkeypatch, untrained_path
):
    """A folder the user may not list, given among other paths, stopped the whole command (exit 2, no answers)."""
    good = write_png(tmp_path / "good.png", line_image([5], gap=0.3)[0])
    locked = tmp_path / "locked"
    locked.mkdir()
    listing = Path.iterdir

    def iterdir(self):
        if self == locked:  # as a folder without read permission answers (root may list any, so it is faked)
            raise PermissionError(13, "Permission denied", str(self))
        return listing(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    assert main(["predict", str(locked), str(good), "--model", str(untrained_path), "--json"]) == 0
    captured = capsys.readouterr()
    assert [row["path"] for row in json.loads(captured.out)] == [str(good)]
    assert captured.err == (
        f"digitrec: cannot list the folder {locked} (Permission denied), so its images are not read; check its "
        "permissions.\n"
    )


def test_cli_names_the_photos_it_cannot_read_in_a_folder(tmp_path, capsys, untrained_path):
    write_png(tmp_path / "good.png", line_image([5], gap=0.3)[0])
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(100))
    Image.new("L", (30, 30), 255).save(tmp_path / "four.tga")  # a format Pillow knows and digitrec refuses
    (tmp_path / "notes.txt").write_text("not a photo, not reported")
    assert main(["predict", str(tmp_path), "--model", str(untrained_path), "--json"]) == 0
    captured = capsys.readouterr()
    assert [row["path"] for row in json.loads(captured.out)] == [str(tmp_path / "good.png")]
    assert "skipped 1 HEIC file(s) such as" in captured.err and "IMG_0001.HEIC" in captured.err
    assert "skipped 1 TGA file(s) such as" in captured.err and "four.tga" in captured.err
    assert "notes.txt" not in captured.err


def test_cli_reads_an_apng_in_a_folder_as_it_reads_one_passed_directly(tmp_path, capsys, untrained_path):
    """A folder's .apng was "skipped 1 APNG file(s) ...: digitrec reads PNG, JPEG, ... only"; passed directly,
    the same file was read (Pillow opens an APNG as a PNG)."""
    image = Image.fromarray(line_image([5], gap=0.3)[0])
    apng = tmp_path / "five.apng"
    image.save(apng, format="PNG", save_all=True, append_images=[Image.new(image.mode, image.size, 255)])
    for target in (tmp_path, apng):
        assert main(["predict", str(target), "--model", str(untrained_path), "--json"]) == 0
        captured = capsys.readouterr()
        assert [row["path"] for row in json.loads(captured.out)] == [str(apng)] and captured.err == ""


def test_cli_read_json(tmp_path, capsys, untrained_path):
    image = write_png(tmp_path / "n.png", line_image([1, 2, 3], gap=0.3)[0])
    # an untrained model doubts most digits, so that the line could be left out as no digits: threshold 0 first
    untrained = ["--model", str(untrained_path)]
    assert main(["read", str(image), *untrained, "--reject-below", "0", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert len(row["number"]) == 3 and row["lines"] == [row["number"]] and row["rejected_lines"] == 0
    assert [set(d) for d in row["digits"]] == [{"digit", "confidence", "box", "doubtful", "line"}] * 3
    assert [d["line"] for d in row["digits"]] == [0, 0, 0] and not any(d["doubtful"] for d in row["digits"])
    # between the two lowest confidences, one digit is under the threshold and says so (and the line stays)
    low = sorted(d["confidence"] for d in row["digits"])
    threshold = str((low[0] + low[1]) / 2)
    assert main(["read", str(image), *untrained, "--reject-below", threshold, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert [d["doubtful"] for d in row["digits"]].count(True) == 1 and len(row["number"]) == 3
    # the text output marks it too (it did not): a "?" after the doubtful digit's confidence
    assert main(["read", str(image), *untrained, "--reject-below", threshold]) == 0
    text = capsys.readouterr().out
    assert text.count("%?@") == 1 and "doubtful, under the reject threshold" in text
    # at its own threshold (0.3) an untrained model is sure of at most one: the line is no digits to it
    assert sum(c >= 0.3 for c in low) <= 1
    assert main(["read", str(image), *untrained, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["number"] == "" and row["digits"] == [] and row["rejected_lines"] == 1


def test_read_help_names_every_key_of_the_json_it_prints(capsys):
    """`read -h` described --json's rows without `lines`, the numbers of a photo of several lines."""
    with pytest.raises(SystemExit):
        main(["read", "-h"])
    said = " ".join(capsys.readouterr().out.split())
    assert '{"path", "number", "lines", "digits": [...], "rejected_lines"}' in said


def test_cli_predict_with_the_bundled_model(tmp_path, capsys, pretrained):
    sample = pen_photos(1, seed=3)[0]
    path = tmp_path / ("digit.jpg" if sample.data.startswith(b"\xff\xd8") else "digit.png")
    path.write_bytes(sample.data)
    assert main(["predict", str(path)]) == 0
    assert f"digit {sample.label}" in capsys.readouterr().out


@pytest.fixture(scope="module")
def real_world(pretrained) -> dict:
    """eval-real's figures for the bundled model, 500 per set, seed 0 (about two minutes): the slow tests' share."""
    from digitrec.realworld import eval_real

    return eval_real(pretrained, count=500)


@pytest.mark.slow
def test_real_world_targets(real_world):
    """Issue 4's targets on single digits and non-digits; the one it misses on this sample has its own test
    below."""
    r = real_world
    missed = []  # every target checked, so one missed target does not hide the state of the others
    for name in ("mnist-photo", "pen-photo", "font-photo"):
        if r[name]["accuracy"] < 0.98:
            missed.append(f"{name} {r[name]['accuracy']:.1%} right")
        if r[name]["rejected"] >= 0.01:
            missed.append(f"{name} {r[name]['rejected']:.1%} rejected")
    if r["negatives"]["rejected"] < 0.95:
        missed.append(f"negatives {r['negatives']['rejected']:.1%} rejected")
    # the target this sample misses (below) must not slip further: no worse than README's figure
    if r["numbers"]["exact"] < 0.944:
        missed.append(f"numbers {r['numbers']['exact']:.1%} exact, below this sample's 94.4%")
    assert not missed, "issue 4's targets missed: " + "; ".join(missed)


# Kept apart so that any other missed target still fails `make test-slow`. Over seed 0's first 2,000 per set
# (README's table) numbers holds (95.30% exact). Strict: once a change meets it on this sample, the unexpected
# pass fails, so that the target moves into the test above.
MISSED_ON_THIS_SAMPLE = {
    "numbers exact": "94.4% on these 500 lines (95.0 / 96.4% on development seeds 2 / 3; docs/realworld.md)",
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "target",
    [
        pytest.param(name, marks=pytest.mark.xfail(reason=f"issue 4: {why}", strict=True))
        for name, why in MISSED_ON_THIS_SAMPLE.items()
    ],
)
def test_real_world_targets_this_sample_misses(real_world, target):
    assert target == "numbers exact"
    assert real_world["numbers"]["exact"] >= 0.95, f"numbers {real_world['numbers']['exact']:.1%} exact"


@pytest.mark.slow
def test_the_bundled_calibration_is_what_calibrate_gives_today(tmp_path):
    """A change to preprocess() or to the calibration sets moves the reject threshold: calibrate the bundled
    file again (README says how) rather than ship a stale one."""
    from digitrec.calibrate import calibrate
    from digitrec.checkpoint import load_tensors

    _, stored = load_tensors(pretrained_path())
    fresh = calibrate(
        pretrained_path(), out_path=tmp_path / "again.safetensors", half=True, log=lambda s: None
    )
    assert fresh["temperature"] == pytest.approx(stored["temperature"], abs=0.002)
    assert fresh["reject_below"] == pytest.approx(stored["reject_below"], abs=0.005)


def test_a_large_folder_spread_over_worker_processes_gives_the_same_answers(
    tmp_path, pretrained, monkeypatch
):
    import concurrent.futures

    from digitrec.predict import PARALLEL_FROM, predict_files

    pools: list[int] = []

    class Pool(concurrent.futures.ProcessPoolExecutor):  # the pool the folder is spread over, counted
        def __init__(self, workers, **kwargs):
            pools.append(workers)
            super().__init__(workers, **kwargs)

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Pool)

    paths = []
    for i, sample in enumerate(generate("pen-photo", PARALLEL_FROM + 6, seed=4)):
        paths.append(tmp_path / f"{i:03d}.jpg")
        paths[-1].write_bytes(sample.data)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    paths.insert(3, tmp_path / "broken.jpg")
    paths.insert(9, tmp_path / "missing.png")
    alone = predict_files(pretrained, paths, workers=1)
    assert pools == []
    spread = predict_files(pretrained, paths, workers=2)
    assert pools == [2]
    assert [r.to_dict() for r in spread] == [r.to_dict() for r in alone]
    assert "error" in spread[3].to_dict() and "does not exist" in spread[9].to_dict()["error"]
    assert sum(r.prediction is not None for r in spread) == PARALLEL_FROM + 6


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: Predictor.load(pretrained_path(), backend="bogus"),
            "backend must be one of auto, numpy, onnx, torch, got 'bogus'.",
        ),
        (
            lambda: Predictor.load(pretrained_path(), backend="ONNX"),
            "backend must be one of auto, numpy, onnx, torch, got 'ONNX'.",
        ),
        (
            lambda: Predictor.pretrained(reject_below=float("nan")),
            "reject_below must be a probability from 0 to 1, got nan.",
        ),
        (
            lambda: Predictor.pretrained(reject_below=-1),
            "reject_below must be a probability from 0 to 1, got -1.",
        ),
        (
            lambda: Predictor.pretrained(reject_below=2),
            "reject_below must be a probability from 0 to 1, got 2.",
        ),
        (
            lambda: Predictor.load("model.onnx", backend="torch"),
            "model.onnx is an ONNX file, which runs on ONNX Runtime only",
        ),
    ],
)
def test_the_python_api_refuses_what_the_cli_refuses(call, message):
    """Each was accepted: an unknown or upper-case backend ran on torch, NaN turned rejection off, -1 and 2 were
    kept, and an .onnx file asked to run on torch silently ran on ONNX Runtime."""
    with pytest.raises(DigitrecError) as refused:
        call()
    assert str(refused.value).startswith(message)


@pytest.mark.parametrize("top_k", [0, -1, 11, 100, 2.5, True])
def test_top_k_outside_one_to_ten_is_refused_not_clamped(pretrained, top_k):
    image = pen_photos(1)[0].data
    for call in (
        lambda: pretrained.predict(image, top_k=top_k),
        lambda: pretrained.predict_tensor(np.zeros((1, 1, 28, 28)), top_k),
    ):
        with pytest.raises(DigitrecError, match=f"top_k must be a whole number from 1 to 10, got {top_k!r}."):
            call()
    assert len(pretrained.predict(image, top_k=10)[0].top) == 10


def test_a_stroke_run_off_the_pad_is_kept_and_a_stream_that_cannot_seek_still_reads(pretrained):
    """A 4 whose stem runs off the bottom edge: the stem, a straight bar twice the size of the 4's other part,
    was dropped as "a pen lying on the page" and the rest read as a 6. And a big blank photo from a pipe: the
    second look for thin strokes loaded it again from the spent stream ("not an image digitrec can read")."""
    import io

    import cv2

    four = np.full((280, 280), 255, np.uint8)
    cv2.line(four, (180, 20), (180, 279), 0, 16)
    cv2.polylines(four, [np.array([(110, 40), (80, 150), (160, 150)])], False, 0, 16)
    assert pretrained.predict(four)[0].digit == 4

    class Pipe(io.RawIOBase):  # a stream that can only be read once, like a socket or `urlopen`
        def __init__(self, data: bytes):
            self.data = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            chunk = self.data.read(len(buffer))
            buffer[: len(chunk)] = chunk
            return len(chunk)

    blank = io.BytesIO()
    Image.fromarray(np.full((1200, 1600), 240, np.uint8)).save(blank, "JPEG")
    assert pretrained.predict(Pipe(blank.getvalue()))[0].rejected
    assert pretrained.read(Pipe(blank.getvalue())).number == ""


def test_cli_says_a_blank_page_is_rejected_as_blank(tmp_path, capsys, untrained_path):
    """A blank page was "not a digit (rejected)" beside a confidence above the threshold, with no reason."""
    Image.new("L", (60, 60), 255).save(tmp_path / "blank.png")
    write_png(tmp_path / "five.png", line_image([5], gap=0.3)[0])
    assert (
        main(
            [
                "predict",
                str(tmp_path / "blank.png"),
                str(tmp_path / "five.png"),
                "--model",
                str(untrained_path),
            ]
        )
        == 0
    )
    blank_line, five_line = capsys.readouterr().out.strip().splitlines()
    # and no confidence or top digits: the model's output for no ink at all means nothing
    assert blank_line == f"{tmp_path / 'blank.png'}: not a digit (rejected: a blank page, no ink)"
    assert "no ink" not in five_line and "confidence" in five_line


def test_predict_json_tells_a_blank_page_from_a_doubtful_image(tmp_path, capsys, untrained_path):
    """`predict --json` gave both `"digit": null` and nothing else: a script could not tell an empty page from a
    digit the model was unsure of, as /api/predict's `blank` and `rejected` can."""
    Image.new("L", (60, 60), 255).save(tmp_path / "blank.png")
    write_png(tmp_path / "five.png", line_image([5], gap=0.3)[0])
    paths = [str(tmp_path / "blank.png"), str(tmp_path / "five.png")]
    # an untrained model is unsure of everything: at 0.99 the five is rejected too, but it is not blank
    assert main(["predict", *paths, "--model", str(untrained_path), "--reject-below", "0.99", "--json"]) == 0
    blank, five = json.loads(capsys.readouterr().out)
    assert blank["digit"] is None and blank["rejected"] is True and blank["blank"] is True
    assert five["digit"] is None and five["rejected"] is True and five["blank"] is False


def test_predict_and_read_name_each_file_as_the_user_spelled_it(
    tmp_path, capsys, monkeypatch, untrained_path
):
    """`predict ./x.png` printed "x.png" (a Path tidies "./" and "//" away), so a script could not match the
    output to its own arguments."""
    (tmp_path / "d").mkdir()
    write_png(tmp_path / "x.png", line_image([5], gap=0.3)[0])
    write_png(tmp_path / "d" / "y.png", line_image([7], gap=0.3)[0])
    monkeypatch.chdir(tmp_path)
    given = ["./x.png", ".//d/"]
    for command in ("predict", "read"):
        assert main([command, *given, "--model", str(untrained_path), "--json"]) == 0
        assert [row["path"] for row in json.loads(capsys.readouterr().out)] == ["./x.png", ".//d/y.png"]
    assert main(["predict", "./x.png", "--model", str(untrained_path)]) == 0
    assert capsys.readouterr().out.startswith("./x.png: ")


def test_cli_says_which_subfolders_it_did_not_read_and_why_a_link_fails(tmp_path, capsys, untrained_path):
    write_png(tmp_path / "good.png", line_image([5], gap=0.3)[0])
    (tmp_path / "more").mkdir()
    write_png(tmp_path / "more" / "other.png", line_image([7], gap=0.3)[0])
    (tmp_path / "old.png").symlink_to("moved-away.png")
    assert main(["predict", str(tmp_path), "--model", str(untrained_path), "--json"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [row["path"] for row in rows] == [str(tmp_path / "good.png"), str(tmp_path / "old.png")]
    assert "symbolic link to moved-away.png" in rows[1]["error"]
    assert "skipped 1 folder(s)" in captured.err and str(tmp_path / "more") in captured.err
    assert "not searched recursively" in captured.err


def test_cli_keeps_going_past_a_file_it_may_not_look_at(tmp_path, capsys, untrained_path, monkeypatch):
    """A file in a folder without search permission stopped the whole command (exit 2), losing the others."""
    good = write_png(tmp_path / "good.png", line_image([5], gap=0.3)[0])
    hidden = tmp_path / "locked" / "x.png"
    real_stat = Path.stat

    def stat(self, *args, **kwargs):
        if self == hidden:
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    for command in ("predict", "read"):
        assert main([command, str(hidden), str(good), "--model", str(untrained_path), "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert "cannot be read (Permission denied)" in rows[0]["error"] and "error" not in rows[1]


@pytest.mark.parametrize("command", ["predict", "read"])
def test_an_empty_image_argument_is_refused_not_read_as_the_current_folder(
    tmp_path, capsys, untrained_path, monkeypatch, command
):
    """`digitrec predict "$IMG"` with $IMG unset read every image in the current folder, without a word."""
    write_png(tmp_path / "someone-else.png", line_image([5], gap=0.3)[0])
    monkeypatch.chdir(tmp_path)
    assert main([command, "", "--model", str(untrained_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "an empty IMG argument" in captured.err


def test_a_digit_box_is_plain_json_whatever_numpy_types_it_holds():
    """`read --json` and `/api/read` share DigitBox.to_dict; the server cast NumPy values on its own copy."""
    from digitrec.predict import DigitBox, ReadResult

    box = DigitBox(
        np.int64(3), np.float32(0.875), tuple(np.int64(v) for v in (1, 2, 3, 4)), np.bool_(True), np.int64(1)
    )
    said = json.loads(json.dumps(ReadResult("5\n3", [box]).to_dict()))
    assert said == {
        "number": "5\n3",
        "lines": ["5", "3"],
        "digits": [{"digit": 3, "confidence": 0.875, "box": [1, 2, 3, 4], "doubtful": True, "line": 1}],
        "rejected_lines": 0,
    }


@pytest.mark.parametrize("backend", ["torch", "numpy", "onnx"])
def test_a_portable_predictor_travels_to_another_process_and_answers_the_same(
    backend: str, tiny_fast_run: Path, tiny_mnist, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the server's reading workers get: a pickle with no torch module in it (an ONNX Runtime session goes
    as its model's bytes and is opened again, whatever its file holds by then), the same calibration and
    threshold, the same answers."""
    import pickle

    if backend == "onnx":
        pytest.importorskip("onnxruntime")
        monkeypatch.setenv("DIGITREC_CACHE", str(tmp_path / "cache"))
    predictor = Predictor.load(tiny_fast_run, reject_below=0.3, backend=backend)
    portable = predictor.portable()
    assert portable is not None and portable.model is None
    pickled = pickle.dumps(portable)
    if backend == "onnx":
        # the file replaced after loading (a redeploy): the workers still run what was loaded
        predictor.backend.path.write_bytes(b"not an ONNX model")
    moved = pickle.loads(pickled)
    assert type(moved.backend).__name__ == {"torch": "NumpyBackend"}.get(
        backend, type(predictor.backend).__name__
    )
    assert (moved.reject_below, moved.temperature, moved.model_id) == (
        0.3,
        predictor.temperature,
        predictor.model_id,
    )
    batch = tiny_mnist.test_images[:40].numpy()[:, None] / np.float32(255)
    assert np.abs(moved.probabilities(batch) - predictor.probabilities(batch)).max() <= 1e-4


def test_a_predictor_nothing_but_torch_runs_has_no_portable_form(tmp_path: Path) -> None:
    path = tmp_path / "lenet.safetensors"
    save_model(path, create_model("lenet"), {"recipe": "seed-lenet", "config": {"arch": "lenet"}})
    assert Predictor.load(path).portable() is None


@pytest.mark.skipif(os.name != "posix", reason="file names as bytes")
def test_a_file_name_that_is_not_utf8_is_printed_as_its_bytes_on_a_strict_terminal(tmp_path, untrained_path):
    """caf\\xe9.png (Latin-1) printed to an en_US.UTF-8 terminal raised UnicodeEncodeError after the work."""
    import subprocess
    import sys

    name = os.fsencode(tmp_path) + b"/caf\xe9.png"
    write_png(Path(os.fsdecode(name)), line_image([3], gap=0.3)[0])
    result = subprocess.run(
        [sys.executable, "-m", "digitrec", "predict", os.fsdecode(name), "--model", str(untrained_path)],
        capture_output=True,
        env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    assert result.stdout.startswith(name + b": ") and b"Traceback" not in result.stderr


def test_a_long_name_is_cut_between_characters():
    """Cut at byte 200, a name of Chinese characters kept half of one: a file name that is not UTF-8."""
    from digitrec.predict import STEPS_STEM_BYTES, _steps_name

    name = _steps_name("数字" * 40, set())
    assert name.encode("utf-8").decode("utf-8") == name and name.endswith("数字.steps.png")
    assert len(name.removesuffix(".steps.png").encode()) <= STEPS_STEM_BYTES


def test_predict_says_when_its_model_was_never_calibrated(tiny_fast_run, tmp_path, capsys):
    """serve said it; predict and read used the default threshold without a word."""
    from PIL import Image

    image = tmp_path / "blank.png"
    Image.new("L", (40, 40), 255).save(image)
    for command in ("predict", "read"):
        assert main([command, str(image), "--model", str(tiny_fast_run), "--json"]) == 0
        err = capsys.readouterr().err
        assert f"note: {tiny_fast_run} was never calibrated" in err and "`digitrec calibrate MODEL`" in err
    assert main(["predict", str(image), "--model", str(tiny_fast_run), "--reject-below", "0.5"]) == 0
    assert "never calibrated" not in capsys.readouterr().err  # a threshold of the user's own
    assert main(["predict", str(image)]) == 0  # the bundled model is calibrated
    assert "never calibrated" not in capsys.readouterr().err


def test_the_note_on_an_uncalibrated_export_says_to_calibrate_its_checkpoint(tiny_fast_run, tmp_path):
    """It said "`digitrec calibrate MODEL` fixes that", which refuses an .onnx file."""
    pytest.importorskip("onnxruntime")
    from digitrec.export import export_onnx
    from digitrec.predict import Predictor, uncalibrated_note

    exported = tmp_path / "fast.onnx"
    export_onnx(tiny_fast_run / "model.safetensors", exported, log=lambda s: None)
    note = uncalibrated_note(Predictor.load(exported, backend="onnx"), exported)
    assert note and "calibrate the checkpoint it was exported from" in note and "and export it again" in note


def test_the_torch_backend_reads_on_its_own_thread_count_and_gives_the_callers_back():
    """A library user's torch.set_num_threads(4) is theirs: the backend reads on one thread (its own count) and
    leaves theirs as it found it."""
    from digitrec.predict import TorchBackend

    seen = []

    class Model(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return torch.zeros(len(x), 10)

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        TorchBackend(Model())(np.zeros((2, 1, 28, 28), np.float32))
        assert seen == [1] and torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)
