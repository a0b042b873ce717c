"""Hypothesis profiles: local runs stay randomised; CI (HYPOTHESIS_PROFILE=ci, set by .ci/run) is reproducible."""
import os

import pytest
from hypothesis import settings

# A fresh checkout has no stored example database, so CI derandomises instead: the same examples on every run.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


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
