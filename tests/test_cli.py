"""End-to-end tests through the real command lines: train.py, sample.py, eval.py (tiny presets, CPU)."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

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
    assert proc.returncode != 0 and "unet0.pt" in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr and not os.path.exists(os.path.join(ROOT, "PWNED"))


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
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                           os.path.join(ROOT, "train.py"), *TINY, "--out", str(out), "--cache-dir", cache_dir,
                           "--steps", "2", "--only-unet", "0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    state = imagen.load_checkpoint(imagen.checkpoint_path(out, 0))
    assert state["step"] == 2 and state["position"] == 2 * 2 * 4  # steps x ranks x batch


def test_ranks_read_disjoint_samples_that_cover_the_data():
    import train
    streams = [iter(train.IndexStream(10, seed=3, start=0, rank=r, world_size=2, shuffle=True)) for r in (0, 1)]
    seen = [[next(s) for _ in range(5)] for s in streams]
    assert set(seen[0]).isdisjoint(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(10))
    resumed = iter(train.IndexStream(10, seed=3, start=4, rank=0, world_size=2, shuffle=True))
    assert [next(resumed) for _ in range(3)] == seen[0][2:5]


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
