"""The reject threshold: chosen so that no calibration set of real digits loses more than its share; the
temperature: the minimum of the validation NLL."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from digitrec.calibrate import choose_threshold, fit_temperature

FAKE_MNIST = (np.random.default_rng(0).integers(0, 255, (50, 28, 28)).astype(np.uint8), np.arange(50) % 10)


def test_the_threshold_protects_the_least_confident_set_of_digits():
    rng = np.random.default_rng(0)
    sure, shaky = rng.beta(30, 1, 5000), rng.beta(6, 1, 600)
    pooled = choose_threshold(np.concatenate([sure, shaky]), max_digit_rejection=0.005)
    per_set = choose_threshold([sure, shaky], max_digit_rejection=0.005)
    assert per_set < pooled  # pooling lets the big, confident set hide the shaky one
    assert (shaky < per_set).mean() <= 0.0051 and (sure < per_set).mean() <= 0.0051
    assert (shaky < pooled).mean() > 0.01


def test_one_array_still_works_and_the_cut_is_bounded():
    assert choose_threshold(np.ones(100)) == 0.99
    assert choose_threshold([np.zeros(10), np.ones(10)]) == 0.0


@pytest.mark.parametrize("true_temperature", [0.6, 1.7, 2.9])
def test_the_temperature_is_the_nll_minimum_to_a_tenth_of_a_percent(true_temperature):
    """fit_temperature's grids promise the minimum to 0.1%; an off-the-shelf 1-D minimizer finds the reference."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2000, 10, generator=generator) * 4
    labels = torch.distributions.Categorical(logits=logits / true_temperature).sample()

    def nll(log_t: float) -> float:
        return torch.nn.functional.cross_entropy(logits.double() / np.exp(log_t), labels).item()

    reference = float(
        np.exp(minimize_scalar(nll, bounds=(-3, 3), method="bounded", options={"xatol": 1e-7}).x)
    )
    assert reference == pytest.approx(true_temperature, rel=0.1)
    assert fit_temperature(logits, labels) == pytest.approx(reference, rel=1e-3)


def test_calibrate_fits_on_the_held_out_split_and_cuts_over_every_tempered_set(
    tiny_fast_run, tiny_mnist, tmp_path, monkeypatch
):
    """The temperature is the NLL minimum on the seed-0 validation split (the one training held out); the
    threshold is chosen over the three generated photo sets (seed 1) and the validation digits, each scored at
    that temperature, with blank pages at confidence 0 (the predictor rejects them before the model)."""
    import inspect
    import io

    from PIL import Image

    from digitrec import calibrate as calibrate_module
    from digitrec import data, realworld
    from digitrec.checkpoint import load_model
    from digitrec.evaluate import predict_logits
    from digitrec.preprocess import preprocess

    blank = io.BytesIO()
    Image.new("L", (40, 40), 235).save(blank, "PNG")
    real_generate = realworld.generate

    seeds = set()
    digits: list[tuple[np.ndarray, np.ndarray]] = []

    def with_a_blank_page(name, count, seed, mnist=None):  # calibrate passes the MNIST it loaded
        seeds.add(seed)
        if mnist is not None:
            digits.append(mnist)
        samples = list(real_generate(name, count, seed, mnist=FAKE_MNIST))
        return [realworld.Sample(blank.getvalue(), samples[0].label, "blank"), *samples[1:]]

    chosen: list[list[np.ndarray]] = []
    monkeypatch.setattr(data, "load_mnist", lambda *args, **kwargs: tiny_mnist)
    monkeypatch.setattr(realworld, "generate", with_a_blank_page)
    monkeypatch.setattr(calibrate_module, "choose_threshold", lambda sets: chosen.append(sets) or 0.5)
    path = tmp_path / "model.safetensors"
    result = calibrate_module.calibrate(
        tiny_fast_run / "model.safetensors", count=8, out_path=path, log=lambda s: None
    )

    model, meta = load_model(tiny_fast_run / "model.safetensors")
    _, _, val_images, val_labels = data.split_validation(
        tiny_mnist.train_images, tiny_mnist.train_labels, 200, seed=0
    )
    val_logits = predict_logits(model, val_images)
    temperature = fit_temperature(val_logits, val_labels)
    assert result["temperature"] == temperature != pytest.approx(1.0, abs=0.05)
    assert (result["reject_below"], load_model(path)[1]["reject_below"]) == (0.5, 0.5)
    # drawn apart from the photos eval-real scores (its default seed), so the threshold is not tuned on them
    assert (
        seeds
        == {calibrate_module.CALIBRATION_SEED}
        != {inspect.signature(realworld.eval_real).parameters["seed"].default}
    )
    # the mnist-photo set's digits are the validation split's: the test set chose the threshold (and the bundled
    # model's threshold came from it), and eval-real's mnist-photo set, made of test digits, overlapped it
    assert digits and all(
        np.array_equal(images, val_images.numpy()) and np.array_equal(labels, val_labels.numpy())
        for images, labels in digits
    )
    (sets,) = chosen
    assert len(sets) == 4
    for name, confidence in zip(("mnist-photo", "pen-photo", "font-photo"), sets, strict=False):
        pages = with_a_blank_page(name, 8, calibrate_module.CALIBRATION_SEED)
        batch = torch.from_numpy(np.stack([preprocess(s.data) for s in pages])[:, None])
        with torch.no_grad():
            expected = torch.softmax(model(batch) / temperature, 1).amax(1).numpy()
        expected[0] = 0.0  # the blank page
        np.testing.assert_allclose(confidence, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sets[3], torch.softmax(val_logits / temperature, 1).amax(1).numpy(), rtol=1e-5)


def test_calibrating_in_place_removes_the_exports_made_from_the_checkpoint_before(
    tiny_fast_run, tiny_mnist, tmp_path, monkeypatch
):
    """`digitrec calibrate RUN` left RUN/model.onnx (and model.int8.onnx) as they were: `predict --model
    RUN/model.onnx` kept temperature 1 and threshold 0.5, with no word. The exports made from the old checkpoint
    beside it go, in one line; an export kept elsewhere, and one beside it made from another checkpoint, stay."""
    pytest.importorskip("onnxruntime")
    import shutil

    from digitrec import calibrate as calibrate_module
    from digitrec import data, realworld
    from digitrec.checkpoint import load_model, save_model, sidecar_path
    from digitrec.export import export_onnx

    run = tmp_path / "run"
    run.mkdir()
    source = tiny_fast_run / "model.safetensors"
    for path in (source, sidecar_path(source)):
        shutil.copy(path, run / path.name)
    checkpoint = run / "model.safetensors"
    export_onnx(checkpoint, log=lambda s: None)  # run/model.onnx
    export_onnx(checkpoint, tmp_path / "kept.onnx", log=lambda s: None)
    other = tmp_path / "other.safetensors"
    model, meta = load_model(checkpoint)
    save_model(other, model, {**meta, "recipe": "another"})
    export_onnx(other, run / "other.onnx", log=lambda s: None)

    real_generate = realworld.generate
    monkeypatch.setattr(data, "load_mnist", lambda *args, **kwargs: tiny_mnist)
    monkeypatch.setattr(
        realworld,
        "generate",
        lambda name, count, seed, mnist=None: real_generate(name, count, seed, mnist=FAKE_MNIST),
    )
    said: list[str] = []
    calibrate_module.calibrate(checkpoint, count=4, log=said.append)  # in place, as the CLI
    assert not (run / "model.onnx").exists()
    assert (tmp_path / "kept.onnx").exists() and (run / "other.onnx").exists()
    (removed,) = [line for line in said if line.startswith("removed ")]
    assert removed.startswith(
        f"removed model.onnx from {run}: exported from model.safetensors before this calibration"
    )
    assert f"`digitrec export {checkpoint}`" in removed

    said.clear()  # written elsewhere: the checkpoint and its exports are as they were
    export_onnx(checkpoint, log=lambda s: None)
    calibrate_module.calibrate(
        checkpoint, count=4, out_path=tmp_path / "calibrated.safetensors", log=said.append
    )
    assert (run / "model.onnx").exists() and not any(line.startswith("removed ") for line in said)

    # written over another checkpoint (--out): the exports made from what that one held go, as in place
    replaced = tmp_path / "replaced"
    replaced.mkdir()
    for path in (source, sidecar_path(source)):
        shutil.copy(path, replaced / path.name)
    export_onnx(replaced / "model.safetensors", log=lambda s: None)
    said.clear()
    calibrate_module.calibrate(checkpoint, count=4, out_path=replaced / "model.safetensors", log=said.append)
    assert not (replaced / "model.onnx").exists()
    assert [line for line in said if line.startswith(f"removed model.onnx from {replaced}: exported")]


def test_the_printed_ece_says_when_the_validation_images_were_trained_on(
    tiny_fast_run, tiny_mnist, tmp_path, monkeypatch
):
    """`fast` trains on every image (val_size 0): the 'validation' split calibrate fits on was seen in training,
    and its line said only "validation ECE"."""
    from digitrec import calibrate as calibrate_module
    from digitrec import data
    from digitrec.checkpoint import load_model, save_model

    monkeypatch.setattr(data, "load_mnist", lambda *args, **kwargs: tiny_mnist)
    said: list[str] = []
    calibrate_module.calibrate(
        tiny_fast_run / "model.safetensors", count=4, out_path=tmp_path / "a.safetensors", log=said.append
    )
    assert "validation (seen in training) ECE" in said[0]
    model, meta = load_model(tiny_fast_run / "model.safetensors")
    held_out = tmp_path / "held-out.safetensors"
    save_model(held_out, model, meta | {"config": {**meta["config"], "val_size": 200}})
    said.clear()
    calibrate_module.calibrate(held_out, count=4, out_path=tmp_path / "b.safetensors", log=said.append)
    assert "validation ECE" in said[0] and "seen in training" not in said[0]


def test_the_commands_default_photo_count_is_the_functions():
    """`digitrec calibrate` without --count calibrates on as many photos a set as calibrate() does."""
    from digitrec.calibrate import CALIBRATION_COUNT
    from digitrec.cli import build_parser

    assert build_parser().parse_args(["calibrate", "runs/x"]).count == CALIBRATION_COUNT


@pytest.mark.parametrize("where", ["the model's folder, in place", "--out's folder"])
def test_calibrate_refuses_a_folder_a_run_is_training_in(tiny_fast_run, tmp_path, monkeypatch, where):
    """calibrate took no lock: beside a run training into the folder its calibration was lost when the run
    wrote its model, or it wrote an earlier epoch's weights over the run's finished model."""
    from digitrec import calibrate as calibrate_module
    from digitrec import data
    from digitrec.folderlock import RunFolderInUse, locked_run_folder

    monkeypatch.setattr(data, "load_mnist", lambda *a, **k: pytest.fail("calibrated a folder in use"))
    run = tmp_path / "run"
    shutil.copytree(tiny_fast_run, run)
    out = tmp_path / "other"
    out.mkdir()
    in_place = where.endswith("in place")
    busy = run if in_place else out
    with (
        locked_run_folder(busy),
        pytest.raises(RunFolderInUse, match=f"{busy} is in use by another digitrec run"),
    ):
        calibrate_module.calibrate(
            run / "model.safetensors",
            count=4,
            out_path=None if in_place else out / "model.safetensors",
            log=lambda s: None,
        )


def test_a_model_may_be_calibrated_into_another_folder_while_its_own_is_held(
    tiny_fast_run, tiny_mnist, tmp_path, monkeypatch
):
    """The lock is the written folder's: two calibrations of one model into two folders refused each other."""
    from digitrec import calibrate as calibrate_module
    from digitrec import data
    from digitrec.folderlock import locked_run_folder

    monkeypatch.setattr(data, "load_mnist", lambda *a, **k: tiny_mnist)
    run = tmp_path / "run"
    shutil.copytree(tiny_fast_run, run)
    with locked_run_folder(run):  # another calibration of it, writing elsewhere, holds the model's folder
        calibrate_module.calibrate(
            run / "model.safetensors",
            count=4,
            out_path=tmp_path / "b" / "model.safetensors",
            log=lambda s: None,
        )
    assert (tmp_path / "b" / "model.safetensors").exists()


def test_calibrate_out_refuses_another_runs_folder_but_not_its_own_or_an_earlier_outs(
    tiny_fast_run, tiny_mnist, tmp_path, monkeypatch
):
    """`calibrate A --out B`, B a run's folder, replaced B's model and left B's metrics, history, last.safetensors
    and report describing the model B trained (a resume then went on from B's last epoch, an evaluate scored A)."""
    from digitrec import calibrate as calibrate_module
    from digitrec import data
    from digitrec.checkpoint import model_file
    from digitrec.errors import DigitrecError

    monkeypatch.setattr(data, "load_mnist", lambda *a, **k: tiny_mnist)
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_fast_run, a)
    shutil.copytree(tiny_fast_run, b)
    before = (b / "model.safetensors").read_bytes()
    for out in (b, b / "model.safetensors"):
        with pytest.raises(
            DigitrecError, match=f"^--out {b / 'model.safetensors'} is in the run folder {b}, whose"
        ):
            calibrate_module.calibrate(a, count=4, out_path=model_file(out), log=lambda s: None)
    assert (b / "model.safetensors").read_bytes() == before
    quiet = {"count": 4, "log": lambda s: None}
    calibrate_module.calibrate(a / "model.safetensors", out_path=a / "model.safetensors", **quiet)  # in place
    fresh = tmp_path / "calibrated" / "model.safetensors"
    calibrate_module.calibrate(a / "model.safetensors", out_path=fresh, **quiet)
    calibrate_module.calibrate(a / "model.safetensors", out_path=fresh, **quiet)  # again: no run's folder
    # not b's model
    calibrate_module.calibrate(a / "model.safetensors", out_path=b / "half.safetensors", **quiet)
    assert (b / "model.safetensors").read_bytes() == before
    mine = (
        tmp_path / "mine"
    )  # a folder of the user's, with a metrics.json of theirs and no run: theirs to use
    mine.mkdir()
    (mine / "metrics.json").write_text("{}")
    calibrate_module.calibrate(a / "model.safetensors", out_path=mine / "model.safetensors", **quiet)


def test_calibrate_replaces_a_damaged_reject_threshold_instead_of_refusing_it(
    tiny_fast_run, tiny_mnist, tmp_path, monkeypatch
):
    """It fitted the temperature, then stopped with "the model model records a reject threshold of 'abc' ...;
    write it again with `digitrec calibrate`": the command that had just failed, and no path."""
    from digitrec import calibrate as calibrate_module
    from digitrec import data
    from digitrec.checkpoint import load_model, save_model

    monkeypatch.setattr(data, "load_mnist", lambda *a, **k: tiny_mnist)
    model, meta = load_model(tiny_fast_run / "model.safetensors")
    bad = tmp_path / "bad.safetensors"
    save_model(bad, model, meta | {"reject_below": "abc"})
    calibrate_module.calibrate(bad, count=4, log=lambda s: None)
    assert 0 <= load_model(bad)[1]["reject_below"] <= 1


@pytest.mark.parametrize("temperature", ["abc", 0, -1.0, {}, True])
def test_a_temperature_no_model_can_have_is_one_sentence_for_every_command(
    tiny_fast_run, idx_folder, tmp_path, capsys, temperature
):
    """predict refused it in a sentence; evaluate, ensemble and robustness raised ValueError or TypeError
    tracebacks, or (at 0) printed nan% confidences."""
    from digitrec.checkpoint import load_model, save_model
    from digitrec.cli import main

    model, meta = load_model(tiny_fast_run / "model.safetensors")
    bad = tmp_path / "bad.safetensors"
    save_model(bad, model, meta | {"temperature": temperature})
    data = ["--data-dir", str(idx_folder)]
    for command in (
        ["evaluate", str(bad), *data],
        ["ensemble", str(bad), str(tiny_fast_run), "--out", str(tmp_path / "ens.safetensors"), *data],
        ["robustness", str(bad), "--limit", "10", "--out", str(tmp_path / "rob"), *data],
    ):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert f"records a temperature of {temperature!r}, not a positive number" in err, command
        assert "Traceback" not in err
