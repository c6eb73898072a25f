"""ONNX export: BatchNorm folding, float parity, int8 accuracy check, metadata, and the ONNX Predictor backend."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from digitrec import export as export_module
from digitrec.backends import OnnxBackend, onnx_metadata, onnx_session
from digitrec.checkpoint import load_model, save_model
from digitrec.cli import main
from digitrec.config import get_recipe
from digitrec.data import as_input
from digitrec.errors import DigitrecError
from digitrec.export import ExportResult, export_onnx, inference_model, run_session, softmax
from digitrec.models import Normalize, create_model
from digitrec.predict import Predictor

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_fast_run: Path) -> Path:
    return tiny_fast_run / "model.safetensors"


def _randomize_batchnorm(model: nn.Module, negative: bool = False) -> None:
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=generator))
            m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=generator))
            m.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            if negative:
                m.weight.data[0] = -1.0


@pytest.mark.parametrize(
    "arch",
    ["fast_cnn", "fast_cnn_24", "fast_cnn_lite", "fast_cnn_crop", "deep_cnn", "bn_cnn", "mlp_bn_300_100"],
)
def test_folding_batchnorm_removes_it_and_keeps_the_outputs(arch: str) -> None:
    model = create_model(arch).eval()
    _randomize_batchnorm(model)
    folded = inference_model(model)
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in folded.modules())
    assert any(
        isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules()
    )  # the original is untouched


def test_normalization_folds_into_an_unpadded_first_conv_only() -> None:
    lite, padded = create_model("fast_cnn_lite").eval(), create_model("fast_cnn").eval()
    assert not any(isinstance(m, Normalize) for m in inference_model(lite).modules())
    cropped = create_model("fast_cnn_crop").eval()  # the crop before the conv commutes with normalization
    assert not any(isinstance(m, Normalize) for m in inference_model(cropped).modules())
    assert any(isinstance(m, Normalize) for m in inference_model(padded).modules())  # padding: not foldable


def test_batchnorm_with_a_negative_scale_after_max_pool_is_kept() -> None:
    """max(a*x) = a*max(x) only for a > 0, so that BatchNorm must not move in front of the pool."""
    model = create_model("fast_cnn").eval()
    _randomize_batchnorm(model, negative=True)
    folded = inference_model(model)
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 1


def test_a_relu_after_max_pool_moves_before_it() -> None:
    """relu(max(x)) = max(relu(x)): the conv before then ends in its ReLU (fused by the runtimes), and the int8
    model pools uint8 values."""
    model = create_model("fast_cnn_crop").eval()
    _randomize_batchnorm(model)  # positive scales: the BatchNorm after the pool folds away
    folded = inference_model(model)
    order = [type(m) for m in folded.modules() if isinstance(m, (nn.ReLU, nn.MaxPool2d))]
    assert order == [nn.ReLU, nn.ReLU, nn.MaxPool2d, nn.ReLU]
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "arch", ["fast_cnn", "fast_cnn_24", "fast_cnn_lite", "fast_cnn_crop", "mlp_bn_300_100"]
)
def test_flattening_channels_last_permutes_the_linear_layer_to_match(arch: str) -> None:
    """The int8 models flatten conv features in (H, W, C) order; a model that flattens the image keeps nn.Flatten."""
    from digitrec.export import FlattenChannelsLast

    model = create_model(arch).eval()
    _randomize_batchnorm(model)
    folded = inference_model(model, flatten_channels_last=True)
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)
    convs = any(isinstance(m, nn.Conv2d) for m in model.modules())
    assert any(isinstance(m, FlattenChannelsLast) for m in folded.modules()) == convs
    assert any(isinstance(m, nn.Flatten) for m in folded.modules()) != convs
    assert not any(isinstance(m, FlattenChannelsLast) for m in inference_model(model).modules())


def test_float_export_matches_pytorch_at_any_batch_size(
    tiny_checkpoint: Path, tiny_mnist, tmp_path: Path
) -> None:
    out = tmp_path / "tiny.onnx"
    result = export_onnx(
        tiny_checkpoint, out, test_images=tiny_mnist.test_images, test_labels=tiny_mnist.test_labels
    )
    assert out.exists() and result.precision == "float32"
    assert result.max_prob_diff <= 1e-4
    assert result.onnx_accuracy == result.torch_accuracy > 0.9

    session = onnx_session(out, threads=1)
    model, _ = load_model(tiny_checkpoint)
    for batch in (1, 7, 300):
        pixels = as_input(tiny_mnist.test_images[:batch])
        with torch.no_grad():
            expected = softmax(model(pixels).numpy())
        got = softmax(run_session(session, pixels.numpy()))
        assert got.shape == (batch, 10)
        assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize("arch", ["fast_cnn", "fast_cnn_24", "fast_cnn_lite", "fast_cnn_crop"])
def test_each_recipe_architecture_exports_with_float_parity(arch: str, tmp_path: Path) -> None:
    """Every architecture a recipe trains exports to ONNX and answers as PyTorch does (random weights and
    BatchNorm statistics, some scales negative, so that no fold is exact by luck)."""
    torch.manual_seed(0)
    model = create_model(arch).eval()
    _randomize_batchnorm(model, negative=True)
    checkpoint, out = tmp_path / f"{arch}.safetensors", tmp_path / f"{arch}.onnx"
    save_model(checkpoint, model, {"recipe": "custom", "config": {"arch": arch}})
    assert export_onnx(checkpoint, out).max_prob_diff <= 1e-4  # its own check, on random images
    pixels = np.random.default_rng(1).random((33, 1, 28, 28), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(pixels)).numpy()
    assert np.abs(run_session(onnx_session(out), pixels) - expected).max() <= 1e-4


def test_export_metadata_names_the_source_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny.onnx"
    export_onnx(tiny_checkpoint, out)  # no data: parity on random images
    meta = onnx_metadata(out)
    assert meta["export"]["source_sha256"] == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert meta["export"]["source_checkpoint"] == str(tiny_checkpoint)
    assert meta["recipe"] == "fast" and meta["config"]["arch"] == get_recipe("fast").arch
    assert "float32 (N, 1, 28, 28)" in meta["export"]["input"]


def test_export_metadata_gives_the_probability_formula_with_temperature_and_threshold(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """It said "softmax gives the digit probabilities", but digitrec divides the logits by the calibrated
    temperature first and rejects below a threshold: another runtime following it got other probabilities."""
    import onnx

    _, checkpoint_meta = load_model(tiny_checkpoint)
    checkpoint_meta |= {"temperature": 0.477, "reject_below": 0.566}
    calibrated = tmp_path / "calibrated.safetensors"
    save_model(calibrated, load_model(tiny_checkpoint)[0], checkpoint_meta)
    out = tmp_path / "tiny.onnx"
    export_onnx(calibrated, out)
    props = {entry.key: entry.value for entry in onnx.load(str(out)).metadata_props}
    assert "softmax(logits / temperature), temperature 0.477" in props["output"]
    assert "below reject_below 0.566" in props["output"]
    assert (props["temperature"], props["reject_below"]) == ("0.477", "0.566")
    pixels = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    logits = run_session(onnx_session(out), pixels)
    by_formula = softmax(logits / float(props["temperature"]))
    assert np.abs(by_formula - Predictor.load(out).probabilities(pixels)).max() < 1e-5


def export_int8(checkpoint: Path, out: Path, mnist) -> ExportResult:
    """export_onnx in int8, calibrated on `mnist`'s training images and checked on its test images."""
    return export_onnx(
        checkpoint,
        out,
        int8=True,
        test_images=mnist.test_images,
        test_labels=mnist.test_labels,
        calibration_images=mnist.train_images,
    )


def test_int8_export_keeps_the_accuracy(tiny_checkpoint: Path, tiny_mnist, tmp_path: Path) -> None:
    out = tmp_path / "tiny.int8.onnx"
    result = export_int8(tiny_checkpoint, out, tiny_mnist)
    assert result.precision == "int8" and out.exists()
    assert result.torch_accuracy - result.onnx_accuracy <= 0.001
    assert onnx_metadata(out)["export"]["precision"] == "int8"


def test_int8_export_keeps_the_first_conv_in_float(tiny_checkpoint: Path, tiny_mnist, tmp_path: Path) -> None:
    """On one input channel the int8 conv is slower than the float one: only the later layers are quantized."""
    import onnx

    out = tmp_path / "tiny.int8.onnx"
    export_int8(tiny_checkpoint, out, tiny_mnist)
    nodes = onnx.load(str(out)).graph.node
    dequantized = {node.output[0] for node in nodes if node.op_type == "DequantizeLinear"}
    convs = [node for node in nodes if node.op_type == "Conv"]
    assert len(convs) == 2
    assert not set(convs[0].input) & dequantized  # float input and weights
    assert set(convs[1].input[:2]) <= dequantized  # uint8 input, int8 weights


def test_int8_export_that_loses_accuracy_fails_and_writes_nothing(
    tiny_checkpoint: Path, tiny_mnist, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_module, "INT8_MAX_DROP", -1.0)  # any result now counts as a loss
    out = tmp_path / "bad.int8.onnx"
    with pytest.raises(DigitrecError, match="nothing was written"):
        export_int8(tiny_checkpoint, out, tiny_mnist)
    assert not out.exists()


def test_float_export_that_disagrees_with_pytorch_fails_and_writes_nothing(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_run_session = export_module.run_session

    def miscompiled(session, pixels):  # an exporter bug: class 0's logit comes out one higher
        logits = real_run_session(session, pixels)
        logits[:, 0] += 1.0
        return logits

    monkeypatch.setattr(export_module, "run_session", miscompiled)
    with pytest.raises(DigitrecError) as refused:
        export_onnx(tiny_checkpoint, tmp_path / "bad.onnx", parity_images=50, log=lambda msg: None)
    assert str(refused.value).startswith("the exported model disagrees with PyTorch (max |Δprob| ")
    assert str(refused.value).endswith(" > 0.0001); nothing was written.")
    assert list(tmp_path.iterdir()) == []


def test_int8_export_without_data_is_a_user_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(DigitrecError, match="needs MNIST"):
        export_onnx(tiny_checkpoint, tmp_path / "x.onnx", int8=True)


def test_onnx_predictor_gives_the_same_answers(
    tiny_checkpoint: Path, tiny_mnist, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DIGITREC_CACHE", str(tmp_path / "cache"))
    batch = as_input(tiny_mnist.test_images[:50])
    torch_answers = Predictor.load(tiny_checkpoint).predict_tensor(batch)
    exported = tmp_path / "tiny.onnx"
    export_onnx(tiny_checkpoint, exported)
    for predictor in (Predictor.load(exported), Predictor.load(tiny_checkpoint, backend="onnx")):
        answers = predictor.predict_tensor(batch)
        assert [a.digit for a in answers] == [t.digit for t in torch_answers]
        assert (
            np.abs(
                np.array([a.probabilities for a in answers])
                - np.array([t.probabilities for t in torch_answers])
            ).max()
            <= 1e-4
        )
    assert len(list((tmp_path / "cache" / "onnx").glob("*.onnx"))) == 1  # exported once, cached


@pytest.mark.parametrize("damage", ["truncated", "another model's export"])
def test_a_damaged_cached_export_is_made_again_not_refused_for_ever(
    tiny_checkpoint: Path, tiny_mnist, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    """A cached export that ONNX Runtime could not load stopped every later `--backend onnx` ("ONNX Runtime
    cannot load .../onnx/<hash>.onnx") and sent `serve`'s auto backend to PyTorch, until deleted by hand."""
    monkeypatch.setenv("DIGITREC_CACHE", str(tmp_path / "cache"))
    cached = export_module.cached_onnx(tiny_checkpoint)
    good = cached.read_bytes()
    if damage == "truncated":
        cached.write_bytes(good[: len(good) // 3])
    else:
        other = tmp_path / "other.safetensors"
        model, meta = load_model(tiny_checkpoint)
        _randomize_batchnorm(model)
        save_model(other, model, meta)
        export_onnx(other, cached)
    said: list[str] = []
    assert export_module.cached_onnx(tiny_checkpoint, log=said.append) == cached
    assert said[0].startswith(f"the cached ONNX export {cached} is damaged or not ")
    assert (
        onnx_metadata(cached)["export"]["source_sha256"]
        == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    )
    batch = as_input(tiny_mnist.test_images[:20])
    answers = Predictor.load(tiny_checkpoint, backend="onnx").predict_tensor(batch)
    expected = Predictor.load(tiny_checkpoint).predict_tensor(batch)
    assert [a.digit for a in answers] == [e.digit for e in expected]
    said.clear()
    export_module.cached_onnx(tiny_checkpoint, log=said.append)
    assert said == []  # a good cache entry is used as it is


def test_a_cache_that_cannot_hold_the_export_is_named_with_the_variable_that_moves_it(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--backend onnx` with $DIGITREC_CACHE on a file said "cannot use .../onnx: Not a directory; name a path you
    can read or write", naming neither the cache nor how to move it."""
    monkeypatch.setenv("DIGITREC_CACHE", str(tiny_checkpoint))  # a file, not a folder
    with pytest.raises(DigitrecError) as caught:
        export_module.cached_onnx(tiny_checkpoint)
    said = str(caught.value)
    assert said.startswith(
        f"digitrec's cache folder {tiny_checkpoint / 'onnx'} cannot hold the ONNX export of "
    )
    assert "set DIGITREC_CACHE to a folder you can write" in said


def test_onnx_backend_answers_one_image_at_a_time_as_it_answers_a_batch(
    tiny_checkpoint: Path, tiny_mnist, tmp_path: Path
) -> None:
    """One image goes through buffers bound once: each call must see its own pixels and return its own copy."""
    exported = tmp_path / "tiny.onnx"
    export_onnx(tiny_checkpoint, exported)
    backend = OnnxBackend(exported)
    assert backend._one is not None  # the bound path is the one under test
    pixels = as_input(tiny_mnist.test_images[:20]).numpy()
    batched = backend(pixels)
    one_by_one = [backend(pixels[i : i + 1]) for i in range(len(pixels))]
    assert all(out.shape == (1, 10) for out in one_by_one)
    assert np.abs(np.concatenate(one_by_one) - batched).max() <= 1e-4
    assert not np.allclose(one_by_one[0], one_by_one[1])  # not the previous call's buffer
    assert np.abs(backend(pixels[0]) - batched[:1]).max() <= 1e-4  # (28, 28) alone reshapes to one image


def test_onnx_backend_reads_its_file_once_and_names_it_in_errors(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session and the bytes a worker gets come from one read (ONNX Runtime read the file itself, then
    digitrec read it again: a file replaced between the two gave the server one model and its workers another),
    and a file that is missing, a folder or not ONNX is named in a one-sentence error."""
    import onnxruntime

    exported = tmp_path / "tiny.onnx"
    export_onnx(tiny_checkpoint, exported)
    sources: list = []
    real_session = onnxruntime.InferenceSession

    def spying(source, *args, **kwargs):
        sources.append(source)
        return real_session(source, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", spying)
    backend = OnnxBackend(exported)
    assert len(sources) == 1 and isinstance(sources[0], bytes)
    assert sources[0] is backend.model and backend.model == exported.read_bytes()
    monkeypatch.undo()
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    for path, says in [
        (tmp_path / "missing.onnx", "does not exist; export one"),
        (
            tmp_path / "junk.onnx",
            "cannot load " + str(tmp_path / "junk.onnx") + "; it is not a valid ONNX model",
        ),
        (tmp_path, "cannot read ONNX model " + str(tmp_path)),
    ]:
        with pytest.raises(DigitrecError, match=re.escape(says)) as error:
            OnnxBackend(path)
        assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_export_command_prints_parity_and_accuracy(
    tiny_checkpoint: Path, idx_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "cli.onnx"
    assert (
        main(["export", str(tiny_checkpoint.parent), "--out", str(out), "--data-dir", str(idx_folder)]) == 0
    )
    printed = capsys.readouterr().out
    assert out.exists()
    assert "max |Δprob|" in printed and "ONNX Runtime" in printed


def test_export_never_writes_over_the_checkpoint_or_to_a_name_without_onnx(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    before = tiny_checkpoint.read_bytes()
    for out in (tiny_checkpoint, tiny_checkpoint.with_suffix(".json"), tmp_path / "model.bin"):
        with pytest.raises(DigitrecError, match="is not an .onnx file name"):
            export_onnx(tiny_checkpoint, out, log=lambda msg: None)
    # a folder, even one named like a file ("is not an .onnx file name ... ending in .onnx" said of dir.onnx)
    (tmp_path / "dir.onnx").mkdir()
    for out in (tmp_path, tmp_path / "dir.onnx"):
        with pytest.raises(
            DigitrecError, match=f"^--out {re.escape(str(out))} is a folder; name the file to write"
        ):
            export_onnx(tiny_checkpoint, out, log=lambda msg: None)
    assert tiny_checkpoint.read_bytes() == before


def test_loading_a_file_that_is_not_onnx_is_a_user_error(tmp_path: Path) -> None:
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"not a model")
    with pytest.raises(DigitrecError):
        Predictor.load(bogus)


def test_an_ensemble_exports_with_the_same_answers(tiny_checkpoint: Path, tiny_mnist, tmp_path: Path) -> None:
    from digitrec.checkpoint import load_ensemble, save_model

    other = tmp_path / "other.safetensors"
    model, meta = load_model(tiny_checkpoint)
    _randomize_batchnorm(model)
    save_model(other, model, meta | {"temperature": 0.5})
    ensemble = tmp_path / "ensemble.safetensors"
    save_model(ensemble, *load_ensemble([tiny_checkpoint, other]))
    result = export_onnx(
        ensemble, tmp_path / "e.onnx", test_images=tiny_mnist.test_images, test_labels=tiny_mnist.test_labels
    )
    assert result.max_prob_diff <= 1e-4 and result.onnx_accuracy == result.torch_accuracy
    batch = as_input(tiny_mnist.test_images[:20]).numpy()
    probabilities = [Predictor.load(p).probabilities(batch) for p in (ensemble, tmp_path / "e.onnx")]
    assert np.abs(probabilities[0] - probabilities[1]).max() <= 1e-4


def test_a_checkpoint_whose_weights_are_not_finite_is_not_exported_and_such_an_export_is_refused(
    idx_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Its parity check passed (max |Δprob| NaN > 1e-4 is false), and the .onnx answered digit 0 with
    confidence NaN."""
    from digitrec.export import _to_onnx_bytes, _with_metadata

    model = create_model("fast_cnn").eval()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    checkpoint = tmp_path / "run" / "model.safetensors"
    save_model(checkpoint, model, {"recipe": "fast", "config": {"arch": "fast_cnn"}})
    out = tmp_path / "diverged.onnx"
    assert main(["export", str(checkpoint.parent), "--out", str(out), "--data-dir", str(idx_folder)]) != 0
    assert "holds weights that are not finite numbers" in capsys.readouterr().err and not out.exists()

    # an export made before digitrec refused them
    export = {"source_checkpoint": str(checkpoint), "source_sha256": "0" * 64, "precision": "float32"}
    export |= {"input": "pixels", "output": "logits", "temperature": 1.0, "reject_below": 0.3}
    out.write_bytes(_with_metadata(_to_onnx_bytes(inference_model(model)), {"export": export}))
    for load in (OnnxBackend, lambda path: Predictor.load(path, backend="onnx")):
        with pytest.raises(DigitrecError) as refused:
            load(out)
        assert str(refused.value) == (
            f"ONNX model {out} holds weights that are not finite numbers (NaN or infinity): the run that wrote "
            "its checkpoint diverged; train it again (with a lower --lr) and export that."
        )


def test_an_export_whose_checkpoint_beside_it_changed_since_is_refused(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """The export's metadata names its source checkpoint and that file's SHA-256: where that checkpoint lies beside
    the export with other contents (calibrated or trained again), the export answers with the old temperature and
    threshold, and loading it says so instead of predicting with them; elsewhere (its checkpoint not beside it,
    or unchanged) it loads."""
    import shutil

    from digitrec.checkpoint import sidecar_path

    for path in (tiny_checkpoint, sidecar_path(tiny_checkpoint)):
        shutil.copy(path, tmp_path / path.name)
    checkpoint = tmp_path / "model.safetensors"
    export_onnx(checkpoint, log=lambda msg: None)
    exported = tmp_path / "model.onnx"
    Predictor.load(exported)  # unchanged: it loads
    model, meta = load_model(checkpoint)
    save_model(checkpoint, model, {**meta, "temperature": 1.7, "reject_below": 0.8})  # as calibrate writes it
    with pytest.raises(DigitrecError) as refused:
        Predictor.load(exported)
    message = str(refused.value)
    assert message.startswith(
        f"ONNX model {exported} was exported from {checkpoint} before that checkpoint changed"
    )
    assert f"`digitrec export {checkpoint}`" in message and message.count(". ") == 0
    # an export under a name of the user's: the command given writes it there again (it wrote model.onnx)
    mine = tmp_path / "mine.onnx"
    shutil.copy(exported, mine)
    with pytest.raises(DigitrecError, match=f"`digitrec export {checkpoint} --out {mine}`"):
        Predictor.load(mine)
    moved = tmp_path / "elsewhere" / "model.onnx"
    moved.parent.mkdir()
    shutil.copy(exported, moved)
    assert Predictor.load(moved).temperature == pytest.approx(float(meta.get("temperature", 1.0)))
    # kept in another model's folder, beside a model.safetensors it was not exported from (other weights): that
    # one is not its source (the review that found this was told to export the wrong model again)
    another = create_model(meta["config"]["arch"], tuple(meta["config"]["normalize"]))
    _randomize_batchnorm(another)
    save_model(moved.parent / checkpoint.name, another, {**meta, "created": "2026-12-07T09:00:00+0000"})
    (tmp_path / "gone").mkdir()
    checkpoint.rename(tmp_path / "gone" / checkpoint.name)  # its own source, recorded, no longer there
    assert Predictor.load(moved).temperature == pytest.approx(float(meta.get("temperature", 1.0)))
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(exported, other / "a-v1.onnx")
    (tmp_path / "gone" / checkpoint.name).rename(checkpoint)  # back: the export's source exists, elsewhere
    save_model(other / "model.safetensors", model, meta)
    assert Predictor.load(other / "a-v1.onnx").temperature == pytest.approx(
        float(meta.get("temperature", 1.0))
    )


def test_a_stale_export_is_refused_from_any_folder_not_only_the_one_it_was_made_in(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export recorded its source as given (run/model.safetensors, relative): from any other folder that path
    named nothing, the check was skipped, and predict and serve answered with the replaced model."""
    import shutil

    from digitrec.checkpoint import sidecar_path

    run = tmp_path / "run"
    run.mkdir()
    for path in (tiny_checkpoint, sidecar_path(tiny_checkpoint)):
        shutil.copy(path, run / path.name)
    monkeypatch.chdir(tmp_path)
    export_onnx(Path("run/model.safetensors"), Path("run/prod.onnx"), log=lambda msg: None)
    model, meta = load_model(run / "model.safetensors")
    save_model(run / "model.safetensors", model, {**meta, "temperature": 1.7})  # as calibrate writes it
    monkeypatch.chdir(tmp_path.parent)
    with pytest.raises(DigitrecError, match="before that checkpoint changed"):
        Predictor.load(run / "prod.onnx")
    # the project moved (its absolute path names nothing now), used from its new place as before: still refused
    monkeypatch.chdir(tmp_path)
    export_onnx(Path("run/model.safetensors"), Path("run/prod.onnx"), log=lambda msg: None)
    (tmp_path / "project").mkdir()
    run.rename(tmp_path / "project" / "run")
    model, meta = load_model(tmp_path / "project" / "run" / "model.safetensors")
    save_model(tmp_path / "project" / "run" / "model.safetensors", model, {**meta, "temperature": 2.5})
    monkeypatch.chdir(tmp_path / "project")
    with pytest.raises(DigitrecError, match="before that checkpoint changed"):
        Predictor.load(Path("run/prod.onnx"))
    # the run folder renamed (neither recorded path names it now), then calibrated: refused from anywhere
    export_onnx(Path("run/model.safetensors"), Path("run/prod.onnx"), log=lambda msg: None)
    renamed = tmp_path / "project" / "renamed"
    (tmp_path / "project" / "run").rename(renamed)
    model, meta = load_model(renamed / "model.safetensors")
    save_model(renamed / "model.safetensors", model, {**meta, "temperature": 3.5})
    with pytest.raises(DigitrecError, match="before that checkpoint changed"):
        Predictor.load(renamed / "prod.onnx")
    # calibrated with --half, which rewrites the weights' bytes: the same run, by when it began
    from digitrec.checkpoint import load_tensors, save_tensors

    tensors, meta = load_tensors(renamed / "model.safetensors")
    halved = {name: t.half() if t.is_floating_point() else t for name, t in tensors.items()}
    save_tensors(renamed / "model.safetensors", halved, {**meta, "temperature": 4.5})
    with pytest.raises(DigitrecError, match="before that checkpoint changed"):
        Predictor.load(renamed / "prod.onnx")


def _with_signature(
    exported: Path, out: Path, batch: int | None = None, input_name: str | None = None
) -> Path:
    """The export with its batch size fixed, or its input renamed, its metadata kept."""
    import onnx

    graph = onnx.load(str(exported))
    if batch is not None:
        for value in [*graph.graph.input, *graph.graph.output]:
            value.type.tensor_type.shape.dim[0].dim_value = batch
    if input_name is not None:
        old = graph.graph.input[0].name
        graph.graph.input[0].name = input_name
        for node in graph.graph.node:
            node.input[:] = [input_name if name == old else name for name in node.input]
    onnx.save(graph, str(out))
    return out


def test_an_onnx_model_that_does_not_take_what_our_exports_take_is_one_sentence(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """An export changed after `digitrec export` (its batch fixed to 1 for a phone, say) stopped a folder's
    predict with ONNX Runtime's traceback; another input name stopped every call."""
    exported = export_onnx(tiny_checkpoint, tmp_path / "model.onnx", log=lambda msg: None).path
    for changed, says in [
        (_with_signature(exported, tmp_path / "one.onnx", batch=1), "pixels tensor(float) [1, 1, 28, 28]"),
        (_with_signature(exported, tmp_path / "x.onnx", input_name="x"), "takes x tensor(float)"),
    ]:
        with pytest.raises(DigitrecError) as refused:
            OnnxBackend(changed)
        assert str(refused.value).startswith(f"ONNX model {changed} takes ") and says in str(refused.value)
        assert str(refused.value).endswith("export the model again with `digitrec export`.")


def test_an_int8_drop_of_exactly_the_allowed_images_passes() -> None:
    """10 of 10,000 images lost is 0.1 point, which is allowed: the fractions' difference (0.0010000000000000009)
    said it was more (`export --int8` refused 'costs 0.10 points ... (more than 0.1)')."""
    from digitrec.export import costs_too_much

    assert not costs_too_much(3479 / 10000, 3469 / 10000, 10000, 0.001)
    assert costs_too_much(3479 / 10000, 3468 / 10000, 10000, 0.001)
    assert not costs_too_much(0.5, 0.5, 300, 0.001) and costs_too_much(0.5, 299 / 600, 600, 0.001)


@pytest.mark.parametrize("use", ["export", "predict", "evaluate", "load"])
def test_the_pair_classifier_is_named_as_reads_not_an_unknown_architecture(
    use: str, tmp_path: Path, idx_folder: Path, capsys: pytest.CaptureFixture
) -> None:
    """`digitrec export src/digitrec/pretrained/pairs.safetensors` said "unknown architecture 'pair_cnn'; run
    `digitrec models`", as did predict and evaluate."""
    from digitrec.errors import CheckpointError
    from digitrec.predict import pretrained_path

    pairs = pretrained_path("pairs")
    expected = f"{pairs} is the pair classifier that `digitrec read` consults"
    if use == "load":
        for load in (load_model, Predictor.load, lambda path: Predictor.load(path, backend="numpy")):
            with pytest.raises(CheckpointError, match="is the pair classifier that `digitrec read` consults"):
                load(pairs)
        return
    image = tmp_path / "digit.png"
    from PIL import Image

    Image.new("L", (28, 28), 0).save(image)
    argv = {
        "export": [
            "export",
            str(pairs),
            "--out",
            str(tmp_path / "pairs.onnx"),
            "--data-dir",
            str(idx_folder),
        ],
        "predict": ["predict", str(image), "--model", str(pairs)],
        "evaluate": ["evaluate", str(pairs), "--data-dir", str(idx_folder)],
    }[use]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "unknown architecture" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "pairs.onnx").exists()


@pytest.mark.parametrize(
    "text, says",
    [
        ("null", "the ONNX model's digitrec metadata is damaged; export it again."),
        ("[]", "the ONNX model's digitrec metadata is damaged; export it again."),
        ('{"temperature": "hot"}', "records a temperature of 'hot', not a positive number"),
        ('{"temperature": 0}', "records a temperature of 0, not a positive number"),
        ('{"reject_below": "x"}', "records a reject threshold of 'x', not a probability from 0 to 1"),
        ('{"reject_below": 1.5}', "records a reject threshold of 1.5, not a probability from 0 to 1"),
        ('{"config": []}', "records a config that is a list, not a table"),
        ('{"versions": 3}', None),  # not needed to answer: the model loads
    ],
)
def test_an_export_whose_metadata_was_edited_by_hand_is_one_sentence(
    tiny_checkpoint: Path, tmp_path: Path, text: str, says: str | None
) -> None:
    """ONNX metadata carries no checksum: null, [] or "config": [] gave an AttributeError traceback, a temperature
    "hot" a ValueError one, and a temperature of 0 answered "digit 0, confidence nan%"."""
    import json

    import onnx

    from digitrec.checkpoint import META_KEY

    exported = export_onnx(tiny_checkpoint, tmp_path / "model.onnx", log=lambda msg: None).path
    proto = onnx.load(str(exported))
    [entry] = [p for p in proto.metadata_props if p.key == META_KEY]
    edited = json.loads(text)
    entry.value = json.dumps({**json.loads(entry.value), **edited} if isinstance(edited, dict) else edited)
    onnx.save(proto, str(exported))
    if says is None:
        assert Predictor.load(exported).predict_tensor(np.zeros((1, 1, 28, 28), np.float32))
        return
    with pytest.raises(DigitrecError) as refused:
        Predictor.load(exported)
    assert says in str(refused.value) and str(refused.value).count(". ") == 0


def test_a_checkpoint_whose_reject_threshold_was_edited_is_one_sentence_to_export(
    tiny_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    """export raised `ValueError: could not convert string to float: 'abc'`, a traceback; evaluate and predict
    said a sentence."""
    model, meta = load_model(tiny_checkpoint)
    bad = tmp_path / "bad.safetensors"
    save_model(bad, model, meta | {"reject_below": "abc"})
    assert main(["export", str(bad), "--out", str(tmp_path / "bad.onnx")]) == 2
    err = capsys.readouterr().err
    assert f"the model {bad} records a reject threshold of 'abc', not a probability from 0 to 1" in err
    assert err.strip().endswith(f"write it again with `digitrec calibrate {bad}`.")  # not "export it again"
    assert "Traceback" not in err and not (tmp_path / "bad.onnx").exists()


def test_a_refused_export_leaves_no_folder_it_made_for_its_out(tmp_path: Path, capsys) -> None:
    """`digitrec export nonexist --out newdir/sub/x.onnx` made newdir/sub before the checkpoint was looked at, and
    left it there after refusing; a folder that was there before stays."""
    assert (
        main(["export", str(tmp_path / "nonexist"), "--out", str(tmp_path / "newdir" / "sub" / "x.onnx")])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "newdir").exists()
    (tmp_path / "kept").mkdir()
    assert (
        main(["export", str(tmp_path / "nonexist"), "--out", str(tmp_path / "kept" / "new" / "x.onnx")]) == 2
    )
    assert (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "new").exists()
