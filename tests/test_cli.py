"""End-to-end tests through the real command lines: train.py, sample.py, eval.py (tiny presets, CPU)."""
import io
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch
from PIL import Image

import data
import imagen
import train as train_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--unets", "base-test,super-test", "--sizes", "16,32", "--batch-size", "4", "--workers", "0",
        "--warmup", "2", "--sample-steps", "3"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("text-cache"))


def run(script, *args, check=True, **kw):
    """Run one of the project's command lines; return the CompletedProcess."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def train(out, cache_dir, *extra, **kw):
    return run("train.py", *TINY, "--out", str(out), "--cache-dir", cache_dir, *extra, **kw)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("run")
    train(out, cache_dir, "--steps", "4", "--save-every", "2")
    return out


def test_train_writes_checkpoints_log_and_samples(trained):
    for k in (0, 1):
        state = imagen.load_checkpoint(imagen.checkpoint_path(trained, k))
        assert state["step"] == 4 and state["unet"] == k
        assert {"config", "model", "ema", "optimizer", "scaler", "position"} <= set(state)
    records = [json.loads(line) for line in open(trained / "log.jsonl")]
    assert {r["unet"] for r in records} == {0, 1}
    assert Image.open(trained / "samples.png").size[0] > 32


def test_sample_writes_pngs_of_each_stage_size(trained, tmp_path, cache_dir):
    proc = run("sample.py", "--ckpt", str(trained), "--prompt", "a red circle", "--prompt", "a blue square",
               "--n-per-prompt", "2", "--steps", "3", "--out", str(tmp_path / "full"), "--cache-dir", cache_dir)
    paths = proc.stdout.split()
    assert len(paths) == 5 and paths[-1].endswith("grid.png")
    assert {Image.open(p).size for p in paths[:-1]} == {(32, 32)}
    proc = run("sample.py", "--ckpt", str(trained / "unet0.pt"), "--prompt", "a red circle", "--stop-at-unet", "0",
               "--sampler", "ddim", "--steps", "2", "--out", str(tmp_path / "base"), "--cache-dir", cache_dir)
    assert Image.open(proc.stdout.split()[0]).size == (16, 16)


def test_eval_prints_the_three_scores(trained, cache_dir):
    proc = run("eval.py", "--ckpt", str(trained), "--n", "4", "--steps", "2", "--cache-dir", cache_dir)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("color", "shape"):
        assert 0.0 <= result[key] <= 1.0
    assert result["n"] == 4 and result["seconds_per_image"] > 0


def weights(out):
    return [imagen.load_checkpoint(imagen.checkpoint_path(out, k)) for k in (0, 1)]


def test_resume_after_sigkill_is_exact(tmp_path, cache_dir):
    train(tmp_path / "straight", cache_dir, "--steps", "6")
    killed = tmp_path / "killed"
    args = [sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--out", str(killed), "--cache-dir", cache_dir,
            "--steps", "6", "--save-every", "3"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.exists(imagen.checkpoint_path(killed, 0)) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert imagen.load_checkpoint(imagen.checkpoint_path(killed, 0))["step"] in (3, 6)
    train(killed, cache_dir, "--steps", "6")
    for a, b in zip(weights(tmp_path / "straight"), weights(killed)):
        assert a["step"] == b["step"] == 6
        for key in ("model", "ema"):
            for name in a[key]:
                assert torch.equal(a[key][name], b[key][name]), (key, name)


def test_kill_during_save_leaves_a_loadable_checkpoint(tmp_path):
    path = str(tmp_path / "unet0.pt")
    imagen.save_checkpoint({"step": 1, "w": torch.zeros(4)}, path)
    code = ("import torch, imagen\n"
            "while True: imagen.save_checkpoint({'step': 2, 'w': torch.randn(8_000_000)}, %r)" % path)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    time.sleep(3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert imagen.load_checkpoint(path)["step"] in (1, 2)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_checkpoint_that_runs_code_is_refused(tmp_path, cache_dir):
    (tmp_path / "ckpt").mkdir()
    with open(tmp_path / "ckpt" / "unet0.pt", "wb") as f:
        pickle.dump({"config": RunsCode()}, f)
    proc = run("sample.py", "--ckpt", str(tmp_path / "ckpt"), "--prompt", "x", "--cache-dir", cache_dir,
               check=False)
    assert proc.returncode != 0 and "refusing" in proc.stderr
    assert not os.path.exists(os.path.join(ROOT, "PWNED"))


@pytest.mark.parametrize("script, args, needle", [
    ("train.py", ["--unets", "nope,super-test"], "nope"),
    ("train.py", ["--unets", "base-test", "--sizes", "16,32"], "--sizes"),
    ("train.py", ["--encoder", "no-such-encoder"], "no-such-encoder"),
    ("train.py", ["--precision", "fp8"], "fp8"),
    ("train.py", ["--channels-last", "2"], "--channels-last"),
    ("train.py", ["--compile", "fastest"], "fastest"),
    ("train.py", ["--compile", "reduce-overhead", "--grad-accum", "2"], "--grad-accum"),
    ("sample.py", ["--ckpt", "/does/not/exist", "--prompt", "x"], "/does/not/exist"),
    ("sample.py", ["--prompt", "x"], "--ckpt"),
])
def test_bad_command_lines_fail_with_one_line_error(script, args, needle, tmp_path):
    proc = run(script, *args, "--out", str(tmp_path), check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert needle in last, proc.stderr


def test_unknown_sampler_is_refused(trained, cache_dir):
    proc = run("sample.py", "--ckpt", str(trained), "--prompt", "x", "--sampler", "euler", "--cache-dir", cache_dir,
               check=False)
    assert proc.returncode != 0 and "euler" in proc.stderr.strip().splitlines()[-1] and "dpmpp-2m" in proc.stderr


def test_corrupt_image_in_folder_is_skipped_and_counted(tmp_path, cache_dir):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (40, 40), (40 * i, 80, 120)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a picture number {i}")
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "bad.txt").write_text("a broken picture")
    out = tmp_path / "out"
    train(out, cache_dir, "--data", str(folder), "--steps", "3", "--only-unet", "0", "--log-every", "1")
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert max(r.get("skipped", 0) for r in records) >= 1


def test_torchrun_two_processes_train_and_save(tmp_path, cache_dir):
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "train.py"), *TINY, "--out", str(out), "--cache-dir", cache_dir,
                           "--steps", "2", "--only-unet", "0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    state = imagen.load_checkpoint(imagen.checkpoint_path(out, 0))
    assert state["step"] == 2 and state["position"] == 2 * 2 * 4  # steps x ranks x batch


def write_picture_shards(root, sizes):
    """Tar shards of coloured PNGs captioned 'picture <k>', of the given (unequal) sample counts."""
    root.mkdir()
    k = 0
    for shard, n in enumerate(sizes):
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for k in range(k, k + n):
                png = io.BytesIO()
                Image.new("RGB", (40, 40), (20 * k % 256, 80, 120)).save(png, "PNG")
                for name, payload in ((f"{k:05d}.png", png.getvalue()), (f"{k:05d}.txt", f"picture {k}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
            k += 1
    return root


def log_records(out):
    return [json.loads(line) for line in open(out / "log.jsonl")]


def test_shards_resume_after_sigkill_with_the_same_samples_and_weights(tmp_path, cache_dir):
    shards = write_picture_shards(tmp_path / "shards", [5, 2, 6])  # 13 samples: 8 steps of 4 cross two epochs
    flags = ["--data", str(shards), "--steps", "8", "--only-unet", "0", "--log-every", "1", "--save-every", "2"]
    train(tmp_path / "straight", cache_dir, *flags)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--out", str(killed),
                             "--cache-dir", cache_dir, *flags], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any(r.get("step", 0) >= 5 for r in
                                             (log_records(killed) if (killed / "log.jsonl").exists() else [])):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = imagen.load_checkpoint(imagen.checkpoint_path(killed, 0))["step"]
    assert 4 <= saved < 8  # killed mid-stage, after a save
    train(killed, cache_dir, *flags)
    digests = [{r["step"]: r["data_digest"] for r in log_records(out) if "loss" in r} for out in (tmp_path / "straight",
                                                                                                 killed)]
    assert digests[0] == digests[1] and len(digests[0]) == 8  # the same captions in the same order at every step
    a, b = (imagen.load_checkpoint(imagen.checkpoint_path(out, 0)) for out in (tmp_path / "straight", killed))
    assert a["step"] == b["step"] == 8 and a["position"] == b["position"] == 32
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


def test_cache_files_do_not_grow_with_training_steps(tmp_path):
    shards, cache = write_picture_shards(tmp_path / "shards", [7, 6]), tmp_path / "cache"
    flags = ["--data", str(shards), "--only-unet", "0", "--cache-dir", str(cache)]
    counts = []
    for steps in (2, 10):
        run("train.py", *TINY, "--out", str(tmp_path / "out"), *flags, "--steps", str(steps))
        counts.append(sorted(p.name for p in cache.rglob("*")))
    assert counts[0] == counts[1] and len(counts[0]) <= 3  # one folder, one shard: .npy + .json


def test_data_without_a_usable_sample_stops_with_one_line(tmp_path, cache_dir):
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
        (folder / f"{i}.txt").write_text(f"a broken picture {i}")
    proc = train(tmp_path / "out", cache_dir, "--data", str(folder), "--steps", "3", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert re.search(r"error: .*(held-out samples .* is usable|samples in a row .* were unusable)", proc.stderr)


def test_a_long_run_of_unusable_samples_stops_training():
    trainer, _ = trainer_for()
    empty = (torch.zeros(0, 3, 0, 0, dtype=torch.uint8), [], 4)  # a batch whose 4 samples were all skipped
    with pytest.raises(SystemExit, match=f"{train_module.MAX_UNUSABLE} samples in a row"):
        next(train_module.batches(iter([empty] * (train_module.MAX_UNUSABLE // 4 + 1)), None, 16, "cpu", trainer))


def trainer_for(*flags):
    """train.py's Trainer for stage 0 of the tiny cascade built from these flags (no training)."""
    args = train_module.parse_args([*TINY, *flags])
    config, _ = train_module.prepare(args)
    return train_module.Trainer(args, imagen.Imagen(config), 0, torch.device("cpu"), rank=0, world=1), args


def test_learning_rate_warms_up_then_decays_to_the_final_fraction():
    t, args = trainer_for("--steps", "100", "--warmup", "10", "--lr", "1e-3", "--lr-final", "0.1")
    lrs = []
    for step in range(100):
        t.step = step
        lrs.append(t.lr())
    assert lrs[0] == pytest.approx(1e-4) and max(lrs) <= 1e-3
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))  # warmup rises
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine decay falls
    t.step = 100
    assert t.lr() == pytest.approx(1e-4) and t.finished()
    t, _ = trainer_for("--minutes", "2", "--lr-final", "0.5")  # a time budget: progress is the elapsed fraction
    t.step, t.elapsed = 10_000, 60.0
    assert t.progress() == pytest.approx(0.5) and t.lr() == pytest.approx(1e-3 * 0.75) and not t.finished()


def test_precision_and_memory_format_are_set_per_stage():
    t, _ = trainer_for("--steps", "1", "--precision", "bf16,fp32", "--channels-last", "0,1")
    assert t.precision == "bf16" and t.autocast["enabled"] and t.autocast["dtype"] == torch.bfloat16
    assert not t.stage.unet.final_conv.weight.is_contiguous(memory_format=torch.channels_last)
    args = train_module.parse_args([*TINY, "--steps", "1"])
    train_module.prepare(args)
    assert args.precisions == ["fp32", "fp32"] and args.channels_lasts == [True, True]


def captioned_pictures(folder, n):
    """n coloured PNGs captioned 'picture <i>' in a folder."""
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (40, 40), (20 * i % 256, 80, 120)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"picture {i}")
    return folder


def test_held_out_samples_never_reach_the_training_loader(tmp_path):
    folder = captioned_pictures(tmp_path / "pictures", 40)
    train_set, heldout_set = data.holdout_split(data.make_dataset(folder, 16), 0.1, 16)
    held = {caption for _, caption in (heldout_set[i] for i in range(len(heldout_set)))}
    args = train_module.parse_args([*TINY, "--data", str(folder)])
    loader = iter(train_module.make_loader(args, train_set, 0, 0, 1))
    trained = {c for _ in range(3 * len(train_set) // 4) for c in next(loader)[1]}  # three epochs
    assert len(held) == 4 and len(trained) == 36 and held.isdisjoint(trained)
    again = data.holdout_split(data.make_dataset(folder, 32), 0.1, 32)[1]
    assert again.indices == heldout_set.indices  # the same choice every time: eval.py finds the same samples


def test_a_real_data_preset_trains_logs_held_out_loss_and_grids_held_out_captions(tmp_path, cache_dir):
    folder, out = captioned_pictures(tmp_path / "pictures", 30), tmp_path / "out"
    train(out, cache_dir, "--unets", "real-base-small,real-super-small", "--sizes", "16,32", "--data", str(folder),
          "--steps", "3", "--eval-every", "2", "--holdout", "5")
    records = log_records(out)
    losses = [r for r in records if "heldout_loss" in r]
    assert {(r["unet"], r["step"]) for r in losses} >= {(0, 2), (0, 3), (1, 2), (1, 3)}
    assert all(math.isfinite(r["heldout_loss"]) for r in losses)
    held = {f"picture {i}" for i in data.holdout_split(data.make_dataset(folder, 32), 5, 32)[1].indices}
    grid = next(r for r in records if r.get("event") == "grid")
    assert set(grid["prompts"]) == held and os.path.exists(out / "samples.png")
    assert imagen.load_checkpoint(imagen.checkpoint_path(out, 1))["config"]["holdout"] == 5
    proc = run("eval.py", "--ckpt", str(out), "--data", str(folder), "--cache-dir", cache_dir, "--steps", "2")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["captions"]) == held and len(result["heldout_loss"]) == 2
    final = {r["unet"]: r["heldout_loss"] for r in records if r.get("event") == "done"}
    assert result["heldout_loss"] == pytest.approx([final[0], final[1]], rel=1e-3)  # the same samples and noise
    assert Image.open(result["grid"]).size == (8 * 34 - 2, 2 * 34 - 2)  # 5 samples beside 5 real images, 32 px
    assert Image.open(result["plot"]).size[1] == 2 * 220  # one panel per stage


def test_an_only_unet_grid_starts_from_real_low_res_images(tmp_path, cache_dir, monkeypatch):
    folder, out = captioned_pictures(tmp_path / "pictures", 12), tmp_path / "out"
    train(out, cache_dir, "--data", str(folder), "--steps", "1", "--only-unet", "1", "--holdout", "4")
    grid = next(r for r in log_records(out) if r.get("event") == "grid")
    assert len(grid["prompts"]) == 4 and all(p.startswith("picture ") for p in grid["prompts"])
    assert train_module.grid_start(train_module.parse_args(["--only-unet", "1"]), 1) == 1
    assert train_module.grid_start(train_module.parse_args([]), 1) == 0
