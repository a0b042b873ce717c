"""bench.py end to end on tiny presets: the JSON has every section's rows with positive numbers (no timing checks)."""
import json

import pytest
import torch

import bench
import imagen
import registry
from test_cli import run
from unet import Unet


@pytest.mark.parametrize("cond_scale", [1.0, 3.0])
def test_two_pass_guidance_matches_the_batched_pass(cond_scale):
    torch.manual_seed(0)
    unet = Unet(**registry.unet_kwargs("base-test"), text_embed_dim=8, lowres_cond=True).eval()
    x, lowres = torch.randn(3, 3, 16, 16), dict(lowres_img=torch.randn(3, 3, 16, 16), lowres_noise_time=torch.rand(3))
    emb, time = torch.randn(3, 5, 8), torch.rand(3)
    mask = torch.tensor([[True] * 5, [True] * 2 + [False] * 3, [False] * 5])  # [3, 5]: full, short, empty caption
    for p in unet.final_conv.parameters():  # the zero-initialised output layer would make every output 0
        torch.nn.init.normal_(p)
    with torch.no_grad():
        batched = unet.forward_with_cond_scale(x, time, emb, mask, cond_scale=cond_scale, **lowres)
        two_pass = bench.TwoPassGuidance(unet).forward_with_cond_scale(x, time, emb, mask, cond_scale=cond_scale,
                                                                       **lowres)
    assert batched.abs().max() > 0
    torch.testing.assert_close(two_pass, batched, atol=1e-4, rtol=1e-4)


def test_bench_writes_every_section(tmp_path):
    cache, ckpt, out = str(tmp_path / "cache"), str(tmp_path / "run"), tmp_path / "bench.json"
    run("train.py", "--unets", "base-test,super-test", "--sizes", "16,32", "--steps", "2", "--batch-size", "4",
        "--workers", "0", "--sample-steps", "2", "--timesteps", "20", "--out", ckpt, "--cache-dir", cache)
    proc = run("bench.py", "--sections", "train,profile,sample", "--presets", "base-test", "--sizes", "32",
               "--steps", "1", "--batch-size", "2", "--ckpt", ckpt, "--n-eval", "4", "--ref-eval-n", "6",
               "--sample-batch-size", "2", "--single-n", "2", "--cache-dir", cache, "--json", str(out))
    results = json.loads(out.read_text())
    assert set(results) == {"machine", "train", "profile", "sample", "targets"}
    assert "## targets" in proc.stdout and results["machine"]["threads"] >= 1
    steps = [r for r in results["train"] if "text" in r]  # then one row per precision: torch.mm's measured peak
    assert {(r["precision"], r["channels_last"], r["text"]) for r in steps} == {
        ("fp32", False, "cached"), ("fp32", True, "cached"), ("bf16", False, "cached"), ("bf16", True, "cached"),
        ("fp32", True, "encoded")}
    assert all(r["images_per_s"] > 0 and r["peak_mib"] >= 0 and r["mfu_measured_peak"] >= 0 for r in steps)
    assert {r["precision"] for r in results["train"] if "text" not in r} == {"fp32", "bf16"}
    ops = results["profile"]
    assert len(ops) == bench.PROFILE_TOP and {r["stage"] for r in ops} == {"unet0 BaseTest"}
    assert all(r["ms_per_step"] > 0 and r["calls_per_step"] >= 0 for r in ops)
    assert 0 < sum(r["share"] for r in ops) <= 1.001 and any("conv" in r["op"] for r in ops)
    rows = [(r["role"], r["stages"], r["sampler"], r["steps"], r["guidance"], r["n"], r["batch"])
            for r in results["sample"]]
    default = imagen.SAMPLING_DEFAULTS["sampler"]
    assert rows == [("sampler", 2, name, "2,2", "batched", 4, 2) for name in registry.SAMPLERS.names()
                    if name not in registry.FAMILIES["ddpm"]["refuses"]] + [
        ("default", 2, default, "2,2", "batched", 6, 2), ("two-pass", 2, default, "2,2", "two-pass", 6, 2),
        ("reference", 2, "ddpm", "20,20", "two-pass", 6, 2)] + [
        (f"base {guidance}", 1, default, "2,2", guidance, 6 if batch == 2 else 2, batch)
        for batch in (2, 1) for guidance in ("batched", "two-pass")]
    assert all(r["s_per_image"] > 0 and 0 <= r["color"] <= 1 for r in results["sample"])
    two_pass = next(r for r in results["sample"] if r["role"] == "two-pass")
    assert two_pass["max_abs_diff_vs_batched"] < 1e-2  # two passes compute what one batched pass does
    assert len(results["targets"]) == 5 and all(r["measured"] is not None for r in results["targets"])
    worst = next(r for r in results["targets"] if "worst eval score change" in r["target"])
    assert worst["standard_error"] is None or worst["standard_error"] >= 0


def test_paired_standard_error_of_verdict_differences(monkeypatch):
    monkeypatch.setattr(bench.data, "judge", lambda img, prompt: dict(color=bool(img > 0), shape=True, position=None))
    a, b = torch.tensor([1.0, 1.0, -1.0, -1.0]), torch.tensor([-1.0, 1.0, -1.0, -1.0])  # colour differs on prompt 0
    se = bench.paired_standard_error(a, b, ["p"] * 4)
    assert se == dict(color=0.25, shape=0.0, position=None)  # diffs [1, 0, 0, 0]: std 0.5 / sqrt(4)


def test_minilm_rows_are_judged_against_cached_rows_of_the_same_settings():
    def row(compiled, source, images_per_s):
        return dict(stage="unet0 BaseTest", precision="fp32", channels_last=True, compile=compiled, text=source,
                    images_per_s=images_per_s)
    train = [row(False, "cached", 100.0), row("reduce-overhead", "cached", 300.0),
             row(False, "encoded", 80.0), row("reduce-overhead", "encoded", 150.0)]
    targets = bench.target_rows({"train": train})
    assert [(t["measured"], t["met"]) for t in targets] == [(1.25, False), (2.0, True)]
    assert "compile reduce-overhead" in targets[1]["target"] and "compile" not in targets[0]["target"]


def test_bench_threads_section_times_each_count_and_auto_idle_and_beside_a_busy_core(tmp_path):
    out = tmp_path / "bench.json"
    run("bench.py", "--sections", "threads", "--presets", "base-test", "--sizes", "32", "--batch-size", "2",
        "--thread-steps", "7", "--cache-dir", str(tmp_path / "cache"), "--json", str(out))
    rows = json.loads(out.read_text())["threads"]
    counts = [str(n) for n in sorted({torch.get_num_threads() >> i for i in range(8)} - {0}, reverse=True)]
    assert [(r["load"], r["threads"]) for r in rows] == [
        (load, n) for load in ("idle", "one core busy") for n in counts + ["auto"]]
    assert all(r["stage"] == "unet0 BaseTest" and r["s_per_step"] > 0 for r in rows)
