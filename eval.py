"""Evaluate a cascade: `python eval.py --ckpt out` (shapes) or `python eval.py --ckpt out --data DIR` (any data).

Shapes: samples prompts of the shapes grammar drawn with a seed the training data never used, judges every image
with the pixel-reading shapes judge (data.judge) and prints JSON colour, shape and position accuracy and seconds
per image. Other data: the held-out samples that training never read (train.py's --holdout, stored in the
checkpoint): prints each stage's held-out loss at fixed noise, writes a grid of samples of held-out captions, each
beside its real image, and plots the held-out losses that training logged.
"""
import argparse
import json
import os
import time

import torch
from PIL import Image, ImageDraw

import data
import imagen
from sample import add_sampling_args, generate, load_for_sampling, save_grid

EVAL_SEED = 20_251_125  # prompts for evaluation; training draws from the dataset's own per-index seeds
JUDGE_KEYS = ("color", "shape", "position")  # the verdicts of data.judge


def score(images, prompts):
    """Mean of each judge verdict over the images that have one (position is None without a position word)."""
    verdicts = [data.judge(img, prompt) for img, prompt in zip(images, prompts)]
    result = {}
    for key in JUDGE_KEYS:
        votes = [v[key] for v in verdicts if v[key] is not None]
        result[key] = round(sum(votes) / len(votes), 4) if votes else None
    return result


def heldout_losses(cascade, stop_at, cache, images, captions, device):
    """Each stage's loss at fixed noise on held-out uint8 images [n, 3, s, s] and their captions."""
    emb, mask = (x.to(device) for x in cache(captions))
    x = images.to(device).float() / 127.5 - 1  # [n, 3, s, s] in [-1, 1]
    return [round(imagen.fixed_noise_loss(stage, imagen.resize(x, stage.size), emb, mask, data.HOLDOUT_SEED), 5)
            for stage in cascade.stages[:stop_at]]


def plot_losses(log_path, png_path, width=640, height=360, pad=40):
    """Plot the held-out loss of every stage in a training log.jsonl against its step, as a PNG."""
    records = [json.loads(line) for line in open(log_path)]
    curves = {}
    for r in records:
        if r.get("heldout_loss") is not None:
            curves.setdefault(r["unet"], {})[r["step"]] = r["heldout_loss"]  # a resumed run's repeats: the last
    points = [(step, loss) for curve in curves.values() for step, loss in curve.items()]
    (x0, x1), (y0, y1) = [(min(v), max(v) or 1) for v in zip(*points)]
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((pad, pad // 2, width - pad // 2, height - pad), outline="black")

    def xy(step, loss):
        return (pad + (step - x0) / max(x1 - x0, 1) * (width - 1.5 * pad),
                height - pad - (loss - y0) / max(y1 - y0, 1e-9) * (height - 1.5 * pad))
    for k, curve in sorted(curves.items()):
        colour = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd")[k % 4]
        draw.line([xy(s, loss) for s, loss in sorted(curve.items())], fill=colour, width=2)
        draw.text((pad + 8, pad // 2 + 6 + 14 * k), f"unet{k} held-out loss", fill=colour)
    draw.text((pad, height - pad + 6), f"step {x0}", fill="black")
    draw.text((width - pad * 3, height - pad + 6), f"step {x1}", fill="black")
    draw.text((4, pad // 2), f"{y1:.3f}", fill="black")
    draw.text((4, height - pad - 10), f"{y0:.3f}", fill="black")
    image.save(png_path)
    return png_path


def eval_heldout(cascade, stop_at, cache, args):
    """JSON result for --data: held-out losses per stage, a samples-beside-real grid, the log's loss plot."""
    size = cascade.config["stages"][stop_at - 1]["size"]
    holdout = cascade.config.get("holdout", 0.02)
    images, captions = data.first_usable(data.holdout_split(data.make_dataset(args.data, size), holdout, size)[1],
                                         args.n)
    losses = heldout_losses(cascade, stop_at, cache, images, captions, args.device)
    samples = generate(cascade, cache, captions, stop_at, args)  # [n, 3, size, size] in [0, 1]
    pairs = torch.stack((samples, images.float() / 255), dim=1).flatten(0, 1)  # sample, real, sample, real, ...
    folder = args.ckpt if os.path.isdir(args.ckpt) else os.path.dirname(args.ckpt)
    grid = args.grid or os.path.join(folder, "heldout.png")
    save_grid(pairs, grid, nrow=8)
    log = os.path.join(folder, "log.jsonl")
    plot = plot_losses(log, os.path.join(folder, "heldout-loss.png")) if os.path.exists(log) else None
    return dict(heldout_loss=losses, n=len(captions), captions=captions, grid=grid, plot=plot)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_sampling_args(p)
    p.add_argument("--n", type=int, default=96, help="number of prompts (one image each); with --data, at most "
                   "this many held-out samples")
    p.add_argument("--prompt-seed", type=int, default=EVAL_SEED, help="seed of the evaluation prompts")
    p.add_argument("--grid", default=None, help="also save the judged images as this PNG grid (--data: the "
                   "samples beside the real images; default CKPT/heldout.png)")
    p.add_argument("--data", default=None, help="the dataset the cascade was trained on (a folder or shards): "
                   "evaluate on its held-out samples instead of shapes prompts")
    args = p.parse_args(argv)
    try:
        cascade, stop_at, cache = load_for_sampling(args)
        if args.data:
            print(json.dumps(eval_heldout(cascade, stop_at, cache, args)))
            return
    except ValueError as e:
        p.error(str(e))
    prompts = data.shapes_captions(args.n, seed=args.prompt_seed)
    cache(prompts)  # encode misses now, so the timing below is sampling alone
    start = time.perf_counter()
    images = generate(cascade, cache, prompts, stop_at, args)
    seconds = time.perf_counter() - start
    if args.grid:
        save_grid(images, args.grid, nrow=12)
    result = dict(score(images, prompts), n=args.n, seconds_per_image=round(seconds / args.n, 4),
                  size=images.shape[-1], threads=torch.get_num_threads())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
