"""Benchmark the cascade on this machine: `python bench.py --ckpt out` prints markdown tables and writes JSON.

train: images/s, peak memory and model FLOP utilisation of a training step per stage (fp32, and bf16 where --precision
auto picks it, x channels_last x compile; cached text vs minilm each step). loop: a real train.py run's loop beside its
isolated step, its wall clock split by part. presets: parameters, GFLOP per image and training memory of every U-Net
preset. sample: seconds per image and eval scores per sampler, against ancestral DDPM. Speed is measured here only.
"""
import argparse
import contextlib
import cProfile
import itertools
import json
import multiprocessing
import os
import platform
import pstats
import tempfile
import time
from pathlib import Path

import torch

import data
import imagen
import registry
import sample
import text
import train
from settings import COMPILE_MODES, DEFAULTS, cascade_config, resolve
from eval import EVAL_SEED, score

WARMUP = 2  # untimed steps first: allocator warm-up, and torch.compile's compilation
MATMUL_N = 4096  # the side of the torch.mm whose FLOP/s is the measured peak
DATASHEET_TFLOPS = dict(H100=dict(bf16=989, fp32=67), H200=dict(bf16=989, fp32=67),  # dense, NVIDIA's datasheets
                        A100=dict(bf16=312, fp32=19.5))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--sections", default="train,loop,sample", help="comma list of: " + ", ".join(SECTIONS))
    a("--recipe", default="shapes", help="train: the recipe whose cascade is measured: " + ", ".join(
        registry.RECIPES.names()))
    a("--presets", default=None, help="train: U-Net presets instead of the recipe's, as train.py --unets")
    a("--sizes", default=None, help="train: their image sizes, as train.py --sizes")
    a("--batch-size", type=int, default=None, help="train: images per step (default: the recipe's)")
    a("--steps", type=int, default=5, help=f"train: timed steps per measurement (after {WARMUP} warm-up steps)")
    a("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
      help="train: also measure torch.compile in this mode (slow to compile on CPU)")
    a("--data", default=None, help="loop: the run's data (default: the recipe's)")
    a("--loop-steps", type=int, default=300, help="loop: training steps per stage in the profiled train.py run")
    a("--ckpt", default=DEFAULTS.out, help="sample: a trained cascade (a train.py --out folder)")
    a("--n-eval", type=int, default=96, help="sample: eval prompts per sampler at its default steps")
    a("--ref-eval-n", type=int, default=24, help="sample: prompts for the slow all-T-steps ddpm reference")
    a("--sample-batch-size", type=int, default=24, help="sample: images sampled at once, the same for every run")
    a("--cache-dir", default=DEFAULTS.cache_dir, help="text-embedding cache folder (as train.py)")
    a("--device", default="auto", type=registry.device_flag, help="auto (cuda, then mps, then cpu), cuda, mps, cpu")
    a("--json", default="bench.json", help="write the results here")
    args = p.parse_args(argv)
    if unknown := set(args.sections.split(",")) - set(SECTIONS):
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
                 batch_size=args.batch_size, cache_dir=args.cache_dir, out=tempfile.gettempdir()) | overrides
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
    if text_source == "cached":  # encoded before timing, as train.py does
        captions_to.precompute([caption for _, captions, _ in loader for caption in captions])
    stream = (train.model_inputs(images, captions, captions_to, cfg, k, device, parts.memory_format, 0)
              for images, captions, _ in loader)
    return parts, stream, cfg


def run_steps(parts, stream, n, cfg):
    """n optimizer steps of stage parts.k on the stream's next batches."""
    for _ in range(n):
        train.optimizer_step(parts, [next(stream)], cfg.lr[parts.k], None, 1, cfg.grad_clip)


def train_case(case):
    """images/s and peak memory of timed steps of train.py's own optimizer step on its own model inputs."""
    args, k, precision, channels_last, compiled, text_source = case
    torch.set_num_threads(train.STARTUP_THREADS)  # every core, whatever count a loop's thread tuner left
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


def bench_train(args):
    """Rows of every (stage, precision, channels_last, compile) with cached text, then minilm-each-step at train.py's
    defaults. bf16 only where --precision auto picks it: emulated (no AVX512-BF16), a 4096³ torch.mm takes minutes."""
    cfg = bench_config(args)
    spec = text.resolve(cfg.encoder, registry.ENCODERS)
    stages = range(len(cfg.unets))
    compile_modes = list(dict.fromkeys((None, args.compile)))  # uncompiled, and --compile's mode if given
    precisions = list(dict.fromkeys(("fp32", bench_config(args, precision="auto", device=args.device).precision[0])))
    cases = [(args, k, p, cl, c, "cached") for k, p, cl, c in
             itertools.product(stages, precisions, (0, 1), compile_modes)]
    cases += [(args, k, None, None, c, "encoded") for k in stages for c in compile_modes]  # minilm each step
    rows, peaks = in_fresh_processes(train_case, cases), matmul_peaks(torch.device(args.device), precisions)
    config, datasheet = cascade_config(cfg, spec), DATASHEET_TFLOPS.get(machine(args)["device"].split()[-1], {})
    flops = {k: imagen.training_cost(config, k, cfg.batch_size[k])["flops"] / cfg.batch_size[k] for k in stages}
    for row in rows:  # model FLOP/s over the measured matmul peak (MFU), and over the datasheet's where known
        k, precision = int(row["stage"][4:].split()[0]), row["precision"]
        achieved = flops[k] * row["images_per_s"]
        row.update(gflop_per_image=round(flops[k] / 1e9, 2), tflop_s=round(achieved / 1e12, 3),
                   mfu_measured_peak=round(achieved / peaks[precision], 3))
        if precision in datasheet:
            row["mfu_datasheet"] = round(achieved / (datasheet[precision] * 1e12), 3)
    return rows + [dict(stage=f"torch.mm {MATMUL_N}³", precision=p, tflop_s=round(v / 1e12, 3))
                   for p, v in peaks.items()]


def matmul_peaks(device, precisions):
    """Measured FLOP/s of a MATMUL_N³ torch.mm in each precision: the best of 4 (the first warms up)."""
    peaks = {}
    for precision in precisions:
        a, b = (torch.randn(MATMUL_N, MATMUL_N, device=device, dtype=text.DTYPES[precision]) for _ in range(2))
        peaks[precision] = 2 * MATMUL_N ** 3 / min(timed(lambda: torch.mm(a, b), device)[1] for _ in range(4))
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
    """[fn(case) for case in cases], each in a new process: its own peak memory and compile caches."""
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        return pool.map(fn, cases, chunksize=1)


# ---- loop: where a real train.py run's wall clock goes, against its isolated step ----

LOOP_PARTS = dict(  # part -> (function, the function that calls it) pairs of train.py's loop
    data=[("read_batch", "train_stage")], text=[("model_inputs", "train_stage")], ema=[("follow", "optimizer_step")],
    evaluation=[("heldout_loss", "train_stage"), ("write_grid", "train_stage")],
    saving=[("save_checkpoint", "save")], logging=[("log", "train_stage")])


def called_from(stats, name, caller):
    """Cumulative seconds of the calls that functions named `caller` made to functions named `name` (cProfile)."""
    return sum(calls[3] for (_, _, callee), (*_, callers) in stats.items() if callee == name
               for (_, _, by), calls in callers.items() if by == caller)


def loop_case(case):
    """Rows: stage k's loop in a real train.py run of --loop-steps: images/s from the run's own wall clock of the loop
    (first step to last save), then its share by part in a second run under cProfile, which slows Python's calls:
    the optimizer step, LOOP_PARTS and the rest. The loop is train_stage less its setup (build_parts, resume)."""
    args, k = case
    overrides = dict(only_unet=k, steps=[args.loop_steps], **({"data": args.data} if args.data else {}))
    with tempfile.TemporaryDirectory() as out:
        cfg = bench_config(args, out=out, **overrides)
        train.train(cfg)
        done = next(r for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if r.get("event") == "done")
    with tempfile.TemporaryDirectory() as out:
        profiler = cProfile.Profile()
        profiler.runcall(train.train, bench_config(args, out=out, **overrides))
    stats = pstats.Stats(profiler).stats
    loop = called_from(stats, "train_stage", "train") - sum(
        called_from(stats, name, "train_stage") for name in ("build_parts", "resume"))
    parts = {part: sum(called_from(stats, *call) for call in calls) for part, calls in LOOP_PARTS.items()}
    parts = dict(optimizer_step=called_from(stats, "optimizer_step", "train_stage") - parts["ema"], **parts)
    parts["other"] = loop - sum(parts.values())
    stage, images = f"unet{k} {cfg.unets[k]}", args.loop_steps * cfg.batch_size[k]
    return [dict(stage=stage, part="loop", images_per_s=round(images / (60 * done["wall_minutes"]), 2))] + [
        dict(stage=stage, part=part, seconds=round(v, 2), share=round(v / loop, 3)) for part, v in parts.items()]


def bench_loop(args):
    """Rows: each stage's isolated step (the train section's, at the recipe's settings), its loop, and by part."""
    cfg, rows = bench_config(args), []
    for k in range(len(cfg.unets)):
        case = (args, k, cfg.precision[k], cfg.channels_last[k], None, "cached")
        before, loop = train_case(case)["images_per_s"], loop_case((args, k))  # in one process: the same allocator
        isolated = [before, train_case(case)["images_per_s"]]  # just before and just after the loop
        loop[0]["of_isolated_step"] = round(2 * loop[0]["images_per_s"] / sum(isolated), 3)  # their mean: drift cancels
        rows += [dict(stage=loop[0]["stage"], part="isolated step", images_per_s=isolated)] + loop
    return rows


# ---- sample: every sampler at its default steps vs ancestral ddpm over all T steps ----

def bench_sample(args):
    """Rows: seconds per image and eval scores of every sampler at its default steps on --n-eval prompts, and of
    the default sampler against ancestral ddpm over all T steps on --ref-eval-n prompts."""
    cascade, stop_at, cache = sample.load_for_sampling(args.ckpt, args.device, ema=True, stop_at_unet=None,
                                                       cache_dir=args.cache_dir)
    opts = {**imagen.SAMPLING_DEFAULTS, **cascade.config.get("sampling", {})}
    steps = registry.broadcast(opts["steps"], len(cascade.stages), "the checkpoint's sampling steps")
    # every row samples a prefix of the same eval prompts (shapes_captions is prefix-stable)
    prompts = data.shapes_captions(max(args.n_eval, args.ref_eval_n), seed=EVAL_SEED)
    cache(prompts)  # encode misses now: the timings are sampling alone

    def run(role, n, samplers, sampler_steps=steps):
        """A row: seconds per image and eval scores of sample.generate with these samplers (one, or one per stage)."""
        options = dict(sampler=samplers, steps=sampler_steps)
        images, elapsed = timed(lambda: sample.generate(cascade, cache, prompts[:n], stop_at, options, seed=0,
                                                        batch_size=args.sample_batch_size, device=args.device),
                                torch.device(args.device))
        return dict(role=role, sampler=",".join(samplers), steps=",".join(map(str, sampler_steps)), n=n,
                    s_per_image=round(elapsed / n, 4), **score(images, prompts[:n]))

    all_t = [stage.diffusion.num_timesteps for stage in cascade.stages]
    default = registry.broadcast(opts["sampler"], len(steps), "the checkpoint's samplers")
    return ([run("sampler", args.n_eval, [name]) for name in cascade.samplers()] +
            [run("default", args.ref_eval_n, default), run("reference", args.ref_eval_n, ["ddpm"], all_t)])


# ---- report ----

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


SECTIONS = dict(train=bench_train, loop=bench_loop, presets=bench_presets, sample=bench_sample)


def main(argv=None):
    args = parse_args(argv)
    results = dict(machine=machine(args)) | {name: SECTIONS[name](args) for name in args.sections.split(",")}
    for name, rows in results.items():
        if rows:
            print(f"## {name}\n\n{markdown(rows if isinstance(rows, list) else [rows])}\n")
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
