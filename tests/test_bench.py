"""bench.py end to end on tiny presets: the JSON has every section's rows with positive numbers (no timing checks)."""
import json

import pytest

import bench
import registry
import settings
from test_cli import run


def test_bench_writes_every_section(tmp_path):
    cache, ckpt, out = str(tmp_path / "cache"), str(tmp_path / "run"), tmp_path / "bench.json"
    run("train.py", "--unets", "base-test,super-test", "--sizes", "16,32", "--steps", "2", "--batch-size", "4",
        "--workers", "0", "--sample-steps", "2", "--sampler", "ddpm,ddim", "--timesteps", "20", "--out", ckpt,
        "--cache-dir", cache)
    proc = run("bench.py", "--sections", "train,loop,sample", "--presets", "base-test", "--sizes", "32",
               "--steps", "1", "--batch-size", "2", "--ckpt", ckpt, "--n-eval", "4", "--ref-eval-n", "6",
               "--loop-steps", "3", "--sample-batch-size", "2", "--cache-dir", cache, "--json", str(out))
    results = json.loads(out.read_text())
    assert set(results) == {"machine", "train", "loop", "sample"}
    assert "## sample" in proc.stdout and results["machine"]["threads"] >= 1
    steps = [r for r in results["train"] if "text" in r]  # then one row per precision: torch.mm's measured peak
    default = settings.resolve(dict(unets="base-test")).precision[0]  # auto: bf16 where this CPU computes it natively
    precisions = {"fp32", default}  # bf16 only where this CPU computes it natively: emulated, it takes minutes
    assert {(r["precision"], r["channels_last"], r["text"]) for r in steps} == {
        (p, cl, "cached") for p in precisions for cl in (False, True)} | {(default, True, "encoded")}
    assert all(r["images_per_s"] > 0 and r["peak_mib"] >= 0 and r["mfu_measured_peak"] >= 0 for r in steps)
    assert {r["precision"] for r in results["train"] if "text" not in r} == precisions
    loop = {r["part"]: r for r in results["loop"]}  # the loop's wall clock, split into parts that add up to it
    assert loop["loop"]["images_per_s"] > 0 and len(loop["isolated step"]["images_per_s"]) == 2  # before, after
    assert min(loop["isolated step"]["images_per_s"]) > 0
    assert set(loop) == {"isolated step", "loop", "optimizer_step", *bench.LOOP_PARTS, "other"}
    assert sum(r.get("share", 0) for r in loop.values()) == pytest.approx(1, abs=0.01)
    assert loop["optimizer_step"]["share"] > 0.1 and loop["evaluation"]["seconds"] > 0
    rows = [(r["role"], r["sampler"], r["steps"], r["n"]) for r in results["sample"]]
    assert rows == [("sampler", name, "2,2", 4) for name in registry.SAMPLERS.names()
                    if name not in registry.FAMILIES["ddpm"]["refuses"]] + [
        ("default", "ddpm,ddim", "2,2", 6), ("reference", "ddpm", "20,20", 6)]  # the checkpoint's samplers
    assert all(r["s_per_image"] > 0 and 0 <= r["color"] <= 1 for r in results["sample"])

