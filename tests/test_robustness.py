"""Robustness: perturbations do what their names say, models are scored on identical images, the CLI reports and plots."""

from __future__ import annotations

import json
import math

import pytest
import torch

from digitrec import robustness
from digitrec.checkpoint import load_model, save_model
from digitrec.cli import main
from digitrec.config import TrainConfig

BY_NAME = {p.name: p for p in robustness.PERTURBATIONS}


@pytest.fixture(scope="module")
def run_dir(tiny_fast_run):
    return tiny_fast_run


def test_clean_strength_leaves_images_alone(tiny_mnist):
    images = tiny_mnist.test_images[:20]
    for p in robustness.PERTURBATIONS:
        assert torch.equal(robustness.perturb(images, p, p.clean), images), p.name


def test_perturbations_change_ink_the_way_they_say(tiny_mnist):
    images = tiny_mnist.test_images[:20]
    ink = images.float().sum()
    assert robustness.perturb(images, BY_NAME["stroke"], 1).float().sum() > ink  # dilate: thicker
    assert robustness.perturb(images, BY_NAME["stroke"], -1).float().sum() < ink  # erode: thinner
    assert robustness.perturb(images, BY_NAME["contrast"], 0.5).float().sum() == pytest.approx(
        ink.item() / 2, rel=0.01
    )
    assert torch.equal(robustness.perturb(images, BY_NAME["inversion"], 1.0), 255 - images)
    # seeded: the same call twice gives the same images, so several models see identical inputs
    assert torch.equal(
        robustness.perturb(images, BY_NAME["rotation"], 30),
        robustness.perturb(images, BY_NAME["rotation"], 30),
    )


def _ink_moments(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each image's ink mass (N,), centre of mass (N, 2: x, y) and axis angle in degrees (N,), from the
    intensity-weighted second moments; a horizontal bar's angle is 0."""
    w = images.float()
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    mass = w.sum((1, 2))
    cx = (w * xs).sum((1, 2)) / mass
    cy = (w * ys).sum((1, 2)) / mass
    dx, dy = xs - cx[:, None, None], ys - cy[:, None, None]
    mu20 = (w * dx**2).sum((1, 2)) / mass
    mu02 = (w * dy**2).sum((1, 2)) / mass
    mu11 = (w * dx * dy).sum((1, 2)) / mass
    angle = torch.rad2deg(0.5 * torch.atan2(2 * mu11, mu20 - mu02))
    return mass, torch.stack([cx, cy], 1), angle


def _block(count: int, rows: slice, cols: slice) -> torch.Tensor:
    images = torch.zeros(count, 28, 28, dtype=torch.uint8)
    images[:, rows, cols] = 255
    return images


@pytest.mark.parametrize("degrees", [30, 60])
def test_rotation_turns_a_bar_by_a_random_angle_within_the_named_degrees(degrees):
    """A horizontal bar's axis turns by a uniform random angle within ± the strength: never beyond it, both ways,
    by up to nearly all of it and on average by about half of it, so no rotation, or a fixed one, fails."""
    bars = _block(400, slice(13, 15), slice(6, 22))  # 16 x 2 px through the centre
    _, _, angle = _ink_moments(robustness.perturb(bars, BY_NAME["rotation"], degrees))
    assert angle.abs().max() <= degrees + 2
    assert angle.min() < -0.85 * degrees and angle.max() > 0.85 * degrees
    assert angle.abs().mean() == pytest.approx(degrees / 2, rel=0.15)


@pytest.mark.parametrize("factor", [1.3, 0.6])
def test_scale_changes_the_inks_extent_by_the_named_factor(factor):
    """Every image is scaled by exactly the factor about the centre: a centred square's ink spreads factor times
    as far and its area (total ink) changes by factor squared; the centre stays put."""
    squares = _block(3, slice(9, 19), slice(9, 19))  # 10 x 10 px, centred on the image's centre 13.5
    mass, centre, _ = _ink_moments(squares)
    scaled = robustness.perturb(squares, BY_NAME["scale"], factor)
    new_mass, new_centre, _ = _ink_moments(scaled)
    assert new_mass / mass == pytest.approx(torch.full((3,), factor**2), rel=0.06)
    assert new_centre == pytest.approx(centre, abs=0.05)
    width = scaled.float().amax(1).sum(1) / 255  # the ink's width in pixels, an edge column part-covered
    assert width == pytest.approx(torch.full((3,), 10 * factor), abs=0.3)


@pytest.mark.parametrize("pixels", [2, 6])
def test_translation_moves_the_centre_of_mass_by_up_to_the_named_pixels(pixels):
    """Each image moves by its own uniform random shift within ± pixels, along x and y independently: the ink's
    centre never moves further, moves both ways by nearly all of it, on average by half, and keeps its mass."""
    squares = _block(400, slice(11, 17), slice(11, 17))  # 6 x 6 px: an 8 px shift keeps it inside the frame
    mass, centre, _ = _ink_moments(squares)
    new_mass, new_centre, _ = _ink_moments(robustness.perturb(squares, BY_NAME["translation"], pixels))
    shift = new_centre - centre
    assert shift.abs().max() <= pixels + 0.05
    for axis in (0, 1):
        assert shift[:, axis].min() < -0.85 * pixels and shift[:, axis].max() > 0.85 * pixels
        assert shift[:, axis].abs().mean() == pytest.approx(pixels / 2, rel=0.15)
    assert new_mass == pytest.approx(mass, rel=0.01)


@pytest.mark.parametrize("std", [0.1, 0.15])
def test_noise_adds_gaussian_pixel_noise_of_the_named_std_the_same_each_time(std):
    """On mid-gray images (far from clipping) the noise added has mean 0 and the named std in the 0-1 pixel
    range, differs from pixel to pixel and image to image, and is seeded: two calls give the same images."""
    gray = torch.full((20, 28, 28), 128, dtype=torch.uint8)
    noisy = robustness.perturb(gray, BY_NAME["noise"], std)
    added = (noisy.float() - gray.float()) / 255
    assert added.std().item() == pytest.approx(std, rel=0.03)
    assert added.mean().item() == pytest.approx(0, abs=0.005)
    assert not torch.equal(noisy[0], noisy[1])
    assert torch.equal(noisy, robustness.perturb(gray, BY_NAME["noise"], std))


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_blur_is_a_zero_padded_separable_gaussian(sigma):
    """The banded-matrix blur gives what the textbook separable conv2d gives, on a non-square image too."""
    import math

    import torch.nn.functional as F

    images = torch.randint(0, 256, (6, 28, 20), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    rows = F.conv2d(images.unsqueeze(1).float() / 255, kernel.view(1, 1, 1, -1), padding=(0, radius))
    expected = F.conv2d(rows, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    expected = (expected.clamp(0, 1) * 255).round()[:, 0]
    blurred = robustness.perturb(images, BY_NAME["blur"], sigma).float()
    assert (blurred - expected).abs().max() <= 1  # sums taken in another order may round the other way
    assert (blurred - images.float()).abs().mean() > 10  # and it did blur: random pixels lose their contrast


def test_coverage_curve_trades_answers_for_accuracy():
    # 10 confident right answers, 10 unsure wrong ones: keeping the top half is 100% right
    logits = torch.cat([torch.eye(10) * 10, torch.eye(10).roll(1, 1) * 0.5])
    labels = torch.cat([torch.arange(10), torch.arange(10)])
    curve = robustness.coverage_curve(logits, labels)
    rows = {round(r["coverage"], 2): r["accuracy"] for r in curve}
    assert rows[1.0] == pytest.approx(0.5) and rows[0.5] == pytest.approx(1.0)
    assert rows[0.75] == pytest.approx(10 / 15)  # the 10 right ones and the 5 most confident wrong ones
    # the threshold that keeps a share is the confidence of the least confident answer kept
    sure, unsure = (math.exp(10) / (math.exp(10) + 9), math.exp(0.5) / (math.exp(0.5) + 9))
    thresholds = {round(r["coverage"], 2): r["threshold"] for r in curve}
    assert thresholds[0.5] == pytest.approx(sure) and thresholds[1.0] == pytest.approx(unsure)
    result = {
        "coverage": curve,
        "perturbations": {"noise": [{"accuracy": 0.9}, {"accuracy": 0.6}, {"accuracy": 0.3}]},
    }
    assert robustness.coverage_at(result, 0.52)["coverage"] == pytest.approx(0.5)
    assert robustness.summary(result) == {"noise": pytest.approx(0.6)}  # the mean over the strengths


def test_strong_perturbations_hurt_a_trained_model(run_dir, tiny_mnist):
    model = robustness.load_scored(run_dir)
    chosen = [BY_NAME["inversion"], BY_NAME["noise"]]
    report = robustness.evaluate_robustness(
        [model], tiny_mnist.test_images[:150], tiny_mnist.test_labels[:150], chosen
    )
    result = report["models"][0]
    assert result["clean_accuracy"] > 0.8
    assert result["perturbations"]["inversion"][-1]["accuracy"] < result["clean_accuracy"] - 0.3
    assert [row["strength"] for row in result["perturbations"]["noise"]] == list(BY_NAME["noise"].strengths)


def test_cli_compares_several_models_on_one_plot(run_dir, idx_folder, tmp_path, capsys):
    out = tmp_path / "robustness"
    model, meta = load_model(run_dir / "model.safetensors")
    # the same weights in another file: the models see identical images, and a copy would be refused
    save_model(tmp_path / "warmer.safetensors", model, meta | {"temperature": 2.0})
    code = main(
        [
            "robustness",
            str(run_dir),
            str(tmp_path / "warmer.safetensors"),
            "--limit",
            "40",
            "--json",
            "--out",
            str(out),
            "--data-dir",
            str(idx_folder),
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 40 and len(report["models"]) == 2
    first, second = report["models"]
    assert first["perturbations"] == second["perturbations"]  # same weights, same perturbed images
    assert (out / "robustness.png").stat().st_size > 10_000 and (out / "robustness.json").exists()


def test_cli_table_and_missing_model(run_dir, idx_folder, tmp_path, capsys):
    assert (
        main(
            [
                "robustness",
                str(run_dir),
                "--limit",
                "20",
                "--out",
                str(tmp_path),
                "--data-dir",
                str(idx_folder),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "rotation" in printed and "coverage" in printed and "plot:" in printed
    assert (
        main(["robustness", str(tmp_path / "nope"), "--data-dir", str(idx_folder), "--out", str(tmp_path)])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_cli_names_two_models_of_one_name_by_their_paths_and_refuses_one_model_twice(
    run_dir, idx_folder, tmp_path, capsys
):
    """runs/fast and other/fast were both labelled `fast` in the table, the legend and the JSON; the same model
    given twice was scored twice, silently."""
    model, meta = load_model(run_dir / "model.safetensors")
    for folder, temperature in (("a", 1.5), ("b", 2.0)):
        save_model(
            tmp_path / folder / "fast" / "model.safetensors", model, meta | {"temperature": temperature}
        )
    a, b = str(tmp_path / "a" / "fast"), str(tmp_path / "b" / "fast")
    flags = ["--limit", "20", "--json", "--out", str(tmp_path / "out"), "--data-dir", str(idx_folder)]
    assert main(["robustness", a, b, *flags]) == 0
    assert [m["name"] for m in json.loads(capsys.readouterr().out)["models"]] == [a, b]
    assert main(["robustness", a, f"{a}/model.safetensors", *flags]) == 2
    assert f"{a} and {a}/model.safetensors are the same model" in capsys.readouterr().err


@pytest.mark.parametrize("problem", ["missing model", "unwritable --out"])
def test_cli_checks_the_models_and_the_out_folder_before_scoring(
    problem, run_dir, idx_folder, tmp_path, capsys, monkeypatch
):
    """A missing model was found after loading MNIST, an --out under /proc after scoring every image."""
    from pathlib import Path

    from digitrec import data

    if problem == "unwritable --out" and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc")
    monkeypatch.setattr(data, "load_mnist", lambda *a, **k: pytest.fail("loaded MNIST before the checks"))
    model, out = (tmp_path / "nope", tmp_path) if problem == "missing model" else (run_dir, "/proc/nope")
    assert main(["robustness", str(model), "--out", str(out), "--data-dir", str(idx_folder)]) == 2
    err = capsys.readouterr().err
    assert (
        "does not exist" in err or "cannot write into the folder /proc/nope" in err
    ) and "Traceback" not in err


def test_a_checkpoint_is_scored_the_way_its_recipe_evaluates_one_view_each(
    run_dir, tiny_mnist, tmp_path, monkeypatch
):
    """load_scored scored every checkpoint in float32, contiguous, 500 at a time, whatever its recipe said, so
    the clean row of `digitrec robustness` and `explore` differed from `digitrec evaluate`'s."""
    from digitrec import evaluate

    model, meta = load_model(run_dir / "model.safetensors")
    recipe = {**meta["config"], "amp": True, "channels_last": True, "tta_views": 5, "eval_batch_size": 64}
    save_model(tmp_path / "bf16.safetensors", model, meta | {"config": recipe})
    calls = []
    real = evaluate.predict_logits

    def spy(*args, **kwargs):
        calls.append(args[2:])
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "predict_logits", spy)
    images, labels = tiny_mnist.test_images[:100], tiny_mnist.test_labels[:100]
    scored = robustness.load_scored(tmp_path / "bf16.safetensors")
    report = robustness.evaluate_robustness([scored], images, labels, [BY_NAME["noise"]])
    assert calls and set(calls) == {(64, True, True, 1)}  # eval batch size, bfloat16, channels-last, one view
    # the clean row is `digitrec evaluate --tta-views 1`'s accuracy on the same images
    config = TrainConfig.from_checkpoint(meta | {"config": recipe}).override(tta_views=1)
    _, accuracy = evaluate.evaluate(model, images, labels, config)
    assert report["models"][0]["clean_accuracy"] == accuracy


def test_the_reports_coverage_curve_is_at_the_models_calibrated_temperature(
    run_dir, tiny_mnist, tmp_path, monkeypatch
):
    """The report's accuracy-vs-coverage rows were computed at T=1 for a calibrated model, whose Predictor (and
    `digitrec robustness`) ranks its answers at its own temperature: another curve, other thresholds."""
    from digitrec.evaluate import write_report

    model, meta = load_model(run_dir / "model.safetensors")
    config = TrainConfig.from_checkpoint(meta)
    images, labels = tiny_mnist.test_images[:100], tiny_mnist.test_labels[:100]
    logits = robustness.torch_scorer(model, config)(images)
    at = robustness.for_report(model, tiny_mnist, 100, config, temperature=0.3)["models"][0]["coverage"]
    assert at == robustness.coverage_curve(logits, labels, 0.3) != robustness.coverage_curve(logits, labels)
    asked: list[float] = []
    for_report = robustness.for_report
    monkeypatch.setattr(robustness, "for_report", lambda *args: asked.append(args[4]) or for_report(*args))
    write_report(
        tmp_path, model, tiny_mnist, config=config, meta={**meta, "temperature": 0.3}, robustness_images=20
    )
    assert asked == [0.3]


def test_coverage_rows_keep_no_more_than_their_coverage_on_few_images():
    """On 50 images round() kept all 50 for the 99% row, and the table printed 100% accuracy as "99%"."""
    logits = torch.eye(10).repeat(5, 1) * torch.linspace(1, 9, 50)[:, None]
    labels = torch.arange(10).repeat(5)
    labels[0] = 1  # the least confident answer is wrong: the 99% row must not keep it
    curve = robustness.coverage_curve(logits, labels)
    row = robustness.coverage_at({"coverage": curve}, 0.99)
    assert row["coverage"] == pytest.approx(0.98) and row["accuracy"] == 1.0
    assert all(robustness.coverage_at({"coverage": curve}, c)["coverage"] <= c for c in robustness.COVERAGES)
    # 10,000 images: every row at exactly its coverage (0.99 * 10,000 is 9899.999... as a float)
    many = {
        "coverage": robustness.coverage_curve(torch.eye(10).repeat(1000, 1), torch.arange(10).repeat(1000))
    }
    assert [robustness.coverage_at(many, c)["coverage"] for c in robustness.COVERAGES] == list(
        robustness.COVERAGES
    )
    result = {
        "images": 50,
        "perturbations": [],
        "models": [{"name": "m", "clean_accuracy": 1.0, "coverage": curve}],
    }
    lines = robustness.table(result).splitlines()
    assert any(line.startswith("98.0%") for line in lines) and not any(
        line.startswith("99%") for line in lines
    )


def test_a_model_file_named_model_is_named_by_its_folder_given_as_dot(run_dir, tmp_path, monkeypatch):
    """`digitrec robustness .` in a run folder named the model "" in the table, the JSON and the legend."""
    monkeypatch.chdir(run_dir)
    assert robustness.load_scored(".").name == run_dir.name
    assert robustness.load_scored("model.safetensors").name == run_dir.name


def test_a_name_that_starts_with_an_underscore_keeps_its_legend_entry(monkeypatch, tmp_path):
    """matplotlib leaves out labels that start with "_": a run folder named _baseline had a line, no entry."""
    from digitrec import plots
    from digitrec.plots import plt

    curve = [{"coverage": 1.0, "accuracy": 0.9, "threshold": 0.5}]
    models = [
        {"name": name, "clean_accuracy": 0.9, "perturbations": {}, "coverage": curve}
        for name in ("_base", "b")
    ]
    legends = []

    def keep(fig, path):
        legends.append([text.get_text() for text in fig.axes[0].get_legend().get_texts()])
        plt.close(fig)
        return path

    monkeypatch.setattr(plots, "save_figure", keep)
    robustness.plot({"images": 10, "perturbations": [], "models": models}, tmp_path / "r.png")
    assert [label.strip() for label in legends[0]] == ["_base", "b"]


def test_an_exported_model_is_scored_in_batches(run_dir, tmp_path, monkeypatch):
    """ONNX Runtime got every image in one call: `explore --model model.onnx` scoring 60,000 took ~10 GB."""
    pytest.importorskip("onnxruntime")
    from digitrec.backends import OnnxBackend
    from digitrec.export import export_onnx

    onnx_path = tmp_path / "model.onnx"
    export_onnx(run_dir, onnx_path, log=lambda message: None)
    sizes = []
    call = OnnxBackend.__call__
    monkeypatch.setattr(OnnxBackend, "__call__", lambda self, x: sizes.append(len(x)) or call(self, x))
    monkeypatch.setattr(robustness, "ONNX_BATCH", 16)
    images = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8)
    scored = robustness.load_scored(onnx_path)
    sizes.clear()  # loading checks the model with one image
    logits = scored.scorer(images)
    assert sizes == [16, 16, 8] and logits.shape == (40, 10)


def test_robustness_refuses_to_write_over_a_run_folders_own_figures(run_dir, idx_folder, capsys):
    """`--out RUN` replaced the run's robustness.png (shown in its report) with a figure of other models."""
    figure = run_dir / "robustness.png"
    before = figure.read_bytes() if figure.exists() else None
    flags = ["--limit", "20", "--out", str(run_dir), "--data-dir", str(idx_folder)]
    assert main(["robustness", str(run_dir), *flags]) == 2
    assert f"--out {run_dir} is a run folder" in capsys.readouterr().err
    assert (figure.read_bytes() if figure.exists() else None) == before


def test_robustness_refuses_a_limit_over_the_test_images_there_are(run_dir, idx_folder, tmp_path, capsys):
    """`--limit 20000` scored the 10,000 there are and said nothing (bench infer refuses such a batch size)."""
    from digitrec.data import load_mnist

    count = len(load_mnist(idx_folder).test_images)
    out = tmp_path / "robustness"
    args = [
        "robustness",
        str(run_dir),
        "--limit",
        str(count + 1),
        "--out",
        str(out),
        "--data-dir",
        str(idx_folder),
    ]
    assert main(args) == 2
    assert (
        f"--limit {count + 1:,} is more than the {count:,} test images there are" in capsys.readouterr().err
    )
    assert not (out / "robustness.json").exists()
