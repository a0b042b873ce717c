"""Train an Imagen cascade: `python train.py` trains the `shapes` recipe on the built-in data (a 2-core CPU).

`python train.py --recipe real-cpu --data DIR` trains on your captioned images; `--recipe real-gpu` on a GPU;
`--unets a,b` without a recipe takes defaults that suit a real run. Any flag overrides a recipe's value.
Every listed U-Net trains in turn for its step budget; `--only-unet K` trains one, so stages can run as parallel
jobs writing to the same --out folder (one checkpoint file per U-Net). Re-running the same command resumes
exactly. SIGTERM or Ctrl-C finishes the current step, saves and exits with 128 + the signal number (143, 130);
a second Ctrl-C stops at once. Multi-GPU: `torchrun --nproc_per_node=N train.py ...` (DDP from torchrun's env vars).
"""
import contextlib
import copy
import dataclasses
import hashlib
import importlib
import json
import math
import multiprocessing
import os
import resource
import signal
import statistics
import sys
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from PIL import Image
from tqdm import tqdm

import data
import imagen
import registry
import text
from settings import PER_STAGE, SAME_ON_RESUME, cascade_config, layout_window, parse_config

GRID_PROMPTS, HELDOUT_N = 8, 64  # images in a sample grid; held-out samples whose loss is logged
MAX_UNUSABLE = 1000  # consecutive unusable samples (unreadable image or no caption) before training stops
MAX_BAD_STEPS = 10  # consecutive non-finite losses before training stops
TUNE_EVERY, TUNE_STEPS = 500, 3  # CPU thread counts are re-timed every TUNE_EVERY steps, TUNE_STEPS steps each
SLOWDOWN = 3  # ... and at once after a step this many times slower than its count's median
STARTUP_THREADS = torch.get_num_threads()  # torch's count (the cores, or OMP_NUM_THREADS) before a tuner sets it
CHECKPOINT_KEYS = ("config", "model", "ema", "ema_n", "optimizer", "scaler", "step", "position", "elapsed", "skipped")


# ---- the pieces of one optimizer step ----

def learning_rate(cfg, k, step):
    """Linear warmup, then cosine decay to lr * lr_final at the end of stage k's budget (Loshchilov & Hutter 2017)."""
    warmup = min(1.0, (step + 1) / max(1, cfg.warmup))
    progress = min(1.0, step / cfg.steps[k])
    return cfg.lr[k] * warmup * (cfg.lr_final + (1 - cfg.lr_final) * (1 + math.cos(math.pi * progress)) / 2)


def layout_level(cfg, k, step):
    """The layout phase's lowest noise level while stage k's step lies in its --layout-phase window, else None."""
    start, end = layout_window(cfg.layout_phase[k])
    return cfg.layout_level if start <= step / cfg.steps[k] < end else None


class EMA:
    """The U-Net's weights and buffers, averaged: update n (from 0) lerps them by 1 - min(decay, (1 + n) / (10 + n))."""

    def __init__(self, unet, decay):
        self.module, self.decay, self.n = copy.deepcopy(unet).requires_grad_(False), decay, 0
        self.pairs = [list(m.state_dict().values()) for m in (self.module, unet)]  # views of the tensors themselves

    def follow(self):
        torch._foreach_lerp_(*self.pairs, 1 - min(self.decay, (1 + self.n) / (10 + self.n)))  # one fused kernel
        self.n += 1


def step_outcome(loss, norm, fp16):
    """"applied"; "overflow": fp16 gradients overflowed, and GradScaler lowers its scale; else "non-finite"."""
    finite = math.isfinite(loss)
    return "applied" if finite and math.isfinite(norm) else "overflow" if finite and fp16 else "non-finite"


class Parts(NamedTuple):
    """What trains stage k: its Stage, the model that runs it (DDP, compiled), optimizer, EMA, scaler."""
    k: int
    stage: imagen.Stage
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    ema: EMA
    scaler: torch.amp.GradScaler
    autocast: dict
    memory_format: torch.memory_format


def available_memory(device):
    """Bytes free for training: the GPU's free memory, or the RAM Linux says is available (and within the address-space
    limit, where one is set); unlimited where the system does not say (no /proc/meminfo: no check)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what PyTorch's allocator keeps for freed tensors is free to the next stage
        return torch.cuda.mem_get_info(device)[0]
    limit = max(resource.getrlimit(resource.RLIMIT_AS)[0], 0) or math.inf  # RLIM_INFINITY is -1
    if not os.path.exists("/proc/meminfo"):
        return limit
    meminfo = dict(line.split(":") for line in open("/proc/meminfo"))
    return min(int(meminfo["MemAvailable"].split()[0]) * 1024, limit)


def check_memory(cfg, config, k, device):
    """A one-line ValueError, before anything is allocated, where stage k needs more memory than the device has."""
    need = imagen.training_cost(config, k, cfg.batch_size[k], bool(cfg.checkpointing[k]))["bytes"]
    free = available_memory(device)
    if need > free:
        raise ValueError(f"unet{k} ({cfg.unets[k]}) needs about {need / 2**30:.1f} GiB to train at --batch-size "
                         f"{cfg.batch_size[k]}, and {device.type} has {free / 2**30:.1f} GiB free: use a GPU, a "
                         "smaller preset or --batch-size, or --checkpointing 1")


def build_parts(cfg, cascade, k, device, world):
    """Stage k on the device with its optimizer, EMA and grad scaler."""
    check_memory(cfg, cascade.config, k, device)
    imagen.reuse_freed_memory(device)
    memory_format = torch.channels_last if cfg.channels_last[k] else torch.contiguous_format
    stage = cascade.stages[k].to(device, memory_format=memory_format)
    stage.unet.checkpointing = bool(cfg.checkpointing[k])
    opt = torch.optim.AdamW(stage.parameters(), lr=cfg.lr[k], betas=(0.9, 0.99), weight_decay=0.01,
                            fused=True)  # one kernel for all parameters, not a Python loop over them
    ema = EMA(stage.unet, cfg.ema_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision[k] == "fp16")
    model = DistributedDataParallel(stage) if world > 1 else stage
    model = torch.compile(model, mode=cfg.compile) if cfg.compile else model
    autocast = dict(device_type=device.type, dtype=torch.bfloat16 if cfg.precision[k] == "bf16" else torch.float16,
                    enabled=cfg.precision[k] != "fp32")
    return Parts(k, stage, model, opt, ema, scaler, autocast, memory_format)


def optimizer_step(parts, micro_batches, lr, level, world, grad_clip):
    """One optimizer step over [(images [b,3,s,s] in [-1,1], text embeds, mask)] -> (loss, step_outcome). Under DDP
    the loss is the mean over ranks, so every rank reaches the same outcome."""
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
        parts.ema.follow()
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
    if cfg.init_from and init_from(parts, cfg.init_from, path, rank):
        log(dict(unet=k, step=0, event=f"initialised from {cfg.init_from}"))
    first_step = saved_step = state["step"]
    bad_steps, shown = 0, {}
    tuner = ThreadTuner.for_run(cfg.threads, device)
    sampler = data.EpochSampler(len(train_set), cfg.seed, state["position"], rank, world)
    loader = torch.utils.data.DataLoader(train_set, sampler=sampler, batch_size=cfg.batch_size[k],
                                         num_workers=cfg.workers, collate_fn=data.collate)  # iterated once: endless
    batches, signum = iter(loader), 0

    def save():
        nonlocal saved_step
        if rank == 0 and saved_step != state["step"]:
            imagen.save_checkpoint(checkpoint(parts, config, cfg, state), path, keep=cfg.keep)
        saved_step = state["step"]

    bar = tqdm(total=cfg.steps[k], initial=state["step"], desc=f"unet{k} {cfg.unets[k]}",  # --only-unet K: line K
               disable=rank != 0 or first_step >= cfg.steps[k], position=max(cfg.only_unet, 0))
    wall_start = time.perf_counter()  # this process's wall clock of the loop: steps, evaluation, saves, logging
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
        bar.set_postfix(loss=f"{loss:.4f}", **shown, img_s=f"{ips:.1f}", threads=threads, refresh=False)
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
            held = heldout_loss(parts, heldout, cache, device)
            shown["heldout"] = f"{held:.4f}"
            log(dict(unet=k, step=step, heldout_loss=held, minutes=round(state["elapsed"] / 60, 2)))
    bar.close()
    save()
    wall_minutes = round((time.perf_counter() - wall_start) / 60, 4)
    if signum:
        name = signal.Signals(signum).name
        log(dict(unet=k, step=state["step"], event=f"stopped by {name}", minutes=round(state["elapsed"] / 60, 2)))
        end_run(rank, f"stopped by {name} at unet{k} step {state['step']}: saved {path}; re-run the same command "
                "to resume", 128 + signum)
    parts.stage.unet.load_state_dict(parts.ema.module.state_dict())  # later stages' grids sample its EMA weights
    if state["step"] == first_step:  # nothing trained here (it trained beside this process, or was past its budget)
        return parts
    held = heldout_loss(parts, heldout, cache, device) if rank == 0 else None
    log(dict(unet=k, step=state["step"], event="done", minutes=round(state["elapsed"] / 60, 2),
             wall_minutes=wall_minutes, skipped=state["skipped"], heldout_loss=held))
    if rank == 0:
        print(f"unet{k}: {state['step']} of {cfg.steps[k]} steps in {state['elapsed'] / 60:.1f} minutes of training "
              f"({wall_minutes:.1f} of wall clock here), held-out loss {held:.4f}")
    return parts


def shared_clock_and_signal(elapsed, rank, world, device):
    """(training seconds, stop signal number): under DDP every rank takes rank 0's clock and any rank's signal, so
    that all ranks stop at the same step."""
    if world == 1:
        return elapsed, StopSignal.signum
    shared = torch.tensor([elapsed if rank == 0 else 0.0, StopSignal.signum], dtype=torch.float64, device=device)
    dist.all_reduce(shared, dist.ReduceOp.MAX)  # clocks and signal numbers are >= 0
    return shared[0].item(), int(shared[1].item())


def checkpoint(parts, config, cfg, state):
    """The one checkpoint dict of a stage: cascade, settings, weights, EMA, optimizer, scaler and position."""
    return dict(config=config, settings=dataclasses.asdict(cfg), unet=parts.k, model=parts.stage.unet.state_dict(),
                ema=parts.ema.module.state_dict(), ema_n=parts.ema.n, optimizer=parts.opt.state_dict(),
                scaler=parts.scaler.state_dict(), **state)


def resume(parts, path, config, cfg, device):
    """Load stage k's checkpoint into parts if one exists -> its counters ({} if none; older: no data_digest).
    Refuses another cascade's checkpoint or settings that would change the run's meaning; notes a changed budget."""
    if not os.path.exists(path):
        return {}
    s = imagen.require(imagen.load_checkpoint(path, device), path, CHECKPOINT_KEYS)
    if mismatch := imagen.cascade_mismatch(s["config"], config, parts.k):
        raise ValueError(f"{path} holds U-Net {parts.k} of another cascade ({mismatch}, checkpoint -> this "
                         "command); use another --out or the command that made it")
    settings_changed(s.get("settings"), cfg, parts.k, path)
    for part, key in ((parts.stage.unet, "model"), (parts.ema.module, "ema"), (parts.opt, "optimizer"),
                      (parts.scaler, "scaler")):
        part.load_state_dict(s[key])
    parts.ema.n = int(s["ema_n"])
    return {key: s[key] for key in ("step", "position", "elapsed", "skipped", "data_digest") if key in s}


def init_from(parts, source, path, rank):
    """Stage k's U-Net and EMA from the source's stage k weights (its EMA's where stored) -> whether it did: a
    checkpoint at `path` resumes instead. A one-line ValueError where the source has no stage k or other shapes."""
    if os.path.exists(path):
        if rank == 0:
            print(f"note: unet{parts.k} resumes from {path}; --init-from applies only to a stage without a checkpoint")
        return False
    _, weights, _ = imagen.load_weights(source)
    if parts.k not in weights:
        raise ValueError(f"--init-from {source!r} has no trained U-Net {parts.k} (it has U-Nets {sorted(weights)})")
    imagen.load_unet(parts.stage.unet, weights[parts.k], f"--init-from {source!r} U-Net {parts.k}")
    parts.ema.module.load_state_dict(weights[parts.k])
    return True


def settings_changed(old, cfg, k, path):
    """Refuse a resume whose settings change the run's meaning; print one line for a changed budget."""
    if old is None:
        print(f"note: {path} was written before checkpoints stored their settings; resuming with this command's")
        return
    for name in (*SAME_ON_RESUME, "steps"):
        before, now = old.get(name), getattr(cfg, name)
        if name in PER_STAGE:
            before, now = before[k] if isinstance(before, (list, tuple)) else before, now[k]  # older: one for all
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


def heldout_loss(parts, heldout, cache, device):
    """Stage loss of the EMA weights on the held-out samples at fixed noise (imagen.fixed_noise_loss)."""
    emb, mask = cache(heldout.captions)  # [n, max_len, d], [n, max_len]
    with ema_unet(parts), torch.autocast(**parts.autocast):
        return imagen.fixed_noise_loss(parts.stage, heldout.images.to(device), emb.to(device), mask.to(device))


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
    """Trains at the CPU thread count that runs steps fastest under the machine's current load (speed only). A round
    of trials gives each count TUNE_STEPS real steps, taking turns (a passing load hits them alike); the rest of the
    round uses the fastest (median). A round lasts TUNE_EVERY steps; one that chose fewer threads than all, 1/8, 1/4,
    1/2 of that in a row; a step SLOWDOWN times slower, or the end of a stage training beside this one, starts one.
    Another program on a core slows all counts but 1."""

    def __init__(self, options):
        self.options, self.seconds = options, {}  # seconds: thread count -> this round's step times
        self.start, self.streak = 0, 0  # this round's first step; rounds in a row that chose fewer threads than all
        self.children = 0  # this process's running children at the last step: stages beside it, loader workers

    @classmethod
    def for_run(cls, flag, device):
        """Tuner over N, N/2, ..., 1 threads (`flag` auto on a CPU; N = STARTUP_THREADS), or the count `flag` gives."""
        most = STARTUP_THREADS if flag == "auto" else int(flag)
        torch.set_num_threads(most)
        return cls([most] if flag != "auto" or device.type != "cpu" else
                   sorted({most >> i for i in range(most.bit_length())} - {0}, reverse=True))

    def choose(self, step):
        """Set and return the thread count for optimizer step `step`."""
        done = all(len(self.seconds.get(n, ())) == TUNE_STEPS for n in self.options)
        fastest = min(self.options, key=lambda n: statistics.median(self.seconds[n])) if done else None
        fewer = fastest not in (None, self.options[0])
        length = TUNE_EVERY >> max(0, 3 - self.streak) if fewer else TUNE_EVERY
        children = len(multiprocessing.active_children())
        if step - self.start >= length or children < self.children:  # a new round
            self.start, self.seconds, self.streak, fastest = step, {}, self.streak + 1 if fewer else 0, None
        self.children = children
        threads = fastest or min(self.options, key=lambda n: len(self.seconds.get(n, ())))  # the trials take turns
        torch.set_num_threads(threads)
        return threads

    def record(self, threads, seconds):
        """Time one step at `threads` if this round is still timing that count; a step SLOWDOWN times slower than
        that count's median means the machine's load changed: every count is timed again from the next step."""
        times = self.seconds.setdefault(threads, [])
        if len(times) < TUNE_STEPS:
            times.append(seconds)
        elif seconds > SLOWDOWN * statistics.median(times):
            self.seconds = {}


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


def setup_distributed(name):
    """(rank, world_size, device) from torchrun's env vars and --device; a single process without them."""
    device = torch.device(registry.pick_device(name))
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "mps":
        raise ValueError("--device mps trains in one process: torch.distributed's backends (nccl, gloo) take cuda and "
                         "cpu tensors only; give torchrun --device cuda or cpu")
    cuda = device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, local = dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    return rank, dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu")


class Tracker:
    """--tracker wandb or tensorboard: each log.jsonl record's numbers as scalars `unetK/name` at the record's step,
    its sample grid as the image `unetK/samples`. The package is imported here, and only when chosen."""

    def __init__(self, kind, out, settings):
        self.kind = kind
        try:
            module = importlib.import_module("wandb" if kind == "wandb" else "torch.utils.tensorboard")
        except ImportError as e:
            raise ValueError(f'--tracker {kind}: pip install -e ".[{kind}]" ({imagen.first_line(e)})') from None
        if kind == "wandb":  # the stages of one --out folder (--parallel-stages: processes) are one W&B group
            folder = hashlib.sha1(os.path.abspath(out).encode()).hexdigest()[:8]  # alike in every stage's process
            self.run = module.init(project="nanoimagen", dir=out, config=settings,
                                   group=os.environ.get("WANDB_RUN_GROUP") or f"nanoimagen-{folder}")
            self.image, self.close = module.Image, self.run.finish  # W&B writes the run's summary only at finish
        else:
            self.writer = module.SummaryWriter(os.path.join(out, "tensorboard"))
            self.close = self.writer.close

    def __call__(self, record):
        k, step, grid = record["unet"], record.get("step"), record["path"] if record.get("event") == "grid" else None
        numbers = {f"unet{k}/{key}": v for key, v in record.items()
                   if key not in ("unet", "step") and type(v) in (int, float)}  # not None, True or strings
        if self.kind == "wandb":
            images = {f"unet{k}/samples": self.image(grid)} if grid else {}
            self.run.log({**numbers, **images, f"unet{k}/step": step})
            return
        for tag, value in numbers.items():
            self.writer.add_scalar(tag, value, step)
        if grid:
            pixels = np.asarray(Image.open(grid).convert("RGB"))  # [h, w, 3]
            self.writer.add_image(f"unet{k}/samples", pixels, step, dataformats="HWC")
        self.writer.flush()


def end_run(rank, message, status):
    """End every rank with exit status `status`; rank 0 prints the one-line message."""
    if rank == 0:
        print(message, file=sys.stderr)
    raise SystemExit(status)


def describe(cfg):
    """The run's first line: the recipe, stages, sizes and budget it took."""
    recipe = f"recipe {cfg.recipe}" if cfg.recipe else "no recipe (defaults for a real run)"
    sizes, batches, lrs = (", ".join(f"{v:g}" for v in values) for values in (cfg.sizes, cfg.batch_size, cfg.lr))
    return (f"{recipe}: U-Nets {', '.join(cfg.unets)} at {sizes} px, {' + '.join(map(str, cfg.steps))} steps of "
            f"batch {batches}, lr {lrs}, EMA {cfg.ema_decay:g}, {', '.join(cfg.precision)}, data {cfg.data}")


def train(cfg, beside=False):
    """Data -> text cache -> cascade -> every stage's loop -> the final sample grid (left to the first if `beside`)."""
    StopSignal.install()
    rank, world, device = setup_distributed(cfg.device)
    if rank == 0 and not beside:
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
    track = Tracker(cfg.tracker, cfg.out, dataclasses.asdict(cfg)) if rank == 0 and cfg.tracker != "none" else None
    cache = text.EmbeddingCache(cfg.cache_dir, encoder, config["max_text_len"], device, cfg.encoder_dtype)
    if world > 1:
        dist.barrier()  # every rank has read the same cache state before the work is split
    cache.precompute(dataset.captions(), rank=rank, world_size=world, progress=rank == 0)
    if world > 1:
        dist.barrier()  # every shard is written before anyone trains
    heldout = Heldout(*data.first_usable(heldout_set, HELDOUT_N))
    if not heldout.captions:
        raise ValueError(f"none of the {len(heldout_set)} held-out samples of --data {cfg.data!r} is usable; "
                         "hold out more with --holdout")
    torch.manual_seed(cfg.seed)  # same initial weights on every rank and every run of the same command
    cascade = imagen.Imagen(config).to(device)
    log_file = open(os.path.join(cfg.out, "log.jsonl"), "a") if rank == 0 else None

    def log(record):
        """A strict-JSON line per record (non-finite numbers as the strings "nan", "inf"); as it is to --tracker."""
        if track:
            track(record)
        if log_file:
            record = {key: str(v) if isinstance(v, float) and not math.isfinite(v) else v for key, v in record.items()}
            log_file.write(json.dumps(record, allow_nan=False) + "\n")
            log_file.flush()

    stages = [cfg.only_unet] if cfg.only_unet >= 0 else list(range(len(cfg.unets)))
    jobs = start_beside(cfg, stages) if cfg.parallel_stages and device.type == "cpu" and world == 1 else {}
    try:
        for k in stages:
            parts = None  # the last stage's optimizer and EMA are freed before this stage is built
            if k in jobs:  # it trained beside the first stage: wait for it, then resume it at its end
                jobs[k].join()
                if jobs[k].exitcode:
                    end_run(rank, f"error: unet{k}, trained beside unet0, stopped with exit status {jobs[k].exitcode}"
                            " (its message is above); re-run the same command to resume", 1)
            parts = train_stage(cfg, config, cascade, k, train_set, heldout, cache, log, (rank, world, device))
        if rank == 0 and not beside:
            path = os.path.join(cfg.out, "samples.png")
            log(dict(unet=parts.k, event="grid", path=path,
                     prompts=write_grid(cascade, parts, cache, path, heldout, cfg.only_unet)))
            print(f"checkpoints in {cfg.out}/, samples in {path}")
    finally:  # also when a signal stops the run
        for job in jobs.values():  # stages still training beside this one save and stop (SIGTERM)
            job.terminate()
        if track:
            track.close()
    if world > 1:
        dist.barrier()  # no rank tears the group down while rank 0 still writes


def start_beside(cfg, stages):
    """--parallel-stages: every stage after the first trains in a new process of its own (as --only-unet K), each on
    a fixed equal share of the cores, while this one trains the first -> {stage: its process}."""
    share = str(max(1, STARTUP_THREADS // len(stages)))
    jobs = {k: multiprocessing.get_context("spawn").Process(target=main, kwargs=dict(cfg=dataclasses.replace(
        cfg, only_unet=k, parallel_stages=0, threads=share), beside=True)) for k in stages[1:]}
    for job in jobs.values():
        job.start()
    return jobs


def main(argv=None, cfg=None, beside=False):
    try:
        train(cfg or parse_config(argv), beside)
    except (ValueError, OSError) as e:  # bad flags, checkpoints, data folders, encoder ids; a full disk
        raise SystemExit(f"error: {imagen.first_line(e)}")
    except torch.OutOfMemoryError:  # the last checkpoint on disk is whole: saves are atomic
        raise SystemExit("error: out of GPU memory while training; the last checkpoint is untouched: re-run with a "
                         "smaller --batch-size (--grad-accum keeps the batch), --checkpointing 1 or --precision bf16")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
