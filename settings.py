"""A training run's settings: one Config, parsed once from the command line, recipes merged under the flags.

The defaults live in the Config's fields, beside each flag's help; `registry.RECIPES` holds named overrides
(plain data); `resolve` merges defaults <- recipe <- flags and checks every value where it is parsed.
"""
import argparse
import dataclasses
import math

import torch

import diffusion
import imagen
import registry
import text
import unet

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # these replay CUDA graphs on a GPU


def setting(default, help):
    """A Config field: its default and its flag's help, in one place."""
    return dataclasses.field(default=default, metadata=dict(help=help))


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a training run, one flag each. The defaults suit a real run on a GPU; a recipe
    (registry.RECIPES) overrides them, flags override both. Per-stage settings hold one value per U-Net."""
    recipe: str = setting("", "a recipe: " + ", ".join(registry.RECIPES.names()) + " (default: shapes without --unets)")
    unets: tuple = setting((), "comma list of U-Net presets, base first: " + ", ".join(registry.UNETS.names()))
    sizes: tuple = setting((), "image side per U-Net, increasing (default: each preset's own)")
    data: str = setting("shapes", "'shapes' (built-in), an image+caption folder, or a folder of .tar shards")
    encoder: str = setting("minilm", "text encoder: " + ", ".join(registry.ENCODERS.names()) + ", a HF id or folder")
    steps: tuple = setting((100_000,), "the budget: optimizer steps per U-Net")
    minutes: tuple = setting((0.0,), "an optional wall-clock cap per U-Net (0 = none)")
    batch_size: tuple = setting((32,), "images per micro-step, per process, per U-Net")
    grad_accum: int = setting(1, "micro-steps per optimizer step")
    lr: tuple = setting((1e-4,), "AdamW learning rate after warmup, per U-Net")
    warmup: int = setting(1000, "linear learning-rate warmup steps")
    lr_final: float = setting(1.0, "learning rate at the end of the budget, a fraction of --lr, by cosine decay")
    grad_clip: float = setting(1.0, "max global gradient norm")
    ema_decay: float = setting(0.9999, "EMA decay, warmed up as min(decay, (1 + n) / (10 + n))")
    precision: tuple = setting(("auto",), "autocast per U-Net: auto (bf16 where native, else fp32), fp32, bf16, fp16")
    channels_last: tuple = setting((1,), "channels_last memory format per U-Net: 1 or 0")
    checkpointing: tuple = setting((0,), "activation checkpointing per U-Net: 1 (less memory, more compute) or 0")
    family: tuple = setting(("ddpm",), "diffusion family per U-Net: " + ", ".join(registry.FAMILIES.names()))
    target: tuple = setting((), "prediction target per U-Net: eps, x0 or v for ddpm (default v); edm for edm")
    schedule: tuple = setting(("cosine",), "noise schedule per U-Net: " + ", ".join(registry.SCHEDULES.names()))
    timesteps: tuple = setting((1000,), "diffusion steps T per U-Net")
    min_snr_gamma: tuple = setting((5.0,), "Min-SNR-γ loss weighting per U-Net (0 = off; ddpm only)")
    cond_drop_prob: float = setting(0.1, "probability of dropping the text (classifier-free guidance)")
    crop: tuple = setting((), "SR U-Nets train on random crops of this side and sample whole images (Imagen App. "
                          "F); 0 = whole images, the base takes 0 (default: half of each SR size)")
    layout_phase: tuple = setting(("0",), "START:END per U-Net: the fractions of its steps trained on an x0 loss at "
                                  "noise levels from --layout-level to 1 only (where layouts form); 0: none")
    layout_level: float = setting(0.95, "lowest noise level of the layout phase, in [0, 1)")
    hflip: bool = setting(False, "random horizontal flips, seeded by the sample's position (break 'left'/'right')")
    holdout: float = setting(0.02, "samples never trained on: a count, or a fraction below 1")
    cond_scale: tuple = setting((), "sampling default per U-Net: guidance scale (default 3 for the base, 1 after)")
    sampler: tuple = setting((), "sampling default per U-Net: " + ", ".join(registry.SAMPLERS.names()) +
                             " (default: ddpm, heun for edm)")
    sample_steps: tuple = setting((20,), "sampling default per U-Net: sampler steps")
    lowres_noise: float = setting(imagen.SAMPLING_DEFAULTS["lowres_noise"], "sampling default: noise level of "
                                  "low-res conditions (a fraction of T)")
    seed: int = setting(0, "initial weights, noise and data order")
    out: str = setting("out", "checkpoint/log/sample folder; re-running with the same folder resumes")
    init_from: str = setting("", "start a new run (step 0, fresh optimizer) from another run's --out folder or "
                             "unetK.pt, or a sample.py --export folder or Hub id: its EMA weights where stored")
    only_unet: int = setting(-1, "train only U-Net K (0-based), e.g. as one of parallel jobs; -1: all")
    save_every: int = setting(500, "write a checkpoint every N steps (and at the end)")
    keep: int = setting(0, "also keep the N newest older checkpoints per U-Net, as unetK-stepNNNNNN.pt")
    log_every: int = setting(10, "append to log.jsonl every N steps")
    eval_every: int = setting(100, "log the held-out loss of 64 held-out samples every N steps (0: at the end)")
    sample_every: int = setting(0, "write a sample grid every N steps (0: at the end only)")
    tracker: str = setting("none", 'also send log.jsonl and grids to wandb or tensorboard (pip install -e ".[wandb]")')
    threads: str = setting("auto", "CPU threads: a number, or auto: the fastest of N, N/2, ..., 1 under this "
                           "machine's load, re-timed on real steps (speed only; a number makes runs bit-identical)")
    parallel_stages: int = setting(0, "1: on a CPU, the stages after the first train beside it, each in a process of "
                                   "its own on an equal share of the cores (small U-Nets use cores better so)")
    workers: int = setting(1, "DataLoader worker processes")
    device: str = setting("auto", "auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu")
    compile: str = setting("", "torch.compile each stage in this mode: " + ", ".join(COMPILE_MODES))
    cache_dir: str = setting(text.DEFAULT_CACHE_DIR, "text-embedding cache folder")
    encoder_dtype: str = setting("fp32", "text encoder precision for the caption precompute: fp32, bf16, fp16")


DEFAULTS = Config()
PER_STAGE = dict(unets=str, sizes=int, steps=int, minutes=float, batch_size=int, lr=float, precision=str,
                 channels_last=int, checkpointing=int, family=str, target=str, schedule=str, timesteps=int,
                 min_snr_gamma=float, crop=int, layout_phase=str, cond_scale=float, sampler=str, sample_steps=int)
# Settings that a resume must share with the checkpoint: another value would change what the run means.
SAME_ON_RESUME = ("data", "seed", "holdout", "hflip", "lr", "warmup", "lr_final", "grad_clip", "ema_decay",
                  "grad_accum", "batch_size", "precision", "layout_phase", "layout_level")
LEAST = dict(steps=1, batch_size=1, timesteps=2, sample_steps=1, grad_accum=1, log_every=1, save_every=0,
             sample_every=0, eval_every=0, keep=0, workers=0, warmup=0, minutes=0)


def parse_config(argv=None):
    """The command line, parsed once into a checked Config: one flag per field, its help and default beside it."""
    p = argparse.ArgumentParser(description=__doc__, argument_default=argparse.SUPPRESS)
    shapes = registry.RECIPES["shapes"]
    for field in dataclasses.fields(Config):
        shown = f" (default: {field.default})" if field.default not in ((), "") else ""
        shown += f" [shapes recipe: {shapes[field.name]}]" if field.name in shapes else ""
        kind = dict(action="store_true") if field.type is bool else dict(nargs="?", const="default") if (
            field.name == "compile") else {}
        p.add_argument("--" + field.name.replace("_", "-"), help=field.metadata["help"] + shown, **kind)
    return resolve(vars(p.parse_args(argv)))


def resolve(given):
    """A checked Config from the flags given (strings): defaults <- the recipe <- the flags."""
    recipe = given.get("recipe", "" if "unets" in given else "shapes")
    values = {**dataclasses.asdict(DEFAULTS), **(registry.RECIPES[recipe] if recipe else {}), **given}
    values["recipe"] = registry.RECIPES.canonical(recipe) if recipe else ""
    if not values["unets"]:
        raise ValueError("give --recipe NAME or --unets a,b: " + ", ".join(registry.RECIPES.names()))
    names = [registry.UNETS.canonical(name) for name in registry.comma_list(values["unets"], str, "--unets")]
    n = len(names)
    for name, cast in PER_STAGE.items():
        flag = "--" + name.replace("_", "-")
        if name in ("unets", "sizes") or values[name] in ((), []):
            values[name] = tuple(registry.comma_list(values[name], cast, flag)) if values[name] else ()
        else:
            values[name] = tuple(registry.broadcast(registry.comma_list(values[name], cast, flag), n, flag))
    for name, default in dataclasses.asdict(DEFAULTS).items():
        if name not in PER_STAGE and not isinstance(values[name], type(default)):
            values[name] = scalar(values[name], type(default), name)
    values.update(unets=tuple(names), **derived_stage_defaults(values, names))
    return check(Config(**values))


def scalar(value, cast, name):
    """A flag's string as the setting's type; a ValueError naming the flag."""
    try:
        return cast(value) if cast is not bool else value in (True, "1", "true")
    except ValueError:
        raise ValueError(f"--{name.replace('_', '-')} {value!r}: give a {cast.__name__}") from None


def derived_stage_defaults(values, names):
    """Per-stage defaults that depend on the stages or device: sizes, precision, targets, crops, scales, samplers."""
    n, given = len(names), {key: values[key] for key in ("sizes", "target", "crop", "cond_scale", "sampler")
                            if values[key]}
    sizes = given.get("sizes", tuple(registry.UNETS[name]["size"] for name in names))
    multiples = [unet.size_multiple(**registry.unet_kwargs(name)) for name in names]
    families = [registry.FAMILIES.canonical(f) for f in values["family"]]
    kind = registry.pick_device(values["device"]).split(":")[0] if "auto" in values["precision"] else None
    bf16 = torch.cpu._is_avx512_bf16_supported() if kind == "cpu" else kind == "cuda" and torch.cuda.is_bf16_supported()
    out = dict(sizes=sizes, family=tuple(families),
               precision=tuple(("bf16" if bf16 else "fp32") if p == "auto" else p for p in values["precision"]),
               target=given.get("target", tuple("edm" if f == "edm" else "v" for f in families)),
               crop=given.get("crop", (0, *(s // 2 // m * m for s, m in zip(sizes[1:], multiples[1:])))),
               cond_scale=given.get("cond_scale", (3.0,) + (1.0,) * (n - 1)),
               sampler=given.get("sampler", tuple("heun" if f == "edm" else imagen.SAMPLING_DEFAULTS["sampler"]
                                                  for f in families)))
    for key in ("target", "crop", "cond_scale", "sampler"):
        out[key] = tuple(registry.broadcast(out[key], n, "--" + key.replace("_", "-")))
    return out


def check(cfg):
    """cfg, or a one-line ValueError naming the first bad value and what is allowed."""
    n = len(cfg.unets)
    if len(cfg.sizes) != n or list(cfg.sizes) != sorted(set(cfg.sizes)):
        raise ValueError(f"--sizes {cfg.sizes}: give {n} strictly increasing sizes, one per U-Net {cfg.unets}")
    for k, (name, size, crop) in enumerate(zip(cfg.unets, cfg.sizes, cfg.crop)):
        m = unet.size_multiple(**registry.unet_kwargs(name))
        if size < m or size % m:
            raise ValueError(f"--sizes {cfg.sizes}: {size} (U-Net {k}, {name}) must be a positive multiple of {m}")
        if crop and (k == 0 or not 0 < crop < size or crop % m):
            raise ValueError(f"--crop {cfg.crop}: {crop} for U-Net {k} ({name}); a super-resolution U-Net takes 0 "
                             f"or a multiple of {m} below its size {size}, the base 0")
    for k, (family, target) in enumerate(zip(cfg.family, cfg.target)):
        allowed = diffusion.EDM.TARGETS if family == "edm" else diffusion.TARGETS
        if target not in allowed:
            raise ValueError(f"--target {target!r} for U-Net {k} ({family}): choose from {', '.join(allowed)}")
    for name, least in LEAST.items():
        value = getattr(cfg, name)
        if (min(value) if name in PER_STAGE else value) < least:
            need = "every U-Net needs" if name in PER_STAGE else "must be"
            raise ValueError(f"--{name.replace('_', '-')} {value}: {need} at least {least}")
    checks = [("precision", set(cfg.precision) <= {"fp32", "bf16", "fp16"}, "auto, fp32, bf16 or fp16 per U-Net"),
              ("channels_last", set(cfg.channels_last) <= {0, 1}, "1 (channels_last) or 0 per U-Net"),
              ("checkpointing", set(cfg.checkpointing) <= {0, 1}, "1 (checkpointed) or 0 per U-Net"),
              ("parallel_stages", cfg.parallel_stages in (0, 1), "1 (stages beside the first, on a CPU) or 0"),
              ("layout_level", 0 <= cfg.layout_level < 1, "a noise level in [0, 1)"),
              ("lr", all(v > 0 and math.isfinite(v) for v in cfg.lr), "a positive number per U-Net"),
              ("ema_decay", 0 <= cfg.ema_decay < 1, "a decay in [0, 1)"),
              ("cond_scale", all(map(math.isfinite, cfg.cond_scale)), "finite guidance scales"),
              ("threads", cfg.threads == "auto" or cfg.threads.isdigit() and int(cfg.threads) >= 1,
               "auto or a positive number of CPU threads"),
              ("only_unet", -1 <= cfg.only_unet < n, f"a U-Net index 0..{n - 1}"),
              ("compile", cfg.compile in ("", *COMPILE_MODES), ", ".join(COMPILE_MODES)),
              ("tracker", cfg.tracker in ("none", "wandb", "tensorboard"), "none, wandb or tensorboard"),
              ("encoder_dtype", cfg.encoder_dtype in text.DTYPES, ", ".join(text.DTYPES))]
    for name, ok, allowed in checks:
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: give {allowed}")
    registry.pick_device(cfg.device)
    for window in cfg.layout_phase:
        layout_window(window)
    for schedule in cfg.schedule:
        registry.SCHEDULES.canonical(schedule)
    for k, (sampler, family) in enumerate(zip(cfg.sampler, cfg.family)):
        registry.check_sampler(sampler, family, k)
    if cfg.compile in CUDA_GRAPH_MODES and cfg.grad_accum > 1:  # measured on an H200: the graphs raise
        raise ValueError(f"--compile {cfg.compile} needs --grad-accum 1 (got {cfg.grad_accum}): a CUDA graph's "
                         "replay overwrites the gradients that the last micro-step left; use --compile default")
    return cfg


def layout_window(window):
    """'START:END' -> (start, end) with 0 <= start < end <= 1; '0' -> (0, 0), no window."""
    try:
        start, end = (0.0, 0.0) if window == "0" else map(float, window.split(":"))
    except ValueError:
        start, end = -1.0, -1.0
    if (start, end) != (0, 0) and not 0 <= start < end <= 1:
        raise ValueError(f"--layout-phase {window!r} is not START:END with 0 <= START < END <= 1, or 0")
    return start, end


def cascade_config(cfg, encoder):
    """The cascade as plain data: everything sample.py needs to rebuild it (stored in every checkpoint)."""
    stages = []
    for k, name in enumerate(cfg.unets):
        edm = cfg.family[k] == "edm"
        stage = dict(unet=name, unet_kwargs=registry.unet_kwargs(name), size=cfg.sizes[k], target=cfg.target[k],
                     schedule=registry.SCHEDULES.canonical(cfg.schedule[k]), timesteps=cfg.timesteps[k],
                     cond_drop_prob=cfg.cond_drop_prob, min_snr_gamma=None if edm else cfg.min_snr_gamma[k] or None)
        if edm:  # only then: checkpoints from before families still match
            stage["family"] = "edm"
        if cfg.crop[k]:
            stage["crop"] = cfg.crop[k]
        stages.append(stage)
    sampling = dict(sampler=[registry.SAMPLERS.canonical(s) for s in cfg.sampler], cond_scale=list(cfg.cond_scale),
                    steps=list(cfg.sample_steps), lowres_noise=cfg.lowres_noise)
    try:
        width = text.encoder_dim(encoder)
    except OSError as e:
        raise ValueError(f"--encoder {encoder['name']!r}: cannot read its config ({imagen.first_line(e)})") from None
    return dict(encoder=cfg.encoder, text_embed_dim=width, max_text_len=max(s["unet_kwargs"]["max_text_len"]
                                                                            for s in stages),
                stages=stages, sampling=sampling, holdout=cfg.holdout)
