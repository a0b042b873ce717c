"""Train an Imagen cascade: `python train.py` trains the `shapes` recipe on the built-in data (a 2-core CPU).

`python train.py --recipe real-cpu --data DIR` trains on your captioned images; `--recipe real-gpu` on a GPU;
`--unets a,b` without a recipe takes defaults that suit a real run. Any flag overrides a recipe's value.
Every listed U-Net trains in turn for its step budget; `--only-unet K` trains one, so stages can run as parallel
jobs writing to the same --out folder (one checkpoint file per U-Net). Re-running the same command resumes
exactly. SIGTERM or Ctrl-C finishes the current step, saves and exits with 128 + the signal number (143, 130);
a second Ctrl-C stops at once. Multi-GPU: `torchrun --nproc_per_node=N train.py ...` (DDP from torchrun's env vars).
"""
import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import statistics
import sys
import time
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

import data
import diffusion
import imagen
import registry
import text
import unet


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a training run, in one place. The defaults suit a real run on a GPU; a recipe
    (registry.RECIPES) overrides them, flags override both. Per-stage settings hold one value per U-Net."""
    recipe: str = ""                      # the registry.RECIPES entry merged in ("" = none)
    unets: tuple = ()                     # registry.UNETS presets, base first
    sizes: tuple = ()                     # image side per U-Net (default: each preset's own)
    data: str = "shapes"                  # 'shapes', an image+caption folder or .tar shards
    encoder: str = "minilm"               # registry.ENCODERS name, HF id or folder
    steps: tuple = (100_000,)             # the budget: optimizer steps per U-Net
    minutes: tuple = (0.0,)               # an optional wall-clock cap per U-Net (0 = none)
    batch_size: tuple = (32,)             # images per micro-step, per process
    grad_accum: int = 1                   # micro-steps per optimizer step
    lr: float = 1e-4                      # AdamW learning rate after warmup
    warmup: int = 1000                    # linear warmup steps
    lr_final: float = 1.0                 # lr at the end of the budget, a fraction of lr (cosine decay)
    grad_clip: float = 1.0                # max global gradient norm
    ema_decay: float = 0.9999             # EMA decay, warmed up as min(decay, (1 + n) / (10 + n))
    precision: tuple = ("fp32",)          # autocast: fp32, bf16 or fp16
    channels_last: tuple = (1,)           # channels_last memory format: 1 or 0
    family: tuple = ("ddpm",)             # registry.FAMILIES
    target: tuple = ()                    # eps, x0 or v for ddpm (default v); edm for edm
    schedule: tuple = ("cosine",)         # registry.SCHEDULES
    timesteps: tuple = (1000,)            # diffusion steps T
    min_snr_gamma: tuple = (5.0,)         # Min-SNR-γ loss weighting (0 = off; ddpm only)
    cond_drop_prob: float = 0.1           # text dropped for classifier-free guidance
    crop: tuple = ()                      # SR U-Nets train on random crops of this side (default: half the size)
    layout_phase: tuple = ("0",)          # START:END fractions of the budget trained at noise >= layout_level only
    layout_level: float = 0.95            # lowest noise level of the layout phase
    hflip: bool = False                   # random horizontal flips (break 'left'/'right' captions)
    holdout: float = 0.02                 # samples never trained on: a count, or a fraction below 1
    cond_scale: tuple = ()                # sampling default: guidance scale (default 3 for the base, 1 after)
    sample_steps: tuple = (20,)           # sampling default: sampler steps
    lowres_noise: float = imagen.SAMPLING_DEFAULTS["lowres_noise"]  # sampling default: low-res condition noise
    seed: int = 0
    out: str = "out"                      # checkpoints, log.jsonl and grids; the same folder resumes
    only_unet: int = -1                   # train only U-Net K (-1: all)
    save_every: int = 500                 # checkpoint every N steps (and at the end)
    keep: int = 0                         # also keep the N newest older checkpoints per U-Net
    log_every: int = 10                   # log.jsonl record every N steps
    eval_every: int = 100                 # held-out loss every N steps (0: at the end only)
    sample_every: int = 0                 # sample grid every N steps (0: at the end only)
    threads: str = "auto"                 # CPU threads: a number, or auto (ThreadTuner)
    workers: int = 1                      # DataLoader worker processes
    compile: str = ""                     # torch.compile mode ("" = eager)
    cache_dir: str = text.DEFAULT_CACHE_DIR
    encoder_dtype: str = "fp32"           # text encoder precision for the caption precompute


DEFAULTS = Config()
PER_STAGE = dict(unets=str, sizes=int, steps=int, minutes=float, batch_size=int, precision=str, channels_last=int,
                 family=str, target=str, schedule=str, timesteps=int, min_snr_gamma=float, crop=int,
                 layout_phase=str, cond_scale=float, sample_steps=int)
# Settings that a resume must share with the checkpoint: another value would change what the run means.
SAME_ON_RESUME = ("data", "seed", "holdout", "hflip", "lr", "warmup", "lr_final", "grad_clip", "ema_decay",
                  "grad_accum", "batch_size", "precision", "layout_phase", "layout_level")
LEAST = dict(grad_accum=1, log_every=1, save_every=0, sample_every=0, eval_every=0, keep=0, workers=0, warmup=0)
CHANGED_FLAGS = {"--minutes": "--minutes is now only a cap: the budget is --steps",
                 "--layout-phase": "--layout-phase is now a fraction of --steps, with no forecast of machine speed"}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # these replay CUDA graphs on a GPU
GRID_PROMPTS, HELDOUT_N = 8, 64  # images in a sample grid; held-out samples whose loss is logged
MAX_UNUSABLE = 1000  # consecutive unusable samples (unreadable image or no caption) before training stops
MAX_BAD_STEPS = 10  # consecutive non-finite losses before training stops
TUNE_EVERY, TUNE_STEPS = 200, 3  # CPU thread counts are re-timed every TUNE_EVERY steps, TUNE_STEPS steps each
CHECKPOINT_KEYS = ("config", "model", "ema", "ema_n", "optimizer", "scaler", "step", "position", "elapsed", "skipped")


def parse_config(argv=None):
    """The command line, parsed once into a checked Config."""
    p = argparse.ArgumentParser(description=__doc__, argument_default=argparse.SUPPRESS)
    a = p.add_argument
    a("--recipe", help="a recipe: " + ", ".join(registry.RECIPES.names()) + " (default: shapes, unless --unets is given)")
    a("--unets", help="comma list of U-Net presets: " + ", ".join(registry.UNETS.names()))
    a("--sizes", help="image side per U-Net, increasing (default: each preset's own)")
    a("--data", help="'shapes' (built-in), an image+caption folder, or a folder of .tar shards")
    a("--encoder", help="text encoder: " + ", ".join(registry.ENCODERS.names()) + ", a HF id or a folder")
    a("--steps", help="the budget: optimizer steps per U-Net")
    a("--minutes", help="an optional wall-clock cap per U-Net, 0 = none")
    a("--batch-size", help="images per micro-step, per process, per U-Net")
    a("--grad-accum", help="micro-steps per optimizer step")
    a("--lr", help="AdamW learning rate after warmup")
    a("--warmup", help="linear learning-rate warmup steps")
    a("--lr-final", help="learning rate at the end of the budget, a fraction of --lr, by cosine decay")
    a("--grad-clip", help="max global gradient norm")
    a("--ema-decay", help="EMA decay, warmed up as min(decay, (1+n)/(10+n))")
    a("--precision", help="autocast precision per U-Net: fp32, bf16 or fp16")
    a("--channels-last", help="channels_last memory format per U-Net: 1 or 0")
    a("--family", help="diffusion family per U-Net: " + ", ".join(registry.FAMILIES.names()))
    a("--target", help="prediction target per U-Net: eps, x0 or v for ddpm (default v); edm for edm")
    a("--schedule", help="noise schedule per U-Net: " + ", ".join(registry.SCHEDULES.names()))
    a("--timesteps", help="diffusion steps T per U-Net")
    a("--min-snr-gamma", help="Min-SNR-γ loss weighting per U-Net (0 = off; ddpm only)")
    a("--cond-drop-prob", help="probability of dropping the text (classifier-free guidance)")
    a("--crop", help="SR U-Nets train on random crops of this side and sample whole images (Imagen App. F); "
      "0 = whole images, the base takes 0 (default: half of each SR size)")
    a("--layout-phase", help="START:END per U-Net, fractions of its steps trained only at noise levels from "
      "--layout-level to 1 with a plain x0 loss (where the layout is decided); 0 = none")
    a("--layout-level", help="lowest noise level of the layout phase, in [0, 1)")
    a("--hflip", action="store_true", help="random horizontal flips, seeded by the sample's position")
    a("--holdout", help="samples never trained on: a count, or a fraction below 1; the loss of 64 is logged")
    a("--cond-scale", help="sampling default per U-Net: guidance scale (default 3 for the base, 1 after)")
    a("--sample-steps", help="sampling default per U-Net: sampler steps")
    a("--lowres-noise", help="sampling default: noise level of low-res conditions (a fraction of T)")
    a("--seed", help="initial weights, noise and data order")
    a("--out", help="checkpoint/log/sample folder; re-running with the same folder resumes")
    a("--only-unet", help="train only U-Net K (0-based), e.g. as one of parallel jobs")
    a("--save-every", help="write a checkpoint every N steps (and at the end)")
    a("--keep", help="also keep the N newest older checkpoints per U-Net, as unetK-stepNNNNNN.pt")
    a("--log-every", help="append to log.jsonl every N steps")
    a("--eval-every", help="log the held-out loss every N steps (0 = only at the end)")
    a("--sample-every", help="write a sample grid every N steps (0 = only at the end)")
    a("--threads", help="CPU threads: a number, or auto: the fastest of N, N/2, ..., 1 under this machine's load, "
      f"re-timed on real steps every {TUNE_EVERY} steps (speed only; a fixed number makes runs bit-identical)")
    a("--workers", help="DataLoader worker processes")
    a("--compile", nargs="?", const="default", help="torch.compile each stage: " + ", ".join(COMPILE_MODES))
    a("--cache-dir", help="text-embedding cache folder")
    a("--encoder-dtype", help="text encoder precision for the caption precompute: " + ", ".join(text.DTYPES))
    for action in p._actions:  # the defaults' one home feeds the help
        default, shapes = getattr(DEFAULTS, action.dest, ""), registry.RECIPES["shapes"].get(action.dest)
        action.help += f" (default: {default})" if default not in ((), "") else ""
        action.help += f" [shapes recipe: {shapes}]" if shapes is not None else ""
    given = vars(p.parse_args(argv))
    for flag, note in CHANGED_FLAGS.items():
        if flag.lstrip("-").replace("-", "_") in given:
            print(f"note: {note}")
    return resolve(given)


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
    """Per-stage settings whose default depends on the stages: sizes, targets, crops, guidance scales."""
    n, given = len(names), {key: values[key] for key in ("sizes", "target", "crop", "cond_scale") if values[key]}
    sizes = given.get("sizes", tuple(registry.UNETS[name]["size"] for name in names))
    multiples = [unet.size_multiple(**registry.unet_kwargs(name)) for name in names]
    families = [registry.FAMILIES.canonical(f) for f in values["family"]]
    out = dict(sizes=sizes, family=tuple(families),
               target=given.get("target", tuple("edm" if f == "edm" else "v" for f in families)),
               crop=given.get("crop", (0, *(s // 2 // m * m for s, m in zip(sizes[1:], multiples[1:])))),
               cond_scale=given.get("cond_scale", (3.0,) + (1.0,) * (n - 1)))
    for key in ("target", "crop", "cond_scale"):
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
    for name in ("steps", "batch_size", "timesteps", "sample_steps"):
        least = 2 if name == "timesteps" else 1
        if min(getattr(cfg, name)) < least:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: every U-Net needs at least {least}")
    for name, least in LEAST.items():
        if getattr(cfg, name) < least:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least {least}")
    checks = [("minutes", min(cfg.minutes) >= 0, "a cap >= 0 per U-Net (0 = none)"),
              ("precision", set(cfg.precision) <= {"fp32", "bf16", "fp16"}, "fp32, bf16 or fp16 per U-Net"),
              ("channels_last", set(cfg.channels_last) <= {0, 1}, "1 (channels_last) or 0 per U-Net"),
              ("layout_level", 0 <= cfg.layout_level < 1, "a noise level in [0, 1)"),
              ("lr", cfg.lr > 0 and math.isfinite(cfg.lr), "a positive number"),
              ("ema_decay", 0 <= cfg.ema_decay < 1, "a decay in [0, 1)"),
              ("cond_scale", all(map(math.isfinite, cfg.cond_scale)), "finite guidance scales"),
              ("threads", cfg.threads == "auto" or cfg.threads.isdigit() and int(cfg.threads) >= 1,
               "auto or a positive number of CPU threads"),
              ("only_unet", -1 <= cfg.only_unet < n, f"a U-Net index 0..{n - 1}"),
              ("compile", cfg.compile in ("", *COMPILE_MODES), ", ".join(COMPILE_MODES)),
              ("encoder_dtype", cfg.encoder_dtype in text.DTYPES, ", ".join(text.DTYPES))]
    for name, ok, allowed in checks:
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: give {allowed}")
    for window in cfg.layout_phase:
        layout_window(window)
    for schedule in cfg.schedule:
        registry.SCHEDULES.canonical(schedule)
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
    sampling = dict(cond_scale=list(cfg.cond_scale), steps=list(cfg.sample_steps), lowres_noise=cfg.lowres_noise)
    if "edm" in cfg.family:  # EDM's Algorithm 2 on edm U-Nets
        sampling["sampler"] = ["heun" if f == "edm" else imagen.SAMPLING_DEFAULTS["sampler"] for f in cfg.family]
    try:
        width = text.encoder_dim(encoder)
    except OSError as e:
        raise ValueError(f"--encoder {encoder['name']!r}: cannot read its config ({imagen.first_line(e)})") from None
    return dict(encoder=cfg.encoder, text_embed_dim=width, max_text_len=max(s["unet_kwargs"]["max_text_len"]
                                                                            for s in stages),
                stages=stages, sampling=sampling, holdout=cfg.holdout)


# ---- the pieces of one optimizer step ----

def learning_rate(cfg, k, step):
    """Linear warmup, then cosine decay to lr * lr_final at the end of stage k's budget (Loshchilov & Hutter 2017)."""
    warmup = min(1.0, (step + 1) / max(1, cfg.warmup))
    progress = min(1.0, step / cfg.steps[k])
    return cfg.lr * warmup * (cfg.lr_final + (1 - cfg.lr_final) * (1 + math.cos(math.pi * progress)) / 2)


def layout_level(cfg, k, step):
    """The layout phase's lowest noise level while stage k's step lies in its --layout-phase window, else None."""
    start, end = layout_window(cfg.layout_phase[k])
    return cfg.layout_level if start <= step / cfg.steps[k] < end else None


def ema_update(decay):
    """EMA update for AveragedModel with warmup: decay_n = min(decay, (1 + n) / (10 + n))."""
    def update(ema_params, params, n):
        torch._foreach_lerp_(ema_params, params, 1 - min(decay, (1 + float(n)) / (10 + float(n))))
    return update


def step_outcome(loss, norm, fp16):
    """"applied"; "overflow": fp16 gradients overflowed, which GradScaler answers by lowering its scale (not a bad
    step); "non-finite": a bad step (a non-finite loss, or a non-finite gradient norm without fp16)."""
    if not math.isfinite(loss):
        return "non-finite"
    if math.isfinite(norm):
        return "applied"
    return "overflow" if fp16 else "non-finite"


class Parts(NamedTuple):
    """What trains stage k: its Stage, the model that runs it (DDP, compiled), optimizer, EMA, scaler."""
    k: int
    stage: imagen.Stage
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    ema: AveragedModel
    scaler: torch.amp.GradScaler
    autocast: dict
    memory_format: torch.memory_format


def build_parts(cfg, cascade, k, device, world):
    """Stage k on the device with its optimizer, EMA and grad scaler."""
    memory_format = torch.channels_last if cfg.channels_last[k] else torch.contiguous_format
    stage = cascade.stages[k].to(device, memory_format=memory_format)
    opt = torch.optim.AdamW(stage.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.01,
                            fused=True)  # one kernel for all parameters: 5x faster than the default loop
    ema = AveragedModel(stage.unet, multi_avg_fn=ema_update(cfg.ema_decay), use_buffers=True)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision[k] == "fp16")
    model = DistributedDataParallel(stage) if world > 1 else stage
    model = torch.compile(model, mode=cfg.compile) if cfg.compile else model
    autocast = dict(device_type=device.type, dtype=torch.bfloat16 if cfg.precision[k] == "bf16" else torch.float16,
                    enabled=cfg.precision[k] != "fp32")
    return Parts(k, stage, model, opt, ema, scaler, autocast, memory_format)


def optimizer_step(parts, micro_batches, lr, level, world, grad_clip):
    """One optimizer step over [(images [b,3,s,s] in [-1,1], text embeds, mask)] -> (loss, outcome): "applied",
    "overflow" (fp16: GradScaler skipped it and lowered its scale) or "non-finite" (skipped, a bad step).
    Under DDP the loss is the mean over ranks, so every rank reaches the same outcome."""
    for group in parts.opt.param_groups:
        group["lr"] = lr
    total = 0.0
    for i, (images, emb, mask) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = parts.model.no_sync() if world > 1 and not last else contextlib.nullcontext()
        with sync, torch.autocast(**parts.autocast):
            loss = parts.model(images, emb, mask, layout_level=level) / len(micro_batches)
        parts.scaler.scale(loss).backward()
        total += loss.detach()
    parts.scaler.unscale_(parts.opt)
    norm = torch.nn.utils.clip_grad_norm_(parts.stage.parameters(), grad_clip)
    stats = torch.stack((total, norm))  # [2]; the norm is of the gradients DDP averaged: the same on every rank
    if world > 1:
        dist.all_reduce(stats)  # a non-finite loss on any rank makes the sum non-finite on every rank
    total, norm = (stats / world).tolist()  # the step's one host sync
    outcome = step_outcome(total, norm, fp16=parts.scaler.is_enabled())
    if outcome == "applied":
        parts.scaler.step(parts.opt)
        parts.ema.update_parameters(parts.stage.unet)
    parts.scaler.update()  # an overflow (found by unscale_) lowers the fp16 scale
    parts.opt.zero_grad(set_to_none=True)
    return total, outcome


def read_batch(batches, data_name):
    """The loader's next batch with a usable sample -> (uint8 images, captions, samples read, samples skipped)."""
    read = skipped = 0
    while True:
        images, captions, bad = next(batches)
        read, skipped = read + len(captions) + bad, skipped + bad
        if captions:
            return images, captions, read, skipped
        if skipped >= MAX_UNUSABLE:
            raise ValueError(f"{skipped} samples in a row of --data {data_name!r} were unusable (unreadable images "
                             "or empty captions); check the data")


def model_inputs(images, captions, cache, cfg, k, device, memory_format, flip_seed):
    """(images [b, 3, s, s] in [-1, 1] at stage k's size, text embeds, mask) for a batch."""
    emb, mask = cache(captions)  # [b, n, d], [b, n]: precomputed, never encoded here
    images = imagen.resize(data.to_signed(images.to(device)), cfg.sizes[k])  # [b, 3, s, s]
    if cfg.hflip:  # seeded by the batch's position: a resumed run flips the same samples
        flip = torch.rand(len(captions), generator=torch.Generator().manual_seed(flip_seed)).to(device) < 0.5  # [b]
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    return images.contiguous(memory_format=memory_format), emb.to(device), mask.to(device)


# ---- the loop ----

def train_stage(cfg, config, cascade, k, train_set, heldout, cache, log, dist_info):
    """Train stage k to its step budget (or its --minutes cap, or a stop signal), then save it."""
    rank, world, device = dist_info
    parts = build_parts(cfg, cascade, k, device, world)
    path = imagen.checkpoint_path(cfg.out, k)
    state = dict(step=0, position=0, elapsed=0.0, skipped=0, data_digest="")
    state.update(resume(parts, path, config, cfg, device))
    saved_step, bad_steps, shown = state["step"], 0, {}
    tuner = ThreadTuner.for_run(cfg.threads, device)
    sampler = data.EpochSampler(len(train_set), cfg.seed, state["position"], rank, world)
    loader = torch.utils.data.DataLoader(train_set, sampler=sampler, batch_size=cfg.batch_size[k],
                                         num_workers=cfg.workers, collate_fn=data.collate,
                                         persistent_workers=cfg.workers > 0)
    batches, signum = iter(loader), 0

    def save():
        nonlocal saved_step
        if rank == 0 and saved_step != state["step"]:
            imagen.save_checkpoint(checkpoint(parts, config, cfg, state), path, keep=cfg.keep)
        saved_step = state["step"]

    bar = tqdm(total=cfg.steps[k], initial=state["step"], desc=f"unet{k} {cfg.unets[k]}", disable=rank != 0)
    while state["step"] < cfg.steps[k]:
        elapsed, signum = shared_clock_and_signal(state["elapsed"], rank, world, device)
        if signum or cfg.minutes[k] and elapsed >= 60 * cfg.minutes[k]:
            break
        threads, start = tuner.choose(state["step"]), time.perf_counter()
        torch.manual_seed(hash((cfg.seed, k, rank, state["step"])) % 2**63)  # exact resume, no RNG state
        micro_batches = []
        for _ in range(cfg.grad_accum):
            flip_seed = hash((cfg.seed, rank, state["position"])) % 2**63
            images, captions, read, skipped = read_batch(batches, cfg.data)
            state["position"] += read * world
            state["skipped"] += skipped
            state["data_digest"] = hashlib.sha1("\n".join([state["data_digest"], *captions]).encode()).hexdigest()
            micro_batches.append(model_inputs(images, captions, cache, cfg, k, device, parts.memory_format, flip_seed))
        level = layout_level(cfg, k, state["step"])
        loss, outcome = optimizer_step(parts, micro_batches, learning_rate(cfg, k, state["step"]), level, world,
                                       cfg.grad_clip)
        seconds = time.perf_counter() - start
        tuner.record(threads, seconds)
        state["elapsed"] += seconds
        if outcome == "non-finite":
            bad_steps += 1
            log(dict(unet=k, step=state["step"], event="non-finite loss, step skipped", loss=loss))
            if bad_steps >= MAX_BAD_STEPS:
                save()  # the bad steps were not applied: the weights in memory are the last good ones
                bar.close()
                end_run(rank, f"error: {MAX_BAD_STEPS} non-finite losses in a row at unet{k} step {state['step']}; "
                        f"stopped and saved the last good weights to {path} (try a lower --lr)", 1)
        if outcome != "applied":
            continue
        bad_steps, state["step"] = 0, state["step"] + 1
        step, ips = state["step"], cfg.batch_size[k] * cfg.grad_accum * world / seconds
        bar.update()
        bar.set_postfix(loss=f"{loss:.4f}", **shown, img_s=f"{ips:.1f}", threads=threads)
        if step % cfg.log_every == 0:
            log(dict(unet=k, step=step, loss=loss, lr=learning_rate(cfg, k, step - 1), layout_level=level,
                     img_per_s=round(ips, 1), threads=threads, skipped=state["skipped"],
                     minutes=round(state["elapsed"] / 60, 2), data_digest=state["data_digest"][:16]))
        if cfg.save_every and step % cfg.save_every == 0:
            save()
        if cfg.sample_every and step % cfg.sample_every == 0 and rank == 0:
            grid = os.path.join(cfg.out, f"samples-unet{k}-{step:06d}.png")
            log(dict(unet=k, step=step, event="grid", path=grid,
                     prompts=write_grid(cascade, parts, cache, grid, heldout, cfg.only_unet)))
        if cfg.eval_every and step % cfg.eval_every == 0 and rank == 0:
            held = heldout_loss(parts, cfg.sizes[k], heldout, cache, device)
            shown["heldout"] = f"{held:.4f}"
            log(dict(unet=k, step=step, heldout_loss=held, minutes=round(state["elapsed"] / 60, 2)))
    bar.close()
    save()
    if signum:
        name = signal.Signals(signum).name
        log(dict(unet=k, step=state["step"], event=f"stopped by {name}", minutes=round(state["elapsed"] / 60, 2)))
        end_run(rank, f"stopped by {name} at unet{k} step {state['step']}: saved {path}; re-run the same command "
                "to resume", 128 + signum)
    held = heldout_loss(parts, cfg.sizes[k], heldout, cache, device) if rank == 0 else None
    log(dict(unet=k, step=state["step"], event="done", minutes=round(state["elapsed"] / 60, 2),
             skipped=state["skipped"], heldout_loss=held))
    if rank == 0:
        print(f"unet{k}: {state['step']} of {cfg.steps[k]} steps in {state['elapsed'] / 60:.1f} minutes of training, "
              f"held-out loss {held:.4f}")
    parts.stage.unet.load_state_dict(parts.ema.module.state_dict())  # later stages' grids sample its EMA weights
    return parts


def shared_clock_and_signal(elapsed, rank, world, device):
    """(training seconds, stop signal number): under DDP every rank takes rank 0's clock and any rank's signal, so
    that all ranks stop at the same step."""
    signum = StopSignal.signum
    if world == 1:
        return elapsed, signum
    shared = torch.tensor([elapsed if rank == 0 else 0.0, signum], dtype=torch.float64, device=device)
    dist.all_reduce(shared, dist.ReduceOp.MAX)  # clocks and signal numbers are >= 0
    return shared[0].item(), int(shared[1].item())


def checkpoint(parts, config, cfg, state):
    """The one checkpoint dict of a stage: cascade, settings, weights, EMA, optimizer, scaler and position."""
    return dict(config=config, settings=dataclasses.asdict(cfg), unet=parts.k, model=parts.stage.unet.state_dict(),
                ema=parts.ema.module.state_dict(), ema_n=parts.ema.n_averaged, optimizer=parts.opt.state_dict(),
                scaler=parts.scaler.state_dict(), **state)


def resume(parts, path, config, cfg, device):
    """Load stage k's checkpoint into parts if one exists -> its counters ({} if none). Refuses a checkpoint of
    another cascade or of settings that would change the run's meaning; says when the budget changed."""
    if not os.path.exists(path):
        return {}
    s = imagen.require(imagen.load_checkpoint(path, device), path, CHECKPOINT_KEYS)
    mismatch = imagen.cascade_mismatch(s["config"], config, parts.k)
    if mismatch:
        raise ValueError(f"{path} holds U-Net {parts.k} of another cascade ({mismatch}, checkpoint -> this "
                         "command); use another --out or the command that made it")
    settings_changed(s.get("settings"), cfg, parts.k, path)
    parts.stage.unet.load_state_dict(s["model"])
    parts.ema.module.load_state_dict(s["ema"])
    parts.ema.n_averaged.copy_(s["ema_n"])
    parts.opt.load_state_dict(s["optimizer"])
    parts.scaler.load_state_dict(s["scaler"])
    return {key: s[key] for key in ("step", "position", "elapsed", "skipped")} | dict(
        data_digest=s.get("data_digest", ""))


def settings_changed(old, cfg, k, path):
    """Refuse a resume whose settings change the run's meaning; print one line for a changed budget."""
    if old is None:
        print(f"note: {path} was written before checkpoints stored their settings; resuming with this command's")
        return
    for name in (*SAME_ON_RESUME, "steps"):
        before, now = old.get(name), getattr(cfg, name)
        if name in PER_STAGE:
            before, now = list(before or [None] * (k + 1))[k], now[k]
        if before != now and name == "steps":
            print(f"note: unet{k} resumes from {path} with a budget of {now} steps (it was trained for {before})")
        elif before != now:
            raise ValueError(f"{path} was trained with --{name.replace('_', '-')} {before!r}, this command gives "
                             f"{now!r}; use the same value to resume, or another --out")


class Heldout(NamedTuple):
    """Samples training never reads: their loss is logged, their captions prompt the sample grids."""
    images: torch.Tensor  # uint8 [n, 3, s, s]
    captions: list


@contextlib.contextmanager
def ema_unet(parts):
    """Stage k's EMA U-Net in its place for the duration (held-out loss, sample grids)."""
    raw, parts.stage.unet = parts.stage.unet, parts.ema.module
    try:
        yield
    finally:
        parts.stage.unet = raw


def heldout_loss(parts, size, heldout, cache, device):
    """Stage loss of the EMA weights on the held-out images at `size`, at fixed noise (imagen.fixed_noise_loss)."""
    emb, mask = cache(heldout.captions)  # [n, max_len, d], [n, max_len]
    images = imagen.resize(data.to_signed(heldout.images.to(device)), size)  # [n, 3, size, size]
    with ema_unet(parts), torch.autocast(**parts.autocast):
        # contiguous, not channels_last: randn_like fills memory order, and eval.py's draws must be the same noise
        return imagen.fixed_noise_loss(parts.stage, images, emb.to(device), mask.to(device), data.HOLDOUT_SEED)


def write_grid(cascade, parts, cache, path, heldout, only_unet):
    """Sample held-out captions through stage k with EMA weights into a PNG grid. With --only-unet K the chain starts
    at K, conditioned on held-out images at the previous stage's size (an untrained base would say nothing)."""
    k, prompts, start_at, start_images = parts.k, heldout.captions[:GRID_PROMPTS], max(only_unet, 0), None
    device = next(parts.stage.parameters()).device
    if start_at:
        lowres = cascade.config["stages"][start_at - 1]["size"]
        start_images = imagen.resize(heldout.images[:GRID_PROMPTS].to(device).float() / 255, lowres)  # [n,3,s,s]
    emb, mask = cache(prompts)
    with ema_unet(parts):
        images = cascade.sample(emb.to(device), mask.to(device), stop_at=k + 1, start_at=start_at,
                                start_images=start_images, generator=torch.Generator(device).manual_seed(0))
    imagen.save_grid(images, path, nrow=4)
    return prompts


class ThreadTuner:
    """Trains at the CPU thread count that runs steps fastest under the machine's current load: a speed-only choice.
    At the start of every TUNE_EVERY steps each option runs TUNE_STEPS real training steps; the rest use the fastest
    (median). Every op waits for all of torch's threads: on the 2-core CPU with one core kept busy by another
    program, a base step took 4x longer on 2 threads than on 1 (docs/experiments.md)."""

    def __init__(self, options):
        self.options, self.seconds, self.round = options, {}, -1  # seconds: thread count -> this round's step times

    @classmethod
    def for_run(cls, flag, device):
        """Tuner over N, N/2, ..., 1 threads (`flag` auto on a CPU), or one fixed count (a number)."""
        if flag != "auto":
            torch.set_num_threads(int(flag))
        most = torch.get_num_threads()
        if flag != "auto" or device.type != "cpu":
            return cls([most])
        return cls(sorted({most >> i for i in range(most.bit_length())} - {0}, reverse=True))

    def choose(self, step):
        """Set and return the thread count for optimizer step `step`."""
        if step // TUNE_EVERY != self.round:  # a new round of trials
            self.round, self.seconds = step // TUNE_EVERY, {}
        untimed = [n for n in self.options if len(self.seconds.get(n, ())) < TUNE_STEPS]
        threads = untimed[0] if untimed else min(self.seconds, key=lambda n: statistics.median(self.seconds[n]))
        torch.set_num_threads(threads)
        return threads

    def record(self, threads, seconds):
        """Time one step at `threads` if this round is still timing that count."""
        times = self.seconds.setdefault(threads, [])
        if len(times) < TUNE_STEPS:
            times.append(seconds)


class StopSignal:
    """SIGTERM and SIGINT (Ctrl-C) set `signum`: training finishes its step, saves and exits with 128 + signum.
    A second signal of the same kind ends the process at once."""
    signum = 0

    @classmethod
    def install(cls):
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, cls.catch)

    @classmethod
    def catch(cls, signum, frame):
        cls.signum = signum
        signal.signal(signum, signal.SIG_DFL)


def setup_distributed():
    """(rank, world_size, device) from torchrun's env vars; single process without them."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, local = dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    return rank, dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu")


def end_run(rank, message, status):
    """End every rank with exit status `status`; rank 0 prints the one-line message."""
    if rank == 0:
        print(message, file=sys.stderr)
    raise SystemExit(status)


def json_line(record):
    """A strict-JSON log line: non-finite numbers, which JSON has no literal for, become strings ("nan", "inf")."""
    return json.dumps({key: str(v) if isinstance(v, float) and not math.isfinite(v) else v
                       for key, v in record.items()}, allow_nan=False)


def describe(cfg):
    """The run's first line: the recipe, stages, sizes and budget it took."""
    recipe = f"recipe {cfg.recipe}" if cfg.recipe else "no recipe (defaults for a real run)"
    return (f"{recipe}: U-Nets {', '.join(cfg.unets)} at {', '.join(map(str, cfg.sizes))} px, "
            f"{' + '.join(map(str, cfg.steps))} steps of batch {', '.join(map(str, cfg.batch_size))}, lr {cfg.lr:g}, "
            f"EMA {cfg.ema_decay:g}, {', '.join(cfg.precision)}, data {cfg.data}")


def train(cfg):
    """Data -> text cache -> cascade -> every stage's loop -> the final sample grid."""
    StopSignal.install()
    rank, world, device = setup_distributed()
    if rank == 0:
        print(describe(cfg))
    size = cfg.sizes[-1]
    dataset = data.make_dataset(cfg.data, size, seed=cfg.seed)
    train_set, heldout_set = data.holdout_split(dataset, cfg.holdout, size)
    if getattr(dataset, "truncated", None):
        print(f"warning: {len(dataset.truncated)} truncated shards (first: {dataset.truncated[0]}): their samples "
              "up to the break are used, the rest skipped")
    encoder = text.resolve(cfg.encoder, registry.ENCODERS)
    config = cascade_config(cfg, encoder)
    os.makedirs(cfg.out, exist_ok=True)
    cache = text.EmbeddingCache(cfg.cache_dir, encoder, config["max_text_len"], device, cfg.encoder_dtype)
    if world > 1:
        dist.barrier()  # every rank has read the same cache state before the work is split
    cache.precompute(dataset.captions(), rank=rank, world_size=world, progress=rank == 0)
    if world > 1:
        dist.barrier()  # every shard is written before anyone trains
    images, captions = data.first_usable(heldout_set, HELDOUT_N)
    if not captions:
        raise ValueError(f"none of the {len(heldout_set)} held-out samples of --data {cfg.data!r} is usable; "
                         "hold out more with --holdout")
    heldout = Heldout(images, captions)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank and every run of the same command
    cascade = imagen.Imagen(config).to(device)
    log_file = open(os.path.join(cfg.out, "log.jsonl"), "a") if rank == 0 else None

    def log(record):
        if log_file:
            log_file.write(json_line(record) + "\n")
            log_file.flush()

    todo = [cfg.only_unet] if cfg.only_unet >= 0 else range(len(cfg.unets))
    for k in todo:
        parts = train_stage(cfg, config, cascade, k, train_set, heldout, cache, log, (rank, world, device))
    if rank == 0:
        path = os.path.join(cfg.out, "samples.png")
        log(dict(unet=parts.k, event="grid", path=path,
                 prompts=write_grid(cascade, parts, cache, path, heldout, cfg.only_unet)))
        print(f"checkpoints in {cfg.out}/, samples in {path}")
    if world > 1:
        dist.barrier()  # no rank tears the group down while rank 0 still writes


def main(argv=None):
    try:
        train(parse_config(argv))
    except (ValueError, OSError) as e:  # bad flags, checkpoints, data folders, encoder ids; a full disk
        raise SystemExit(f"error: {imagen.first_line(e)}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
