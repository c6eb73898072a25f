"""The public Python API: its doctests run as written (on the tiny data set), and its promises hold."""

from __future__ import annotations

import doctest
import io
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_segment import line_image

import digitrec
import digitrec.api
from digitrec.errors import DigitrecError
from digitrec.preprocess import preprocess


@pytest.fixture
def tiny_env(idx_folder, tmp_path, monkeypatch):
    """MNIST is the tiny set (found through $DIGITREC_DATA) and runs/ lands in a temporary folder."""
    monkeypatch.setenv("DIGITREC_DATA", str(idx_folder))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@pytest.fixture(scope="module")
def predictor():
    """The bundled model: it reads digits, so the tests can check the answers and not only their form."""
    return digitrec.Predictor.pretrained()


@pytest.fixture(scope="module")
def seven() -> np.ndarray:
    """A pen-drawn 7 as MNIST holds its digits: white on black, uint8 28x28."""
    return (255 * preprocess(line_image([7])[0])).round().astype(np.uint8)


@pytest.mark.parametrize("module", [digitrec, digitrec.api], ids=lambda m: m.__name__)
def test_docstring_examples_run_as_written(module, tiny_env):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_import_is_lazy_and_exports_the_api():
    code = "import sys, digitrec; print('torch' in sys.modules, sorted(set(digitrec.__all__) <= set(dir(digitrec)) and digitrec.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("False")  # torch is not imported by `import digitrec`
    for name in ("Predictor", "Prediction", "ReadResult", "Run", "TrainConfig", "train", "DigitrecError"):
        assert name in out


def test_dir_lists_the_public_names_not_the_modules_own_imports():
    """dir(digitrec) listed Any, TYPE_CHECKING, annotations and import_module beside the API."""
    assert set(digitrec.__all__) <= set(dir(digitrec))
    assert not {"Any", "TYPE_CHECKING", "annotations", "import_module"} & set(dir(digitrec))


def test_train_is_the_friendly_function_even_after_the_loop_is_imported(tiny_mnist, tmp_path):
    import digitrec.training as loop

    assert callable(digitrec.train) and digitrec.train is not loop.train and hasattr(loop, "train_steps")
    run = digitrec.train(
        digitrec.TrainConfig(arch="lenet", epochs=1, val_size=100), tmp_path, data=tiny_mnist, report=False
    )
    assert (
        isinstance(run, digitrec.Run) and run.model_path.exists() and run.metrics["val_accuracy"] is not None
    )


def test_a_stopped_run_is_resumed_or_started_over_from_python(tiny_mnist, tmp_path):
    """Stopped in a notebook (KeyboardInterrupt), a run could only be taken up again by the command line: a new
    digitrec.train() into its folder was refused with "--resume ... --overwrite", flags train() did not take."""
    from digitrec.training import train as loop

    config = digitrec.TrainConfig(arch="lenet", epochs=2, val_size=100, checkpoint_every_steps=3)

    def stop(model, row):
        raise KeyboardInterrupt  # after epoch 1's mid-epoch checkpoints

    with pytest.raises(KeyboardInterrupt):
        loop(
            config, tmp_path, data=tiny_mnist, on_epoch=stop, progress=False, report=False, log=lambda m: None
        )
    with pytest.raises(DigitrecError) as refused:
        digitrec.train(config, tmp_path, data=tiny_mnist, report=False)
    assert "resume=True), start it over with overwrite=True, or choose another out_dir." in str(refused.value)
    assert "--" not in str(refused.value)
    with pytest.raises(DigitrecError, match="goes on with its own settings"):
        digitrec.train("fast", tmp_path, data=tiny_mnist, resume=True)
    run = digitrec.train(out_dir=tmp_path, data=tiny_mnist, report=False, resume=True)
    assert run.config == config and len(run.history) == 2 and run.model_path.exists()
    again = digitrec.train("fast", tmp_path, data=tiny_mnist, epochs=0.1, report=False, overwrite=True)
    assert again.config.arch == digitrec.RECIPES["fast"].arch


def test_train_trains_when_the_caller_has_autograd_off(tiny_mnist, tmp_path):
    """Why train() enters torch.enable_grad(): a caller inside torch.no_grad() still gets a trained model."""
    with torch.no_grad():
        run = digitrec.train("fast", tmp_path / "run", data=tiny_mnist, epochs=1, report=False)
        assert not torch.is_grad_enabled()
    assert run.model_path.is_file()  # without autograd, backward() would have raised


def test_train_reads_a_toml_config(tiny_mnist, tmp_path):
    config = tmp_path / "best.toml"
    config.write_text('recipe = "fast"\nlr = 0.002\nbatch_size = 64\n')
    run = digitrec.train(config, tmp_path / "run", data=tiny_mnist, epochs=1, report=False)
    assert (run.config.lr, run.config.batch_size, run.config.arch) == (
        0.002,
        64,
        digitrec.RECIPES["fast"].arch,
    )


def test_a_toml_config_is_known_by_its_suffix_in_any_case(tmp_path):
    """`digitrec.train("c.TOML")` said "unknown recipe 'c.TOML'"."""
    from digitrec.api import resolve_config

    config = tmp_path / "C.TOML"
    config.write_text('recipe = "fast"\nlr = 0.002\n')
    recipe, resolved = resolve_config(str(config))
    assert recipe == "fast" and resolved.lr == 0.002


def test_what_is_no_model_path_or_no_data_set_is_one_sentence(predictor):
    """Predictor.load(None) (an unset os.environ.get) or bytes raised TypeError, a path with a NUL character
    ValueError; train(data="mnist") an AttributeError from deep inside the training loop."""
    for model, said in [
        (None, "the model must be a path (a run folder, a .safetensors or an .onnx file), got None."),
        (
            b"runs/x",
            "the model must be a path (a run folder, a .safetensors or an .onnx file), got b'runs/x'.",
        ),
        ("runs/a\0b", "the model's path 'runs/a\\x00b' holds a NUL character, which no file name can."),
    ]:
        with pytest.raises(digitrec.DigitrecError) as refused:
            digitrec.Predictor.load(model)
        assert str(refused.value) == said
    with pytest.raises(digitrec.DigitrecError, match="holds a NUL character, which no file name can; check"):
        predictor.predict("a\0b.png")
    with pytest.raises(digitrec.DigitrecError, match="^data must be the MNIST that digitrec.load_mnist"):
        digitrec.train("fast", data="mnist")


def test_unknown_recipe_is_a_user_error():
    with pytest.raises(digitrec.DigitrecError, match="unknown recipe 'nope'"):
        digitrec.train("nope")


def _inputs(image: np.ndarray) -> dict[str, object]:
    """One MNIST-like digit (white on black, uint8 28x28) in every form the API accepts."""
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    rgb = np.repeat(image[:, :, None], 3, axis=2)
    return {
        "array uint8": image,
        "array float": image / 255.0,
        "array HxWxC": rgb,
        "PIL": Image.fromarray(image),
        "bytes": png.getvalue(),
    }


def test_predict_accepts_every_input_form_and_agrees(predictor, seven, tmp_path):
    forms = _inputs(seven)
    path = tmp_path / "digit.png"
    path.write_bytes(forms["bytes"])  # type: ignore[arg-type]
    forms["path"] = path
    results = {name: predictor.predict(value)[0] for name, value in forms.items()}
    assert {n: (r.digit, r.rejected) for n, r in results.items()} == {n: (7, False) for n in forms}
    batch = predictor.predict(list(forms.values()))
    assert len(batch) == len(forms)
    assert [r.digit for r in batch] == [7] * len(forms)
    for result in batch:
        assert len(result.probabilities) == 10 and abs(sum(result.probabilities) - 1) < 1e-4
        assert result.rejected == (result.digit is None) and 0 <= result.confidence <= 1


def test_predict_accepts_a_torch_tensor(predictor, seven):
    [from_tensor] = predictor.predict(torch.from_numpy(seven))
    [from_array] = predictor.predict(seven)
    assert (from_tensor.digit, from_tensor.rejected) == (7, False)
    assert from_tensor.probabilities == from_array.probabilities


def test_forms_a_review_found_read_wrong_or_with_a_traceback(predictor, seven, tmp_path):
    """A uint16 array of 0-255 values read as blank (divided by 65535), where int16 or int32 ones read right; a
    bfloat16 tensor and a PIL image whose file was closed before it loaded raised from inside torch and Pillow."""
    for form in (seven.astype(np.uint16), Image.fromarray(seven).convert("I;16")):
        assert predictor.predict(form)[0].digit == 7
    # and at any depth up to 16 bits: a 12-bit sensor's 0-4095 read blank when divided by 65535
    for top in (511, 4095, 8000, 65535):
        assert predictor.predict((seven.astype(np.float64) * top / 255).astype(np.uint16))[0].digit == 7
    assert predictor.predict(torch.from_numpy(seven).to(torch.bfloat16) / 255)[0].digit == 7
    Image.fromarray(seven).save(tmp_path / "seven.png")
    with Image.open(tmp_path / "seven.png") as opened:
        pass  # opened lazily, and its file closed: nothing decoded yet
    with pytest.raises(digitrec.DigitrecError, match=r"cannot be read \(its file was closed"):
        predictor.predict(opened)


def test_three_mnist_digits_in_one_array_are_refused_not_read_as_one_color_image(predictor, seven):
    """An (N, 28, 28) stack was refused for any N but 3, which was taken for one channels-first RGB digit and
    answered with one confident guess; a (3, H, W) color image stays one image."""
    stack = np.stack([seven, seven, seven])
    for images in (stack, torch.from_numpy(stack)):
        with pytest.raises(digitrec.DigitrecError, match=r"stack of images\? pass them as a list"):
            predictor.predict(images)
    assert [p.digit for p in predictor.predict(list(stack))] == [7, 7, 7]
    color = np.repeat(np.kron(seven, np.ones((2, 2), np.uint8))[None], 3, axis=0)  # (3, 56, 56)
    assert predictor.predict(color)[0].digit == 7


def test_predict_tensor_refuses_what_is_not_a_preprocessed_batch(predictor, seven):
    """0-255 values were read as they came (a 1 read as a 3 at 0.999), a wrong shape raised NumPy's reshape error."""
    with pytest.raises(digitrec.DigitrecError, match=r"pixel values in \[0, 1\], got 0 to 255; divide"):
        predictor.predict_tensor(seven[None, None])
    with pytest.raises(digitrec.DigitrecError, match=r"\(N, 1, 28, 28\).*shape \(5, 5\)"):
        predictor.predict_tensor(np.zeros((5, 5)))
    # shapes of a multiple of 784 pixels were cut into 28x28 pieces: a color batch answered 6 images, a 56x56
    # image with a 7 in its corner four, two of them confident
    for shape in [(2, 3, 28, 28), (56, 56), (2, 784), (784,)]:
        with pytest.raises(digitrec.DigitrecError, match=re.escape(f"shape {shape}")):
            predictor.predict_tensor(np.zeros(shape))
    for shape in [(28, 28), (2, 28, 28), (2, 1, 28, 28)]:  # one image, and a batch without its channel axis
        assert len(predictor.predict_tensor(np.zeros(shape))) == (shape[0] if len(shape) > 2 else 1)
    assert predictor.predict_tensor(seven[None, None] / 255.0)[0].digit == 7


def test_a_file_in_the_way_of_the_run_folder_and_an_empty_model_path_are_one_sentence(tmp_path):
    """train() into an existing file raised NotADirectoryError from deep inside; Predictor.load("") read the
    current folder's model.safetensors."""
    (tmp_path / "a.png").write_bytes(b"not a folder")
    for out in (tmp_path / "a.png", tmp_path / "a.png" / "run"):
        with pytest.raises(
            digitrec.DigitrecError, match=r"a.png is a file, not a folder; choose another folder"
        ):
            digitrec.train("fast", out)
    with pytest.raises(digitrec.DigitrecError, match="the model's path is empty"):
        digitrec.Predictor.load("")


def test_a_run_folder_that_is_a_link_to_nowhere_says_so(tmp_path):
    """It was "cannot write into the run folder ... (File exists)"."""
    (tmp_path / "runs").symlink_to(tmp_path / "gone")
    for out in (tmp_path / "runs", tmp_path / "runs" / "fast"):
        with pytest.raises(
            DigitrecError, match=f"runs is a link to {tmp_path / 'gone'}, which does not exist"
        ):
            digitrec.train("fast", out)


def test_read_returns_a_number_string(predictor):
    image, _ = line_image([3, 0, 5, 1, 8], gap=0.3)
    result = predictor.read(image)
    assert isinstance(result, digitrec.ReadResult) and result.number == "30518"
    assert [d.digit for d in result.digits] == [3, 0, 5, 1, 8]


def test_pretrained_model_if_bundled():
    from digitrec.predict import pretrained_path

    if not pretrained_path().exists():
        pytest.skip("no bundled model in this checkout")
    assert isinstance(digitrec.Predictor.pretrained(), digitrec.Predictor)
