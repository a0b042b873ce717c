"""Evaluate a cascade: `python eval.py --ckpt out` (shapes) or `python eval.py --ckpt out --data DIR` (any data).

Shapes: the pixel judge's colour, shape and position accuracy on prompts training never drew (eval_shapes). Other
data: the held-out loss per stage, and how often a sample ranks its caption's own picture first among all of the
data's (eval_data); --fid, --kid and --clip-score add torchmetrics' metrics (`pip install -e ".[metrics]"`).
"""
import argparse
import functools
import json
import math
import os
import statistics
import sys
import time

import torch
from PIL import Image, ImageDraw

import data
import imagen
from sample import add_sampling_args, at_least_one, generate, sampling_setup

EVAL_SEED = 20_251_125  # prompts for evaluation; training draws from the dataset's own per-index seeds
JUDGE_KEYS = ("color", "shape", "position")  # the verdicts of data.judge
RETRIEVAL_SIDE = 16  # --data: samples and pictures are compared as RGB images this many pixels wide
GRID_PAIRS = 32  # --data: samples shown beside their pictures in each grid
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"  # torch-fidelity's weights
                 "weights-inception-2015-12-05-6726825d.pth")


def score(images, prompts):
    """Mean of each judge verdict over the images that have one (position is None without a position word)."""
    verdicts = [data.judge(img, prompt) for img, prompt in zip(images, prompts)]
    votes = {key: [v[key] for v in verdicts if v[key] is not None] for key in JUDGE_KEYS}
    return {key: round(sum(v) / len(v), 4) if v else None for key, v in votes.items()}


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


# ---- --data: held-out loss, and how well each sample picks out its own picture among all of the data's ----

def retrieval_ranks(samples, pictures, own_index):
    """The rank (1 = nearest) of each sample's own picture among all pictures by L2 distance of RGB images resized to
    RETRIEVAL_SIDE px (antialiased); a picture as near as the own one does not push it down. samples [n, 3, h, w] and
    pictures [m, 3, h', w'] in [0, 1]; own_index [n]: each sample's row in pictures."""
    a = imagen.resize(samples.float(), RETRIEVAL_SIDE).flatten(1)  # [n, 3 * side²]
    b = imagen.resize(pictures.float(), RETRIEVAL_SIDE).flatten(1)  # [m, 3 * side²]
    distances = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")  # [n, m], exact: an equal image is 0
    own = distances.gather(1, own_index[:, None])  # [n, 1]
    return (distances < own).sum(1) + 1  # [n]


def retrieval_scores(ranks):
    """recall@1, recall@10 (the fraction of own pictures ranked within 1 or 10) and the median rank of ranks [n]."""
    return {"n": len(ranks), **{f"recall@{k}": round((ranks <= k).float().mean().item(), 4) for k in (1, 10)},
            "median_rank": statistics.median(ranks.tolist())}


def chance_scores(n_pictures):
    """What retrieval_scores expects of samples unrelated to their captions, among n_pictures pictures."""
    return {"recall@1": round(1 / n_pictures, 4), "recall@10": round(min(10, n_pictures) / n_pictures, 4),
            "median_rank": (n_pictures + 1) / 2}


def retrieval_pictures(dataset, chunk=256):
    """(every usable picture of the dataset at RETRIEVAL_SIDE px [m, 3, side, side] in [0, 1], {dataset index: row}),
    read `chunk` pictures at a time."""
    rows, parts = {}, []
    for start in range(0, len(dataset), chunk):
        items = {i: item for i in range(start, min(start + chunk, len(dataset))) if (item := dataset[i]) is not None}
        rows |= {i: len(rows) + k for k, i in enumerate(items)}
        if items:
            images = torch.stack([image for image, _ in items.values()])  # [k, 3, s, s] uint8
            parts.append(imagen.resize(images.float() / 255, RETRIEVAL_SIDE))
    return torch.cat(parts), rows


def fixed_choice(indices, n):
    """n of the indices (all if fewer), the same ones every time (seeded by EVAL_SEED), in order."""
    order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(EVAL_SEED))[:n]
    return [indices[i] for i in sorted(order.tolist())]


def caption_lookup(cache, captions, heldout, trained):
    """For each held-out index, the trained index whose caption is nearest in the text encoder's space (cosine of
    masked-mean token embeddings): a reference that draws nothing, only looks up a trained caption's picture."""
    emb, mask = cache([captions[i] for i in heldout + trained])  # [h + t, max_len, d], [h + t, max_len]
    pooled = torch.nn.functional.normalize((emb * mask[..., None]).sum(1), dim=-1)  # the mean's direction [h + t, d]
    return [trained[j] for j in (pooled[:len(heldout)] @ pooled[len(heldout):].T).argmax(1).tolist()]


def retrieval(dataset, indices, pictures, rows, sample, grid):
    """Sample each caption of the dataset at `indices` once, rank its own picture (retrieval_scores), and save the
    first GRID_PAIRS samples beside their pictures as the PNG `grid`."""
    captions = dataset.captions()
    samples = sample([captions[i] for i in indices])  # [n, 3, s, s] in [0, 1]
    ranks = retrieval_ranks(samples, pictures, torch.tensor([rows[i] for i in indices]))
    shown = torch.stack([dataset[i][0] for i in indices[:GRID_PAIRS]]).float() / 255  # [k, 3, s, s]
    imagen.save_grid(torch.stack((samples[:GRID_PAIRS], shown), dim=1).flatten(0, 1), grid, nrow=8)  # sample, own
    return retrieval_scores(ranks)


def eval_data(cascade, stop_at, cache, sample, *, dataset, data_spec, n, n_trained, folder, device):
    """JSON result for `dataset` (--data, at the last sampled stage's size): held-out losses per stage of the first n
    held-out samples; retrieval of the pictures of n_trained training captions and of every held-out caption (grids
    folder/trained.png, heldout.png); the plot of the held-out losses that training logged in `folder`.
    `sample(captions)` draws images [k, 3, s, s] in [0, 1]."""
    size = cascade.config["stages"][stop_at - 1]["size"]
    if isinstance(dataset, data.Shapes):
        raise ValueError("--data shapes: procedural scenes have no fixed pictures to rank; run eval.py without "
                         "--data, which judges the shapes")
    train_set, heldout_set = data.holdout_split(dataset, cascade.config.get("holdout", 0.02), size)
    images, captions = data.first_usable(heldout_set, n)
    emb, mask = (x.to(device) for x in cache(captions))
    losses = [round(imagen.fixed_noise_loss(stage, images.to(device), emb, mask), 5)
              for stage in cascade.stages[:stop_at]]
    pictures, rows = retrieval_pictures(dataset)  # [m, 3, side, side]
    trained = [i for i in train_set.indices if i in rows]
    chosen = dict(trained=fixed_choice(trained, n_trained), heldout=[i for i in heldout_set.indices if i in rows])
    if empty := [name for name, indices in chosen.items() if not indices]:
        raise ValueError(f"--data {data_spec!r} has no usable {empty[0]} sample to rank")
    grids = {name: os.path.join(folder, f"{name}.png") for name in chosen}
    scores = {name: retrieval(dataset, indices, pictures, rows, sample, grids[name])
              for name, indices in chosen.items()}
    looked_up = [rows[i] for i in caption_lookup(cache, dataset.captions(), chosen["heldout"], trained)]  # [h]
    lookup = retrieval_ranks(pictures[looked_up], pictures, torch.tensor([rows[i] for i in chosen["heldout"]]))
    log = os.path.join(folder, "log.jsonl")
    plot = plot_losses(log, os.path.join(folder, "heldout-loss.png")) if os.path.exists(log) else None
    return dict(heldout_loss=losses, n=len(captions), captions=captions, grid=grids["heldout"],
                trained_grid=grids["trained"], plot=plot,
                retrieval=dict(scores, caption_lookup=retrieval_scores(lookup), chance=chance_scores(len(pictures)),
                               pictures=len(pictures)))


def inception_weights(path):
    """`path`, else torch-fidelity's Inception weights in torch hub's download cache; ValueError if not a file."""
    found = path or os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(INCEPTION_URL))
    if not os.path.isfile(found):
        raise ValueError(f"--fid-weights {found}: no such file; download {INCEPTION_URL} and pass it")
    return found


def inception_distance(metric, real, fake, batch=64):
    """torchmetrics' FID or KID `metric` of the uint8 images real [m, 3, s, s] and fake [n, 3, s, s]."""
    for images, is_real in ((real, True), (fake, False)):
        for part in images.split(batch):
            metric.update(part.to(metric.device), real=is_real)
    return metric.compute()


def inception(weights):
    """torch-fidelity's InceptionV3 pool features (what FID and KID compare), its weights the file `weights`."""
    from torchmetrics.image.fid import NoTrainInceptionV3
    return NoTrainInceptionV3("inception-v3-compat", ["2048"], weights)


def frechet_inception_distance(real, fake, features, device):
    """FID (Heusel et al. 2017) of uint8 image sets under the feature network `features` (`inception`)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    return round(inception_distance(FrechetInceptionDistance(feature=features).to(device), real, fake).item(), 4)


def kernel_inception_distance(real, fake, features, device):
    """KID (Bińkowski et al. 2018): unbiased, so fit for small sets; (mean, std) over 100 seeded subsets."""
    from torchmetrics.image.kid import KernelInceptionDistance
    metric = KernelInceptionDistance(feature=features, subset_size=min(1000, len(real), len(fake)))
    with torch.random.fork_rng(devices=[]):  # the subsets: torch.randperm on the CPU generator
        torch.manual_seed(EVAL_SEED)
        return tuple(round(x.item(), 6) for x in inception_distance(metric.to(device), real, fake))


def clip_score(images, captions, model, device, batch=64):
    """CLIP score (Hessel et al. 2021) of uint8 images and their captions under a CLIP model (HF id or folder)."""
    import transformers
    from torchmetrics.multimodal.clip_score import CLIPScore
    clip = transformers.CLIPModel.from_pretrained(model)
    for name in ("get_image_features", "get_text_features"):  # tensors, not transformers 5 outputs (torchmetrics#3407)
        setattr(clip, name, lambda *a, f=getattr(clip, name), **k: getattr(out := f(*a, **k), "pooler_output", out))
    metric = CLIPScore(model_name_or_path=lambda: (clip, transformers.CLIPProcessor.from_pretrained(model))).to(device)
    for start in range(0, len(images), batch):
        metric.update(images[start:start + batch].to(device), captions[start:start + batch])
    return round(metric.compute().item(), 4)


def eval_fidelity(dataset, sample, *, fid, kid, weights, clip_model, device):
    """JSON result of --fid, --kid and --clip-score: one sample of each usable caption against all the pictures."""
    real, captions = data.first_usable(dataset, len(dataset))  # uint8 [n, 3, s, s]
    fake = (sample(captions) * 255).round().to(torch.uint8)
    if fid and len(fake) < 2000:
        print(f"warning: FID of {len(fake)} (< 2,000) samples is biased upward and noisy: read KID", file=sys.stderr)
    features = inception(weights) if fid or kid else None
    return dict(n_samples=len(fake), n_real=len(real),
                fid=frechet_inception_distance(real, fake, features, device) if fid else None,
                kid=kernel_inception_distance(real, fake, features, device) if kid else None,
                clip_score=clip_score(fake, captions, clip_model, device) if clip_model else None)


def eval_shapes(cache, sample, *, n, prompt_seed, grid):
    """JSON result without --data: judge scores of n shapes prompts and seconds per image."""
    prompts = data.shapes_captions(n, seed=prompt_seed)
    cache(prompts)  # encode misses now, so the timing below is sampling alone
    start = time.perf_counter()
    images = sample(prompts)
    seconds = time.perf_counter() - start
    if grid:
        imagen.save_grid(images, grid, nrow=12)
    return dict(score(images, prompts), n=n, seconds_per_image=round(seconds / n, 4), size=images.shape[-1],
                threads=torch.get_num_threads())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_sampling_args(p)
    p.add_argument("--n", type=int, default=96, help="number of prompts (one image each); with --data, at most "
                   "this many held-out samples for the held-out loss")
    p.add_argument("--prompt-seed", type=int, default=EVAL_SEED, help="seed of the evaluation prompts")
    p.add_argument("--grid", default=None, help="also save the judged images as this PNG grid (without --data)")
    p.add_argument("--data", default=None, help="the dataset the cascade was trained on (a folder or shards): "
                   "evaluate on it instead of shapes prompts")
    p.add_argument("--n-trained", type=int, default=256, help="with --data: training captions whose pictures are "
                   "ranked (beside every held-out caption)")
    p.add_argument("--fid", action="store_true", help="with --data: FID of a sample per caption vs all the pictures")
    p.add_argument("--kid", action="store_true", help="with --data: KID of those samples (unbiased: for small sets)")
    p.add_argument("--fid-weights", default=None, help="torch-fidelity's Inception weights file for --fid and --kid "
                   f"(default: {os.path.basename(INCEPTION_URL)} in torch hub's checkpoints folder)")
    p.add_argument("--clip-score", default=None, metavar="MODEL", help="with --data: CLIP score under this CLIP model")
    args = p.parse_args(argv)
    try:
        at_least_one(args.n, "--n")
        at_least_one(args.n_trained, "--n-trained")
        if (fidelity := args.fid or args.kid or args.clip_score) and not args.data:
            raise ValueError("--fid, --kid and --clip-score compare samples with a dataset's pictures: give --data")
        weights = inception_weights(args.fid_weights) if args.fid or args.kid else None
        cascade, stop_at, cache, options = sampling_setup(args)
        sample = functools.partial(generate, cascade, cache, stop_at=stop_at, options=options, seed=args.seed,
                                   batch_size=args.batch_size, device=args.device)
        if args.data:
            folder = args.ckpt if os.path.isdir(args.ckpt) else os.path.dirname(args.ckpt)
            dataset = data.make_dataset(args.data, cascade.config["stages"][stop_at - 1]["size"])
            result = eval_data(cascade, stop_at, cache, sample, dataset=dataset, data_spec=args.data, n=args.n,
                               n_trained=args.n_trained, folder=folder, device=args.device)
            if fidelity:
                result["fidelity"] = eval_fidelity(dataset, sample, fid=args.fid, kid=args.kid, weights=weights,
                                                   clip_model=args.clip_score, device=args.device)
        else:
            result = eval_shapes(cache, sample, n=args.n, prompt_seed=args.prompt_seed, grid=args.grid)
    except (ValueError, OSError) as e:
        p.error(imagen.first_line(e))
    except ImportError as e:  # the metrics extra's packages, imported where --fid, --kid and --clip-score use them
        p.error(f"{imagen.first_line(e)} (the metrics extra: pip install -e \".[metrics]\")")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
