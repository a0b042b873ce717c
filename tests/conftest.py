"""Hypothesis profiles: local runs stay randomised; CI (HYPOTHESIS_PROFILE=ci, set by .ci/run) is reproducible."""
import os

from hypothesis import settings

# A fresh checkout has no stored example database, so CI derandomises instead: the same examples on every run.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
