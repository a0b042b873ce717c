"""Sharing runs and models: trackers, devices, exported folders, and new runs started from another run's weights."""
import argparse
import glob
import json
import os
import re
import shutil
import sys
import types

import pytest
import safetensors.torch
import torch

import bench
import imagen
import registry
import sample
import settings
import train as train_module
from test_cli import TINY, read_log, run, sampled, train
from test_train import parts_for


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


def test_wandb_offline_writes_one_group_of_runs_with_the_logged_numbers_and_the_grid(tmp_path, cache_dir):
    out, home = tmp_path / "run", str(tmp_path / "wandb-home")
    env = {key: v for key, v in os.environ.items() if key != "WANDB_RUN_GROUP"}
    env.update(WANDB_MODE="offline", WANDB_DIR=home, WANDB_CACHE_DIR=home, WANDB_CONFIG_DIR=home, WANDB_DATA_DIR=home)
    train(out, cache_dir, "--steps", "2", "--log-every", "1", "--tracker", "wandb", "--parallel-stages", "1", env=env)
    runs = glob.glob(str(out / "wandb" / "offline-run-*"))  # this process's (unet0, the grid), unet1's beside it
    histories = [open(path, "rb").read() for run in runs for path in glob.glob(os.path.join(run, "*.wandb"))]
    assert len(histories) == 2  # protobuf records: their keys and the run's group are plain bytes
    assert all(key in b"".join(histories) for key in (b"unet0/loss", b"unet1/lr", b"unet1/heldout_loss"))
    groups = [set(re.findall(rb"nanoimagen-[0-9a-f]{8}", history)) for history in histories]
    assert len(groups[0]) == 1 and groups[0] == groups[1]  # one W&B group holds both runs
    assert glob.glob(str(out / "wandb" / "offline-run-*" / "files" / "media" / "images" / "unet1" / "samples_*.png"))


def test_a_tracked_run_has_a_wandb_group_of_its_own_unless_the_user_names_one(tmp_path, cache_dir, monkeypatch):
    def init(group=None, **_):  # a stand-in wandb.init: no wandb process, nothing written; W&B's own default group
        groups.append(group or os.environ.get("WANDB_RUN_GROUP"))
        return types.SimpleNamespace(finish=lambda: None, log=lambda record: None)
    groups = []
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Image=str, init=init))
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    monkeypatch.setattr(train_module.StopSignal, "install", lambda: None)  # leave pytest's own Ctrl-C alone
    args = [*TINY, "--steps", "1", "--cache-dir", cache_dir, "--tracker", "wandb", "--parallel-stages", "0"]
    train_module.main([*args, "--out", str(tmp_path / "a")])
    assert re.fullmatch("nanoimagen-[0-9a-f]{8}", groups[0])
    assert "WANDB_RUN_GROUP" not in os.environ  # a next run in this process (a notebook) is not in this one's group
    monkeypatch.setenv("WANDB_RUN_GROUP", "mine")
    train_module.main([*args, "--out", str(tmp_path / "b")])
    assert groups[1] == "mine"


def test_a_tracker_that_is_not_installed_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ValueError, match=r'--tracker wandb: pip install -e "\.\[wandb\]"'):
        train_module.Tracker("wandb", str(tmp_path), {})


def fake_devices(monkeypatch, cuda, mps):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: cuda)  # what --precision auto asks a GPU
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize("cuda, mps, picked", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_picks_cuda_then_mps_then_cpu_on_every_command_line(monkeypatch, cuda, mps, picked):
    fake_devices(monkeypatch, cuda, mps)
    monkeypatch.delenv("RANK", raising=False)  # not under torchrun
    assert registry.pick_device("auto") == picked
    assert settings.parse_config([]).device == "auto" and train_module.setup_distributed("auto")[2].type == picked
    parser = argparse.ArgumentParser()
    sample.add_sampling_args(parser)
    assert parser.parse_args(["--ckpt", "out"]).device == picked
    assert bench.parse_args([]).device == picked


@pytest.mark.parametrize("name, needle", [("tpu", "--device 'tpu': give auto (cuda, then mps, then cpu), cuda"),
                                          ("cuda:x", "--device 'cuda:x': give auto"),
                                          ("cuda", "--device 'cuda': torch finds no cuda device here"),
                                          ("mps", "--device 'mps': torch finds no mps device here")])
def test_an_unknown_or_absent_device_is_one_line_naming_it(monkeypatch, name, needle):
    fake_devices(monkeypatch, False, False)
    with pytest.raises(ValueError, match=re.escape(needle)):
        settings.parse_config(["--device", name])
    parser = argparse.ArgumentParser()
    sample.add_sampling_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--ckpt", "out", "--device", name])


def test_torchrun_on_mps_is_refused_in_one_line(monkeypatch):
    fake_devices(monkeypatch, False, True)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="--device mps trains in one process"):
        train_module.setup_distributed("auto")


def test_a_bad_device_ends_sample_py_in_one_line():
    proc = run("sample.py", "--ckpt", "out", "--prompt", "x", "--device", "tpu", check=False)
    assert proc.returncode == 2 and "--device 'tpu': give auto" in proc.stderr.strip().splitlines()[-1]


def test_an_exported_folder_samples_like_the_checkpoints_and_its_card_says_what_trained_it(trained, tmp_path,
                                                                                           cache_dir):
    source, exported = tmp_path / "run", tmp_path / "exported"
    shutil.copytree(trained, source)
    (source / "eval.json").write_text('{"color": 0.5, "n": 4}\n')
    assert run("sample.py", "--ckpt", str(source), "--export", str(exported)).stdout.split() == [str(exported)]
    assert sorted(os.listdir(exported)) == ["README.md", "config.json", "unet0.safetensors", "unet1.safetensors"]
    about = json.loads((exported / "config.json").read_text())
    assert about["cascade"] == json.loads(json.dumps(imagen.load_checkpoint(source / "unet0.pt")["config"]))
    assert about["sampling"]["steps"] == [3, 3] and about["eval"] == {"color": 0.5, "n": 4}
    assert [t["steps"] for t in about["trained"]] == [4, 4] and about["trained"][1]["settings"]["data"] == "shapes"
    card = (exported / "README.md").read_text()
    assert "| 1 | SuperTest | 32 px | 4 | none | shapes |" in card and '"color": 0.5' in card
    for k in (0, 1):
        ema = imagen.load_checkpoint(imagen.checkpoint_path(source, k))["ema"]
        tensors = safetensors.torch.load_file(exported / f"unet{k}.safetensors")
        assert tensors.keys() == ema.keys() and all(torch.equal(tensors[name], t) for name, t in ema.items())
    assert torch.equal(sampled(exported, tmp_path / "from-folder", cache_dir),
                       sampled(source, tmp_path / "from-run", cache_dir))


def exported_folder(folder, cascade):
    imagen.export_folder(cascade.config, {k: s.unet.state_dict() for k, s in enumerate(cascade.stages)}, folder,
                         dict(trained=[{}, {}]))
    return folder


def test_a_hub_id_loads_through_snapshot_download(tmp_path, cascade, monkeypatch):
    import huggingface_hub
    folder = exported_folder(tmp_path / "snapshot", cascade)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda hub_id: {"someone/tiny": str(folder)}[hub_id])
    loaded, trained = imagen.load_cascade("someone/tiny")
    assert trained == 2 and all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                                   cascade.state_dict().values()))


@pytest.mark.parametrize("fault, needle", [
    ("stage missing", "cannot load {folder}/unet1.safetensors"),
    ("shape mismatch", "{folder} U-Net 0 does not fit its U-Net (downs.0.after.bias: [8] -> [16], weights -> U-Net)"),
    ("bad json", "{folder}/config.json is not a sample.py --export config (JSONDecodeError"),
    ("no cascade", "{folder}/config.json is not a sample.py --export config (KeyError: 'cascade')"),
    ("no such hub id", "'no-such-org/no-such-model': no such file, folder or Hugging Face Hub model")])
def test_a_broken_exported_folder_is_one_line_naming_the_file(tmp_path, cascade, fault, needle, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the unknown id fails the same online
    folder = exported_folder(tmp_path / "exported", cascade)
    config = folder / "config.json"
    if fault == "stage missing":
        (folder / "unet1.safetensors").unlink()
    elif fault == "shape mismatch":
        about = json.loads(config.read_text())
        about["cascade"]["stages"][0]["unet_kwargs"]["dim"] = 16
        config.write_text(json.dumps(about))
    elif fault in ("bad json", "no cascade"):
        config.write_text("{" if fault == "bad json" else "{}")
    else:
        folder = "no-such-org/no-such-model"
    with pytest.raises(ValueError, match=re.escape(needle.format(folder=folder))) as e:
        imagen.load_cascade(str(folder))
    assert "\n" not in str(e.value)


def test_init_from_a_trained_run_starts_at_its_ema_weights_with_a_fresh_optimizer(trained, tmp_path):
    cfg, _, parts = parts_for("--init-from", str(trained), "--out", str(tmp_path))
    assert train_module.init_from(parts, cfg.init_from, imagen.checkpoint_path(tmp_path, 0), rank=0)
    ema = imagen.load_checkpoint(imagen.checkpoint_path(trained, 0))["ema"]
    for unet in (parts.stage.unet, parts.ema.module):
        assert all(torch.equal(t, ema[name]) for name, t in unet.state_dict().items())
    assert parts.opt.state_dict()["state"] == {} and parts.ema.n == 0


def test_init_from_trains_a_new_run_and_a_rerun_resumes_it_instead(trained, tmp_path, cache_dir):
    out = tmp_path / "new"
    train(out, cache_dir, "--steps", "1", "--init-from", str(trained), "--lr", "1e-3")
    state = imagen.load_checkpoint(imagen.checkpoint_path(out, 1))
    assert state["step"] == 1 and state["optimizer"]["state"][0]["step"] == 1 and state["settings"]["lr"][0] == 1e-3
    assert [r["event"] for r in read_log(out) if r.get("event", "").startswith("init")] == [
        f"initialised from {trained}"] * 2
    proc = train(out, cache_dir, "--steps", "2", "--init-from", str(trained), "--lr", "1e-3")
    assert "note: unet0 resumes from" in proc.stdout and imagen.load_checkpoint(out / "unet0.pt")["step"] == 2


def test_init_from_a_stage_of_other_shapes_or_none_is_one_line_naming_it(trained, tmp_path):
    cfg, _, parts = parts_for("--unets", "base-tiny,super-test", "--init-from", str(trained))
    with pytest.raises(ValueError, match=re.escape(f"--init-from {str(trained)!r} U-Net 0 does not fit its U-Net (")):
        train_module.init_from(parts, cfg.init_from, imagen.checkpoint_path(tmp_path, 0), rank=0)
    cfg, _, parts = parts_for("--unets", "base-test,super-test,super-test", "--sizes", "16,32,64", "--init-from",
                              str(trained), k=2)
    with pytest.raises(ValueError, match=re.escape("has no trained U-Net 2 (it has U-Nets [0, 1])")):
        train_module.init_from(parts, cfg.init_from, imagen.checkpoint_path(tmp_path, 2), rank=0)
