"""The model card: written beside every run's checkpoint and into report.html, with what a reader needs to trust it."""

from __future__ import annotations

import html
import json
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from digitrec import modelcard
from digitrec.config import get_recipe
from digitrec.training import train


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_mnist):
    out = tmp_path_factory.mktemp("card-run")
    return train(
        get_recipe("fast").override(epochs=1),
        out,
        recipe="fast",
        data=tiny_mnist,
        progress=False,
        log=lambda m: None,
    )


def test_every_run_writes_a_model_card_beside_the_checkpoint(run):
    card = (run.out_dir / "MODEL_CARD.md").read_text()
    for heading in (
        f"# Model card: fast ({run.config.arch})",
        "## Recipe",
        "## Data",
        "## Metrics",
        "## Calibration",
        "## Robustness",
        "## Latency",
        "## Intended use",
        "## Known limits",
    ):
        assert heading in card
    assert "`synthetic`" in card  # the data checksum the model was trained on
    assert f"{run.metrics['test_accuracy']:.2%}" in card
    assert card.count("\n| ") >= 10 + 8  # a row per class and per perturbation
    assert "Checkpoint size" in card and " ms median" in card and "digitrec train --recipe fast" in card


def test_report_html_holds_the_card_and_the_robustness_curves(run):
    report = (run.out_dir / "report.html").read_text()
    assert 'class="model-card"' in report and "Robustness and accuracy vs coverage" in report
    assert (run.out_dir / "robustness.png").exists()


def test_card_names_weak_spots_and_calibration():
    metrics = {
        "test_accuracy": 0.99,
        "test_loss": 0.03,
        "errors": 100,
        "count": 10000,
        "ece": 0.012,
        "per_class": [],
    }
    robustness = {
        "images": 100,
        "perturbations": [{"name": "blur", "label": "sigma", "strengths": [1, 2], "clean": 0}],
        "models": [
            {
                "clean_accuracy": 0.99,
                "perturbations": {
                    "blur": [{"strength": 1, "accuracy": 0.95}, {"strength": 2, "accuracy": 0.4}]
                },
                "coverage": [
                    {"coverage": c / 100, "accuracy": 0.99, "threshold": 0.5} for c in range(1, 101)
                ],
            }
        ],
    }
    sections = modelcard.build_card(
        metrics, {"recipe": "x", "temperature": 1.7, "reject_below": 0.6}, robustness=robustness
    )
    text = modelcard.to_markdown(sections)
    assert "T = 1.700" in text and "0.600" in text and "ECE, 15 bins) on the test set: 0.0120" in text
    assert "blur (down to 40%)" in text
    assert "<b>99.00%</b>" in modelcard.to_html(sections)


def test_a_card_without_latency_has_no_empty_latency_section():
    """A checkpoint's size without a latency made an empty "Latency and size" heading (the size is in the
    first section)."""
    metrics = {"test_accuracy": 0.99, "test_loss": 0.03}
    sections = modelcard.build_card(metrics, {"recipe": "x"}, size_bytes=250_000)
    assert all(section.paragraphs or section.table or section.bullets for section in sections)
    assert "Checkpoint size 0.25 MB" in sections[0].paragraphs[1]
    assert not any("Latency" in section.title for section in sections)
    latency = {"single_ms": 0.5, "batch_ms_per_image": 0.01, "batch_size": 256, "device": "cpu", "threads": 1}
    with_latency = modelcard.build_card(
        metrics, {"recipe": "x"}, latency=latency | {"machine": "x86_64 Linux"}
    )
    assert [s.paragraphs for s in with_latency if s.title == "Latency"][0][0].startswith(
        "Forward pass of one image"
    )


def test_a_card_of_a_model_scored_in_views_says_robustness_and_latency_are_of_one_view():
    """A `default` card (5 views) gave "Test accuracy 99.56%" (5 views) beside a robustness section's "Clean accuracy
    99.40%" and a latency per forward pass, both of one view, without saying so."""
    from digitrec.config import get_recipe

    robustness = {
        "images": 10,
        "perturbations": [{"name": "blur", "label": "sigma", "strengths": [1], "clean": 0}],
        "models": [
            {
                "clean_accuracy": 0.99,
                "perturbations": {"blur": [{"strength": 1, "accuracy": 0.9}]},
                "coverage": [
                    {"coverage": c / 100, "accuracy": 0.99, "threshold": 0.5} for c in range(1, 101)
                ],
            }
        ],
    }
    latency = {"single_ms": 0.5, "batch_ms_per_image": 0.01, "batch_size": 256, "device": "cpu", "threads": 1}
    latency |= {"machine": "x86_64 Linux"}
    metrics = {"test_accuracy": 0.99, "test_loss": 0.03}

    def said(config, scored=None):
        sections = modelcard.build_card(
            metrics | ({"scored_tta_views": scored} if scored else {}),
            config=config,
            robustness=robustness,
            latency=latency,
        )
        return {s.title: s.paragraphs[0] for s in sections if s.title in ("Robustness", "Latency")}

    five = said(get_recipe("default"))
    assert five["Robustness"].startswith(
        "Accuracy on 10 MNIST test images under each perturbation, one view each (the test accuracy above "
        "averages 5 views per image) (`digitrec robustness`"
    )
    assert five["Latency"].startswith(
        "Forward pass of one image (one view; the Predictor runs 5 per image): 0.50 ms"
    )
    one = said(get_recipe("fast"))
    assert one["Robustness"].startswith("Accuracy on 10 MNIST test images under each perturbation (`digitrec")
    assert one["Latency"].startswith("Forward pass of one image: 0.50 ms")
    # `evaluate --tta-views 1`: the figures are of one view, and the Predictor still runs the recipe's 5
    assert said(get_recipe("default"), scored=1) == {
        "Robustness": one["Robustness"],
        "Latency": five["Latency"],
    }
    # `evaluate --tta-views 5` of a one-view recipe: its Predictor runs one (the card said 5)
    assert said(get_recipe("fast"), scored=5)["Latency"] == one["Latency"]
    # an ensemble of 5-view members is scored in 5 views as its first member's recipe says (its card said one)
    members = [{"path": "runs/a", "config": get_recipe("default").to_dict()}] * 2
    meta = {"recipe": "ensemble", "config": get_recipe("default").to_dict(), "members": members}
    sections = modelcard.build_card(metrics, meta, robustness=robustness, latency=latency)
    ensemble = {s.title: s.paragraphs[0] for s in sections if s.title in ("Robustness", "Latency")}
    assert ensemble == five


def test_a_card_says_a_models_validation_accuracy_is_of_one_view_where_its_test_accuracy_is_not():
    """Validation scores one view whatever tta_views says (training.py); `default`'s card must not suggest five."""
    from digitrec.config import get_recipe

    metrics = {"test_accuracy": 0.99, "test_loss": 0.03, "val_accuracy": 0.993}

    def validation_line(recipe):
        sections = modelcard.build_card(metrics, config=get_recipe(recipe))
        [metrics_section] = [s for s in sections if s.title == "Metrics"]
        return [line for line in metrics_section.paragraphs if line.startswith("Validation")]

    assert validation_line("default") == [
        "Validation accuracy 99.30% (chose the checkpoint, each image in one view)."
    ]
    assert validation_line("fast") == ["Validation accuracy 99.30% (chose the checkpoint)."]


def test_a_card_gives_the_runs_validation_accuracy_where_the_evaluation_has_none():
    """write_report's metrics are the test set's (compute_metrics), so a trained run's card showed no validation
    line though model.json holds it; the card takes it from the checkpoint's metadata, and its own where given."""
    from digitrec.config import get_recipe

    test_only = {"test_accuracy": 0.99, "test_loss": 0.03}

    def validation_line(metrics, meta):
        sections = modelcard.build_card(metrics, meta=meta, config=get_recipe("fast"))
        [metrics_section] = [s for s in sections if s.title == "Metrics"]
        return [line for line in metrics_section.paragraphs if line.startswith("Validation")]

    assert validation_line(test_only, {"metrics": {"val_accuracy": 0.9931}}) == [
        "Validation accuracy 99.31% (chose the checkpoint)."
    ]
    assert validation_line({**test_only, "val_accuracy": 0.95}, {"metrics": {"val_accuracy": 0.9931}}) == [
        "Validation accuracy 95.00% (chose the checkpoint)."
    ]
    assert validation_line(test_only, {"metrics": {"val_accuracy": None}}) == []  # trained without one


def test_a_card_scored_with_one_view_says_so_plainly_and_names_its_columns():
    """`--tta-views 1` read "the mean over that many shifted views", and `digitrec evaluate` "scores it so"; the
    robustness table's "strength" column held the description and "strengths" the values."""
    from digitrec.config import get_recipe

    metrics = {"test_accuracy": 0.99, "test_loss": 0.03, "scored_tta_views": 1}
    config = get_recipe("best").override(tta_views=5)
    [overall] = [s for s in modelcard.build_card(metrics, config=config) if s.title == "Metrics"]
    assert overall.paragraphs[0].endswith(
        " Scored with `--tta-views 1` (each image once, unshifted), not the way its recipe scores it (5 views); "
        "`digitrec evaluate` without `--tta-views` scores it the recipe's way."
    )
    robustness = {
        "images": 10,
        "perturbations": [{"name": "blur", "label": "sigma", "strengths": [1, 2], "clean": 0}],
        "models": [
            {
                "clean_accuracy": 0.99,
                "perturbations": {
                    "blur": [{"strength": 1, "accuracy": 0.9}, {"strength": 2, "accuracy": 0.8}]
                },
                "coverage": [
                    {"coverage": c / 100, "accuracy": 0.99, "threshold": 0.5} for c in range(1, 101)
                ],
            }
        ],
    }
    [table] = [
        s.table for s in modelcard.build_card(metrics, robustness=robustness) if s.title == "Robustness"
    ]
    assert table is not None and table[0][:3] == ["perturbation", "strength means", "strengths"]
    assert table[1][0][:3] == ["blur", "sigma", "1, 2"]


def test_an_ensembles_card_names_its_members():
    members = [{"config": {"arch": "deep_cnn"}}, {"config": {"arch": "fast_cnn"}}]
    meta = {"recipe": "robust", "config": {"arch": "deep_cnn"}, "members": members}
    text = modelcard.to_markdown(
        modelcard.build_card({"test_accuracy": 0.99, "test_loss": 0.03, "per_class": []}, meta)
    )
    assert "Model card: ensemble (ensemble of deep_cnn, fast_cnn)" in text


def test_an_ensembles_limits_say_what_its_members_trained_on():
    """An ensemble with a `robust` member (photo-like digits and non-digits) said "Trained only on MNIST"."""
    robust = get_recipe("robust").to_dict()
    plain = get_recipe("fast").to_dict()

    def limits(*configs):
        meta = {"recipe": "ensemble", "config": configs[0], "members": [{"config": c} for c in configs]}
        text = modelcard.to_markdown(modelcard.build_card({"test_accuracy": 0.99, "test_loss": 0.03}, meta))
        return text.split("## Known limits")[1]

    mixed = limits(plain, robust)
    assert "Trained only on MNIST" not in mixed and "from the network itself" not in mixed
    assert "1 of 2 members warped" in mixed and "1 of 2 also trained on non-digits" in mixed
    assert "Trained only on MNIST" in limits(plain, plain)


def test_an_ensembles_rebuild_command_and_members_table_survive_odd_paths():
    """The rebuild command gave `my runs/fast/...` unquoted (two arguments to a shell), and a | in a path made a
    sixth column in the members table."""
    members = [
        {"path": path, "config": {"arch": "fast_cnn"}}
        for path in ("my runs/a.safetensors", "b|c.safetensors")
    ]
    meta = {"recipe": "ensemble", "members": members}
    text = modelcard.to_markdown(modelcard.build_card({"test_accuracy": 0.99, "test_loss": 0.03}, meta))
    assert "`digitrec ensemble 'my runs/a.safetensors' 'b|c.safetensors' --out PATH`" in text
    row = next(line for line in text.splitlines() if "b\\|c" in line)
    assert row.replace("\\|", "").count("|") == 6  # five cells


def test_a_backtick_or_stars_in_a_path_keep_the_cards_code_spans_whole():
    """A member's path with a backtick in it (`runs/a`b/m.safetensors`) closed its code span early and opened one
    that ran on through the table; ** in a path turned bold inside the HTML card's code."""
    members = [
        {"path": path, "config": {"arch": "fast_cnn"}} for path in ("runs/a`b/m.safetensors", "runs/**x**/m")
    ]
    sections = modelcard.build_card({"test_accuracy": 0.99, "test_loss": 0.03}, {"members": members})
    text = modelcard.to_markdown(sections)
    assert "``runs/a`b/m.safetensors``" in text and "`runs/**x**/m`" in text
    page = modelcard.to_html(sections)
    assert "<code>runs/a`b/m.safetensors</code>" in page and "<code>runs/**x**/m</code>" in page
    assert "<b>x</b>" not in page


@given(
    st.text(
        alphabet=st.sampled_from(list("`` *|<&ab"))
        | st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")),
        min_size=1,
    )
)
def test_a_code_span_holds_any_text_as_it_is(text):
    assert modelcard._inline_html(modelcard.code(text)) == f"<code>{html.escape(text)}</code>"


def test_an_ensembles_card_says_when_it_was_made_without_a_gap():
    meta = {"members": [{"config": {"arch": "lenet"}}] * 2, "versions": {"digitrec": "0.1.0"}}
    text = modelcard.to_markdown(modelcard.build_card({"test_accuracy": 0.99, "test_loss": 0.03}, meta))
    assert "Trained with digitrec 0.1.0." in text  # "Trained  with": no date for an ensemble


def test_evaluate_reports_the_size_and_weight_type_of_the_checkpoint_it_evaluated(run, idx_folder, tmp_path):
    """The card gave the size of whatever model.safetensors lay in --report DIR (none: no size), always as
    float32, where `calibrate --half` stores float16."""
    from digitrec.checkpoint import load_tensors, save_tensors
    from digitrec.cli import main

    tensors, meta = load_tensors(run.model_path)
    half = tmp_path / "half.safetensors"
    save_tensors(half, {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, meta)
    size = half.stat().st_size
    report = tmp_path / "report"
    assert main(["evaluate", str(half), "--report", str(report), "--data-dir", str(idx_folder)]) == 0
    card = (report / "MODEL_CARD.md").read_text()
    assert f"Checkpoint size {size / 1e6:.2f} MB (safetensors, float16 weights)." in card
    # into another run's folder: refused (its card would describe the half model beside its own), and the
    # folder's own model gets its own size
    other = tmp_path / "other-run"
    shutil.copytree(run.out_dir, other)
    assert main(["evaluate", str(half), "--report", str(other), "--data-dir", str(idx_folder)]) == 2
    assert main(["evaluate", str(other), "--report", str(other), "--data-dir", str(idx_folder)]) == 0
    card = (other / "MODEL_CARD.md").read_text()
    assert f"{run.model_path.stat().st_size / 1e6:.2f} MB (safetensors, float32 weights)." in card


def _card_command(text: str) -> list[str]:
    """The `digitrec train ...` command the card's Recipe section gives, as arguments after `digitrec`."""
    return text.split("reproduce it with `digitrec ")[1].split("`")[0].split()


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"epochs": 2, "lr": 0.005, "device": "cpu", "amp": False},
        {"epochs": 2, "betas": (0.8, 0.95), "arch": "lenet", "compile": True},  # no flag sets betas or arch
    ],
)
def test_the_cards_command_trains_the_same_config(changes, tmp_path):
    from digitrec.cli import build_parser, training_config

    config = get_recipe("fast").override(**changes)
    meta = {"recipe": "fast", "config": config.to_dict(), "metrics": {"steps": 1000}}
    text = modelcard.to_markdown(modelcard.build_card({"test_accuracy": 0.9, "test_loss": 0.3}, meta))
    args = _card_command(text)
    if "--config" in args:  # the settings no flag sets, in the TOML file the card spells out
        toml = text.split("FILE a TOML file holding ")[1].split(" (one per line)")[0]
        (tmp_path / "run.toml").write_text("\n".join(line.strip("`") for line in toml.split(", `")))
        args[args.index("FILE")] = str(tmp_path / "run.toml")
    recipe, reproduced = training_config(build_parser().parse_args(args))
    assert recipe == "fast" and reproduced.to_dict() == config.to_dict()


@pytest.mark.parametrize("base", ["fast", None])
def test_a_custom_configs_card_trains_it_again_from_the_nearest_recipe(base, tmp_path):
    """`digitrec.train(a TrainConfig)` wrote a card saying only "A custom configuration; its full values are in
    model.json", though a card gives the command that trains its settings again."""
    from digitrec.cli import build_parser, training_config
    from digitrec.config import TrainConfig

    config = (
        get_recipe(base).override(epochs=0.2) if base else TrainConfig(arch="lenet", epochs=2, val_size=100)
    )
    meta = {"recipe": "custom", "config": config.to_dict(), "metrics": {"steps": 1000}}
    text = modelcard.to_markdown(modelcard.build_card({"test_accuracy": 0.9, "test_loss": 0.3}, meta))
    assert "A custom configuration, nearest to recipe `" in text
    if base:
        assert (
            "nearest to recipe `fast`; reproduce it with `digitrec train --recipe fast --epochs 0.2`." in text
        )
    args = _card_command(text)
    if "--config" in args:
        toml = text.split("FILE a TOML file holding ")[1].split(" (one per line)")[0]
        (tmp_path / "run.toml").write_text("\n".join(line.strip("`") for line in toml.split(", `")))
        args[args.index("FILE")] = str(tmp_path / "run.toml")
    reproduced = training_config(build_parser().parse_args(args))[1].to_dict()
    expected = config.to_dict()
    for key in modelcard._DESCRIPTIVE:  # where a recipe comes from, not what it trains
        reproduced.pop(key), expected.pop(key)
    assert reproduced == expected


@pytest.mark.parametrize("world_size", [1, 2])
def test_the_cards_command_of_a_run_on_several_processes_trains_on_as_many(world_size):
    """A `--nproc 2` run of a batch-norm recipe trains other weights than one process (each process normalizes
    its share of a batch on a CPU), and its card said `digitrec train --recipe fast --epochs 0.1` without it."""
    from digitrec.cli import build_parser, training_config

    config = get_recipe("fast").override(epochs=0.1)
    meta = {"recipe": "fast", "config": config.to_dict(), "metrics": {"steps": 19, "world_size": world_size}}
    text = modelcard.to_markdown(modelcard.build_card({"test_accuracy": 0.9, "test_loss": 0.3}, meta))
    args = build_parser().parse_args(_card_command(text))
    assert args.nproc == (world_size if world_size > 1 else None)
    assert training_config(args) == ("fast", config)


@pytest.mark.parametrize(
    "device, threads, config_threads, said",
    [("cpu", 4, 0, True), ("cpu", 2, 2, False), ("cuda:0", 4, 0, False), ("cpu", None, 0, False)],
)
def test_a_cpu_runs_card_names_the_thread_count_torch_chose(device, threads, config_threads, said):
    """A CPU run on torch's default thread count (the cores) trains other weights on a machine with other cores,
    and its card's command, `digitrec train --recipe fast --epochs 0.1`, did not say how many it had."""
    from digitrec.cli import build_parser, training_config

    config = get_recipe("fast").override(epochs=0.1, threads=config_threads)
    run = {"steps": 19, "device": device} | ({"threads": threads} if threads else {})
    meta = {"recipe": "fast", "config": config.to_dict(), "metrics": run}
    text = modelcard.to_markdown(modelcard.build_card({"test_accuracy": 0.9, "test_loss": 0.3}, meta))
    assert ("It trained on 4 CPU threads; the same weights need as many (add `--threads 4`" in text) == said
    assert training_config(build_parser().parse_args(_card_command(text))) == ("fast", config)


def test_a_dry_runs_card_says_so_and_what_it_trained_on(tmp_path, tiny_mnist):
    config = get_recipe("fast").override(
        batch_size=32
    )  # 0.85 epoch of 8 batches: 7 of 32, of the 1,200 images
    train(config, tmp_path, recipe="fast", data=tiny_mnist, dry_run=True, progress=False, log=lambda m: None)
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert card.startswith("# Model card: fast, dry run (")
    assert "reproduce it with `digitrec train --recipe fast --batch-size 32 --dry-run`" in card
    # the subset the log line names (8 batches of 32), of which it saw 7; it said "the first 224" there
    assert "Trained on the first 256 training images only, 7 steps of 32 (a dry run" in card
    threads = torch.get_num_threads()  # what the run trained on, as metrics.json records it
    assert json.loads((tmp_path / "metrics.json").read_text())["threads"] == threads
    assert f"add `--threads {threads}` on a machine with other cores" in card


@pytest.mark.parametrize(
    "changes",
    [
        {"epochs": 0.3},  # the card said `--recipe fast --dry-run`: 0.85 epoch of 8 batches, not 0.3
        {"epochs": 0.2, "betas": (0.9, 0.99), "lr": 0.01},  # a TOML file and a flag; the file dropped epochs
        {"epochs": 3},  # more than a dry run trains: one epoch, as the recipe's 0.85 is not
        {"batch_size": 32},
    ],
)
def test_a_dry_runs_card_gives_the_command_that_trains_what_it_trained(changes, tmp_path, tiny_mnist):
    from digitrec.cli import build_parser, training_config

    out = tmp_path / "run"
    config = get_recipe("fast").override(**changes)
    train(config, out, recipe="fast", data=tiny_mnist, dry_run=True, progress=False, log=lambda m: None)
    text = (out / "MODEL_CARD.md").read_text()
    args = _card_command(text)
    if "--config" in args:
        toml = text.split("FILE a TOML file holding ")[1].split(" (one per line)")[0]
        (tmp_path / "run.toml").write_text("\n".join(line.strip("`") for line in toml.split(", `")))
        args[args.index("FILE")] = str(tmp_path / "run.toml")
    parsed = build_parser().parse_args(args)
    recipe, again = training_config(parsed)
    assert recipe == "fast" and parsed.dry_run
    trained = json.loads((out / "model.json").read_text())["config"]
    assert trained["epochs"] == min(config.epochs, 1)  # what the dry run trained, as it recorded it
    dry_again = again.override(epochs=min(again.epochs, 1))  # what the command's dry run trains
    assert json.loads(json.dumps(dry_again.to_dict())) == trained


def test_an_ensembles_card_says_how_to_rebuild_it_not_how_to_train_its_first_member():
    members = [
        {
            "path": f"runs/{name}/model.safetensors",
            "recipe": name,
            "config": {"arch": arch},
            "temperature": 1.2,
            "test_accuracy": 0.99,
        }
        for name, arch in (("fast", "fast_cnn_crop"), ("default", "fast_cnn"))
    ]
    meta = {
        "recipe": "ensemble",
        "arch": "ensemble",
        "config": get_recipe("fast").to_dict(),
        "members": members,
        "temperature": 1.1,
    }
    text = modelcard.to_markdown(modelcard.build_card({"test_accuracy": 0.99, "test_loss": 0.03}, meta))
    assert text.startswith("# Model card: ensemble (ensemble of fast_cnn_crop, fast_cnn)")
    assert "digitrec train" not in text and "## Recipe" not in text  # not the first member's settings
    assert (
        "Rebuild it with `digitrec ensemble runs/fast/model.safetensors runs/default/model.safetensors --out PATH` "
        "(the paths as given when it was built), then `digitrec calibrate PATH`."
    ) in text
    assert "| `runs/default/model.safetensors` | `default` | `fast_cnn` | 1.200 | 99.00% |" in text


def _finetune_command(text: str) -> list[str]:
    """The `digitrec finetune ...` command a fine-tune's card gives, as arguments after `digitrec`."""
    import shlex

    return shlex.split(text.split("Reproduce it with `digitrec ")[1].split("`")[0])


def test_a_fine_tunes_card_says_what_it_started_from_and_trained_on(run, tiny_mnist, tmp_path):
    """A `digitrec finetune` run's card said "Trained on all 1,260 training images" (MNIST plus 3 corrections
    x 20, as if MNIST had 1,260), "Trained only on MNIST", labelled the corrections' checksum as MNIST's, and
    gave neither the model it started from nor the command that makes it again."""
    import numpy as np

    from digitrec.cli import build_parser, cmd_finetune
    from digitrec.feedback import FeedbackStore, finetune

    store = FeedbackStore(tmp_path / "feedback.sqlite")
    for seed, label in enumerate([7, 3, 1]):
        pixels = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
        store.add(label=label, image=b"png", input28=pixels)
    threads = torch.get_num_threads()
    try:
        finetune(
            run.model_path, store.path, tmp_path / "tuned", data=tiny_mnist, epochs=0.2, log=lambda m: None
        )
    finally:
        torch.set_num_threads(threads)
    card = (tmp_path / "tuned" / "MODEL_CARD.md").read_text()
    assert f"Fine-tuned from `{run.model_path}` (recipe `fast`) by `digitrec finetune`" in card
    assert (
        "Trained on MNIST's 1,200 training images plus 3 corrections its users sent (the 28x28 images the model "
        "saw, with the digit they said), each repeated 20 times (1,260 images an epoch, none held out for "
        f"validation), starting from `{run.model_path}`"
    ) in card
    assert "1,260 training images" not in card and "Trained only on MNIST" not in card
    assert "and 3 corrections its users sent. Other handwriting" in card  # the limits
    digest = json.loads((tmp_path / "tuned" / "model.json").read_text())["data_checksum"]
    assert f"corrections' pixels and labels; not MNIST's own): `{digest}`" in card and digest != "synthetic"
    assert "MNIST's (MD5 over the four files' MD5s): `synthetic`" in card
    assert "Data checksum (MD5 over the four files' MD5s)" not in card
    args = build_parser().parse_args(_finetune_command(card))
    assert args.func is cmd_finetune and args.model == str(run.model_path)
    assert (args.feedback, args.epochs, args.lr_scale, args.repeat) == (str(store.path), 0.2, 0.1, 20)
    assert not args.no_corrections


def test_a_fine_tune_on_mnist_alone_and_an_older_fine_tune_say_what_they_can(tmp_path):
    """--no-corrections: MNIST alone, the command with --no-corrections. The bundled model's metadata, written
    before fine-tunes recorded their --lr-scale, gives no command it cannot vouch for."""
    from digitrec.checkpoint import load_tensors
    from digitrec.cli import build_parser
    from digitrec.predict import pretrained_path

    config = get_recipe("fast").override(epochs=1, lr=0.0044, schedule="cosine", val_size=0)
    meta = {
        "recipe": "fast+finetune",
        "config": config.to_dict(),
        "finetuned_from": "runs/fast/model.safetensors",
        "lr_scale": 0.2,
        "mnist": {"images": 60000, "checksum": "f" * 32},
        "data_checksum": "e" * 32,
    }
    text = modelcard.to_markdown(modelcard.build_card({"test_accuracy": 0.99, "test_loss": 0.03}, meta))
    assert "Trained on MNIST's 60,000 training images without corrections (`--no-corrections`)" in text
    args = build_parser().parse_args(_finetune_command(text))
    assert args.no_corrections and (args.model, args.epochs, args.lr_scale) == (
        "runs/fast/model.safetensors",
        1,
        0.2,
    )
    assert "Trained only on MNIST" in text  # true here
    # every digit of the scale (:g kept six: 0.123456789 became 0.123457, and other weights)
    precise = modelcard.build_card(
        {"test_accuracy": 0.99, "test_loss": 0.03}, meta | {"lr_scale": 0.123456789}
    )
    assert (
        build_parser().parse_args(_finetune_command(modelcard.to_markdown(precise))).lr_scale == 0.123456789
    )
    assert f"of which there were none; not MNIST's own): `{'e' * 32}`. MNIST's (MD5 over" in text

    bundled = load_tensors(pretrained_path())[1]
    text = modelcard.to_markdown(modelcard.build_card({"test_accuracy": 0.99, "test_loss": 0.03}, bundled))
    assert "Fine-tuned from `" in text and "(recipe `robust`) by `digitrec finetune`" in text
    assert "Its metadata does not record the whole `digitrec finetune` command" in text
    assert "Reproduce it with" not in text and "reproduce it with" not in text
    assert "Trained only on MNIST" not in text and "| negatives | `0.5` |" in text
    # a fine-tune written over the model it began from (`finetune --out` into that run's folder; the bundled model
    # was made so) said it was fine-tuned from itself; the bundled model records a path on the machine that made it
    itself = tmp_path / "run" / "model.safetensors"
    for checkpoint, replaced in ((itself, True), (tmp_path / "other" / "model.safetensors", False)):
        text = modelcard.to_markdown(
            modelcard.build_card(
                {"test_accuracy": 0.99, "test_loss": 0.03},
                {**meta, "finetuned_from": str(itself)},
                checkpoint=checkpoint,
            )
        )
        said = f"Fine-tuned from an earlier model at this same path (`{itself}`), which this one replaced"
        assert (said in text) == replaced and ("its own card says" in text) != replaced
        assert ("digitrec finetune --model" in text) != replaced  # no command that would tune the new file


def test_a_robust_runs_card_says_it_trained_on_photo_like_digits_and_non_digits():
    """The `robust` recipe's card left `negatives` out of its settings, and said "Trained only on MNIST" and
    that letters still get a digit "from the network itself": it trains to doubt non-digits."""
    config = get_recipe("robust").override(epochs=0.02)
    meta = {"recipe": "robust", "config": config.to_dict(), "metrics": {"steps": 9}}
    text = modelcard.to_markdown(modelcard.build_card({"test_accuracy": 0.9, "test_loss": 0.3}, meta))
    assert "| augment | `robust` |\n| negatives | `0.5` |\n| val_size | `5000` |" in text
    data = text.split("## Data")[1].split("## Metrics")[0]
    assert "photo-like augmentation (`robust`" in data and "one non-digit for every 2 digits" in data
    assert "outlier exposure" in data and "The non-digits are drawn by the code" in data
    limits = text.split("## Known limits")[1]
    assert "Trained only on MNIST" not in limits and "from the network itself" not in limits
    assert "It was trained to answer non-digits" in limits and "look like photographed and scanned" in limits


@pytest.mark.parametrize("name", ["fast", "default", "best", "seed-mlp", "seed-lenet", "seed-cnn-bn"])
def test_cards_of_recipes_that_train_on_mnist_alone_keep_their_settings_and_limits(name):
    meta = {"recipe": name, "config": get_recipe(name).to_dict(), "metrics": {"steps": 9}}
    text = modelcard.to_markdown(modelcard.build_card({"test_accuracy": 0.9, "test_loss": 0.3}, meta))
    settings = [
        line.split(" | ")[0][2:]
        for line in text.split("| setting | value |\n|---|---|\n")[1].split("\n\n")[0].splitlines()
    ]
    views = ["tta_views"] if get_recipe(name).tta_views > 1 else []  # `default` scores five views
    assert settings == [
        "epochs", "batch_size", "optimizer", "lr", "weight_decay", "schedule", "label_smoothing", "normalize",
        "augment", "val_size", "seed", *views,
    ]  # fmt: skip
    assert "- Trained only on MNIST: digits written by" in text
    assert "Letters, symbols and blank images still get a digit from the network itself" in text
    assert "Non-digits" not in text and "photo-like" not in text


def test_evaluate_with_a_report_says_the_test_accuracy_once(run, idx_folder, tmp_path, capsys):
    """`evaluate RUN --report DIR` printed "test accuracy ..." twice: the report's log line, then its own."""
    from digitrec.cli import main

    assert main(["evaluate", str(run.out_dir), "--report", str(tmp_path), "--data-dir", str(idx_folder)]) == 0
    printed = capsys.readouterr()
    assert (printed.out + printed.err).count("test accuracy") == 1
    assert f"report: {tmp_path / 'report.html'}" in printed.err


def test_evaluate_with_more_views_keeps_the_card_of_how_the_model_was_trained(run, idx_folder, tmp_path):
    """`evaluate RUN --tta-views 5 --report DIR` wrote a card whose settings and reproduce command said the run
    trained with 5 views (with --report RUN it replaced the run's own, true card)."""
    from digitrec.cli import main

    argv = [
        "evaluate",
        str(run.out_dir),
        "--tta-views",
        "5",
        "--report",
        str(tmp_path),
        "--data-dir",
        str(idx_folder),
    ]
    assert main(argv) == 0
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert "tta_views" not in card.split("## Metrics")[0]  # settings and command: as trained
    assert (
        "Scored with `--tta-views 5` (the mean probability over 5 shifted copies of each image), not the way its "
        "recipe scores it (1 view); `digitrec evaluate` without `--tta-views` scores it the recipe's way."
        in card
    )
    scored = (tmp_path / "report.html").read_text()  # the report's configuration: how it was scored here
    assert "&quot;tta_views&quot;: 5" in scored
