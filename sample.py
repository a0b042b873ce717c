"""Sample a trained cascade: `python sample.py --ckpt out --prompt "a red circle above a blue square"`.

Writes one PNG per image plus a grid, and prints their paths. Uses the EMA weights unless --no-ema.
Edits a given image with --init-image (SDEdit), --inpaint/--mask (RePaint), or super-resolves one with
--start-at-unet K --image PATH.
`python sample.py --ckpt out --export DIR` writes the weights and config of every trained U-Net and a model card
into a folder for sharing; `--ckpt DIR` (or a Hub id of it) samples from it.
"""
import argparse
import json
import math
import os
import re

import numpy as np
import torch
from PIL import Image

import diffusion
import imagen
import registry
import text


def add_sampling_args(p):
    """Flags shared by sample.py and eval.py; unset ones fall back to the checkpoint's stored defaults."""
    a = p.add_argument
    a("--ckpt", required=True, help="training --out folder, one unetK.pt file in it, a folder written by --export, "
      "or a Hugging Face Hub id of such a folder")
    a("--sampler", default=None, help=f"sampler, one value or a comma list per U-Net: "
      f"{', '.join(registry.SAMPLERS.names())} (default: the checkpoint's)")
    a("--steps", default=None, help="sampler steps, one value or a comma list per U-Net")
    a("--cond-scale", default=None, help="classifier-free guidance scale, one value or a comma list per U-Net")
    a("--lowres-noise", type=float, default=None, help="noise level (fraction of T) added to low-res conditions")
    a("--threshold", default=None, help="x0 threshold: " + ", ".join(registry.THRESHOLDS.names()))
    a("--threshold-p", type=float, default=None, help="dynamic-thresholding percentile (Imagen §2.3)")
    a("--stop-at-unet", type=int, default=None, help="stop after U-Net K (0-based); default: every trained U-Net")
    a("--seed", type=int, default=0)
    a("--batch-size", type=int, default=64, help="images sampled at once")
    a("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    a("--cache-dir", default=text.DEFAULT_CACHE_DIR, help="text-embedding cache folder")
    a("--device", default="auto", type=registry.device_flag, help="auto (cuda, then mps, then cpu), cuda:N, mps, cpu")


def at_least_one(value, flag):
    """An integer flag's value; ValueError naming the flag unless it is >= 1."""
    if value < 1:
        raise ValueError(f"{flag} {value}: give an integer >= 1")
    return value


def within(value, flag, allowed, inside):
    """A float flag's value (None passes); ValueError naming the flag and the `allowed` interval if not inside."""
    if value is not None and not inside(value):  # NaN is inside nothing
        raise ValueError(f"{flag} {value}: give a value in {allowed}")
    return value


def checked(value, check, flag):
    """check(value), None passing through; check's ValueError prefixed with the flag and the value."""
    if value is None:
        return None
    try:
        return check(value)
    except ValueError as e:
        raise ValueError(f"{flag} {value!r}: {e}") from None


def positive_steps(value):
    if not str(value).strip().isdigit() or int(value) < 1:
        raise ValueError(f"{value!r} is not an integer >= 1")
    return int(value)


def finite_scale(value):
    if not math.isfinite(scale := float(value)):
        raise ValueError(f"{value!r} is not a finite number")
    return scale


def sampling_options(args):
    """The sampling flags as checked plain data for imagen.Imagen.sample; None where the checkpoint's default holds.
    sampler, steps and cond_scale are per-U-Net lists (one value for every U-Net, or one each)."""
    def listed(value, cast, flag):
        return None if value is None else registry.comma_list(value, cast, flag)
    return dict(sampler=listed(args.sampler, registry.SAMPLERS.canonical, "--sampler"),
                steps=listed(args.steps, positive_steps, "--steps"),
                cond_scale=listed(args.cond_scale, finite_scale, "--cond-scale"),
                lowres_noise=within(args.lowres_noise, "--lowres-noise", "[0, 1)", lambda v: 0 <= v < 1),
                threshold=checked(args.threshold, registry.THRESHOLDS.canonical, "--threshold"),
                threshold_p=within(args.threshold_p, "--threshold-p", "(0, 1]", lambda v: 0 < v <= 1))


def load_for_sampling(ckpt, device, *, ema, stop_at_unet, cache_dir):
    """(cascade, stop_at, text cache) for a checkpoint: U-Nets 0..stop_at_unet (None: every trained U-Net)."""
    imagen.reuse_freed_memory(torch.device(device))
    cascade, trained = imagen.load_cascade(ckpt, device, ema=ema)
    stop_at = trained if stop_at_unet is None else stop_at_unet + 1
    if not 1 <= stop_at <= trained:
        raise ValueError(f"--stop-at-unet {stop_at_unet} not available; {ckpt} has trained U-Nets 0..{trained - 1}")
    encoder = text.resolve(cascade.config["encoder"], registry.ENCODERS)
    return cascade, stop_at, text.EmbeddingCache(cache_dir, encoder, cascade.config["max_text_len"], device=device)


def sampling_setup(args):
    """(cascade, stop_at, text cache, sampling options) from the sampling flags, every value checked before loading."""
    options = sampling_options(args)
    at_least_one(args.batch_size, "--batch-size")
    cascade, stop_at, cache = load_for_sampling(args.ckpt, args.device, ema=not args.no_ema,
                                                stop_at_unet=args.stop_at_unet, cache_dir=args.cache_dir)
    for key in ("sampler", "steps", "cond_scale"):
        if options[key] is not None:
            registry.broadcast(options[key], len(cascade.stages), f"--{key.replace('_', '-')} (one per U-Net)")
    return cascade, stop_at, cache, options


def generate(cascade, cache, prompts, stop_at, options, *, seed, batch_size, device, start_at=0, start_images=None,
             edit=None):
    """Images [n, 3, s, s] in [0, 1] for a list of prompts, sampled in batches with one seeded generator. `options`
    are imagen.Imagen.sample's (see sampling_options); start_images [1, 3, h, w] and an Edit's tensors apply to
    every prompt (see imagen.Imagen.sample)."""
    generator = torch.Generator(device).manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch_size):
        emb, mask = cache(prompts[i:i + batch_size])  # [b, n, d], [b, n]
        start = None if start_images is None else start_images.to(device).expand(len(emb), -1, -1, -1)
        out.append(cascade.sample(emb.to(device), mask.to(device), stop_at=stop_at, start_at=start_at,
                                  start_images=start, edit=edit, generator=generator, **options).cpu())
    return torch.cat(out)


def add_edit_args(p):
    """Flags that give sample.py an image to edit or super-resolve."""
    a = p.add_argument
    a("--init-image", default=None, help="image to start from (SDEdit, arXiv 2108.01073), resized to the first U-Net")
    a("--strength", type=float, default=None, help="fraction of the chain run from the noised image: 0 returns it, "
      "1 ignores it (default: 0.6 with --init-image, 1 with --inpaint)")
    a("--inpaint", default=None, help="image whose pixels outside --mask are kept (RePaint, arXiv 2201.09865)")
    a("--mask", default=None, help="with --inpaint: white where new content is painted, black where the image is kept")
    a("--resample", type=int, default=1, help="with --inpaint: runs of each step, jumping back between (RePaint's U)")
    a("--start-at-unet", type=int, default=None, help="with --image: super-resolve it through U-Nets K, K+1, ...")
    a("--image", default=None, help="with --start-at-unet K: the low-res input of U-Net K (resized to its input size)")


def load_image(path, flag, mode="RGB"):
    """A square image file as [1, c, h, w] in [0, 1]; ValueError naming the flag and file otherwise."""
    try:
        image = Image.open(path).convert(mode)
    except OSError as e:  # missing or not an image
        raise ValueError(f"{flag} {path!r}: cannot read it as an image ({e.__class__.__name__})") from None
    if image.width != image.height:
        raise ValueError(f"{flag} {path!r} is {image.width}x{image.height}; give a square image")
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)  # [h, w] or [h, w, c]
    return pixels.reshape(image.height, image.width, -1).permute(2, 0, 1)[None]  # [1, c, h, w]


def edit_from_args(args, stop_at):
    """(start_at, start_images, Edit or None) from the image flags; ValueError for a combination that makes no sense."""
    given = args.init_image or args.inpaint
    if args.init_image and args.inpaint:
        raise ValueError("give --init-image or --inpaint, not both: each is the image to edit")
    if args.strength is not None and not given:
        raise ValueError(f"--strength {args.strength} needs --init-image or --inpaint (the image to noise)")
    if (args.inpaint is None) != (args.mask is None):
        raise ValueError("--inpaint PATH and --mask PATH go together: the image and where to paint")
    if args.resample != 1 and args.mask is None:
        raise ValueError(f"--resample {args.resample} needs --inpaint and --mask: it harmonises the kept pixels")
    if (args.start_at_unet is None) != (args.image is None):
        raise ValueError("--start-at-unet K and --image PATH go together: the U-Net to start at and its low-res input")
    start_at = args.start_at_unet or 0
    if args.start_at_unet is not None and not 1 <= start_at < stop_at:
        raise ValueError(f"--start-at-unet {start_at} out of range: this run samples U-Nets 0..{stop_at - 1}, "
                         "and U-Net 0 (the base) takes no image; use --init-image for it")
    start_images = None if args.image is None else load_image(args.image, "--image")
    if not given:
        return start_at, start_images, None
    strength = args.strength if args.strength is not None else 1.0 if args.inpaint else 0.6
    keep = None if args.mask is None else 1 - load_image(args.mask, "--mask", "L").to(args.device)
    image = load_image(given, "--init-image" if args.init_image else "--inpaint").to(args.device)
    return start_at, start_images, diffusion.Edit(image, strength, keep, args.resample)


def export(args):
    """Write the --ckpt's trained U-Nets (EMA unless --no-ema) to the --export folder; print its path."""
    config, weights, history = imagen.load_weights(args.ckpt, ema=not args.no_ema)
    stages = range(imagen.leading_stages(weights))
    about = dict(trained=[history.get(k, {}) for k in stages], weights="raw" if args.no_ema else "EMA",
                 eval=eval_scores(args.ckpt))
    imagen.export_folder(config, {k: weights[k] for k in stages}, args.export, about)
    with open(os.path.join(args.export, "README.md"), "w") as f:
        f.write(model_card(config, about))
    print(args.export)


def eval_scores(ckpt):
    """The scores in eval.json beside the checkpoints (`python eval.py --ckpt out > out/eval.json`), or None."""
    path = os.path.join(ckpt if os.path.isdir(ckpt) else os.path.dirname(ckpt), "eval.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(f"{path} is not eval.py's JSON ({imagen.first_line(e)})") from None


def model_card(config, about):
    """An exported folder's README.md: the cascade, what trained each U-Net, its eval scores where known."""
    rows = []
    for k, trained in enumerate(about["trained"]):
        stage, settings = config["stages"][k], trained.get("settings") or {}
        rows.append(f"| {k} | {stage['unet']} | {stage['size']} px | {trained.get('steps') or 'unknown'} | "
                    f"{settings.get('recipe', 'unknown') or 'none'} | {settings.get('data', 'unknown')} |")
    scores = json.dumps(about["eval"]) if about["eval"] else "unknown (no eval.json beside the checkpoints)"
    return "\n".join([
        "# nanoimagen cascade", "",
        f"{len(rows)} text-conditioned pixel diffusion U-Nets over `{config['encoder']}` text embeddings, "
        f"{about['weights']} weights. Sample: `python sample.py --ckpt THIS_FOLDER --prompt \"a red circle\"`.", "",
        "| U-Net | preset | size | steps trained | recipe | data |", "|---|---|---:|---:|---|---|", *rows, "",
        f"Eval scores: {scores}", ""])


def read_prompts(prompts, prompts_file, n_per_prompt):
    """The --prompt values then the lines of --prompts, each repeated n_per_prompt times."""
    if prompts_file:
        try:
            with open(prompts_file) as f:
                prompts = [*prompts, *(line.strip() for line in f if line.strip())]
        except OSError as e:
            raise ValueError(f"--prompts {prompts_file!r}: cannot read it ({e.strerror})") from None
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompts file")
    return [q for q in prompts for _ in range(at_least_one(n_per_prompt, "--n-per-prompt"))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_sampling_args(p)
    add_edit_args(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", default=None, help="a text file with one prompt per line")
    p.add_argument("--n-per-prompt", type=int, default=1, help="images per prompt")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--export", default=None, metavar="DIR", help="instead of sampling, write the weights (EMA unless "
                   "--no-ema) and config of every trained U-Net to a folder that --ckpt loads (config.json, "
                   "unetK.safetensors, a README.md model card)")
    args = p.parse_args(argv)
    try:
        if args.export:
            return export(args)
        prompts = read_prompts(args.prompt, args.prompts, args.n_per_prompt)
        cascade, stop_at, cache, options = sampling_setup(args)
        start_at, start_images, edit = edit_from_args(args, stop_at)
        images = generate(cascade, cache, prompts, stop_at, options, seed=args.seed, batch_size=args.batch_size,
                          device=args.device, start_at=start_at, start_images=start_images, edit=edit)
    except (ValueError, OSError) as e:
        p.error(imagen.first_line(e))
    os.makedirs(args.out, exist_ok=True)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "prompt"
        path = os.path.join(args.out, f"{i:03d}-{slug}.png")
        imagen.to_pil(image).save(path)
        print(path)
    grid = os.path.join(args.out, "grid.png")
    imagen.save_grid(images, grid, nrow=max(args.n_per_prompt, min(8, len(prompts))))
    print(grid)


if __name__ == "__main__":
    main()
