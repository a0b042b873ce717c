"""The cascade: per-stage training loss, sampling through the chain, checkpoints."""
import pytest
import torch

import imagen
import registry

TEXT_DIM = 8


def tiny_config(**stage):
    stages = [dict(unet="BaseTest", unet_kwargs=dict(registry.UNETS["BaseTest"]), size=16, timesteps=50, **stage),
              dict(unet="SuperTest", unet_kwargs=dict(registry.UNETS["SuperTest"]), size=32, timesteps=50, **stage)]
    return dict(encoder="none", text_embed_dim=TEXT_DIM, max_text_len=16, stages=stages, sampling=dict(steps=3))


@pytest.fixture(scope="module")
def cascade():
    torch.manual_seed(0)
    model = imagen.Imagen(tiny_config())
    for p in model.parameters():  # random weights everywhere, the zero-initialised output convolutions too
        torch.nn.init.normal_(p, std=0.05)
    return model


def text(b):
    return torch.randn(b, 5, TEXT_DIM), torch.ones(b, 5, dtype=torch.bool)


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


def test_checkpoint_round_trip_rebuilds_the_cascade(tmp_path, cascade):
    for k, stage in enumerate(cascade.stages):
        state = dict(config=cascade.config, unet=k, model=stage.unet.state_dict(), ema=stage.unet.state_dict())
        imagen.save_checkpoint(state, imagen.checkpoint_path(tmp_path, k))
    loaded, trained = imagen.load_cascade(str(tmp_path))
    assert trained == 2
    for a, b in zip(cascade.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoints_of_different_cascades_are_not_mixed(tmp_path, cascade):
    other = tiny_config(target="eps")  # the same U-Nets, another diffusion target
    for k, (config, stage) in enumerate(zip((cascade.config, other), cascade.stages)):
        state = dict(config=config, unet=k, model=stage.unet.state_dict(), ema=stage.unet.state_dict())
        imagen.save_checkpoint(state, imagen.checkpoint_path(tmp_path, k))
    with pytest.raises(ValueError, match="unet1.pt was trained as U-Net 1 of a different cascade"):
        imagen.load_cascade(str(tmp_path))
