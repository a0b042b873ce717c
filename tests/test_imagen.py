"""The cascade: per-stage training loss, sampling through the chain, checkpoints."""
import copy
import os
import resource
import stat
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import imagen
from conftest import random_cascade, text, tiny_config


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_every_stage_has_a_finite_loss_with_gradients(target):
    torch.manual_seed(0)
    model = imagen.Imagen(tiny_config(target=target))
    for stage in model.stages:
        images = torch.rand(4, 3, stage.size, stage.size) * 2 - 1
        loss = stage(images, *text(4))
        loss.backward()
        assert torch.isfinite(loss) and loss > 0
        assert stage.unet.final_conv.weight.grad.abs().sum() > 0


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 4), h=st.integers(4, 12), w=st.integers(4, 12), side=st.integers(1, 4), seed=st.integers(0, 99))
def test_random_crops_take_the_same_window_of_every_tensor(b, h, w, side, seed):
    torch.manual_seed(seed)
    images = torch.rand(b, 3, h, w)
    crops, lows = imagen.random_crops((images, images * 2), side)
    assert crops.shape == lows.shape == (b, 3, side, side) and torch.equal(lows, crops * 2)
    for image, crop in zip(images, crops):  # each crop is one window of its own image
        windows = image.unfold(1, side, 1).unfold(2, side, 1)  # [3, h - side + 1, w - side + 1, side, side]
        assert (windows == crop[:, None, None]).flatten(3).all(-1).all(0).any()


def test_a_super_resolution_stage_trains_on_crops_and_samples_whole_images():
    torch.manual_seed(0)
    model = imagen.Imagen(tiny_config(crop=8))
    sr = model.stages[1]
    seen = []
    sr.unet.init_conv.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].shape[-1]))
    sr(torch.rand(2, 3, 32, 32) * 2 - 1, *text(2)).backward()
    model.sample(*text(1), steps=1)
    assert seen == [8, 32]


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_the_layout_loss_is_the_x0_mse_at_noise_levels_from_the_layout_level_up(target):
    base = random_cascade(target=target).stages[0]  # an untrained U-Net predicts 0: the x0 error must depend on it
    d, seen = base.diffusion, {}
    base.unet.register_forward_hook(lambda module, args, output: seen.update(xt=args[0], time=args[1], out=output))
    images = torch.rand(64, 3, 16, 16) * 2 - 1
    loss = base(images, *text(64), layout_level=0.9)
    t = (seen["time"] * (d.num_timesteps - 1)).round().long()  # [64]: model_time is t / (T - 1)
    assert t.min() >= round(0.9 * (d.num_timesteps - 1)) and t.max() == d.num_timesteps - 1
    x0 = d.x0_eps_from_output(seen["out"], seen["xt"], t, target)[0]
    assert torch.allclose(loss, (x0 - images).pow(2).mean(), rtol=1e-4)


def test_sampling_runs_the_chain_and_returns_images_in_0_1(cascade):
    emb, mask = text(2)
    g = torch.Generator().manual_seed(0)
    full = cascade.sample(emb, mask, generator=g)
    base = cascade.sample(emb, mask, stop_at=1, generator=torch.Generator().manual_seed(0))
    assert full.shape == (2, 3, 32, 32) and base.shape == (2, 3, 16, 16)
    assert full.min() >= 0 and full.max() <= 1
    again = cascade.sample(emb, mask, generator=torch.Generator().manual_seed(0))
    assert torch.equal(full, again)  # the same seed, the same images
    sr = cascade.sample(emb, mask, start_at=1, start_images=base, sampler="ddim", steps=2)
    assert sr.shape == (2, 3, 32, 32)


def test_the_super_resolution_stage_reads_the_previous_output(cascade):
    emb, mask = text(1)
    outs = [cascade.sample(emb, mask, start_at=1, start_images=torch.full((1, 3, 16, 16), v), lowres_noise=0.0,
                           generator=torch.Generator().manual_seed(0)) for v in (0.0, 1.0)]
    assert not torch.allclose(*outs)


def test_bad_stage_ranges_are_refused(cascade):
    emb, mask = text(1)
    with pytest.raises(ValueError, match="out of range"):
        cascade.sample(emb, mask, stop_at=3)
    with pytest.raises(ValueError, match="start_images"):
        cascade.sample(emb, mask, start_at=1)
    with pytest.raises(ValueError, match="one per U-Net"):
        cascade.sample(emb, mask, steps=[2, 2, 2])


def perturbed(state_dict):
    return {name: t + 1 if t.is_floating_point() else t for name, t in state_dict.items()}


def save_stages(folder, cascade, configs=None):
    """One checkpoint per stage whose EMA weights are the model's plus one; configs default to the cascade's."""
    for k, stage in enumerate(cascade.stages):
        config = configs[k] if configs else cascade.config
        weights = stage.unet.state_dict()
        state = dict(config=config, unet=k, step=k, model=weights, ema=perturbed(weights))
        imagen.save_checkpoint(state, imagen.checkpoint_path(folder, k))


@pytest.mark.parametrize("ema", [True, False])
def test_checkpoint_round_trip_rebuilds_the_cascade_with_ema_or_raw_weights(tmp_path, cascade, ema):
    save_stages(tmp_path, cascade)
    loaded, trained = imagen.load_cascade(str(tmp_path), ema=ema)
    assert trained == 2
    for k, stage in enumerate(cascade.stages):
        expected = perturbed(stage.unet.state_dict()) if ema else stage.unet.state_dict()
        for name, t in loaded.stages[k].unet.state_dict().items():
            assert torch.equal(t, expected[name]), (k, name)


def test_a_failed_or_unloadable_save_keeps_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = str(tmp_path / "unet0.pt")
    imagen.save_checkpoint({"step": 1}, path)

    def disk_full(state, f):
        open(f, "wb").write(b"PK partial")
        raise OSError(28, "No space left on device")

    def short_write(state, f):  # a writer that fails silently: what lands on disk is not a checkpoint
        open(f, "wb").write(b"PK partial")

    for writer, error in ((disk_full, OSError), (short_write, ValueError)):
        monkeypatch.setattr(imagen.torch, "save", writer)
        with pytest.raises(error):
            imagen.save_checkpoint({"step": 2}, path)
        assert os.listdir(tmp_path) == ["unet0.pt"]
        assert imagen.load_checkpoint(path)["step"] == 1


def test_save_fsyncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(imagen.os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or fsync(fd))
    imagen.save_checkpoint({"step": 1}, str(tmp_path / "unet0.pt"))
    assert synced[-1] is True  # the last fsync is the folder's, after os.replace


def test_a_truncated_checkpoint_is_a_one_line_error_naming_the_file(tmp_path):
    path = tmp_path / "unet0.pt"
    imagen.save_checkpoint({"step": 1, "w": torch.zeros(1000)}, str(path))
    path.write_bytes(path.read_bytes()[:500])
    for mmap in (False, True):
        with pytest.raises(ValueError, match=f"cannot load {path}: it is truncated"):
            imagen.load_checkpoint(str(path), mmap=mmap)


def test_keep_leaves_the_newest_older_checkpoints_which_are_not_found_as_stages(tmp_path):
    path = imagen.checkpoint_path(tmp_path, 0)
    for step in (100, 200, 300, 400):
        imagen.save_checkpoint({"step": step}, path, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["unet0-step000200.pt", "unet0-step000300.pt", "unet0.pt"]
    assert [imagen.load_checkpoint(p)["step"] for p in imagen.older_checkpoints(path)] == [200, 300]
    assert imagen.load_checkpoint(path)["step"] == 400
    assert imagen.find_checkpoints(str(tmp_path)) == {0: path}
    older = str(tmp_path / "unet0-step000200.pt")
    assert imagen.find_checkpoints(older) == {0: older}  # a file named on its own stands in for its stage


def test_checkpoints_of_different_cascades_are_not_mixed(tmp_path, cascade):
    other = tiny_config(target="eps")  # the same U-Nets, another diffusion target
    for k, (config, stage) in enumerate(zip((cascade.config, other), cascade.stages)):
        state = dict(config=config, unet=k, model=stage.unet.state_dict(), ema=stage.unet.state_dict())
        imagen.save_checkpoint(state, imagen.checkpoint_path(tmp_path, k))
    with pytest.raises(ValueError, match="unet1.pt was trained as U-Net 1 of a different cascade"):
        imagen.load_cascade(str(tmp_path))


@pytest.mark.parametrize("change, difference", [
    (dict(encoder="another-8-wide-encoder"), "encoder: 'another-8-wide-encoder' -> 'none'"),
    (dict(size=8), "stages[0].size: 8 -> 16"),
])
def test_a_stage_of_another_encoder_or_previous_stage_is_refused_naming_the_difference(tmp_path, cascade, change,
                                                                                         difference):
    other = copy.deepcopy(cascade.config)
    (other if "encoder" in change else other["stages"][0]).update(change)
    save_stages(tmp_path, cascade, configs=[cascade.config, other])
    with pytest.raises(ValueError, match="unet1.pt was trained as U-Net 1 of a different cascade") as e:
        imagen.load_cascade(str(tmp_path))
    assert difference in str(e.value)


CHURN = """
import resource, torch, imagen
imagen.reuse_freed_memory(torch.device("cpu"))
step = lambda: [torch.ones(4 << 20) for _ in range(3)]  # a step's activations: three 16 MB tensors, freed together
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_freed_tensor_memory_is_reused_not_faulted_back_in():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    faults = int(subprocess.run([sys.executable, "-c", CHURN], cwd=root, capture_output=True, text=True,
                                check=True).stdout)  # a fresh process: malloc's state is the process's
    assert faults < 5 * 3 * (16 << 20) // resource.getpagesize() / 2  # returned to the OS, all would fault back in
