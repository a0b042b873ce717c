"""Shared test setup: Hypothesis profiles and settings, the session's text cache and trained cascade, tiny random
cascades, random tensors, image folders and shards, and the checks the test files share."""
import io
import json
import os
import tarfile

import pytest
import torch
from hypothesis import settings, strategies as st
from PIL import Image

import imagen
import registry

# A fresh checkout has no stored example database, so CI derandomises instead: the same examples on every run.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

FAST = settings(max_examples=25, deadline=None)
FEW = settings(max_examples=15, deadline=None)
seeds = st.integers(0, 2 ** 31 - 1)
shapes = st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple)  # [b, ...]
TEXT_DIM = 8  # text embedding width of the tiny cascades


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One text-embedding cache for the whole session: MiniLM encodes each caption once."""
    return str(tmp_path_factory.mktemp("text-cache"))


@pytest.fixture(scope="session")
def trained(tmp_path_factory, cache_dir):
    """A tiny cascade trained 4 steps through the real train.py (checkpoints at steps 2 and 4, one older kept)."""
    from test_cli import train
    out = tmp_path_factory.mktemp("run")
    train(out, cache_dir, "--steps", "4", "--save-every", "2", "--keep", "1")
    return out


def randn(shape, seed):
    """Standard normal float32 tensor, reproducible from seed."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def column(values, x):
    """[b] -> [b, 1, ..., 1] to broadcast against x."""
    return values.view(-1, *[1] * (x.ndim - 1))


def assert_within(actual, expected, tolerance):
    assert ((actual - expected).abs() <= tolerance).all(), (actual - expected).abs().max()


def never_called(x, t):
    raise AssertionError("the denoiser must not run on bad input")


def gaussian_x0(x, alpha, sigma, s):
    """E[x0 | x] for data x0 ~ N(0, s²) seen as x = α x0 + σ eps."""
    return alpha * s ** 2 / (alpha ** 2 * s ** 2 + sigma ** 2) * x


def tiny_config(**stage):
    """A two-stage 16 -> 32 px cascade config of the test presets over 8-wide text; `stage` settings for both."""
    stages = [dict(unet="BaseTest", unet_kwargs=registry.unet_kwargs("BaseTest"), size=16, timesteps=50, **stage),
              dict(unet="SuperTest", unet_kwargs=registry.unet_kwargs("SuperTest"), size=32, timesteps=50, **stage)]
    return dict(encoder="none", text_embed_dim=TEXT_DIM, max_text_len=16, stages=stages, sampling=dict(steps=3))


def random_cascade(**stage):
    """The tiny cascade with random weights everywhere, the zero-initialised output convolutions too."""
    torch.manual_seed(0)
    model = imagen.Imagen(tiny_config(**stage))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.fixture(scope="module")
def cascade():
    return random_cascade()


def text(b):
    """Random text embeddings [b, 5, TEXT_DIM] and an all-True mask [b, 5]."""
    return torch.randn(b, 5, TEXT_DIM), torch.ones(b, 5, dtype=torch.bool)


def image_bytes(color=(200, 30, 30), size=(40, 30), fmt="JPEG", mode="RGB"):
    """An encoded image file of one colour."""
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, fmt)
    return buffer.getvalue()


def captioned_pictures(folder, captions):
    """A folder of one coloured PNG per caption; a count n stands for the captions 'picture 0' ... 'picture n-1'."""
    folder.mkdir()
    for i, caption in enumerate([f"picture {i}" for i in range(captions)] if isinstance(captions, int) else captions):
        Image.new("RGB", (40, 40), (20 * i % 256, 80, 120)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption)
    return folder


def write_shards(root, sizes, caption_in="txt"):
    """img2dataset-style tar shards of the given sample counts: coloured JPEGs captioned 'sample <k>' in key.txt
    (beside an empty key.json) or in key.json; returns the captions."""
    root.mkdir(exist_ok=True)
    k = 0
    for shard, n in enumerate(sizes):
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for k in range(k, k + n):
                text = {"txt": f"sample {k}".encode(), "json": json.dumps({"caption": f"sample {k}"}).encode()}
                members = [("jpg", image_bytes((20 * k % 256, 80, 120))), (caption_in, text[caption_in])]
                for ext, payload in members + ([("json", b"{}")] if caption_in == "txt" else []):
                    info = tarfile.TarInfo(f"{k:09d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
            k += 1
    return [f"sample {k}" for k in range(sum(sizes))]
