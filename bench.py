"""Benchmark the cascade on this machine: `python bench.py --ckpt out` prints markdown tables and writes JSON.

train: images/s and peak memory of a training step per stage (fp32/bf16 x channels_last x compile; cached text vs
minilm each step). profile: the top operators of each stage's training step (torch.profiler). sample: seconds per
image and eval scores per sampler, against ancestral DDPM over all T steps with two-pass guidance; batched vs two-pass
guidance on the guided base stage. text: captions/s per encoder vs cache reads. data: loader images/s from a folder and
from shards, caption precompute captions/s, open files over a long run. threads: seconds per training step at each
CPU thread count and at train.py's --threads auto, on an idle machine and with one core kept busy. Speed is measured
here, never in tests.
"""
import argparse
import contextlib
import io
import itertools
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.profiler import ProfilerActivity, profile

import data
import imagen
import registry
import sample
from diffusion import Edit
import text
import train
from settings import COMPILE_MODES, DEFAULTS, cascade_config, resolve
from eval import EVAL_SEED, JUDGE_KEYS, score
from imagen import save_grid

WARMUP = 2  # untimed steps first: allocator warm-up, and torch.compile's compilation
TEXT_BATCH, TEXT_LEN = 64, 32  # captions per encoder call, tokens per caption in the text section
PROFILE_TOP = 12  # operators listed per stage in the profile section
MATMUL_N = 4096  # the side of the torch.mm whose FLOP/s is the measured peak
DATASHEET_TFLOPS = dict(H100=dict(bf16=989, fp32=67), H200=dict(bf16=989, fp32=67),  # dense, NVIDIA's datasheets
                        A100=dict(bf16=312, fp32=19.5))


def parse_args(argv=None):
    defaults = DEFAULTS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--sections", default="train,profile,sample,text", help="comma list of: " + ", ".join(SECTIONS))
    a("--recipe", default="shapes", help="train: the recipe whose cascade is measured: " + ", ".join(
        registry.RECIPES.names()))
    a("--presets", default=None, help="train: U-Net presets instead of the recipe's, as train.py --unets")
    a("--sizes", default=None, help="train: their image sizes, as train.py --sizes")
    a("--batch-size", type=int, default=None, help="train: images per step (default: the recipe's)")
    a("--steps", type=int, default=5, help=f"train: timed steps per measurement (after {WARMUP} warm-up steps)")
    a("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
      help="train: also measure torch.compile in this mode (slow to compile on CPU)")
    a("--ckpt", default=defaults.out, help="sample: a trained cascade (a train.py --out folder)")
    a("--n-eval", type=int, default=96, help="sample: eval prompts per sampler at its default steps")
    a("--ref-eval-n", type=int, default=24, help="sample: prompts for the slow all-T-steps two-pass reference")
    a("--sample-batch-size", type=int, default=24, help="sample: images sampled at once, the same for every run")
    a("--single-n", type=int, default=8, help="sample: prompts for batched vs two-pass guidance one image at a time")
    a("--text-captions", type=int, default=512, help=f"text: captions encoded per encoder (batches of {TEXT_BATCH})")
    a("--resample", type=int, default=5, help="inpaint: RePaint's jumps back per step in the resampled row")
    a("--inpaint-grid", default=None, help="inpaint: save 8 inputs beside their resampled inpaintings here")
    a("--data-images", type=int, default=512, help="data: JPEGs written for the loader rows")
    a("--data-captions", type=int, default=50_000, help="data: captions cached for the open-files row")
    a("--data-steps", type=int, default=10_000, help="data: cache reads of 32 captions for the open-files row")
    a("--thread-steps", type=int, default=30, help="threads: timed steps per row (auto's first rounds included)")
    a("--cache-dir", default=defaults.cache_dir, help="text-embedding cache folder (as train.py)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--json", default="bench.json", help="write the results here")
    args = p.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"unknown --sections {sorted(unknown)}; choose from: {', '.join(SECTIONS)}")
    return args


def timed(fn, device):
    """(fn(), its wall-clock seconds), synchronising the accelerator on both ends."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start


# ---- train: each measurement in a fresh process, so peak memory and compile caches are its own ----

def bench_config(args, **overrides):
    """train.Config of the benchmarked recipe with bench.py's flags and `overrides` (None: the recipe's value)."""
    given = dict(recipe=None if args.presets else args.recipe, unets=args.presets, sizes=args.sizes,
                 batch_size=args.batch_size, cache_dir=args.cache_dir, out=tempfile.gettempdir(), **overrides)
    return resolve({key: v for key, v in given.items() if v is not None})


def with_peak_mib(fn, device):
    """(fn(), MiB): CUDA: max_memory_allocated during fn; CPU: the process's peak resident memory during fn (Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return fn(), torch.cuda.max_memory_allocated(device) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS, VmHWM (Linux >= 4.0)
    result = fn()
    status = Path("/proc/self/status").read_text().splitlines()
    return result, next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024  # kB -> MiB


def parts_and_batches(args, k, text_source="cached", **overrides):
    """(train.py's Parts for stage k, an endless stream of its model inputs over pre-rendered shapes, train.Config)."""
    cfg, device = bench_config(args, **overrides), torch.device(args.device)
    spec = text.resolve(cfg.encoder, registry.ENCODERS)
    config = cascade_config(cfg, spec)
    torch.manual_seed(0)
    parts = train.build_parts(cfg, imagen.Imagen(config), k, device, world=1)
    max_len, b = config["max_text_len"], cfg.batch_size[k]
    captions_to = (text.EmbeddingCache(args.cache_dir, spec, max_len, device) if text_source == "cached"
                   else text.load_encoder(spec, max_len, device))  # minilm on every step's captions
    ds = data.make_dataset("shapes", cfg.sizes[-1])  # rendered before timing, as train.py reads it
    loader = [data.collate([ds[i] for i in range(j * b, (j + 1) * b)]) for j in range(WARMUP + args.steps)]
    stream = (train.model_inputs(images, captions, captions_to, cfg, k, device, parts.memory_format, 0)
              for images, captions, _ in loader)
    return parts, stream, cfg


def run_steps(parts, stream, n, cfg):
    """n optimizer steps of stage parts.k on the stream's next batches."""
    for _ in range(n):
        train.optimizer_step(parts, [next(stream)], cfg.lr, None, 1, cfg.grad_clip)


def train_case(case):
    """images/s and peak memory of timed steps of train.py's own optimizer step on its own model inputs."""
    args, k, precision, channels_last, compiled, text_source = case
    parts, stream, cfg = parts_and_batches(args, k, text_source, precision=precision, channels_last=channels_last,
                                           compile=compiled)
    device = torch.device(args.device)

    def warm_up_then_time():
        run_steps(parts, stream, WARMUP, cfg)
        return timed(lambda: run_steps(parts, stream, args.steps, cfg), device)[1]

    elapsed, mib = with_peak_mib(warm_up_then_time, device)
    b = cfg.batch_size[k]
    return dict(stage=f"unet{k} {cfg.unets[k]}", size=cfg.sizes[k], batch=b, precision=cfg.precision[k],
                channels_last=bool(cfg.channels_last[k]), compile=compiled or False, text=text_source,
                images_per_s=round(args.steps * b / elapsed, 2), peak_mib=round(mib, 1))


def profile_case(case):
    """The PROFILE_TOP operators by self time in train.py's default training step of stage k (torch.profiler)."""
    args, k = case
    parts, stream, cfg = parts_and_batches(args, k)
    run_steps(parts, stream, WARMUP, cfg)
    cuda = args.device.startswith("cuda")
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        run_steps(parts, stream, args.steps, cfg)
    self_us = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    events = sorted(prof.key_averages(), key=self_us, reverse=True)
    total = sum(map(self_us, events))
    return [dict(stage=f"unet{k} {cfg.unets[k]}", op=e.key, calls_per_step=e.count // args.steps,
                 ms_per_step=round(self_us(e) / 1e3 / args.steps, 2), share=round(self_us(e) / total, 3))
            for e in events[:PROFILE_TOP]]


def bench_train(args):
    """Rows of every (stage, precision, channels_last, compile) with cached text, then minilm-each-step at train.py's
    defaults, uncompiled and compiled."""
    cfg = bench_config(args)
    spec = text.resolve(cfg.encoder, registry.ENCODERS)
    text.EmbeddingCache(args.cache_dir, spec, cascade_config(cfg, spec)["max_text_len"]).precompute(
        data.all_shapes_captions())
    stages = range(len(cfg.unets))
    compile_modes = list(dict.fromkeys((None, args.compile)))  # uncompiled, and --compile's mode if given
    cases = [(args, k, p, cl, c, "cached") for k, p, cl, c in
             itertools.product(stages, ("fp32", "bf16"), (0, 1), compile_modes)]
    cases += [(args, k, None, None, c, "encoded") for k in stages for c in compile_modes]  # minilm each step
    rows, peaks = in_fresh_processes(train_case, cases), matmul_peaks(torch.device(args.device))
    config, datasheet = cascade_config(cfg, spec), DATASHEET_TFLOPS.get(machine(args)["device"].split()[-1], {})
    flops = {k: imagen.training_cost(config, k, cfg.batch_size[k])["flops"] / cfg.batch_size[k] for k in stages}
    for row in rows:  # model FLOP/s over the measured matmul peak (MFU), and over the datasheet's where known
        k, precision = int(row["stage"][4:].split()[0]), row["precision"]
        achieved = flops[k] * row["images_per_s"]
        row.update(gflop_per_image=round(flops[k] / 1e9, 2), tflop_s=round(achieved / 1e12, 3),
                   mfu_measured_peak=round(achieved / peaks[precision], 3))
        if precision in datasheet:
            row["mfu_datasheet"] = round(achieved / (datasheet[precision] * 1e12), 3)
    return rows + [dict(stage=f"torch.mm {MATMUL_N}³", precision=p, tflop_s=round(v / 1e12, 3)) for p, v in peaks.items()]


def matmul_peaks(device):
    """Measured FLOP/s of a MATMUL_N³ torch.mm in fp32 and bf16: the best of 3 after a warm-up."""
    peaks = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(MATMUL_N, MATMUL_N, device=device, dtype=dtype) for _ in range(2))
        torch.mm(a, b)
        peaks[precision] = 2 * MATMUL_N ** 3 / min(timed(lambda: torch.mm(a, b), device)[1] for _ in range(3))
    return peaks


def bench_presets(args):
    """Rows: every preset at its own size: parameters, model GFLOP per training image and the memory training needs
    at --batch-size (default 32), without and with checkpointing, counted on the meta device."""
    rows, b = [], args.batch_size or 32
    for name in registry.UNETS.names():
        cfg = resolve(dict(unets=[name], batch_size=b))
        config = cascade_config(cfg, text.resolve(cfg.encoder, registry.ENCODERS))
        plain, saved = (imagen.training_cost(config, 0, b, checkpointing=c) for c in (False, True))
        rows.append(dict(preset=name, size=cfg.sizes[0], parameters_m=round(plain["parameters"] / 1e6, 1),
                         gflop_per_image=round(plain["flops"] / b / 1e9, 2), batch=b,
                         gib=round(plain["bytes"] / 2**30, 2), gib_checkpointing=round(saved["bytes"] / 2**30, 2)))
    return rows


def in_fresh_processes(fn, cases):
    """[fn(case) for case in cases], each in a new process: its own peak memory, compile caches and profiler."""
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        return pool.map(fn, cases, chunksize=1)


def bench_profile(args):
    """Rows: the top operators of each stage's training step at train.py's defaults."""
    return [row for rows in in_fresh_processes(profile_case, [(args, k) for k in range(len(bench_config(args).unets))])
            for row in rows]


# ---- sample: every sampler at its default steps vs the all-T-steps two-pass reference ----

class TwoPassGuidance(nn.Module):
    """Classifier-free guidance as two separate U-Net passes (the reference; the cascade batches them)."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.channels = unet, unet.channels

    def forward_with_cond_scale(self, x, time, text_embeds, text_mask, *, cond_scale=1.0, **lowres):
        """Unet.forward_with_cond_scale's output, from a conditional pass and a separate null pass."""
        cond = self.unet(x, time, text_embeds, text_mask, **lowres)  # [b, c, h, w]
        if cond_scale == 1:  # unguided: one pass, as in the batched U-Net and in imagen-pytorch
            return cond
        null = self.unet(x, time, text_embeds, text_mask, cond_drop_prob=1.0, **lowres)  # every text dropped
        return null + (cond - null) * cond_scale  # Ho & Salimans 2022, eq. 6


@contextlib.contextmanager
def two_pass_guidance(cascade):
    """Temporarily sample every stage of the cascade with TwoPassGuidance."""
    unets = [stage.unet for stage in cascade.stages]
    for stage in cascade.stages:
        stage.unet = TwoPassGuidance(stage.unet)
    try:
        yield
    finally:
        for stage, unet in zip(cascade.stages, unets):
            stage.unet = unet


def sampling_cascade(args):
    """(cascade, stop_at, text cache) of --ckpt: its EMA weights, every trained U-Net."""
    return sample.load_for_sampling(args.ckpt, args.device, ema=True, stop_at_unet=None, cache_dir=args.cache_dir)


def sample_row(cascade, stop_at, cache, args, prompts, guidance, sampler, steps, batch_size):
    """(images, row): seconds per image and eval scores of sample.generate through U-Nets [0, stop_at) with one
    sampler and its steps per U-Net."""
    options = dict(sampler=[sampler], steps=steps)
    images, elapsed = timed(lambda: sample.generate(cascade, cache, prompts, stop_at, options, seed=0,
                                                    batch_size=batch_size, device=args.device),
                            torch.device(args.device))
    return images, dict(stages=stop_at, sampler=sampler, steps=",".join(map(str, steps)), guidance=guidance,
                        n=len(prompts), batch=batch_size, s_per_image=round(elapsed / len(prompts), 4),
                        **score(images, prompts))


def paired_standard_error(images_a, images_b, prompts):
    """Per judge key: the standard error of the mean per-prompt difference of verdicts, a minus b (the noise of a
    score difference measured on these prompts)."""
    verdicts = [[data.judge(img, prompt) for img, prompt in zip(images, prompts)] for images in (images_a, images_b)]
    result = {}
    for key in JUDGE_KEYS:
        diffs = torch.tensor([float(a[key]) - float(b[key]) for a, b in zip(*verdicts) if b[key] is not None])
        result[key] = round(float(diffs.std() / len(diffs) ** 0.5), 4) if len(diffs) > 1 else None
    return result


def bench_sample(args):
    """Rows, each with a role: every sampler on --n-eval prompts; the default vs two-pass guidance vs the all-T
    reference on --ref-eval-n; and batched vs two-pass guidance on the base stage alone (the guided one), at
    --sample-batch-size and one image at a time."""
    cascade, stop_at, cache = sampling_cascade(args)
    opts = {**imagen.SAMPLING_DEFAULTS, **cascade.config.get("sampling", {})}
    steps = registry.broadcast(opts["steps"], len(cascade.stages), "the checkpoint's sampling steps")
    default = registry.SAMPLERS.canonical(opts["sampler"])
    # every row samples a prefix of the same eval prompts (shapes_captions is prefix-stable)
    prompts = data.shapes_captions(max(args.n_eval, args.ref_eval_n, args.single_n), seed=EVAL_SEED)
    cache(prompts)  # encode misses now: the timings are sampling alone

    def run(role, n, guidance="batched", stages=stop_at, sampler=default, sampler_steps=steps,
            batch_size=args.sample_batch_size):
        with two_pass_guidance(cascade) if guidance == "two-pass" else contextlib.nullcontext():
            images, row = sample_row(cascade, stages, cache, args, prompts[:n], guidance, sampler, sampler_steps,
                                     batch_size)
        return images, dict(role=role, **row)

    rows = [run("sampler", args.n_eval, sampler=name)[1] for name in cascade.samplers()]
    batched, row_batched = run("default", args.ref_eval_n)
    two_pass, row_two_pass = run("two-pass", args.ref_eval_n, "two-pass")
    row_two_pass["max_abs_diff_vs_batched"] = float((two_pass - batched).abs().max())  # same computation, one pass
    all_t = [stage.diffusion.num_timesteps for stage in cascade.stages]
    reference, row_reference = run("reference", args.ref_eval_n, "two-pass", sampler="ddpm", sampler_steps=all_t)
    row_reference["se_of_default_minus_this"] = paired_standard_error(batched, reference, prompts[:args.ref_eval_n])
    rows += [row_batched, row_two_pass, row_reference]
    for batch, n in ((args.sample_batch_size, args.ref_eval_n), (1, args.single_n)):  # sample.py --prompt P: batch 1
        rows += [run(f"base {guidance}", n, guidance, stages=1, batch_size=batch)[1]
                 for guidance in ("batched", "two-pass")]
    return rows


# ---- inpaint: repaint one object of a two-object scene with a new colour and shape ----

INPAINT_MARGIN = 0.04  # the erased box reaches this far (fraction of the width) past the object's bounding box


def inpaint_case(rng, size):
    """A two-object scene at size px, a keep mask [1, s, s] (0 over its second object's box) and a caption giving
    that object another colour (not the first's) and another shape."""
    scene, caption = data.sample_scene(rng)
    while len(scene) != 2:
        scene, caption = data.sample_scene(rng)
    first, second = scene
    parsed = data.parse_caption(caption)
    color = str(rng.choice([c for c in data.COLORS if c not in (first.color, second.color)]))
    shape = str(rng.choice([s for s in data.SHAPES if s != second.shape]))
    new = data.Caption((parsed.objects[0], (color, shape, None)), parsed.direction).text()
    half = np.array(data.HALF_EXTENT[second.shape]) * second.r + INPAINT_MARGIN  # (x, y) half box
    xs, ys = (np.arange(size) + 0.5) / size, ((np.arange(size) + 0.5) / size)[:, None]
    erase = (np.abs(xs - second.x) <= half[0]) & (np.abs(ys - second.y) <= half[1])  # [s, s]
    image = torch.from_numpy(data.render(scene, size)).permute(2, 0, 1).float() / 255  # [3, s, s]
    return image, torch.from_numpy(~erase).float()[None], new


def bench_inpaint(args):
    """Rows: RePaint inpainting of --n-eval scenes (judge scores of the new caption, max change of kept pixels)
    against sampling the same captions from scratch."""
    cascade, stop_at, cache = sampling_cascade(args)
    size = cascade.stages[stop_at - 1].size
    cases = [inpaint_case(np.random.default_rng((EVAL_SEED, i)), size) for i in range(args.n_eval)]
    images, keeps, captions = torch.stack([c[0] for c in cases]), torch.stack([c[1] for c in cases]), \
        [c[2] for c in cases]
    rows = []
    for resample in (None, 1, args.resample):
        generator, out, start = torch.Generator(args.device).manual_seed(0), [], time.perf_counter()
        for i in range(0, len(captions), args.sample_batch_size):
            part = slice(i, i + args.sample_batch_size)
            edit = None if resample is None else Edit(images[part].to(args.device), keep=keeps[part].to(args.device),
                                                      resample=resample)
            emb, mask = cache(captions[part])
            out.append(cascade.sample(emb.to(args.device), mask.to(args.device), stop_at=stop_at, edit=edit,
                                      generator=generator).cpu())
        out = torch.cat(out)  # [n, 3, s, s] in [0, 1]
        kept = ((out - images).abs() * keeps).amax().item()  # the largest change of a kept pixel
        rows.append(dict(mode="from scratch" if resample is None else f"inpaint, resample {resample}",
                         n=len(captions), **score(out, captions),
                         max_kept_pixel_change=None if resample is None else round(kept, 6),
                         s_per_image=round((time.perf_counter() - start) / len(captions), 4)))
        if resample == args.resample and args.inpaint_grid:
            save_grid(torch.stack((images[:8], out[:8]), 1).flatten(0, 1), args.inpaint_grid, nrow=8)
    return rows


# ---- text: encoders vs cache reads ----

def tiny_t5(folder):
    """Save a random-weight T5 encoder (d_model 32) with a sentencepiece tokenizer trained on shapes captions."""
    import sentencepiece
    from transformers import T5Config, T5EncoderModel, T5Tokenizer
    model_file = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(data.all_shapes_captions()),
                                             model_writer=model_file, vocab_size=40, pad_id=0, eos_id=1, unk_id=2,
                                             bos_id=-1, minloglevel=2)
    pieces = sentencepiece.SentencePieceProcessor(model_proto=model_file.getvalue())
    vocab = [(pieces.id_to_piece(i), pieces.get_score(i)) for i in range(pieces.get_piece_size())]
    T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
                   ).save_pretrained(folder)
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(folder)
    return folder


def captions_per_s(fn, captions, device):
    """Captions per second of fn called on batches of TEXT_BATCH captions."""
    batches = [captions[i:i + TEXT_BATCH] for i in range(0, len(captions), TEXT_BATCH)]
    return round(len(captions) / timed(lambda: [fn(b) for b in batches], device)[1], 1)


def bench_text(args):
    """Rows: captions/s of each encoder (minilm, a tiny local T5) encoding, and reading its cache."""
    device, captions = torch.device(args.device), data.shapes_captions(args.text_captions, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        specs = {"minilm": text.resolve("minilm", registry.ENCODERS),
                 "tiny-t5": text.resolve(tiny_t5(os.path.join(tmp, "tiny-t5")), {})}
        rows = []
        for name, spec in specs.items():
            encoder = text.load_encoder(spec, TEXT_LEN, device)
            encoder(captions[:TEXT_BATCH])  # warm-up
            cache = text.EmbeddingCache(os.path.join(tmp, "cache"), spec, TEXT_LEN, device)
            cache.precompute(captions)
            rows += [dict(encoder=name, source=source, batch=TEXT_BATCH,
                          captions_per_s=captions_per_s(fn, captions, device))
                     for source, fn in (("encode", encoder), ("cache", cache))]
    return rows


# ---- data: loader throughput from a folder and from shards, caption precompute, open files ----

def write_photo_data(root, n, size=384):
    """n noisy shapes scenes as size-px JPEGs (photo-like decode cost), as a folder and as 4 tar shards."""
    folder, shards, rng = Path(root) / "folder", Path(root) / "shards", torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    shards.mkdir()
    for i in range(n):
        scene, caption = data.sample_scene(np.random.default_rng((7, i)))
        pixels = torch.from_numpy(data.render(scene, size)).float()
        pixels += 12 * torch.randn(pixels.shape, generator=rng)  # [s, s, 3] sensor-like noise: larger JPEGs
        Image.fromarray(pixels.clamp(0, 255).byte().numpy()).save(folder / f"{i:05d}.jpg", quality=90)
        (folder / f"{i:05d}.txt").write_text(f"{caption} {i}")
    for shard in range(4):
        with tarfile.open(shards / f"{shard:05d}.tar", "w") as tar:
            for i in range(shard, n, 4):
                for ext in ("jpg", "txt"):
                    tar.add(folder / f"{i:05d}.{ext}", f"{i:05d}.{ext}")
    return folder, shards


def loader_images_per_s(dataset, workers, batches=12):
    """Images/s of train.py's loader (shuffled EpochSampler, batch 32) after a first, untimed batch."""
    loader = iter(torch.utils.data.DataLoader(dataset, sampler=data.EpochSampler(len(dataset), 0), batch_size=32,
                                              num_workers=workers, collate_fn=data.collate))
    next(loader)  # worker start-up
    start = time.perf_counter()
    n = sum(len(next(loader)[1]) for _ in range(batches))
    return round(n / (time.perf_counter() - start), 1)


def open_files():
    return len(os.listdir("/proc/self/fd"))


def bench_data(args):
    """Rows: loader images/s (folder, shards x 64, 256 px x 1, 2, 4 workers); precompute captions/s (minilm, a tiny
    T5); open file descriptors while reading a large caption cache for many steps."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = write_photo_data(tmp, args.data_images)
        for layout, path in (("folder", folder), ("shards", shards)):
            for size, workers in itertools.product((64, 256), (1, 2, 4)):
                rows.append(dict(measure="loader images/s", data=layout, size=size, workers=workers,
                                 value=loader_images_per_s(data.make_dataset(path, size), workers)))
        captions = [f"{c} {i}" for i, c in enumerate(data.shapes_captions(args.text_captions, seed=0))]
        specs = {"minilm": text.resolve("minilm", registry.ENCODERS),
                 "tiny-t5": text.resolve(tiny_t5(os.path.join(tmp, "tiny-t5")), {})}
        for name, spec in specs.items():
            cache = text.EmbeddingCache(os.path.join(tmp, "cache"), spec, TEXT_LEN, args.device)
            cache.precompute(captions[:TEXT_BATCH])  # loads the encoder
            _, seconds = timed(lambda: cache.precompute(captions[TEXT_BATCH:]), torch.device(args.device))
            rows.append(dict(measure="precompute captions/s", encoder=name, captions=len(captions) - TEXT_BATCH,
                             value=round((len(captions) - TEXT_BATCH) / seconds, 1)))
        many = [f"{c} {i}" for i, c in enumerate(data.shapes_captions(args.data_captions, seed=1))]
        cache = text.EmbeddingCache(os.path.join(tmp, "cache"), specs["tiny-t5"], TEXT_LEN, args.device)
        cache.precompute(many, batch_size=1024)
        before, rng = open_files(), np.random.default_rng(0)
        for _ in range(args.data_steps):
            cache([many[i] for i in rng.integers(len(many), size=32)])
        rows.append(dict(measure=f"open files after {args.data_steps} steps of 32 ({len(many)} cached captions)",
                         encoder="tiny-t5",
                         shards=len(list(cache.dir.glob("*.npy"))), before=before, value=open_files()))
    return rows


# ---- threads: train.py's ThreadTuner against fixed thread counts, idle and beside a busy core ----

def threads_case(case):
    """Seconds per training step of stage k at `threads` (a count or auto), with another program busy or not."""
    args, k, busy, threads = case
    args = argparse.Namespace(**{**vars(args), "steps": args.thread_steps})  # batches for every timed step
    parts, stream, cfg = parts_and_batches(args, k)
    tuner = train.ThreadTuner.for_run(threads, torch.device(args.device))
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None  # another user program
    try:
        run_steps(parts, stream, WARMUP, cfg)
        seconds = 0.0
        for step in range(args.thread_steps):
            count, start = tuner.choose(step), time.perf_counter()
            run_steps(parts, stream, 1, cfg)
            tuner.record(count, time.perf_counter() - start)
            seconds += time.perf_counter() - start
    finally:
        if hog:
            hog.kill()
    return dict(stage=f"unet{k} {cfg.unets[k]}", load="one core busy" if busy else "idle",
                threads=threads, s_per_step=round(seconds / args.thread_steps, 3))


def bench_threads(args):
    """Rows of every (stage, load, thread count or auto) of train.py's default cascade."""
    counts = [str(n) for n in train.ThreadTuner.for_run("auto", torch.device("cpu")).options] + ["auto"]
    return in_fresh_processes(threads_case, [(args, k, busy, threads) for k in range(len(bench_config(args).unets))
                                             for busy in (False, True) for threads in counts])


# ---- report ----

def target(name, measured, minimum, unit="x"):
    """One row of the targets table."""
    return dict(target=name, measured=round(measured, 4), need=f">= {minimum}{unit}", met=measured >= minimum)


def target_rows(results):
    """The issue's targets, from ratios and scores measured in this run."""
    rows = []
    if "sample" in results:
        def role(name, batch=None):
            return next(r for r in results["sample"] if r["role"] == name and batch in (None, r["batch"]))
        default, reference = role("default"), role("reference")
        name = f"{default['sampler']} {default['steps']} steps vs all-T two-pass ddpm"
        rows.append(target(f"{name}: speedup", reference["s_per_image"] / default["s_per_image"], 20))
        change, key = min((default[k] - reference[k], k) for k in JUDGE_KEYS if reference[k] is not None)
        rows.append(dict(target(f"{name}: worst eval score change ({key})", change, -0.03, ""),
                         standard_error=reference["se_of_default_minus_this"][key]))
        for batch in (default["batch"], 1):
            rows.append(target(f"batched vs two-pass guidance, guided base stage, batch {batch}",
                               role("base two-pass", batch)["s_per_image"] / role("base batched", batch)["s_per_image"],
                               1.6))
    for row in results.get("train", []):
        if row["text"] == "encoded":  # against the cached row of the same stage and settings
            cached = next(r for r in results["train"] if r["text"] == "cached" and r["stage"] == row["stage"]
                          and r["precision"] == row["precision"] and r["channels_last"] == row["channels_last"]
                          and r["compile"] == row["compile"])
            compiled = f", compile {row['compile']}" if row["compile"] else ""
            rows.append(target(f"{row['stage']}{compiled}: cached text vs minilm each step",
                               cached["images_per_s"] / row["images_per_s"], 1.3))
    return rows


def machine(args):
    """Where the numbers come from: CPU model, torch version, threads, device, and what peak memory means."""
    cuda, cpu = args.device.startswith("cuda"), platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return dict(cpu=cpu, cores=os.cpu_count(), torch=torch.__version__, threads=torch.get_num_threads(),
                device=torch.cuda.get_device_name(args.device) if cuda else "cpu",
                peak_mib="torch.cuda.max_memory_allocated" if cuda else "peak RSS (VmHWM), a fresh process per row")


def markdown(rows):
    """A markdown table of flat dicts (the union of their keys as columns)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows])


SECTIONS = dict(train=bench_train, presets=bench_presets, profile=bench_profile, sample=bench_sample, text=bench_text, data=bench_data,
                inpaint=bench_inpaint, threads=bench_threads)


def main(argv=None):
    args = parse_args(argv)
    results = dict(machine=machine(args))
    for name in args.sections.split(","):
        results[name] = SECTIONS[name](args)
    results["targets"] = target_rows(results)
    for name, rows in results.items():
        if rows:
            print(f"## {name}\n\n{markdown(rows if isinstance(rows, list) else [rows])}\n")
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
