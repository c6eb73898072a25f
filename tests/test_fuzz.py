"""Hostile input: the IDX parser, the checkpoint loader, preprocess() and the API give a result or the documented error.

Each property runs a few dozen examples by default and 10,000 under `pytest -m slow` (`make test-slow`);
DIGITREC_FUZZ_EXAMPLES changes the default count.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from serverkit import png_claiming

from digitrec.checkpoint import load_model, save_model
from digitrec.data import parse_idx
from digitrec.errors import CheckpointError, DataError, DigitrecError, ImageError
from digitrec.models import create_model
from digitrec.preprocess import preprocess

QUICK = int(os.environ.get("DIGITREC_FUZZ_EXAMPLES", "40"))
EXAMPLES = [pytest.param(QUICK, id="quick"), pytest.param(10_000, id="10k", marks=pytest.mark.slow)]


def check(examples: int, *strategies, **settings_kwargs):
    """Run the decorated property `examples` times now (it takes the drawn values as arguments)."""

    def run(prop):
        settings(
            max_examples=examples,
            deadline=None,
            derandomize=examples == QUICK,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            **settings_kwargs,
        )(given(*strategies)(prop))()

    return run


# ---------------------------------------------------------------------------------------------- IDX files


def idx_header(dtype_code: int, dims: list[int]) -> bytes:
    return bytes([0, 0, dtype_code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)


def assert_idx_outcome(data: bytes) -> None:
    try:
        array = parse_idx(data)
    except DataError as exc:
        assert str(exc).endswith(".") and "\n" not in str(exc)
        return
    assert array.dtype == np.uint8 and array.size == len(data) - 4 - 4 * array.ndim


@pytest.mark.parametrize("examples", EXAMPLES)
def test_idx_random_bytes(examples):
    check(examples, st.binary(max_size=256))(assert_idx_outcome)


dims = st.lists(
    st.one_of(st.integers(0, 40), st.integers(0, 2**32 - 1), st.sampled_from([2**16, 10**9, 2**31])),
    min_size=0,
    max_size=6,
)


@pytest.mark.parametrize("examples", EXAMPLES)
def test_idx_lying_headers(examples):
    """Right magic, any type byte, dims from tiny to 2^32-1, and a payload of any length."""

    @check(
        examples, st.sampled_from([0x08, 0x08, 0x09, 0x0D, 0xFF]), dims, st.integers(0, 2000), st.booleans()
    )
    def prop(dtype_code, dims, payload_size, exact):
        size = math.prod(dims) if exact and math.prod(dims) <= 4096 else payload_size
        assert_idx_outcome(idx_header(dtype_code, dims) + bytes(size))


@pytest.mark.parametrize("dims", [[10**9, 28, 28], [2**16] * 4, [2**32 - 1] * 4, [0, 2**32 - 1, 2**32 - 1]])
def test_idx_headers_claiming_huge_counts_are_refused_without_allocating(dims):
    # [2**16] * 4 is 2^64 items: a NumPy int64 product wraps to 0 and an empty payload would "match"
    with pytest.raises(DataError):
        parse_idx(idx_header(0x08, dims))


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> tuple[bytes, bytes]:
    """A real (small) model file and its side file."""
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_model(
        path,
        create_model("lenet"),
        {"recipe": "r", "config": {"arch": "lenet", "normalize": [0.1307, 0.3081]}},
    )
    return path.read_bytes(), path.with_suffix(".json").read_bytes()


def load_outcome(folder: Path, data: bytes, side: bytes | None) -> str:
    """'loaded' or 'refused' (CheckpointError or DigitrecError, one sentence); anything else fails the test."""
    path = folder / "model.safetensors"
    path.write_bytes(data)
    path.with_suffix(".json").unlink(missing_ok=True)
    if side is not None:
        path.with_suffix(".json").write_bytes(side)
    try:
        load_model(path)
    except DigitrecError as exc:
        assert "\n" not in str(exc)
        return "refused"
    return "loaded"


@pytest.mark.parametrize("examples", EXAMPLES)
def test_checkpoint_random_bytes(examples, tmp_path):
    @check(examples, st.binary(max_size=512), st.booleans())
    def prop(data, with_side):
        assert load_outcome(tmp_path, data, b"{}" if with_side else None) == "refused"


@pytest.mark.parametrize("examples", EXAMPLES)
def test_checkpoint_damaged(examples, tmp_path, checkpoint_bytes):
    """Truncated or with bytes changed anywhere: refused when the side file is there; alone, refused too unless
    what loads is what was written (a change to the header's spacing) or the change hit the checksum's name."""
    good, side = checkpoint_bytes
    (tmp_path / "model.safetensors").write_bytes(good)
    good_model, good_meta = load_model(tmp_path / "model.safetensors")

    @check(
        examples,
        st.integers(0, len(good) - 1),
        st.binary(min_size=1, max_size=8),
        st.booleans(),
        st.booleans(),
    )
    def prop(offset, patch, truncate, with_side):
        data = good[:offset] if truncate else good[:offset] + patch + good[offset + len(patch) :]
        outcome = load_outcome(tmp_path, data, side if with_side else None)
        if with_side and data != good:
            assert outcome == "refused"
        header = data[8 : 8 + int.from_bytes(data[:8], "little")]
        if outcome == "loaded" and b'"digitrec_sha256":' in header:
            model, meta = load_model(tmp_path / "model.safetensors")
            assert meta == good_meta
            assert all(torch.equal(v, good_model.state_dict()[k]) for k, v in model.state_dict().items())


json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.mark.parametrize("examples", EXAMPLES)
def test_checkpoint_hostile_metadata(examples, tmp_path):
    """A well-formed safetensors file whose metadata says anything at all."""
    from safetensors.torch import save

    @check(examples, json_values, st.sampled_from(["lenet", "mlp_500_256", "nope", ""]), st.booleans())
    def prop(value, arch, as_config):
        meta = {"config": {"arch": arch, "normalize": value}} if as_config else value
        data = save({"w": torch.zeros(2)}, metadata={"digitrec": json.dumps(meta)})
        assert load_outcome(tmp_path, data, None) == "refused"


def test_pickles_are_refused_and_never_run(tmp_path, checkpoint_bytes):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for payload in (pickle.dumps(Exploit()), pickle.dumps({"w": torch.zeros(2)})):
        assert load_outcome(tmp_path, payload, None) == "refused"
    buffer = io.BytesIO()
    torch.save({"exploit": Exploit()}, buffer)  # what `torch.save` files renamed to .safetensors look like
    assert load_outcome(tmp_path, buffer.getvalue(), None) == "refused"
    assert load_outcome(tmp_path, buffer.getvalue(), checkpoint_bytes[1]) == "refused"
    assert not marker.exists()


def test_deeply_nested_header_is_refused(tmp_path):
    header = b"[" * 100_000 + b"]" * 100_000
    assert load_outcome(tmp_path, struct.pack("<Q", len(header)) + header, None) == "refused"


def test_resume_refuses_a_foreign_checkpoint(tmp_path, checkpoint_bytes):
    from digitrec.config import TrainConfig
    from digitrec.training import train

    (tmp_path / "last.safetensors").write_bytes(
        checkpoint_bytes[0]
    )  # a model file, not a training checkpoint
    with pytest.raises(CheckpointError, match="not a digitrec training checkpoint"):
        train(TrainConfig(), tmp_path, resume=True, progress=False, log=lambda m: None)


# ---------------------------------------------------------------------------------------------- images


def assert_mnist_like_or_image_error(source) -> None:
    try:
        out = preprocess(source)
    except ImageError as exc:
        assert "\n" not in str(exc)
        return
    assert out.shape == (28, 28) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def image_bytes(image: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("examples", EXAMPLES)
def test_preprocess_random_bytes(examples):
    check(examples, st.binary(max_size=512))(assert_mnist_like_or_image_error)


@pytest.mark.parametrize("examples", EXAMPLES)
def test_preprocess_damaged_images(examples):
    """Real PNG/JPEG/BMP/GIF files of any small size, cut short or with bytes changed."""

    @check(
        examples,
        hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=48)),
        st.sampled_from(["PNG", "JPEG", "BMP", "GIF"]),
        st.floats(0, 1),
        st.binary(max_size=4),
    )
    def prop(pixels, fmt, where, patch):
        data = image_bytes(pixels, fmt)
        offset = int(where * len(data))
        assert_mnist_like_or_image_error(data[:offset] + patch + data[offset + len(patch) :])


@pytest.mark.parametrize("examples", EXAMPLES)
def test_preprocess_arrays(examples):
    """Arrays of any dtype and shape, with NaNs, infinities and extreme values."""
    dtypes = st.sampled_from([np.uint8, np.uint16, np.int32, np.int64, np.float32, np.float64, np.bool_])
    shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=40)

    @check(examples, dtypes.flatmap(lambda dtype: hnp.arrays(dtype, shapes)))
    def prop(array):
        assert_mnist_like_or_image_error(array)


@pytest.mark.parametrize("width, height", [(50_000, 50_000), (2**31 - 1, 1), (1, 2**31 - 1), (0, 0)])
def test_preprocess_refuses_images_whose_header_claims_too_much(width, height):
    with pytest.raises(ImageError):
        preprocess(png_claiming(width, height))


# ---------------------------------------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from serverkit import BASE_URL, FakePredictor

    from digitrec.server import create_app

    app = create_app(FakePredictor(), feedback_db=tmp_path_factory.mktemp("api") / "feedback.sqlite")
    with TestClient(app, raise_server_exceptions=False, base_url=BASE_URL) as test_client:
        yield test_client


ENDPOINTS = ["/api/predict", "/api/read", "/api/feedback", "/api/predict?explain=true", "/api/predict?top=x"]
CONTENT_TYPES = [
    "application/json",
    "multipart/form-data; boundary=xyz",
    "multipart/form-data",
    "image/png",
    "text/plain",
    "application/x-www-form-urlencoded",
    "",
]


def request_bodies():
    """Raw junk, JSON of any shape, JSON with a base64 "image" of junk, and multipart with junk files."""
    import base64

    junk = st.binary(max_size=300)
    return st.one_of(
        junk,
        json_values.map(lambda v: json.dumps(v).encode()),
        st.tuples(junk, json_values).map(
            lambda t: json.dumps({"image": base64.b64encode(t[0]).decode(), "label": t[1]}).encode()
        ),
        junk.map(
            lambda b: (
                b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
                + b
                + b"\r\n--xyz--\r\n"
            )
        ),
    )


@pytest.mark.parametrize("examples", EXAMPLES)
def test_api_answers_junk_with_4xx(examples, client):
    @check(examples, st.sampled_from(ENDPOINTS), st.sampled_from(CONTENT_TYPES), request_bodies())
    def prop(endpoint, content_type, body):
        headers = {"content-type": content_type} if content_type else {}
        response = client.post(endpoint, content=body, headers=headers)
        assert response.status_code < 500, (response.status_code, response.text)
        if response.status_code >= 400:
            assert isinstance(response.json()["detail"], str)


@pytest.mark.parametrize("side", [8_000, 50_000])
def test_api_refuses_a_decompression_bomb(client, side):
    response = client.post(
        "/api/predict", files={"file": ("bomb.png", png_claiming(side, side), "image/png")}
    )
    detail = response.json()["detail"]
    assert response.status_code in (400, 413) and ("too large" in detail or "megapixels" in detail)


@pytest.mark.parametrize("examples", EXAMPLES)
def test_api_reads_any_real_image_or_says_why_not(examples, client):
    """Valid images of any size and content: 200 with a digit (or a rejection), or 400 for too small."""

    @check(examples, hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=64)))
    def prop(pixels):
        response = client.post(
            "/api/predict", files={"file": ("x.png", image_bytes(pixels, "PNG"), "image/png")}
        )
        assert response.status_code in (200, 400), response.text
        if response.status_code == 200:
            assert len(response.json()["probabilities"]) == 10
        else:
            assert "too small" in response.json()["detail"]
