"""End-to-end tests through the real command lines: train.py, sample.py, eval.py (tiny presets, CPU)."""
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import imagen
import train as train_module
from conftest import captioned_pictures, write_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--unets", "base-test,super-test", "--sizes", "16,32", "--batch-size", "4", "--workers", "0",
        "--warmup", "2", "--sample-steps", "3"]


def run(script, *args, check=True, **kw):
    """Run one of the project's command lines; return the CompletedProcess."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def train(out, cache_dir, *extra, **kw):
    return run("train.py", *TINY, "--out", str(out), "--cache-dir", cache_dir, *extra, **kw)


def reject(constant):
    raise ValueError(f"{constant} is not valid JSON")


def read_log(out):
    """The complete records of out/log.jsonl, parsed as strict JSON (no NaN or Infinity literals)."""
    path = os.path.join(out, "log.jsonl")
    lines = open(path).read().splitlines(keepends=True) if os.path.exists(path) else []
    return [json.loads(line, parse_constant=reject) for line in lines if line.endswith("\n")]


def start_train(out, cache_dir, *extra, stderr=subprocess.DEVNULL, **kw):
    """A train.py process running in the background."""
    args = [sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--out", str(out), "--cache-dir", cache_dir, *extra]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, **kw)


def wait_for_logged_step(out, proc, at_least, unet=0):
    """The newest step of U-Net `unet` in log.jsonl once it reaches `at_least`, while proc keeps running."""
    deadline = time.time() + 300
    while time.time() < deadline:
        assert proc.poll() is None, "train.py ended before it logged the step"
        steps = [r["step"] for r in read_log(out) if r["unet"] == unet and "loss" in r]
        if steps and steps[-1] >= at_least:
            return steps[-1]
        time.sleep(0.02)
    raise AssertionError(f"no unet{unet} step >= {at_least} logged in 300 s")


def test_train_writes_checkpoints_log_and_samples(trained):
    for k in (0, 1):
        state = imagen.load_checkpoint(imagen.checkpoint_path(trained, k))
        assert state["step"] == 4 and state["unet"] == k
        assert set(train_module.CHECKPOINT_KEYS) <= set(state)
        older = imagen.older_checkpoints(imagen.checkpoint_path(trained, k))  # --keep 1; no second save of step 4
        assert [imagen.load_checkpoint(p)["step"] for p in older] == [2]
    assert imagen.load_checkpoint(imagen.checkpoint_path(trained, 0))["settings"]["steps"] == (4, 4)
    records = read_log(trained)
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
    for key in ("color", "shape", "position"):  # the 4 eval prompts all have a position word
        assert 0.0 <= result[key] <= 1.0
    assert result["n"] == 4 and result["seconds_per_image"] > 0


def weights(out):
    return [imagen.load_checkpoint(imagen.checkpoint_path(out, k)) for k in (0, 1)]


def test_resume_after_sigkill_mid_stage_is_exact(tmp_path, cache_dir):
    # bit-identical weights need one thread count throughout: --threads auto may switch counts, which changes the
    # order of float sums (the data, steps and random draws stay exact either way)
    train(tmp_path / "straight", cache_dir, "--steps", "20", "--threads", "1")
    killed = tmp_path / "killed"
    proc = start_train(killed, cache_dir, "--steps", "20", "--save-every", "5", "--log-every", "1", "--threads", "1")
    wait_for_logged_step(killed, proc, at_least=6)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = imagen.load_checkpoint(imagen.checkpoint_path(killed, 0))["step"]
    assert saved in (5, 10, 15) and not os.path.exists(imagen.checkpoint_path(killed, 1))  # killed mid-stage
    train(killed, cache_dir, "--steps", "20", "--threads", "1")
    for a, b in zip(weights(tmp_path / "straight"), weights(killed)):
        assert a["step"] == b["step"] == 20 and a["data_digest"] == b["data_digest"]
        for key in ("model", "ema"):
            for name in a[key]:
                assert torch.equal(a[key][name], b[key][name]), (key, name)
        moments = [[t for state in c["optimizer"]["state"].values() for t in state.values()] for c in (a, b)]
        assert all(torch.equal(x, y) for x, y in zip(*moments))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_saves_the_current_step_exits_128_plus_signum_and_the_rerun_resumes(tmp_path, cache_dir,
                                                                                              signum):
    out = tmp_path / "run"
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = start_train(out, cache_dir, "--only-unet", "0", "--steps", "1000", "--save-every", "1000",
                           "--log-every", "1", stderr=stderr)
        logged = wait_for_logged_step(out, proc, at_least=1)
        proc.send_signal(signum)
        assert proc.wait(timeout=300) == 128 + signum
    stderr = (tmp_path / "stderr.txt").read_text()
    name = signal.Signals(signum).name
    assert "Traceback" not in stderr and f"stopped by {name}" in stderr.strip().splitlines()[-1]
    saved = imagen.load_checkpoint(imagen.checkpoint_path(out, 0))["step"]
    assert logged <= saved < 1000
    assert read_log(out)[-1]["event"] == f"stopped by {name}"
    train(out, cache_dir, "--only-unet", "0", "--steps", str(saved + 2), "--log-every", "1")
    assert imagen.load_checkpoint(imagen.checkpoint_path(out, 0))["step"] == saved + 2
    resumed = [r["step"] for r in read_log(out) if "loss" in r]
    assert resumed[-2:] == [saved + 1, saved + 2] and resumed.count(saved + 1) == 1  # continued, not restarted


def test_a_stage_trained_beside_the_base_is_the_one_trained_alone_and_a_sigterm_stops_both(tmp_path, cache_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}  # two cores: the stage beside the base gets one thread of them
    flags = ["--threads", "1", "--save-every", "1000", "--log-every", "1"]
    train(tmp_path / "alone", cache_dir, "--steps", "1,100", "--only-unet", "1", *flags)
    beside = tmp_path / "beside"
    proc = start_train(beside, cache_dir, "--steps", "5000,100", "--parallel-stages", "1", *flags, env=env)
    wait_for_logged_step(beside, proc, at_least=1, unet=1)  # both stages are training now
    proc.send_signal(signal.SIGTERM)  # to the base's process only
    assert proc.wait(timeout=300) == 143
    assert [0 < state["step"] < budget for state, budget in zip(weights(beside), (5000, 100))] == [True, True]
    train(beside, cache_dir, "--steps", "1,100", "--parallel-stages", "1", *flags, env=env)  # the base's budget: met
    a, b = (imagen.load_checkpoint(imagen.checkpoint_path(out, 1)) for out in (tmp_path / "alone", beside))
    assert a["step"] == b["step"] == 100 and a["data_digest"] == b["data_digest"]
    assert all(torch.equal(a[key][name], b[key][name]) for key in ("model", "ema") for name in a[key])
    assert sum(r.get("event") == "done" and r["unet"] == 1 for r in read_log(beside)) == 1  # none more at the join


def test_non_finite_losses_stop_with_the_last_good_weights_saved_and_a_strict_json_log(tmp_path, cache_dir):
    out = tmp_path / "run"
    proc = train(out, cache_dir, "--only-unet", "0", "--steps", "100", "--lr", "1e30", "--log-every", "1",
                 check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "non-finite losses in a row" in proc.stderr.strip().splitlines()[-1]
    bad = [r for r in read_log(out) if r.get("event", "").startswith("non-finite")]
    state = imagen.load_checkpoint(imagen.checkpoint_path(out, 0))
    assert len(bad) == train_module.MAX_BAD_STEPS and state["step"] == bad[-1]["step"] >= 1
    assert all(isinstance(r["loss"], str) for r in bad)  # "nan" / "inf": strings, not bare NaN
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_kill_during_save_leaves_a_loadable_checkpoint(tmp_path):
    path = str(tmp_path / "unet0.pt")
    imagen.save_checkpoint({"step": 1, "w": torch.zeros(4)}, path)
    code = ("import torch, imagen\nw = torch.randn(8_000_000)\n"
            "while True: imagen.save_checkpoint({'step': 2, 'w': w}, %r)" % path)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)

    def saving():
        return [f for f in os.listdir(tmp_path) if f.startswith("unet0.pt.") and f.endswith(".tmp")]

    deadline = time.time() + 300
    while not saving() and time.time() < deadline:
        assert proc.poll() is None
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert saving()  # the kill landed during a save
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
    ("train.py", ["--unets", "base-test,super-test", "--sizes", "15,32"], "15 (U-Net 0, BaseTest) must be a positive "
     "multiple of 2"),
    ("train.py", ["--sizes", "0,64"], "0 (U-Net 0, BaseTiny) must be a positive multiple of 8"),
    ("train.py", ["--target", "v,noise"], "'noise'"),
    ("train.py", ["--timesteps", "1"], "--timesteps"),
    ("train.py", ["--grad-accum", "0"], "--grad-accum 0"),
    ("train.py", ["--steps", "-1"], "--steps"),
    ("train.py", ["--keep", "-1"], "--keep -1"),
    ("train.py", ["--log-every", "0"], "--log-every 0"),
    ("train.py", ["--threads", "0"], "--threads '0'"),
    ("train.py", ["--crop", "16"], "16 for U-Net 0 (BaseTiny)"),
    ("train.py", ["--crop", "0,30"], "30 for U-Net 1 (SuperSmall)"),
    ("train.py", ["--layout-phase", "1.5"], "'1.5' is not START:END"),
    ("train.py", ["--layout-phase", "0.8:0.2,0"], "'0.8:0.2' is not START:END"),
    ("train.py", ["--layout-level", "1"], "--layout-level 1.0"),
    ("train.py", ["--layout-min-steps", "0"], "unrecognized arguments: --layout-min-steps"),
    ("sample.py", ["--ckpt", "/does/not/exist", "--prompt", "x"], "/does/not/exist"),
    ("sample.py", ["--ckpt", "README.md", "--prompt", "x"], "(README.md is not one)"),
    ("sample.py", ["--prompt", "x"], "--ckpt"),
])
def test_bad_command_lines_fail_with_one_line_error(script, args, needle, tmp_path):
    proc = run(script, *args, "--out", str(tmp_path), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert needle in last, proc.stderr


def write_bytes(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)
    return path


@pytest.mark.parametrize("case", ["crafted checkpoint", "truncated checkpoint", "not a checkpoint", "unknown hub id",
                                  "empty folder", "another previous stage"])
def test_load_time_faults_fail_with_one_line_error(case, trained, tmp_path, cache_dir):
    out, extra = tmp_path / "out", []
    if case == "crafted checkpoint":
        write_bytes(out / "unet0.pt", pickle.dumps({"config": RunsCode()}))
        needle = "unet0.pt"
    elif case == "truncated checkpoint":
        write_bytes(out / "unet0.pt", open(trained / "unet0.pt", "rb").read()[:4096])
        needle = "unet0.pt: it is truncated"
    elif case == "not a checkpoint":
        torch.save({"step": 3}, write_bytes(out / "unet0.pt", b""))
        needle = "unet0.pt is not a nanoimagen checkpoint: it has no 'config' entry"
    elif case == "unknown hub id":
        extra, needle = ["--encoder", "no-such-org/no-such-model"], "no-such-org/no-such-model"
    elif case == "empty folder":
        (tmp_path / "empty").mkdir()
        extra, needle = ["--data", str(tmp_path / "empty")], "is empty"
    else:
        out, extra, needle = trained, ["--sizes", "8,32", "--only-unet", "1"], "stages[0].size: 16 -> 8"
    proc = train(out, cache_dir, "--steps", "8", *extra, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and needle in proc.stderr, proc.stderr


def test_unknown_sampler_is_refused(trained, cache_dir):
    proc = run("sample.py", "--ckpt", str(trained), "--prompt", "x", "--sampler", "euler", "--cache-dir", cache_dir,
               check=False)
    assert proc.returncode != 0 and "euler" in proc.stderr.strip().splitlines()[-1] and "dpmpp-2m" in proc.stderr


@pytest.mark.parametrize("script, flags, needle", [
    ("sample.py", ["--cond-scale", "nan"], "--cond-scale 'nan'"),
    ("sample.py", ["--cond-scale", "3,inf"], "--cond-scale '3,inf'"),
    ("sample.py", ["--steps", "0"], "--steps '0'"),
    ("sample.py", ["--steps", "2.5"], "--steps '2.5'"),
    ("sample.py", ["--lowres-noise", "1"], "--lowres-noise 1.0"),
    ("sample.py", ["--threshold", "soft"], "--threshold 'soft'"),
    ("sample.py", ["--threshold-p", "0"], "--threshold-p 0.0"),
    ("sample.py", ["--batch-size", "0"], "--batch-size 0"),
    ("sample.py", ["--n-per-prompt", "0"], "--n-per-prompt 0"),
    ("sample.py", ["--prompts", "/no/such/prompts.txt"], "--prompts '/no/such/prompts.txt': cannot read it"),
    ("eval.py", ["--cond-scale", "nan"], "--cond-scale 'nan'"),
    ("eval.py", ["--n", "0"], "--n 0"),
])
def test_bad_sampling_values_fail_before_loading_with_one_line_error(script, flags, needle):
    prompt = ["--prompt", "x"] if script == "sample.py" else []
    proc = run(script, "--ckpt", "/does/not/exist", *prompt, *flags, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert needle in proc.stderr.strip().splitlines()[-1], proc.stderr


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


RANKS_SCRIPT = """
import os, sys
import torch
import imagen, train

out, rank, calls = sys.argv[1], int(os.environ["RANK"]), []
forward, step, applied = imagen.Stage.forward, train.optimizer_step, []


def forward_with_a_nan_loss_on_rank_1(self, *inputs, **options):
    loss = forward(self, *inputs, **options)
    if inputs[0].is_meta:  # the memory check's pass on the meta device is no training step
        return loss
    calls.append(1)
    if rank == 1 and len(calls) == 2:  # rank 1 alone sees a NaN loss at the second step; its gradients stay finite
        loss = loss + float("nan") * loss.detach()
    return loss


def step_saving_every_rank(parts, *args):
    loss, outcome = step(parts, *args)
    applied.extend([1] * (outcome == "applied"))
    torch.save(parts.stage.unet.state_dict(), f"{out}/rank{rank}-step{len(applied)}.pt")
    return loss, outcome


imagen.Stage.forward, train.optimizer_step = forward_with_a_nan_loss_on_rank_1, step_saving_every_rank
train.main(sys.argv[2:])
"""


def test_torchrun_ranks_skip_a_non_finite_step_together_and_end_with_identical_weights(tmp_path, cache_dir):
    out = tmp_path / "ddp"
    out.mkdir()
    (tmp_path / "ranks.py").write_text(RANKS_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "ranks.py"), str(out), *TINY, "--out", str(out), "--cache-dir", cache_dir,
                           "--steps", "3", "--save-every", "1", "--log-every", "1", "--only-unet", "0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    state = imagen.load_checkpoint(imagen.checkpoint_path(out, 0))
    assert state["step"] == 3 and state["position"] == 4 * 2 * 4  # 4 micro-steps (one skipped) x ranks x batch
    assert [r["step"] for r in read_log(out) if r.get("event", "").startswith("non-finite")] == [1]  # logged once
    for step in (1, 2, 3):
        rank0, rank1 = (torch.load(out / f"rank{r}-step{step}.pt", weights_only=True) for r in (0, 1))
        for name in rank0:
            assert torch.equal(rank0[name], rank1[name]), (step, name)


def test_shards_resume_after_sigkill_with_the_same_samples_and_weights(tmp_path, cache_dir):
    shards = tmp_path / "shards"
    write_shards(shards, [5, 2, 6])  # 13 samples: 8 steps of 4 cross two epochs
    flags = ["--data", str(shards), "--steps", "8", "--only-unet", "0", "--log-every", "1", "--save-every", "2",
             "--threads", "1"]  # one thread count: bit-identical weights (test_resume_after_sigkill_mid_stage_is_exact)
    train(tmp_path / "straight", cache_dir, *flags)
    killed = tmp_path / "killed"
    proc = start_train(killed, cache_dir, *flags)
    wait_for_logged_step(killed, proc, 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = imagen.load_checkpoint(imagen.checkpoint_path(killed, 0))["step"]
    assert 4 <= saved < 8  # killed mid-stage, after a save
    train(killed, cache_dir, *flags)
    digests = [{r["step"]: r["data_digest"] for r in read_log(out) if "loss" in r} for out in (tmp_path / "straight",
                                                                                                 killed)]
    assert digests[0] == digests[1] and len(digests[0]) == 8  # the same captions in the same order at every step
    a, b = (imagen.load_checkpoint(imagen.checkpoint_path(out, 0)) for out in (tmp_path / "straight", killed))
    assert a["step"] == b["step"] == 8 and a["position"] == b["position"] == 32
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


def test_cache_files_do_not_grow_with_training_steps(tmp_path):
    shards, cache = tmp_path / "shards", tmp_path / "cache"
    write_shards(shards, [7, 6])
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


def test_held_out_samples_never_reach_the_training_loader(tmp_path):
    folder = captioned_pictures(tmp_path / "pictures", 40)
    train_set, heldout_set = data.holdout_split(data.make_dataset(folder, 16), 0.1, 16)
    held = {caption for _, caption in (heldout_set[i] for i in range(len(heldout_set)))}
    loader = iter(torch.utils.data.DataLoader(train_set, sampler=data.EpochSampler(len(train_set), 0), batch_size=4,
                                              collate_fn=data.collate))
    trained = {c for _ in range(3 * len(train_set) // 4) for c in next(loader)[1]}  # three epochs
    assert len(held) == 4 and len(trained) == 36 and held.isdisjoint(trained)
    again = data.holdout_split(data.make_dataset(folder, 32), 0.1, 32)[1]
    assert again.indices == heldout_set.indices  # the same choice every time: eval.py finds the same samples


def test_a_real_data_preset_trains_logs_held_out_loss_and_grids_held_out_captions(tmp_path, cache_dir):
    folder, out = captioned_pictures(tmp_path / "pictures", 30), tmp_path / "out"
    train(out, cache_dir, "--unets", "real-base-small,real-super-small", "--sizes", "16,32", "--data", str(folder),
          "--steps", "3", "--eval-every", "2", "--holdout", "5")
    records = read_log(out)
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
    grid = next(r for r in read_log(out) if r.get("event") == "grid")
    assert len(grid["prompts"]) == 4 and all(p.startswith("picture ") for p in grid["prompts"])


def sampled(ckpt, out, cache_dir):
    """The pixels sample.py draws for one fixed prompt from `ckpt`."""
    proc = run("sample.py", "--ckpt", str(ckpt), "--prompt", "a red circle", "--steps", "2", "--out", str(out),
               "--cache-dir", cache_dir)
    return torch.from_numpy(np.array(Image.open(proc.stdout.split()[0])))


def test_sampling_leaves_the_optimizer_state_on_disk(trained, tmp_path):
    state = imagen.load_checkpoint(imagen.checkpoint_path(trained, 0))
    state["optimizer"]["state"][0]["exp_avg"] = torch.ones(50_000_000)  # 200 MB that sampling never needs
    imagen.save_checkpoint(state, imagen.checkpoint_path(tmp_path, 0))
    code = ("import resource, imagen\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "imagen.load_cascade(%r)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)" % str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert int(proc.stdout) < 100_000  # KiB of peak memory growth: not the 200 MB
