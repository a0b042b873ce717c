"""Evaluate a cascade trained on shapes: `python eval.py --ckpt out` prints JSON accuracies.

Samples prompts of the shapes grammar drawn with a seed the training data never used, judges every image with
the pixel-reading shapes judge (data.judge) and reports colour, shape and position accuracy and seconds per image.
"""
import argparse
import json
import time

import torch

import data
from imagen import first_line
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_sampling_args(p)
    p.add_argument("--n", type=int, default=96, help="number of prompts (one image each)")
    p.add_argument("--prompt-seed", type=int, default=EVAL_SEED, help="seed of the evaluation prompts")
    p.add_argument("--grid", default=None, help="also save the judged images as this PNG grid")
    args = p.parse_args(argv)
    try:
        cascade, stop_at, cache = load_for_sampling(args)
    except (ValueError, OSError) as e:
        p.error(first_line(e))
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
