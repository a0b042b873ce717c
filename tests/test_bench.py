"""bench.py end to end on tiny presets: the JSON has every section's rows with positive numbers (no timing checks)."""
import json

import pytest
import torch

import bench
import imagen
import registry
from test_cli import run


def test_bench_writes_every_section(tmp_path):
    cache, ckpt, out = str(tmp_path / "cache"), str(tmp_path / "run"), tmp_path / "bench.json"
    run("train.py", "--unets", "base-test,super-test", "--sizes", "16,32", "--steps", "2", "--batch-size", "4",
        "--workers", "0", "--sample-steps", "2", "--timesteps", "20", "--out", ckpt, "--cache-dir", cache)
    proc = run("bench.py", "--sections", "train,loop,profile,sample", "--presets", "base-test", "--sizes", "32",
               "--steps", "1", "--batch-size", "2", "--ckpt", ckpt, "--n-eval", "4", "--ref-eval-n", "6", "--loop-steps", "3",
               "--sample-batch-size", "2", "--cache-dir", cache, "--json", str(out))
    results = json.loads(out.read_text())
    assert set(results) == {"machine", "train", "loop", "profile", "sample"}
    assert "## sample" in proc.stdout and results["machine"]["threads"] >= 1
    steps = [r for r in results["train"] if "text" in r]  # then one row per precision: torch.mm's measured peak
    assert {(r["precision"], r["channels_last"], r["text"]) for r in steps} == {
        ("fp32", False, "cached"), ("fp32", True, "cached"), ("bf16", False, "cached"), ("bf16", True, "cached"),
        ("fp32", True, "encoded")}
    assert all(r["images_per_s"] > 0 and r["peak_mib"] >= 0 and r["mfu_measured_peak"] >= 0 for r in steps)
    assert {r["precision"] for r in results["train"] if "text" not in r} == {"fp32", "bf16"}
    loop = {r["part"]: r for r in results["loop"]}  # the loop's wall clock, split into parts that add up to it
    assert loop["loop"]["images_per_s"] > 0 and loop["isolated step"]["images_per_s"] > 0
    assert set(loop) == {"isolated step", "loop", "optimizer_step", *bench.LOOP_PARTS, "other"}
    assert sum(r.get("share", 0) for r in loop.values()) == pytest.approx(1, abs=0.01)
    assert loop["optimizer_step"]["share"] > 0.1 and loop["evaluation"]["seconds"] > 0
    ops = results["profile"]
    assert len(ops) == bench.PROFILE_TOP and {r["stage"] for r in ops} == {"unet0 BaseTest"}
    assert all(r["ms_per_step"] > 0 and r["calls_per_step"] >= 0 for r in ops)
    assert 0 < sum(r["share"] for r in ops) <= 1.001 and any("conv" in r["op"] for r in ops)
    rows = [(r["role"], r["sampler"], r["steps"], r["n"]) for r in results["sample"]]
    default = imagen.SAMPLING_DEFAULTS["sampler"]
    assert rows == [("sampler", name, "2,2", 4) for name in registry.SAMPLERS.names()
                    if name not in registry.FAMILIES["ddpm"]["refuses"]] + [
        ("default", default, "2,2", 6), ("reference", "ddpm", "20,20", 6)]
    assert all(r["s_per_image"] > 0 and 0 <= r["color"] <= 1 for r in results["sample"])


def test_bench_threads_section_times_each_count_and_auto_idle_and_beside_a_busy_core(tmp_path):
    out = tmp_path / "bench.json"
    run("bench.py", "--sections", "threads", "--presets", "base-test", "--sizes", "32", "--batch-size", "2",
        "--thread-steps", "7", "--cache-dir", str(tmp_path / "cache"), "--json", str(out))
    rows = json.loads(out.read_text())["threads"]
    counts = [str(n) for n in sorted({torch.get_num_threads() >> i for i in range(8)} - {0}, reverse=True)]
    assert [(r["load"], r["threads"]) for r in rows] == [
        (load, n) for load in ("idle", "one core busy") for n in counts + ["auto"]]
    assert all(r["stage"] == "unet0 BaseTest" and r["s_per_step"] > 0 for r in rows)
