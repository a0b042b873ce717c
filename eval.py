"""Evaluate a cascade: `python eval.py --ckpt out` (shapes) or `python eval.py --ckpt out --data DIR` (any data).

Shapes: samples prompts of the shapes grammar drawn with a seed the training data never used, judges every image
with the pixel-reading shapes judge (data.judge) and prints JSON colour, shape and position accuracy, seconds per
image and the base's word-order gaps (word_order_gaps). Other data: the held-out samples that training never read
(train.py's --holdout, stored in the checkpoint): prints each stage's held-out loss at fixed noise, writes a grid of
samples of held-out captions, each beside its real image, and plots the held-out losses that training logged.
"""
import argparse
import json
import math
import os
import time

import torch
from PIL import Image, ImageDraw

import data
import imagen
from sample import add_sampling_args, at_least_one, generate, sampling_setup

EVAL_SEED = 20_251_125  # prompts for evaluation; training draws from the dataset's own per-index seeds
JUDGE_KEYS = ("color", "shape", "position")  # the verdicts of data.judge
WORD_ORDER_LEVEL, WORD_ORDER_SCENES = 0.85, 128  # the word-order probe: noise level (fraction of T), scenes


def score(images, prompts):
    """Mean of each judge verdict over the images that have one (position is None without a position word)."""
    verdicts = [data.judge(img, prompt) for img, prompt in zip(images, prompts)]
    result = {}
    for key in JUDGE_KEYS:
        votes = [v[key] for v in verdicts if v[key] is not None]
        result[key] = round(sum(votes) / len(votes), 4) if votes else None
    return result


@torch.no_grad()
def word_order_gaps(stage, cache, seed, device):
    """How much worse the base denoises held-out two-object scenes at one high noise level when the caption's objects
    trade places ("order") or its relation turns 90 degrees ("axis"): the relative increase of the x0 error. 0 means
    the U-Net ignores that part of the caption; a U-Net that places both objects right needs both above 0."""
    images, captions = data.two_object_scenes(WORD_ORDER_SCENES, seed, stage.size)
    x0, d = data.to_signed(images.to(device)), stage.diffusion  # [n, 3, s, s]
    t = d.time_for_noise_level(WORD_ORDER_LEVEL, len(x0), device)  # [n]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    xt = d.q_sample(x0, t, noise)

    def x0_error(captions):
        emb, mask = (x.to(device) for x in cache([c.text() for c in captions]))
        out = stage.unet(d.model_input(xt, t), d.model_time(t), emb, mask).float()
        return (d.x0_eps_from_output(out, xt, t, stage.settings["target"])[0] - x0).pow(2).mean().item()

    true = x0_error(captions)
    swapped = x0_error([c._replace(objects=c.objects[::-1]) for c in captions])
    turned = x0_error([c._replace(direction=data.TURNED[c.direction]) for c in captions])
    return dict(order=round(swapped / true - 1, 4), axis=round(turned / true - 1, 4))


def heldout_losses(cascade, stop_at, cache, images, captions, device):
    """Each stage's loss at fixed noise on held-out uint8 images [n, 3, s, s] and their captions."""
    emb, mask = (x.to(device) for x in cache(captions))
    x = data.to_signed(images.to(device))  # [n, 3, s, s]
    return [round(imagen.fixed_noise_loss(stage, imagen.resize(x, stage.size), emb, mask, data.HOLDOUT_SEED), 5)
            for stage in cascade.stages[:stop_at]]


def plot_losses(log_path, png_path, width=640, panel=220, pad=44):
    """Plot each stage's held-out loss in a training log.jsonl against its step (log scale), one panel a stage."""
    curves = {}
    for record in map(json.loads, open(log_path)):
        if record.get("heldout_loss") is not None:  # a resumed run's repeated steps: the last value
            curves.setdefault(record["unet"], {})[record["step"]] = math.log10(record["heldout_loss"])
    image = Image.new("RGB", (width, panel * len(curves)), "white")
    draw = ImageDraw.Draw(image)
    for row, (k, curve) in enumerate(sorted(curves.items())):
        top, steps, logs = row * panel, sorted(curve), [curve[s] for s in sorted(curve)]
        (x0, x1), (y0, y1) = (steps[0], max(steps[-1], steps[0] + 1)), (min(logs), max(max(logs), min(logs) + 1e-3))
        box = (pad, top + pad // 2, width - pad // 2, top + panel - pad)  # left, top, right, bottom

        def xy(step, log):
            return (box[0] + (step - x0) / (x1 - x0) * (box[2] - box[0]),
                    box[3] - (log - y0) / (y1 - y0) * (box[3] - box[1]))
        draw.rectangle(box, outline="black")
        draw.line([xy(s, v) for s, v in zip(steps, logs)], fill="#d62728", width=2)
        draw.text((box[0] + 8, box[1] + 6), f"unet{k}: held-out loss (log scale) vs step", fill="black")
        draw.text((4, box[1]), f"{10 ** y1:.3f}", fill="black")
        draw.text((4, box[3] - 10), f"{10 ** y0:.3f}", fill="black")
        draw.text((box[0], box[3] + 6), f"{x0}", fill="black")
        draw.text((box[2] - 40, box[3] + 6), f"{x1}", fill="black")
    image.save(png_path)
    return png_path


def eval_heldout(cascade, stop_at, cache, sample, *, data_spec, n, folder, grid, device):
    """JSON result for --data: held-out losses per stage, a samples-beside-real grid, the log's loss plot.

    `sample(captions)` draws images [n, 3, s, s] in [0, 1]; `folder` holds the checkpoint and its log.
    """
    size = cascade.config["stages"][stop_at - 1]["size"]
    holdout = cascade.config.get("holdout", 0.02)
    images, captions = data.first_usable(data.holdout_split(data.make_dataset(data_spec, size), holdout, size)[1], n)
    losses = heldout_losses(cascade, stop_at, cache, images, captions, device)
    pairs = torch.stack((sample(captions), images.float() / 255), dim=1).flatten(0, 1)  # sample, real, ...
    grid = grid or os.path.join(folder, "heldout.png")
    imagen.save_grid(pairs, grid, nrow=8)
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
        at_least_one(args.n, "--n")
        cascade, stop_at, cache, options = sampling_setup(args)

        def sample(prompts):
            return generate(cascade, cache, prompts, stop_at, options, seed=args.seed, batch_size=args.batch_size,
                            device=args.device)
        if args.data:
            folder = args.ckpt if os.path.isdir(args.ckpt) else os.path.dirname(args.ckpt)
            print(json.dumps(eval_heldout(cascade, stop_at, cache, sample, data_spec=args.data, n=args.n,
                                          folder=folder, grid=args.grid, device=args.device)))
            return
    except (ValueError, OSError) as e:
        p.error(imagen.first_line(e))
    prompts = data.shapes_captions(args.n, seed=args.prompt_seed)
    cache(prompts)  # encode misses now, so the timing below is sampling alone
    start = time.perf_counter()
    images = sample(prompts)
    seconds = time.perf_counter() - start
    if args.grid:
        imagen.save_grid(images, args.grid, nrow=12)
    result = dict(score(images, prompts), n=args.n, seconds_per_image=round(seconds / args.n, 4),
                  size=images.shape[-1], threads=torch.get_num_threads(),
                  word_order_gap=word_order_gaps(cascade.stages[0], cache, args.prompt_seed, args.device))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
