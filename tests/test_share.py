"""Sharing runs and models: trackers, devices, exported folders, and new runs started from another run's weights."""
import glob
import os
import sys

import pytest

import train as train_module
from test_cli import read_log, train


def test_tensorboard_gets_every_logged_number_and_the_sample_grid(tmp_path, cache_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    train(out, cache_dir, "--steps", "2", "--log-every", "1", "--eval-every", "1", "--tracker", "tensorboard")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = [(f"unet{r['unet']}/{key}", r["step"], value) for r in read_log(out) for key, value in r.items()
              if key not in ("unet", "step") and type(value) in (int, float)]
    assert {tag for tag, _, _ in logged} >= {"unet0/loss", "unet0/lr", "unet0/img_per_s", "unet1/heldout_loss"}
    for tag, step, value in logged:
        assert (step, pytest.approx(value)) in [(e.step, e.value) for e in events.Scalars(tag)], tag
    assert events.Tags()["images"] == ["unet1/samples"]


def test_wandb_offline_writes_its_run_folder_with_the_logged_numbers_and_the_grid(tmp_path, cache_dir):
    out, home = tmp_path / "run", str(tmp_path / "wandb-home")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": home, "WANDB_CACHE_DIR": home,
           "WANDB_CONFIG_DIR": home, "WANDB_DATA_DIR": home}
    train(out, cache_dir, "--steps", "2", "--log-every", "1", "--tracker", "wandb", env=env)
    [run] = glob.glob(str(out / "wandb" / "offline-run-*"))
    [history] = glob.glob(os.path.join(run, "*.wandb"))  # protobuf records: their keys are plain bytes
    assert all(key in open(history, "rb").read() for key in (b"unet0/loss", b"unet1/lr", b"unet1/heldout_loss"))
    assert glob.glob(os.path.join(run, "files", "media", "images", "unet1", "samples_*.png"))


def test_a_tracker_that_is_not_installed_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ValueError, match=r'--tracker wandb needs wandb: pip install -e "\.\[wandb\]"'):
        train_module.Tracker("wandb", str(tmp_path), {})
