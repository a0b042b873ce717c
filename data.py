"""Datasets: the built-in procedural `shapes` set (with its pixel judge), image-caption folders and webdataset shards.

Every dataset item is (uint8 image [3, s, s], caption) or None for a bad sample; `collate` drops and counts the Nones.
Shapes captions follow a fixed grammar (other tools rely on it):
  one object:  a [small |large ]COLOR SHAPE[ on the left| on the right| at the top| at the bottom]
  two objects: a COLOR SHAPE (to the left of|to the right of|above|below) a COLOR SHAPE   (two different colours)
"""
import contextlib
import csv
import io
import json
import os
import re
import struct
import tarfile
import uuid
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Subset

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 200, 20),
          "purple": (140, 60, 180), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle")
SIZE_WORDS = (None, "small", "large")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "top": (1, -1), "bottom": (1, 1)}  # name -> (axis: 0 = x, 1 = y; sign)
ON = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
RELATION = {"left": "to the left of", "right": "to the right of", "top": "above", "bottom": "below"}

# Geometry, in fractions of the image width. r is an object's "radius": the circle's radius, the square's half side
# over SQUARE_HALF_SIDE, the upright triangle's circumradius over TRIANGLE_CIRCUMRADIUS (similar visual areas).
SQUARE_HALF_SIDE, TRIANGLE_CIRCUMRADIUS = 0.9, 1.25
HALF_EXTENT = {"circle": (1.0, 1.0), "square": (SQUARE_HALF_SIDE, SQUARE_HALF_SIDE),  # (x, y) bounding half-box / r
               "triangle": (TRIANGLE_CIRCUMRADIUS * 3 ** 0.5 / 2, TRIANGLE_CIRCUMRADIUS)}
RADIUS = {None: (0.14, 0.16), "small": (0.09, 0.11), "large": (0.20, 0.23)}  # one-object radius ranges per size word
PAIR_RADIUS = (0.12, 0.16)
MARGIN, GAP = 0.02, 0.08  # min distance to the border; min gap between two objects' bounding boxes
EDGE = 0.33  # a positioned object's centre lies within EDGE of its border ("on the left": x <= 0.33)
JITTER, PAIR_JITTER = 0.06, 0.03  # centre jitter of unpositioned objects; of each pair object across the pair axis

# Judge: images are resampled to JUDGE_SIZE; thresholds are fractions of the image size unless noted.
JUDGE_SIZE = 64
POSITION_MARGIN = 0.1  # "on the left" <=> centroid x < 0.5 - POSITION_MARGIN
MIN_AREA = 0.004  # a colour is present if it covers this fraction of the pixels
MIN_SHAPE_IOU = 0.6  # below this overlap with every ideal shape, a blob is no shape
MAX_RESIDUAL = 90.0  # RGB distance beyond which a pixel is no blend of white and any palette colour
PALETTE = np.array(list(COLORS.values()), np.float32)  # [k, 3]
UNIT_AREA = {"circle": np.pi, "square": (2 * SQUARE_HALF_SIDE) ** 2,  # area at r = 1
             "triangle": 3 * 3 ** 0.5 / 4 * TRIANGLE_CIRCUMRADIUS ** 2}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
DECODED_BYTES = 2**29  # an image folder keeps this much of its decoded images in memory, in each loader process
HOLDOUT_SEED = 20_251_203  # which samples are held out from training (never the training --seed)


class Caption(NamedTuple):
    """A shapes caption: one or two (color, shape, size word | None) objects and a direction name or None."""
    objects: tuple
    direction: str | None  # where the single object lies, or where the first object lies relative to the second

    def text(self):
        """The caption in the dataset's grammar."""
        words = [f"a {size + ' ' if size else ''}{color} {shape}" for color, shape, size in self.objects]
        if len(words) == 2:
            return f"{words[0]} {RELATION[self.direction]} {words[1]}"
        return words[0] + (f" {ON[self.direction]}" if self.direction else "")


def _any_of(words):
    """A regex group matching any of the (non-None) words."""
    return "(" + "|".join(w for w in words if w) + ")"


_ONE = re.compile(f"a (?:{_any_of(SIZE_WORDS)} )?{_any_of(COLORS)} {_any_of(SHAPES)}(?: {_any_of(ON.values())})?")
_TWO = re.compile(f"a {_any_of(COLORS)} {_any_of(SHAPES)} {_any_of(RELATION.values())} a {_any_of(COLORS)} "
                  f"{_any_of(SHAPES)}")


def parse_caption(caption):
    """The Caption of a shapes-grammar string; ValueError if it is outside the grammar."""
    if one := _ONE.fullmatch(caption.strip()):
        size, color, shape, where = one.groups()
        return Caption(((color, shape, size),), {v: k for k, v in ON.items()}.get(where))
    two = _TWO.fullmatch(caption.strip())
    if not two or two[1] == two[4]:
        raise ValueError(f"caption {caption!r} is outside the shapes grammar (see data.py's docstring)")
    return Caption(((two[1], two[2], None), (two[4], two[5], None)), {v: k for k, v in RELATION.items()}[two[3]])


def _pick(rng, options):
    """A uniformly random element of options."""
    return options[rng.integers(len(options))]


def sample_caption(rng):
    """A random Caption: half one-object (size and position words optional), half two-object."""
    colors = list(COLORS)
    if rng.random() < 0.5:
        obj = (_pick(rng, colors), _pick(rng, SHAPES), _pick(rng, SIZE_WORDS))
        return Caption((obj,), _pick(rng, (None, *DIRECTIONS)))
    first = rng.integers(len(colors))
    second = (first + 1 + rng.integers(len(colors) - 1)) % len(colors)  # any other colour
    objs = ((colors[first], _pick(rng, SHAPES), None), (colors[second], _pick(rng, SHAPES), None))
    return Caption(objs, _pick(rng, list(DIRECTIONS)))


class SceneObject(NamedTuple):
    """One shape to draw; x, y (the area centroid) and r are fractions of the image width."""
    color: str
    shape: str
    x: float
    y: float
    r: float


def _place_one(rng, color, shape, size, direction):
    """A lone object: near the centre, or with its centre within EDGE of the named border."""
    r = rng.uniform(*RADIUS[size])
    centre = 0.5 + rng.uniform(-JITTER, JITTER, 2)  # [x, y]
    if direction:
        axis, sign = DIRECTIONS[direction]
        reach = 0.5 - MARGIN - HALF_EXTENT[shape][axis] * r  # farthest the centre may go from the middle
        centre[axis] = 0.5 + sign * rng.uniform(0.5 - EDGE, reach)
    return [SceneObject(color, shape, *centre, r)]


def _place_pair(rng, first, second, direction):
    """Two objects side by side along the direction's axis with a clear gap, barely offset across it."""
    axis, sign = DIRECTIONS[direction]
    radii = rng.uniform(*PAIR_RADIUS, 2)
    half = [HALF_EXTENT[shape][axis] * r for (_, shape, _), r in zip((first, second), radii)]
    dist = rng.uniform(sum(half) + GAP, 1 - 2 * MARGIN - sum(half))  # centre-to-centre distance along the axis
    start = rng.uniform(MARGIN + half[0], 1 - MARGIN - half[1] - dist)
    along = 0.5 - sign * (np.array([start, start + dist]) - 0.5)  # [first, second]; mirrored if first is right/below
    across = 0.5 + rng.uniform(-0.1, 0.1) + rng.uniform(-PAIR_JITTER, PAIR_JITTER, 2)
    centres = np.stack([along, across])[[axis, 1 - axis]].T  # [2 objects, (x, y)]
    return [SceneObject(c, s, *xy, r) for (c, s, _), xy, r in zip((first, second), centres, radii)]


def sample_scene(rng):
    """A random (scene objects, caption text) drawn from the dataset's distribution."""
    caption = sample_caption(rng)
    if len(caption.objects) == 1:
        return _place_one(rng, *caption.objects[0], caption.direction), caption.text()
    return _place_pair(rng, *caption.objects, caption.direction), caption.text()


def shapes_captions(n, seed):
    """The captions of items 0..n-1 of Shapes(seed=seed), without rendering."""
    return [sample_caption(np.random.default_rng((seed, i))).text() for i in range(n)]


def _signed_distance(shape, dx, dy, r):
    """Signed distance in pixels (negative inside) at offsets dx [w], dy [h, 1] from the centroid; -> [h, w]."""
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - SQUARE_HALF_SIDE * r
    slant = np.abs(dx) * (3 ** 0.5 / 2) - dy / 2  # distance along the two upper edges' outward normals
    return np.maximum(slant, dy) - TRIANGLE_CIRCUMRADIUS * r / 2  # edges lie at the inradius = circumradius / 2


def _paint(image, obj, size):
    """Composites one antialiased object onto a float image [s, s, 3] in place (only its bounding window)."""
    cx, cy, r = obj.x * size, obj.y * size, obj.r * size
    hx, hy = np.array(HALF_EXTENT[obj.shape]) * r + 1.5  # window half size, +antialiasing band
    x0, x1 = max(int(cx - hx), 0), min(int(cx + hx) + 1, size)
    y0, y1 = max(int(cy - hy), 0), min(int(cy + hy) + 1, size)
    dx = np.arange(x0, x1) + 0.5 - cx  # [w] pixel centres
    dy = (np.arange(y0, y1) + 0.5 - cy)[:, None]  # [h, 1]
    coverage = np.clip(0.5 - _signed_distance(obj.shape, dx, dy, r), 0, 1)[..., None]  # [h, w, 1] ~1-pixel AA
    window = image[y0:y1, x0:x1]  # [h, w, 3] view
    window += coverage * (np.array(COLORS[obj.color], np.float32) - window)


def render(scene, size):
    """The scene's objects over a white background -> uint8 numpy [size, size, 3]."""
    image = np.full((size, size, 3), 255.0, np.float32)  # [s, s, 3]
    for obj in scene:
        _paint(image, obj, size)
    return (image + 0.5).astype(np.uint8)


class Shapes(Dataset):
    """The built-in dataset: procedural shapes scenes, deterministic per (seed, index) and the same at every size."""

    def __init__(self, size=64, seed=0, length=1_000_000):
        if not 32 <= size <= 256:
            raise ValueError(f"shapes image size {size!r} is not allowed; choose a size from 32 to 256")
        self.size, self.seed, self.length = int(size), seed, length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(f"shapes index {index} is outside 0..{self.length - 1}")
        scene, caption = sample_scene(np.random.default_rng((self.seed, index)))
        return torch.from_numpy(render(scene, self.size)).permute(2, 0, 1).contiguous(), caption  # [3, s, s]

    def captions(self):
        """Every caption the grammar can produce, what the text cache precomputes: 270 one-object + 1080 two-object."""
        one = [Caption(((c, s, z),), d) for c in COLORS for s in SHAPES for z in SIZE_WORDS
               for d in (None, *DIRECTIONS)]
        two = [Caption(((a, s, None), (b, t, None)), d) for a in COLORS for s in SHAPES for d in DIRECTIONS
               for b in COLORS if b != a for t in SHAPES]
        return [caption.text() for caption in one + two]


def _as_pixels(image):
    """uint8 numpy HWC, PIL image or tensor [3, h, w] (float in [0, 1] or uint8) -> float numpy [64, 64, 3], 0..255."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # [3, h, w]
    x = image.detach().cpu().float() / (255.0 if image.dtype == torch.uint8 else 1.0)  # [3, h, w] in [0, 1]
    x = F.interpolate(x[None], size=(JUDGE_SIZE, JUDGE_SIZE), mode="bilinear", antialias=True)[0]  # [3, 64, 64]
    return (x.clamp(0, 1) * 255).permute(1, 2, 0).numpy()


def _color_labels(pixels):
    """Each pixel's palette index (nearest white-to-colour blend line, >= half coverage), -1 for background [h, w]."""
    offset = pixels.reshape(-1, 3) - 255  # [n, 3] from white
    toward = PALETTE - 255  # [k, 3] white -> colour
    alpha = np.clip(offset @ toward.T / (toward * toward).sum(1), 0, 1)  # [n, k] best blend fraction
    residual = np.linalg.norm(offset[:, None] - alpha[..., None] * toward, axis=-1)  # [n, k]
    best = residual.argmin(1)  # [n]
    rows = np.arange(len(best))
    foreground = (alpha[rows, best] >= 0.5) & (residual[rows, best] <= MAX_RESIDUAL)
    return np.where(foreground, best, -1).reshape(pixels.shape[:2])


def _largest_component(mask):
    """The largest 8-connected component of a non-empty boolean mask [h, w] (min-label propagation)."""
    h, w = mask.shape
    background = h * w
    labels = np.where(mask, np.arange(h * w).reshape(h, w), background)  # [h, w] flat pixel ids
    while True:
        padded = np.pad(labels, 1, constant_values=background)  # [h + 2, w + 2]
        spread = np.min([padded[i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=0)  # [h, w]
        spread = np.where(mask, np.append(spread.ravel(), background)[spread], background)  # pointer jumping
        if np.array_equal(spread, labels):
            return labels == np.bincount(labels[mask]).argmax()
        labels = spread


def _shape_of(blob):
    """The shape whose ideal (same area and centroid, upright) overlaps the blob best, or None if all overlap poorly."""
    ys, xs = np.nonzero(blob)
    dx = np.arange(blob.shape[1]) - xs.mean()  # [w] offsets from the centroid
    dy = (np.arange(blob.shape[0]) - ys.mean())[:, None]  # [h, 1]
    ideals = {s: _signed_distance(s, dx, dy, np.sqrt(len(xs) / UNIT_AREA[s])) < 0 for s in SHAPES}  # [h, w] each
    overlaps = {s: (ideal & blob).sum() / (ideal | blob).sum() for s, ideal in ideals.items()}  # IoU
    best = max(overlaps, key=overlaps.get)
    return best if overlaps[best] >= MIN_SHAPE_IOU else None


def _centroid(blob):
    """The blob's centroid (x, y) as fractions of the image width and height."""
    ys, xs = np.nonzero(blob)
    return (np.array([xs.mean(), ys.mean()]) + 0.5) / blob.shape[::-1]


def _position_ok(blobs, direction):
    """One blob: centroid in the named region; two: the first lies from the second in that direction, mostly."""
    axis, sign = DIRECTIONS[direction]
    if len(blobs) == 1:
        return bool(sign * (_centroid(blobs[0])[axis] - 0.5) > POSITION_MARGIN)
    delta = _centroid(blobs[0]) - _centroid(blobs[1])  # [2] second -> first
    return bool(sign * delta[axis] > abs(delta[1 - axis]))


def judge(image, caption):
    """Reads pixels only: whether the caption's colours, shapes and position (None if unnamed) are in the image."""
    parsed = parse_caption(caption)
    labels = _color_labels(_as_pixels(image))  # [h, w]
    areas = np.bincount(labels[labels >= 0], minlength=len(COLORS))  # [k] pixels per palette colour
    present = areas >= MIN_AREA * labels.size
    wanted = [list(COLORS).index(color) for color, _, _ in parsed.objects]
    largest = np.argsort(-areas, kind="stable")[:len(wanted)]
    # each wanted colour's largest blob with its holes filled (all that the largest background part cannot reach)
    blobs = [~_largest_component(~_largest_component(labels == k)) if present[k] else None for k in wanted]
    found = all(blob is not None for blob in blobs)
    return {"color": bool(present[largest].all()) and set(largest) == set(wanted),
            "shape": found and all(_shape_of(b) == shape for b, (_, shape, _) in zip(blobs, parsed.objects)),
            "position": None if parsed.direction is None else found and _position_ok(blobs, parsed.direction)}


def load_image(source, size):
    """A path or file object -> RGB uint8 [3, size, size] (upright, resized, centre-cropped); None if unreadable."""
    try:
        with Image.open(source) as img:
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale that still covers size
            img = ImageOps.exif_transpose(img)  # phone photos: apply the EXIF orientation
            if img.has_transparency_data:
                img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
            img = ImageOps.fit(img.convert("RGB"), (size, size), Image.Resampling.BICUBIC)
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, Image.DecompressionBombError):
        return None  # PIL raises all of these on broken files
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()  # [3, s, s]


def _item(source, caption, size):
    """(image, caption), or None when the caption is missing or empty or the image unreadable."""
    image = load_image(source, size) if caption and source is not None else None
    return None if image is None else (image, caption)


def _jsonl_rows(path):
    """The objects of a JSON-lines file; a malformed line raises ValueError naming the file and line number."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rows += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg}); expected one "
                             '{"file": ..., "caption": ...} object per line') from None
    return rows


def _manifest_rows(root):
    """(file, caption) rows of root/captions.jsonl or root/captions.csv; None when there is no manifest."""
    if (path := root / "captions.jsonl").is_file():
        rows = _jsonl_rows(path)
    elif (path := root / "captions.csv").is_file():
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
    else:
        return None
    columns = sorted({column for row in rows for column in row})
    if rows and not {"file", "caption"} <= set(columns):
        raise ValueError(f"manifest {path} has columns {columns}; it needs 'file' and 'caption'")
    return [(row.get("file"), row.get("caption")) for row in rows]


def _paired_rows(root):
    """(image path, caption of the same-named .txt or None) for every image under root."""
    images = sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    return [(p.relative_to(root), t.read_text(errors="replace") if (t := p.with_suffix(".txt")).is_file() else None)
            for p in images]


def _check_captioned(name, captions):
    """ValueError when a dataset has no sample or no sample with a caption (training would wait forever)."""
    if not captions:
        raise ValueError(f"{name} is empty: expected name.jpg|png|webp + name.txt pairs, a captions.jsonl / "
                         f"captions.csv manifest with file and caption, or .tar shards of such pairs")
    if not any(captions):
        raise ValueError(f"{name} has {len(captions)} images but no captions: expected name.txt beside each image "
                         f"(or key.txt / key.json with a 'caption' in shards), or a manifest with file and caption")


class ImageFolder(Dataset):
    """Image-caption pairs: DIR/name.jpg|png|webp + name.txt, or a captions.jsonl / captions.csv (file, caption)."""

    def __init__(self, root, size):
        self.root, self.size = Path(root), size
        if not self.root.is_dir():
            raise ValueError(f"image folder {str(root)!r} does not exist")
        rows = _manifest_rows(self.root)
        self.rows = [(f, (c or "").strip()) for f, c in (_paired_rows(self.root) if rows is None else rows)]
        _check_captioned(f"image folder {str(root)!r}", self.captions())
        self.decoded = {}  # index -> item, up to DECODED_BYTES: a small set is decoded once, not once an epoch

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        file, caption = self.rows[index]
        item = self.decoded.get(index) or _item(None if file is None else self.root / file, caption, self.size)
        if len(self.decoded) * 3 * self.size ** 2 < DECODED_BYTES:
            self.decoded[index] = item
        return item

    def captions(self):
        """Every sample's caption ('' where it has none), in index order."""
        return [caption for _, caption in self.rows]


def _shard_paths(spec):
    """The .tar files of a directory or of a pattern with one brace range, its padding kept ('d/{00000..00002}.tar'
    -> d/00000.tar, d/00001.tar, d/00002.tar); ValueError if none exist or one is missing."""
    braces = re.fullmatch(r"(.*)\{(\d+)\.\.(\d+)\}(.*)", str(spec))
    if Path(spec).is_dir():
        paths = sorted(Path(spec).glob("*.tar"))
    elif braces:
        head, first, last, tail = braces.groups()
        paths = [Path(f"{head}{i:0{len(first)}d}{tail}") for i in range(int(first), int(last) + 1)]
    else:
        paths = [Path(spec)]
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        raise ValueError(f"shards {str(spec)!r}: {'missing ' + missing[0] if missing else 'no .tar files'}; "
                         f"expected a directory of .tar shards or a pattern like DIR/{{00000..00099}}.tar")
    return paths


def _caption_of(payloads):
    """A sample's caption from key.txt, else from the 'caption' of key.json (img2dataset writes both); '' if none."""
    if "txt" in payloads:
        return payloads["txt"].decode("utf-8", "replace").strip()
    try:
        meta = json.loads(payloads.get("json", b"{}"))
    except ValueError:
        return ""
    return str(meta.get("caption") or "").strip() if isinstance(meta, dict) else ""


def _scan_shard(path):
    """(samples [[image extension, data offset, size, caption]], truncated) of one uncompressed tar shard.

    Reads the tar headers (seeking over image data) and the small caption members. Members that share a key
    (the basename up to its first dot, as in webdataset) form one sample. A truncated shard keeps the samples
    whose image lies wholly inside the file.
    """
    end = path.stat().st_size
    members = {}  # (folder, key) -> {extension: (offset, size), or the bytes of a .txt or .json caption}
    with tarfile.open(path, "r:") as tar, open(path, "rb") as raw:
        try:
            for member in tar:
                folder, _, base = member.name.rpartition("/")
                key, _, extension = base.partition(".")
                if member.isfile() and member.offset_data + member.size <= end:
                    payload = member.offset_data, member.size
                    if member.name.lower().endswith((".txt", ".json")):
                        raw.seek(member.offset_data)
                        payload = raw.read(member.size)
                    members.setdefault((folder, key), {})[extension.lower()] = payload
            raw.seek(tar.offset)
            truncated = tar.offset > end or raw.read().strip(b"\0") != b""  # no clean end of archive
        except tarfile.ReadError:  # a corrupt header after the first: keep what came before
            truncated = True
    return [[*next(((e, *payloads[e]) for e in IMAGE_EXTENSIONS if e in payloads), (None, 0, 0)),
             _caption_of(payloads)] for payloads in members.values()], truncated


def _shard_index(path):
    """The shard's sample index, read from PATH.idx.json beside it when that matches the shard, else built (and
    stored there when the folder is writable): one scan per shard, ever."""
    stat, index_path = path.stat(), path.with_name(path.name + ".idx.json")
    stamp = [stat.st_size, stat.st_mtime_ns]
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # missing, stale or damaged: rebuild
        index = json.loads(index_path.read_text())
        if index["stamp"] == stamp:
            return index
    try:
        samples, truncated = _scan_shard(path)
    except tarfile.TarError:  # not a tar file at all, or broken from its first header
        samples, truncated = [], True
    index = dict(stamp=stamp, samples=samples, truncated=truncated)
    with contextlib.suppress(OSError):
        write_atomically(index_path, lambda tmp: tmp.write_text(json.dumps(index)))
    return index


class Shards(Dataset):
    """img2dataset / webdataset tar shards read in place: key.jpg|png|webp + key.txt (or key.json's 'caption').

    Each shard is indexed once (offsets of its images, its captions; see `_shard_index`), so the shards are a
    map-style dataset: the training sampler shuffles samples across shards every epoch, splits them evenly over
    DDP ranks and resumes at the exact next sample, for any number of ranks and loader workers.
    """

    def __init__(self, pattern_or_dir, size):
        self.size, self.paths = size, _shard_paths(pattern_or_dir)
        indexes = [_shard_index(path) for path in self.paths]
        self.truncated = [str(path) for path, index in zip(self.paths, indexes) if index["truncated"]]
        rows = [(shard, *sample) for shard, index in enumerate(indexes) for sample in index["samples"]]
        self.shard, self.extension, self.offset, self.length, self._captions = zip(*rows) if rows else ((),) * 5
        _check_captioned(f"shards {str(pattern_or_dir)!r}", self._captions)

    def __len__(self):
        return len(self._captions)

    def __getitem__(self, index):
        image = None
        if self.extension[index] is not None:
            with open(self.paths[self.shard[index]], "rb") as f:  # one file open at a time, whatever the shard count
                f.seek(self.offset[index])
                image = io.BytesIO(f.read(self.length[index]))
        return _item(image, self._captions[index], self.size)

    def captions(self):
        """Every sample's caption ('' where it has none), in index order."""
        return list(self._captions)


class EpochSampler(torch.utils.data.Sampler):
    """Endless dataset indices for one DDP rank from global sample `start`: epoch e is a permutation seeded by
    (seed, e), and rank r takes global samples r, r + world, ... So every rank gets the same number of samples per
    step, and a resumed run reads exactly the samples it would have read."""

    def __init__(self, n, seed, start=0, rank=0, world_size=1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..world_size-1 = 0..{world_size - 1}")
        self.n, self.seed, self.start, self.rank, self.world = n, seed, start, rank, world_size

    def __iter__(self):
        g, epoch, perm = self.start + self.rank, None, None
        while True:
            e, i = divmod(g, self.n)
            if e != epoch:
                epoch, perm = e, torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + e))
            yield int(perm[i])
            g += self.world


def holdout_split(dataset, holdout, size):
    """(training set, held-out set). Folders and shards hold out `holdout` captioned samples (a count, or a fraction
    of the captioned samples when below 1; at least one), a fixed random choice per dataset: training never reads
    them. Shapes is procedural: its held-out samples are another seed's scenes, and every index trains."""
    if isinstance(dataset, Shapes):
        return dataset, Shapes(size, seed=HOLDOUT_SEED)
    captioned = [i for i, caption in enumerate(dataset.captions()) if caption]
    count = max(1, round(holdout * len(captioned)) if holdout < 1 else int(holdout))
    if count >= len(captioned):
        raise ValueError(f"--holdout {holdout} holds out {count} of {len(captioned)} captioned samples; choose a "
                         f"count below {len(captioned)} or a fraction below 1")
    order = torch.randperm(len(captioned), generator=torch.Generator().manual_seed(HOLDOUT_SEED)).tolist()
    held = {captioned[i] for i in order[:count]}
    return Subset(dataset, [i for i in range(len(dataset)) if i not in held]), Subset(dataset, sorted(held))


def first_usable(dataset, n):
    """(uint8 images [<=n, 3, s, s], captions) of the first n usable samples of a dataset."""
    items = (item for i in range(len(dataset)) if (item := dataset[i]) is not None)
    return collate([item for _, item in zip(range(n), items)])[:2]  # (images, captions) without the skip count


def collate(batch):
    """Drops None items -> (uint8 images [b, 3, s, s] ([0, 3, 0, 0] if none are left), captions, n_skipped)."""
    kept = [item for item in batch if item is not None]
    images = torch.stack([image for image, _ in kept]) if kept else torch.zeros(0, 3, 0, 0, dtype=torch.uint8)
    return images, [caption for _, caption in kept], len(batch) - len(kept)


def to_signed(images):
    """uint8 images [b, 3, s, s] -> float [b, 3, s, s] in [-1, 1], what the diffusion models see."""
    return images.float() / 127.5 - 1


def make_dataset(spec, size, seed=0):
    """'shapes' -> Shapes; a shard pattern or a directory with .tar files -> Shards; other directory -> ImageFolder."""
    spec, path = str(spec), Path(spec)
    if spec.lower() == "shapes":
        return Shapes(size, seed)
    if "{" in spec or path.suffix == ".tar" or (path.is_dir() and any(path.glob("*.tar"))):
        return Shards(spec, size)
    if path.is_dir():
        return ImageFolder(spec, size)
    raise ValueError(f"dataset {spec!r} does not exist; choose 'shapes', an image-caption folder, "
                     f"a directory of .tar shards or a shard pattern like DIR/{{00000..00099}}.tar")


def write_atomically(path, write):
    """Call write(tmp) for a temporary path beside `path`, fsync it, move it over `path` and fsync the folder:
    readers (and a reboot) see all of the new file or the previous one. On any failure tmp is removed."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def fsync(path):
    """fsync a file, or a folder so that a rename inside it survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

