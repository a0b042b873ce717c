"""Train an Imagen cascade: `python train.py` trains the default CPU cascade on the built-in shapes data.

Every listed U-Net trains in turn from one command; `--only-unet K` trains one, so stages can run as parallel
jobs writing to the same --out folder (one checkpoint file per U-Net). Re-running the same command resumes
exactly. SIGTERM or Ctrl-C finishes the current step, saves and exits with 128 + the signal number (143, 130);
a second Ctrl-C stops at once. Multi-GPU: `torchrun --nproc_per_node=N train.py ...` (DDP, detected from
torchrun's env vars).
"""
import argparse
import contextlib
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
from sample import save_grid

SAMPLE_PROMPTS = data.shapes_captions(8, seed=1234)  # the shapes grids' prompts
GRID_PROMPTS = 8  # images in a sample grid
HELDOUT_N = 64  # held-out samples whose loss is logged
DEFAULT_UNETS = "base-tiny,super-small"
MAX_UNUSABLE = 1000  # consecutive unusable samples (unreadable image or no caption) before training stops
DEFAULT_MINUTES = "13,5"  # the default cascade's budget: 20 minutes in all on a 2-core CPU, with start-up and samples
DEFAULT_LAYOUT_PHASE = "0.5:0.75"  # the base's layout phase, where the machine is fast enough: README, 6th/7th rounds
DEFAULT_RUN_STEPS = ((4408, 3198), (1287, 903))  # per stage of the default run, steps (idle, one core busy): README
MAX_BAD_STEPS = 10  # consecutive non-finite losses before training stops
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile modes
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # these replay CUDA graphs on a GPU
CHECKPOINT_KEYS = ("config", "model", "ema", "ema_n", "optimizer", "scaler", "step", "position", "elapsed",
                   "skipped")  # what Trainer.state() writes and resume() reads
TUNE_EVERY, TUNE_STEPS = 200, 3  # CPU thread counts are re-timed every TUNE_EVERY steps, TUNE_STEPS steps each
LEAST = dict(batch_size=1, grad_accum=1, log_every=1, save_every=0, sample_every=0, keep=0, workers=0, warmup=0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--unets", default=DEFAULT_UNETS, help="comma list of U-Net presets: " + ", ".join(registry.UNETS.names()))
    a("--sizes", default="32,64", help="comma list of image sizes, one per U-Net, increasing")
    a("--data", default="shapes", help="'shapes' (built-in), an image+caption folder, or a folder of .tar shards")
    a("--hflip", action="store_true", help="random horizontal flips of training images, seeded by the sample's "
      "position (off by default: flips break 'left'/'right' captions)")
    a("--encoder", default="minilm", help="text encoder: " + ", ".join(registry.ENCODERS.names()) + ", a HF id or a folder")
    a("--steps", default="0", help="optimizer steps per U-Net (comma list or one value; 0 = no step limit)")
    a("--minutes", default=None, help="training minutes per U-Net (comma list or one value; 0 = no time limit); "
      f"default {DEFAULT_MINUTES} without --steps, else 0")
    a("--batch-size", type=int, default=32, help="images per optimizer micro-step, per process")
    a("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    a("--lr", type=float, default=1e-3, help="AdamW learning rate after warmup")
    a("--warmup", type=int, default=100, help="linear learning-rate warmup steps")
    a("--lr-final", type=float, default=1.0, help="learning rate at the end of the step or time budget, as a "
      "fraction of --lr, reached by cosine decay (default 1: constant, measured best for the default run)")
    a("--layout-phase", default=None, help="START:END, fractions of a U-Net's budget between which it trains only "
      "at noise levels from --layout-level to 1, with a plain x0 loss: there the layout (which object goes where) is "
      "decided, and Min-SNR weighting leaves it unlearned; the steps after END restore the other levels; a comma list "
      f"per U-Net, 0 = none (default: {DEFAULT_LAYOUT_PHASE} for the base, 0 for super-resolution U-Nets; README, "
      "sixth and seventh rounds)")
    a("--layout-level", type=float, default=0.95, help="lowest noise level of the layout phase (0..1): README, ninth round")
    a("--layout-min-steps", type=int, default=2800, help="the layout phase runs only while the U-Net is on course "
      "for at least this many steps in its budget (steps so far / spent fraction): fewer leave too few steps before "
      "and after the phase, and it costs more than it gives (README, seventh round); 0 = always")
    a("--grad-clip", type=float, default=1.0, help="max global gradient norm")
    a("--ema-decay", type=float, default=0.995, help="EMA decay, warmed up as min(decay, (1+n)/(10+n))")
    a("--precision", default="fp32", help="autocast precision per U-Net: fp32, bf16 or fp16 (comma list or one value)")
    a("--channels-last", default="1", help="channels_last memory format per U-Net: 1 or 0 (comma list or one value)")
    a("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
      help="torch.compile each stage, in this mode (reduce-overhead: CUDA graphs, for small U-Nets on a GPU)")
    a("--family", default="ddpm", help="diffusion family per U-Net: " + ", ".join(registry.FAMILIES.names())
      + " (EDM, Karras et al. 2022: log-normal σ, preconditioned, heun sampler; comma list or one value)")
    a("--target", default=None, help="prediction target per U-Net: eps, x0 or v for ddpm (default v); edm for edm "
      "(comma list or one value)")
    a("--schedule", default="cosine", help="noise schedule per U-Net: " + ", ".join(registry.SCHEDULES.names()))
    a("--timesteps", default="1000", help="diffusion steps T per U-Net")
    a("--min-snr-gamma", default="5", help="Min-SNR-γ loss weighting per U-Net (0 = off; ddpm U-Nets only)")
    a("--crop", default=None, help="super-resolution U-Nets train on random crops of this side and sample whole "
      "images (Imagen App. F); a comma list per U-Net, 0 = whole images, the base takes 0 (default: half of each "
      "super-resolution size, 0 for the base: 3.4x the steps per minute, measured, see README)")
    a("--cond-drop-prob", type=float, default=0.1, help="probability of dropping the text (classifier-free guidance)")
    a("--cond-scale", default=None, help="default guidance scale per U-Net, stored for sampling (default: 3 for the "
      "base, 1 for super-resolution stages: measured best on shapes)")
    a("--sample-steps", default="20", help="default sampler steps per U-Net, stored for sampling")
    a("--lowres-noise", type=float, default=imagen.SAMPLING_DEFAULTS["lowres_noise"],
      help="default noise level of low-res conditions at sampling (a fraction of T), stored for sampling")
    a("--seed", type=int, default=0)
    a("--out", default="out", help="checkpoint/log/sample folder; re-running with the same folder resumes")
    a("--only-unet", type=int, default=None, help="train only U-Net K (0-based), e.g. as one of parallel jobs")
    a("--sample-every", type=int, default=0, help="write a sample grid every N steps (0 = only at the end)")
    a("--save-every", type=int, default=500, help="write a checkpoint every N steps (and at the end)")
    a("--keep", type=int, default=0, help="also keep the N newest older checkpoints per U-Net, as unetK-stepNNNNNN.pt")
    a("--log-every", type=int, default=10, help="append to log.jsonl every N steps")
    a("--holdout", type=float, default=0.02, help="samples of a folder or shards never trained on: a count, or a "
      "fraction below 1 (a fixed choice per dataset size); the loss of the first 64 is logged")
    a("--eval-every", type=int, default=100, help="log the held-out loss every N steps (0 = only at the end)")
    a("--threads", default="auto", help="CPU threads for training: a number, or auto (the fastest of N, N/2, ..., "
      "1 for this machine's load, timed on real steps every 200 steps; N = torch's default). A switch of count changes "
      "the order of float sums: weights are bit-identical between runs and resumes only at a fixed count")
    a("--workers", type=int, default=1, help="DataLoader worker processes")
    a("--cache-dir", default=text.DEFAULT_CACHE_DIR, help="text-embedding cache folder")
    a("--encoder-dtype", default="fp32", choices=list(text.DTYPES), help="text encoder precision for the caption "
      "precompute (bf16 halves a T5's memory on a GPU)")
    return p.parse_args(argv)


def csv(value, cast, n, flag):
    """Parse a comma list for `flag`, broadcast to n U-Nets (n=None: as given)."""
    try:
        values = [cast(v) for v in str(value).split(",")]
    except ValueError:
        raise ValueError(f"{flag} {value!r} is not a comma list of {cast.__name__}") from None
    try:
        return values if n is None else imagen.per_stage(values, n)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None


def build_config(args, encoder):
    """The whole cascade as plain data: everything sample.py needs to rebuild it. The encoder's width is looked up
    last: for a hub id that may mean a download."""
    names = args.unets.split(",")
    n = len(names)
    sizes = csv(args.sizes, int, None, "--sizes")
    if len(sizes) != n:
        raise ValueError(f"--sizes {args.sizes!r} gives {len(sizes)} sizes for {n} U-Nets {names}")
    if sizes != sorted(set(sizes)):
        raise ValueError(f"--sizes {args.sizes!r} must be strictly increasing")
    multiples = [unet.size_multiple(**registry.UNETS[name]) for name in names]
    for k, (name, size, m) in enumerate(zip(names, sizes, multiples)):
        if size < m or size % m:
            raise ValueError(f"--sizes {args.sizes!r}: {size} (U-Net {k}, {name}) must be a positive multiple of {m}, "
                             f"which this U-Net downsamples by")
    families = [registry.FAMILIES.canonical(f) for f in csv(args.family, str, n, "--family")]
    targets = (["edm" if f == "edm" else imagen.STAGE_DEFAULTS["target"] for f in families] if args.target is None
               else csv(args.target, str, n, "--target"))
    for k, (family, target) in enumerate(zip(families, targets)):
        if (family == "edm") != (target == "edm"):
            raise ValueError(f"--target {target!r} for U-Net {k} ({family}): edm U-Nets take edm, ddpm ones eps, x0 or v")
    per = dict(target=targets, schedule=csv(args.schedule, str, n, "--schedule"),
               timesteps=csv(args.timesteps, int, n, "--timesteps"),
               min_snr_gamma=csv(args.min_snr_gamma, float, n, "--min-snr-gamma"))
    per["crop"] = ([0] + [size // 2 // m * m for size, m in zip(sizes[1:], multiples[1:])] if args.crop is None
                   else csv(args.crop, int, n, "--crop"))
    for k, (name, size, crop, m) in enumerate(zip(names, sizes, per["crop"], multiples)):
        if crop and (k == 0 or not 0 < crop < size or crop % m):
            raise ValueError(f"--crop {args.crop!r}: {crop} for U-Net {k} ({name}); a super-resolution U-Net takes 0 "
                             f"or a multiple of {m} below its size {size}, the base 0")
    allowed = (*diffusion.TARGETS, *diffusion.EDM.TARGETS)
    unknown = set(per["target"]) - set(allowed)
    if unknown:
        raise ValueError(f"--target {args.target!r}: unknown {sorted(unknown)}; choose from {', '.join(allowed)}")
    if min(per["timesteps"]) < 2:
        raise ValueError(f"--timesteps {args.timesteps!r}: every U-Net needs at least 2 diffusion steps")
    stages = []
    for k, name in enumerate(names):
        stages.append(dict(unet=registry.UNETS.canonical(name), unet_kwargs=dict(registry.UNETS[name]),
                           size=sizes[k], target=per["target"][k], schedule=registry.SCHEDULES.canonical(per["schedule"][k]),
                           timesteps=per["timesteps"][k], cond_drop_prob=args.cond_drop_prob,
                           min_snr_gamma=None if families[k] == "edm" else per["min_snr_gamma"][k] or None))
        if families[k] != imagen.STAGE_DEFAULTS["family"]:  # only then: runs from before --family still resume
            stages[k]["family"] = families[k]
        if per["crop"][k]:  # likewise for --crop
            stages[k]["crop"] = per["crop"][k]
    scales = [3.0] + [1.0] * (n - 1) if args.cond_scale is None else csv(args.cond_scale, float, n, "--cond-scale")
    sampling = dict(cond_scale=scales,
                    steps=csv(args.sample_steps, int, n, "--sample-steps"), lowres_noise=args.lowres_noise)
    if "edm" in families:  # EDM's Algorithm 2 on edm U-Nets
        sampling["sampler"] = ["heun" if f == "edm" else imagen.SAMPLING_DEFAULTS["sampler"] for f in families]
    return dict(encoder=args.encoder, text_embed_dim=encoder_width(encoder),
                max_text_len=max(s["unet_kwargs"]["max_text_len"] for s in stages),
                stages=stages, sampling=sampling, holdout=args.holdout)


def encoder_width(encoder):
    """The text encoder's embedding width; a ValueError naming the encoder if its config cannot be read."""
    try:
        return text.encoder_dim(encoder)
    except OSError as e:
        raise ValueError(f"--encoder {encoder['name']!r}: cannot read its config ({imagen.first_line(e)})") from None


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


def make_loader(args, dataset, position, rank, world):
    """DataLoader over the training data from global sample `position`, split by rank (data.EpochSampler)."""
    sampler = data.EpochSampler(len(dataset), args.seed, position, rank, world, shuffle=args.data != "shapes")
    return torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=args.batch_size, num_workers=args.workers,
                                       collate_fn=data.collate, persistent_workers=args.workers > 0)


def ema_multi_avg(decay):
    """EMA update for AveragedModel with warmup: decay_n = min(decay, (1 + n) / (10 + n))."""
    def update(ema_params, params, n):
        d = min(decay, (1 + float(n)) / (10 + float(n)))
        torch._foreach_lerp_(ema_params, params, 1 - d)
    return update


def step_outcome(loss, norm, fp16):
    """"applied"; "overflow": fp16 gradients overflowed, which GradScaler answers by lowering its scale (not a bad
    step); "non-finite": a bad step (a non-finite loss, or a non-finite gradient norm without fp16)."""
    if not math.isfinite(loss):
        return "non-finite"
    if math.isfinite(norm):
        return "applied"
    return "overflow" if fp16 else "non-finite"


class ThreadTuner:
    """Trains at the CPU thread count that runs steps fastest under the machine's current load. At the start of
    every TUNE_EVERY steps each option runs TUNE_STEPS real training steps; the rest use the fastest (median).
    Every op waits for all of torch's threads: on the 2-core CPU, with one core kept busy by another program,
    a base step took 1.34 s on 2 threads and 0.33 s on 1 (README, Results)."""

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


class Trainer:
    """Optimizer, EMA, scaler and position of one stage; `step()` does one optimizer step."""

    def __init__(self, args, cascade, k, device, rank, world):
        self.args, self.k, self.device, self.rank, self.world = args, k, device, rank, world
        self.precision, self.channels_last = args.precisions[k], args.channels_lasts[k]
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.stage = cascade.stages[k].to(device, memory_format=self.memory_format)
        self.opt = torch.optim.AdamW(self.stage.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01,
                                     fused=True)  # one kernel for all parameters: 5x faster than the default loop
        self.ema = AveragedModel(self.stage.unet, multi_avg_fn=ema_multi_avg(args.ema_decay), use_buffers=True)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.step, self.position, self.elapsed, self.skipped, self.bad_steps = 0, 0, 0.0, 0, 0
        self.level = None  # the layout level of the last step (None: the Min-SNR loss over all levels)
        self.data_digest = ""  # a running sha1 of the captions trained on, in order (see `batches`)
        self.saved_step, self.signum = None, 0  # the step on disk; a stop signal that any rank received
        self.threads = ThreadTuner.for_run(args.threads, device)
        self.path = imagen.checkpoint_path(args.out, k)
        model = DistributedDataParallel(self.stage) if world > 1 else self.stage
        self.model = torch.compile(model, mode=args.compile) if args.compile else model
        self.autocast = dict(device_type=device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16,
                             enabled=self.precision != "fp32")

    def state(self, config):
        return dict(config=config, unet=self.k, model=self.stage.unet.state_dict(), ema=self.ema.module.state_dict(),
                    ema_n=self.ema.n_averaged, optimizer=self.opt.state_dict(), scaler=self.scaler.state_dict(),
                    step=self.step, position=self.position, elapsed=self.elapsed, skipped=self.skipped,
                    data_digest=self.data_digest)

    def resume(self, config):
        """Load this stage's checkpoint if one exists; refuse one from a different cascade."""
        if not os.path.exists(self.path):
            return
        s = imagen.require(imagen.load_checkpoint(self.path, self.device), self.path, CHECKPOINT_KEYS)
        mismatch = imagen.cascade_mismatch(s["config"], config, self.k)
        if mismatch:
            raise ValueError(f"{self.path} holds U-Net {self.k} of another cascade ({mismatch}, checkpoint -> this "
                             "command); use another --out or the command that made it")
        self.stage.unet.load_state_dict(s["model"])
        self.ema.module.load_state_dict(s["ema"])
        self.ema.n_averaged.copy_(s["ema_n"])
        self.opt.load_state_dict(s["optimizer"])
        self.scaler.load_state_dict(s["scaler"])
        self.step, self.position, self.elapsed, self.skipped = s["step"], s["position"], s["elapsed"], s["skipped"]
        self.data_digest = s.get("data_digest", "")
        self.saved_step = self.step

    def save(self, config):
        """Write this stage's checkpoint (rank 0) unless it already holds this step."""
        if self.rank == 0 and self.saved_step != self.step:
            imagen.save_checkpoint(self.state(config), self.path, keep=self.args.keep)
        self.saved_step = self.step

    def progress(self):
        """The spent fraction of this stage's budget: steps or minutes, whichever runs out first."""
        steps, minutes = self.args.step_limits[self.k], self.args.minute_limits[self.k]
        return max(self.step / steps if steps else 0.0, self.elapsed / (60 * minutes) if minutes else 0.0)

    def finished(self):
        """Whether the step or time budget is spent or a stop signal came. Under DDP every rank takes rank 0's clock
        and any rank's signal first, so that all ranks stop at the same step and use the same learning rate."""
        self.signum = StopSignal.signum
        if self.world > 1:
            shared = torch.tensor([self.elapsed if self.rank == 0 else 0.0, self.signum], dtype=torch.float64,
                                  device=self.device)
            dist.all_reduce(shared, dist.ReduceOp.MAX)  # clocks and signal numbers are >= 0
            self.elapsed, self.signum = shared[0].item(), int(shared[1].item())
        return self.progress() >= 1 or self.signum != 0

    def in_layout_window(self):
        """Whether the spent fraction of the budget lies inside this stage's --layout-phase window."""
        start, end = self.args.layout_phases[self.k]
        return start <= self.progress() < end

    def layout_level(self):
        """--layout-level inside the --layout-phase window while the stage is on course for --layout-min-steps steps
        (steps so far >= spent fraction * that), else None."""
        on_course = self.step >= self.progress() * self.args.layout_min_steps
        return self.args.layout_level if self.in_layout_window() and on_course else None

    def lr(self):
        """Linear warmup, then cosine decay to lr * lr_final at the end of the budget (Loshchilov & Hutter 2017)."""
        warmup = min(1.0, (self.step + 1) / max(1, self.args.warmup))
        final, progress = self.args.lr_final, min(1.0, self.progress())
        return self.args.lr * warmup * (final + (1 - final) * (1 + math.cos(math.pi * progress)) / 2)

    def timed_step(self, stream, micro_steps):
        """step_on over the stream's next micro-batches at the thread count the tuner chooses, timed with the data
        reads -> (loss, outcome, threads, seconds)."""
        threads = self.threads.choose(self.step)
        start = time.perf_counter()
        loss, outcome = self.step_on([next(stream) for _ in range(micro_steps)])
        seconds = time.perf_counter() - start
        self.threads.record(threads, seconds)
        return loss, outcome, threads, seconds

    def step_on(self, micro_batches):
        """One optimizer step over [(images [b,3,s,s] in [-1,1], text embeds, mask)] -> (loss, outcome): "applied",
        "overflow" (fp16: GradScaler skipped it and lowered its scale) or "non-finite" (skipped, a bad step).
        Under DDP the loss is the mean over ranks, so every rank reaches the same outcome."""
        torch.manual_seed(hash((self.args.seed, self.k, self.rank, self.step)) % 2**63)  # exact resume, no RNG state
        for group in self.opt.param_groups:
            group["lr"] = self.lr()
        total, self.level = 0.0, self.layout_level()  # the level is logged with the step
        for i, (images, emb, mask) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = self.model.no_sync() if self.world > 1 and not last else contextlib.nullcontext()
            with sync, torch.autocast(**self.autocast):
                loss = self.model(images, emb, mask, layout_level=self.level) / len(micro_batches)
            self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.opt)
        norm = torch.nn.utils.clip_grad_norm_(self.stage.parameters(), self.args.grad_clip)
        stats = torch.stack((total, norm))  # [2]; the norm is of the gradients DDP averaged: the same on every rank
        if self.world > 1:
            dist.all_reduce(stats)  # a non-finite loss on any rank makes the sum non-finite on every rank
        total, norm = (stats / self.world).tolist()  # the step's one host sync
        outcome = step_outcome(total, norm, fp16=self.scaler.is_enabled())
        if outcome == "applied":
            self.scaler.step(self.opt)
            self.ema.update_parameters(self.stage.unet)
            self.step += 1
        self.scaler.update()  # an overflow (found by unscale_) lowers the fp16 scale
        self.opt.zero_grad(set_to_none=True)
        self.bad_steps = 0 if outcome == "applied" else self.bad_steps + (outcome == "non-finite")
        return total, outcome


def batches(loader, cache, size, device, trainer):
    """Endless (images, embeds, mask) micro-batches at the stage size; counts skipped samples and fingerprints the
    captions read (trainer.data_digest: equal digests, equal data order)."""
    unusable = 0
    for images, captions, skipped in loader:
        position = trainer.position
        trainer.skipped += skipped
        trainer.position += (len(captions) + skipped) * trainer.world
        unusable = 0 if captions else unusable + skipped
        if unusable >= MAX_UNUSABLE:
            raise SystemExit(f"error: {unusable} samples in a row of --data {trainer.args.data!r} were unusable "
                             "(unreadable images or empty captions); check the data")
        if not captions:
            continue
        trainer.data_digest = hashlib.sha1("\n".join([trainer.data_digest, *captions]).encode()).hexdigest()
        emb, mask = cache(captions)  # [b, n, d], [b, n]: precomputed, never encoded here
        images = imagen.resize(images.to(device).float() / 127.5 - 1, size)  # [b, 3, size, size] in [-1, 1]
        if trainer.args.hflip:  # seeded by the batch's position: a resumed run flips the same samples
            seed = hash((trainer.args.seed, trainer.rank, position)) % 2**63
            flip = torch.rand(len(captions), generator=torch.Generator().manual_seed(seed)).to(device) < 0.5  # [b]
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        yield images.contiguous(memory_format=trainer.memory_format), emb.to(device), mask.to(device)


def precompute_captions(cache, dataset, rank, world):
    """Encode every caption of the dataset and of the sample grid once, before training; ranks split the work."""
    if world > 1:
        dist.barrier()  # every rank has read the same cache state before the work is split
    cache.precompute(dataset.captions() + SAMPLE_PROMPTS, rank=rank, world_size=world, progress=rank == 0)
    if world > 1:
        dist.barrier()  # every shard is written before anyone trains


@contextlib.contextmanager
def ema_weights(trainers):
    """Temporarily put each trained stage's EMA U-Net into the cascade (for sample grids)."""
    raw = {k: t.stage.unet for k, t in trainers.items()}
    for t in trainers.values():
        t.stage.unet = t.ema.module
    try:
        yield
    finally:
        for k, t in trainers.items():
            t.stage.unet = raw[k]


class Heldout(NamedTuple):
    """Samples training never reads: their loss is logged, their captions prompt the sample grids."""
    images: torch.Tensor  # uint8 [n, 3, s, s]
    captions: list
    prompts: list  # the grid's prompts: held-out captions (shapes: SAMPLE_PROMPTS)


def heldout_loss(t, size, heldout, cache):
    """Stage loss of the EMA weights on the held-out images at `size`, at fixed noise (imagen.fixed_noise_loss)."""
    emb, mask = cache(heldout.captions)  # [n, max_len, d], [n, max_len]
    images = imagen.resize(heldout.images.to(t.device).float() / 127.5 - 1, size)  # [n, 3, size, size]
    with ema_weights({t.k: t}), torch.autocast(**t.autocast):
        # contiguous, not channels_last: randn_like fills memory order, and eval.py's draws must be the same noise
        return imagen.fixed_noise_loss(t.stage, images, emb.to(t.device), mask.to(t.device), data.HOLDOUT_SEED)


def write_grid(cascade, trainers, cache, k, path, heldout, start_at=0):
    """Sample stages start_at..k with EMA weights into a PNG grid. Starting after the first stage, the chain is
    conditioned on held-out images at the previous stage's size, prompted by their own captions."""
    prompts, start_images, device = heldout.prompts, None, trainers[k].device
    if start_at:
        prompts = heldout.captions[:GRID_PROMPTS]
        lowres = cascade.config["stages"][start_at - 1]["size"]
        start_images = imagen.resize(heldout.images[:GRID_PROMPTS].to(device).float() / 255, lowres)  # [n, 3, s, s]
    emb, mask = cache(prompts)
    with ema_weights(trainers):
        images = cascade.sample(emb.to(device), mask.to(device), stop_at=k + 1, start_at=start_at,
                                start_images=start_images, generator=torch.Generator(device).manual_seed(0))
    save_grid(images, path, nrow=4)
    return prompts


def train_stage(args, config, cascade, trainers, k, cache, dataset, heldout, log):
    """Train stage k until its step or time budget runs out, and save it; a stop signal ends the run here."""
    t = trainers[k]
    if not t.finished():
        run_steps(args, config, cascade, trainers, k, cache, dataset, heldout, log)
    t.save(config)
    if t.signum:
        name = signal.Signals(t.signum).name
        log(dict(unet=k, step=t.step, event=f"stopped by {name}", minutes=round(t.elapsed / 60, 2)))
        end_run(t, f"stopped by {name} at unet{k} step {t.step}: saved {t.path}; re-run the same command to resume",
                128 + t.signum)
    log(dict(unet=k, step=t.step, event="done", minutes=round(t.elapsed / 60, 2), skipped=t.skipped,
             heldout_loss=heldout_loss(t, config["stages"][k]["size"], heldout, cache) if t.rank == 0 else None))
    if t.rank == 0:
        print(reached(args, k, t.step, t.elapsed))


def reached(args, k, steps, seconds):
    """The line a finished stage prints: steps and minutes, and for the default run what the README measured."""
    line = f"unet{k}: {steps} steps in {seconds / 60:.1f} minutes"
    if (args.unets, args.minutes, args.steps, args.data, args.crop, args.layout_phase) == (
            DEFAULT_UNETS, DEFAULT_MINUTES, "0", "shapes", None, None):
        idle, busy = DEFAULT_RUN_STEPS[k]
        line += (f" (the README's default run: {idle} steps on an idle 2-core CPU, {busy} with one core busy; "
                 "fewer steps than that mean lower scores)")
    return line


def grid_start(args, k):
    """The stage a grid of stage k starts at: k itself when only stage k trains here (its inputs are then real
    low-res images, not an untrained base's), else the first."""
    return k if args.only_unet is not None else 0


def run_steps(args, config, cascade, trainers, k, cache, dataset, heldout, log):
    """Optimizer steps on stage k until t.finished(): logs, held-out losses, periodic saves and sample grids."""
    t, stage_cfg = trainers[k], config["stages"][k]
    loader = make_loader(args, dataset, t.position, t.rank, t.world)
    stream = batches(loader, cache, stage_cfg["size"], t.device, t)
    shown, told = {}, False  # the tqdm line's last held-out loss; whether a skipped layout phase was reported
    with tqdm(total=args.step_limits[k] or None, initial=t.step, desc=f"unet{k} {stage_cfg['unet']}",
              disable=t.rank != 0) as bar:  # closed before any one-line stop message
        while not t.finished():
            loss, outcome, threads, seconds = t.timed_step(stream, args.grad_accum)
            t.elapsed += seconds
            ips = args.batch_size * args.grad_accum * t.world / seconds
            bar.update(int(outcome == "applied"))
            bar.set_postfix(loss=f"{loss:.4f}", **shown, img_s=f"{ips:.1f}", threads=threads)
            if outcome == "non-finite":
                log(dict(unet=k, step=t.step, event="non-finite loss, step skipped", loss=loss))
                if t.bad_steps >= MAX_BAD_STEPS:
                    t.save(config)  # the bad steps were not applied: the weights in memory are the last good ones
                    bar.close()
                    end_run(t, f"error: {MAX_BAD_STEPS} non-finite losses in a row at unet{k} step {t.step}; "
                            f"stopped and saved the last good weights to {t.path} (try a lower --lr)", 1)
            if outcome != "applied":
                continue
            if t.in_layout_window() and t.layout_level() is None and not told:
                told = True  # said once; the phase still starts if the machine speeds up
                skip = layout_skip(args, t)
                log(dict(unet=k, step=t.step, event=skip))
                if t.rank == 0:
                    tqdm.write(skip)
            if t.step % args.log_every == 0:
                log(dict(unet=k, step=t.step, loss=loss, lr=t.lr(), layout_level=t.level,
                         img_per_s=round(ips, 1), threads=threads,
                         skipped=t.skipped, minutes=round(t.elapsed / 60, 2), data_digest=t.data_digest[:16]))
            if args.save_every and t.step % args.save_every == 0:
                t.save(config)
            if args.sample_every and t.step % args.sample_every == 0 and t.rank == 0:
                grid = os.path.join(args.out, f"samples-unet{k}-{t.step:06d}.png")
                prompts = write_grid(cascade, trainers, cache, k, grid, heldout, grid_start(args, k))
                log(dict(unet=k, step=t.step, event="grid", path=grid, prompts=prompts))
            if args.eval_every and t.step % args.eval_every == 0 and t.rank == 0:
                held = heldout_loss(t, stage_cfg["size"], heldout, cache)
                shown["heldout"] = f"{held:.4f}"
                log(dict(unet=k, step=t.step, heldout_loss=held, minutes=round(t.elapsed / 60, 2)))


def layout_skip(args, t):
    """The line that says why a stage's layout phase does not run at this step."""
    return (f"unet{t.k}: layout phase skipped: {t.step} steps at {t.progress():.0%} of the budget is on course for "
            f"{t.step / t.progress():.0f} steps, fewer than --layout-min-steps {args.layout_min_steps}; without "
            "the phase this U-Net will not learn word order (README, seventh round)")


def end_run(trainer, message, status):
    """End every rank with exit status `status`; rank 0 prints the one-line message."""
    if trainer.rank == 0:
        print(message, file=sys.stderr)
    raise SystemExit(status)


def json_line(record):
    """A strict-JSON log line: non-finite numbers, which JSON has no literal for, become strings ("nan", "inf")."""
    return json.dumps({key: str(v) if isinstance(v, float) and not math.isfinite(v) else v
                       for key, v in record.items()}, allow_nan=False)


def layout_window(window, flag):
    """'START:END' -> (start, end) with 0 <= start < end <= 1; '0' -> (0, 0), no window."""
    try:
        start, end = (0.0, 0.0) if window == "0" else map(float, window.split(":"))
    except ValueError:
        start, end = -1.0, -1.0
    if (start, end) != (0, 0) and not 0 <= start < end <= 1:
        raise ValueError(f"--layout-phase {flag!r}: {window!r} is not START:END with 0 <= START < END <= 1, or 0")
    return start, end


def check_counts(args):
    """One-line errors for integer flags below their smallest meaningful value (LEAST)."""
    for name, least in LEAST.items():
        if getattr(args, name) < least:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least {least}")


def prepare(args):
    """(config, resolved encoder) from the flags; every name and number is checked before anything heavy is loaded."""
    check_counts(args)
    if args.threads != "auto" and not (args.threads.isdigit() and int(args.threads) >= 1):
        raise ValueError(f"--threads {args.threads!r}: give auto or a positive number of CPU threads")
    names = args.unets.split(",")
    if args.only_unet is not None and not 0 <= args.only_unet < len(names):
        raise ValueError(f"--only-unet {args.only_unet} out of range; U-Nets are 0..{len(names) - 1} ({args.unets})")
    for name in names:
        registry.UNETS.canonical(name)
    encoder = text.resolve(args.encoder, registry.ENCODERS)
    config = build_config(args, encoder)
    n = len(names)
    if args.minutes is None:
        args.minutes = "0" if args.steps != "0" else DEFAULT_MINUTES
    args.step_limits, args.minute_limits = csv(args.steps, int, n, "--steps"), csv(args.minutes, float, n, "--minutes")
    if min(args.step_limits) < 0 or min(args.minute_limits) < 0:
        raise ValueError(f"--steps {args.steps!r} / --minutes {args.minutes!r}: budgets cannot be negative")
    if not all(s or m for s, m in zip(args.step_limits, args.minute_limits)):
        raise ValueError(f"--steps {args.steps!r} and --minutes {args.minutes!r} leave a U-Net without any limit")
    precisions, layouts = csv(args.precision, str, n, "--precision"), csv(args.channels_last, int, n, "--channels-last")
    bad = set(precisions) - {"fp32", "bf16", "fp16"}
    if bad:
        raise ValueError(f"--precision {args.precision!r}: unknown {sorted(bad)}; choose from fp32, bf16, fp16")
    if set(layouts) - {0, 1}:
        raise ValueError(f"--channels-last {args.channels_last!r}: give 1 (channels_last) or 0 per U-Net")
    args.precisions, args.channels_lasts = precisions, [bool(v) for v in layouts]
    windows = [DEFAULT_LAYOUT_PHASE] + ["0"] * (n - 1) if args.layout_phase is None else csv(args.layout_phase, str, n,
                                                                                              "--layout-phase")
    args.layout_phases = [layout_window(w, args.layout_phase) for w in windows]
    if not 0 <= args.layout_level < 1:
        raise ValueError(f"--layout-level {args.layout_level!r}: give a noise level in [0, 1)")
    if args.layout_min_steps < 0:
        raise ValueError(f"--layout-min-steps {args.layout_min_steps}: give a step count >= 0 (0: always)")
    if args.compile in CUDA_GRAPH_MODES and args.grad_accum > 1:  # measured on an H200: the graphs raise
        raise ValueError(f"--compile {args.compile} needs --grad-accum 1 (got {args.grad_accum}): a CUDA graph's "
                         "replay overwrites the gradients that the last micro-step left; use --compile default")
    return config, encoder


def main(argv=None):
    args = parse_args(argv)
    try:
        config, encoder = prepare(args)
        run(args, config, encoder)
    except (ValueError, OSError) as e:  # bad flags, checkpoints, data folders, encoder ids; a full disk
        raise SystemExit(f"error: {imagen.first_line(e)}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args, config, encoder):
    """Train every stage of the command (or --only-unet), then write the sample grid."""
    StopSignal.install()
    size = config["stages"][-1]["size"]
    dataset = data.make_dataset(args.data, size, seed=args.seed)
    train_set, heldout_set = data.holdout_split(dataset, args.holdout, size)
    if getattr(dataset, "truncated", None):
        print(f"warning: {len(dataset.truncated)} truncated shards (first: {dataset.truncated[0]}): their samples "
              "up to the break are used, the rest skipped")
    rank, world, device = setup_distributed()
    os.makedirs(args.out, exist_ok=True)
    cache = text.EmbeddingCache(args.cache_dir, encoder, config["max_text_len"], device, args.encoder_dtype)
    precompute_captions(cache, dataset, rank, world)
    images, captions = data.first_usable(heldout_set, HELDOUT_N)
    if not captions:
        raise ValueError(f"none of the {len(heldout_set)} held-out samples of --data {args.data!r} is usable; "
                         "hold out more with --holdout")
    heldout = Heldout(images, captions, SAMPLE_PROMPTS if args.data == "shapes" else captions[:GRID_PROMPTS])
    torch.manual_seed(args.seed)  # same initial weights on every rank and every run of the same command
    cascade = imagen.Imagen(config).to(device)
    todo = [args.only_unet] if args.only_unet is not None else range(len(config["stages"]))
    trainers = {k: Trainer(args, cascade, k, device, rank, world) for k in todo}
    for t in trainers.values():
        t.resume(config)
    log_file = open(os.path.join(args.out, "log.jsonl"), "a") if rank == 0 else None

    def log(record):
        if log_file:
            log_file.write(json_line(record) + "\n")
            log_file.flush()

    for k in todo:
        train_stage(args, config, cascade, trainers, k, cache, train_set, heldout, log)
    if rank == 0:
        path = os.path.join(args.out, "samples.png")
        prompts = write_grid(cascade, trainers, cache, max(todo), path, heldout, grid_start(args, max(todo)))
        log(dict(unet=max(todo), step=trainers[max(todo)].step, event="grid", path=path, prompts=prompts))
        print(f"checkpoints in {args.out}/, samples in {path}")
    if world > 1:
        dist.barrier()  # no rank tears the group down while rank 0 still writes


if __name__ == "__main__":
    main()
