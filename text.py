"""Frozen text encoders (Imagen, arXiv 2205.11487 §2.1) and an on-disk cache of their caption embeddings.

An encoder is named by a spec, the plain dict `resolve` returns: dict(name, source, dim), where source is a
Hugging Face id or a local folder and dim is its embedding width (None: read from the model's config).
transformers is imported inside the functions that need it, so `import text` stays cheap.
"""
import contextlib
import functools
import hashlib
import importlib
import json
import os
import re
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import write_atomically

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
DEFAULT_CACHE_DIR = os.path.expanduser("~/.cache/nanoimagen/text")
SHARD_CAPTIONS = 16384  # captions per cache shard written by `precompute`: a 50,000-caption dataset is 4 files
MAX_OPEN_SHARDS = 8  # shards memory-mapped at once (each mapping holds a file descriptor)
STALE_SECONDS = 3600  # a temporary file untouched this long was left by a killed writer
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve(name, entries):
    """The spec of a name registered in entries (registry.ENCODERS), a local model folder, or a hub id 'org/name'."""
    if name in entries:
        entry = entries[name]
        source = entry["id"] if "id" in entry else str(importlib.import_module(entry["package"]).MODEL_DIR)
        return dict(name=entries.canonical(name), source=source, dim=entry["dim"])
    if os.path.isdir(name):
        return dict(name=os.path.abspath(name), source=os.path.abspath(name), dim=None)
    if HUB_ID.fullmatch(name):
        return dict(name=name, source=name, dim=None)
    raise ValueError(f"unknown text encoder {name!r}; choose from: {', '.join(entries.names())}, "
                     "an existing model folder, or a Hugging Face id 'org/name'")


def encoder_dim(spec):
    """The embedding width d of a spec's encoder, without loading its weights."""
    if spec["dim"]:
        return spec["dim"]
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(spec["source"]).hidden_size  # T5 configs alias hidden_size to d_model


class TextEncoder:
    """A frozen tokenizer + encoder: captions -> (token embeddings [b, max_length, d], mask [b, max_length])."""

    def __init__(self, name, tokenizer, model, max_length):
        self.name, self.tokenizer, self.model, self.max_length = name, tokenizer, model, max_length
        self.dim = model.config.hidden_size
        self._warned_truncation = False

    def __call__(self, captions):
        """Embed captions; padded positions are zeroed and False in the mask. Warns the first time a caption has
        more than max_length tokens."""
        if not self._warned_truncation and any(
                len(ids) > self.max_length for ids in self.tokenizer(list(captions)).input_ids):
            warnings.warn(f"text encoder {self.name}: captions longer than {self.max_length} tokens are truncated")
            self._warned_truncation = True
        tokens = self.tokenizer(list(captions), padding="longest", truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.model.device)
        with torch.no_grad():  # no_grad, not inference_mode: the U-Net's backward must be able to save these
            emb = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        mask = tokens.attention_mask.bool()  # [b, n]
        emb = emb.float() * mask[..., None]  # [b, n, d]
        # encode the longest caption's n tokens, return max_length as the cache does: one shape for the U-Net
        pad = self.max_length - mask.shape[1]
        return F.pad(emb, (0, 0, 0, pad)), F.pad(mask, (0, pad))  # [b, max_length, d], [b, max_length]


def load_encoder(spec, max_length=32, device="cpu", dtype="fp32"):
    """Load a spec's tokenizer and encoder (T5 -> T5EncoderModel, others -> their AutoModel), frozen, on device,
    in dtype (fp32, bf16 or fp16: halves a T5's memory on a GPU; T5 v1.1 overflows in fp16, use bf16)."""
    from transformers import AutoModelForTextEncoding, AutoTokenizer
    model = AutoModelForTextEncoding.from_pretrained(spec["source"], dtype=DTYPES[dtype])
    return TextEncoder(spec["name"], AutoTokenizer.from_pretrained(spec["source"]),
                       model.to(device).eval().requires_grad_(False), max_length)


def _content_digest(folder):
    """A digest of a model folder's contents: every file's name and size, its first and last MiB (configs and
    tokenizers whole; weights by their ends, so that a multi-GB folder is keyed in milliseconds)."""
    digest = hashlib.sha1()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder)}:{size}:".encode())
        with open(path, "rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(size - (1 << 20), 0))
            digest.update(f.read())
    return digest.hexdigest()


def cache_folder_name(spec, max_length, dtype="fp32"):
    """The cache folder of an encoder: a registered or hub encoder is named by its name, a local folder by its
    contents (a moved or copied folder keeps its cache; a retrained one gets a new cache)."""
    local = os.path.isdir(spec["name"])
    label = "folder" if local else re.sub(r"[^\w.-]+", "-", spec["name"]).strip("-")[-40:]
    digest = hashlib.sha1((_content_digest(spec["source"]) if local else spec["name"]).encode()).hexdigest()[:8]
    return f"{label}-{digest}-len{max_length}" + ("" if dtype == "fp32" else f"-{dtype}")


class EmbeddingCache:
    """Caption embeddings on disk, one folder per (encoder, max_length, dtype), safe for concurrent processes.

    Each shard is `<stem>.npy` (fp16 rows [tokens, d]: every caption's real tokens, concatenated) and
    `<stem>.json` (caption -> [offset, length]), each written atomically and fsynced, the index last, under a
    unique stem: readers take only shards whose index exists, writers never touch another's files. `precompute`
    writes SHARD_CAPTIONS captions a shard, so a dataset's cache is a few large files; at most MAX_OPEN_SHARDS of
    them are memory-mapped (each holds a file descriptor) at any time, whatever the dataset's size.
    """

    def __init__(self, root, spec, max_length, device="cpu", dtype="fp32"):
        self.dir = Path(root) / cache_folder_name(spec, max_length, dtype)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.spec, self.max_length, self.device, self.dtype = spec, max_length, device, dtype
        self.dim = encoder_dim(spec)
        self._encoder, self._shards, self._rows = None, set(), {}  # _rows: caption -> (stem, offset, length)
        self._mapped = functools.lru_cache(MAX_OPEN_SHARDS)(  # a shard's rows, memory-mapped: fp16 [tokens, d]
            lambda stem: np.load(self.dir / f"{stem}.npy", mmap_mode="r"))
        for tmp in self.dir.glob("*.tmp"):  # left by writers killed mid-write, once untouched for STALE_SECONDS
            with contextlib.suppress(OSError):
                if time.time() - tmp.stat().st_mtime > STALE_SECONDS:
                    tmp.unlink()
        self._scan()

    def __call__(self, captions):
        """(emb [b, max_length, d] float32, mask [b, max_length] bool) of captions, encoding only unseen ones."""
        missing = [c for c in dict.fromkeys(captions) if c not in self._rows]
        if missing:  # other processes may have written them since
            self._scan()
            missing = [c for c in missing if c not in self._rows]
        if missing:
            self._add(missing, batch_size=len(missing))
        emb = np.zeros((len(captions), self.max_length, self.dim), np.float32)
        mask = np.zeros((len(captions), self.max_length), bool)
        for i, caption in enumerate(captions):
            stem, offset, length = self._rows[caption]
            emb[i, :length], mask[i, :length] = self._mapped(stem)[offset:offset + length], True  # [length, d]
        return torch.from_numpy(emb), torch.from_numpy(mask)

    def precompute(self, captions, batch_size=256, rank=0, world_size=1, progress=False):
        """Encode and store the captions not cached yet, SHARD_CAPTIONS to a shard; with several processes each
        takes every world_size-th shard (all must call it on the same cache state). Returns how many it encoded."""
        missing = [c for c in dict.fromkeys(captions) if c not in self._rows]
        mine = [missing[i:i + SHARD_CAPTIONS] for i in range(0, len(missing), SHARD_CAPTIONS)][rank::world_size]
        with tqdm(total=sum(map(len, mine)), desc=f"encoding captions ({self.spec['name']})", unit="caption",
                  disable=not progress or not mine) as bar:
            for chunk in mine:
                self._add(chunk, batch_size, bar)
        return sum(map(len, mine))

    def _scan(self):
        """Index the captions of every complete shard not read yet."""
        for index in self.dir.glob("*.json"):
            if index.stem not in self._shards:
                self._read_shard(index.stem)

    def _read_shard(self, stem):
        """Map one shard's captions to their rows; an unreadable shard is skipped (its captions get re-encoded)."""
        try:
            rows = np.load(self.dir / f"{stem}.npy", mmap_mode="r").shape[0]  # the mapping closes at once
            index = json.loads((self.dir / f"{stem}.json").read_text())
            if any(offset + length > rows for offset, length in index.values()):
                raise ValueError(f"its index points past its {rows} rows")
        except (OSError, ValueError) as e:
            warnings.warn(f"text cache {self.dir}: skipping unreadable shard {stem} ({e})")
            index = {}
        self._rows |= {caption: (stem, offset, length) for caption, (offset, length) in index.items()}
        self._shards.add(stem)

    def _add(self, captions, batch_size, bar=None):
        """Encode captions (loading the encoder on first use) and write them as a new shard."""
        self._encoder = self._encoder or load_encoder(self.spec, self.max_length, self.device, self.dtype)
        captions = sorted(captions, key=len)  # similar lengths in a batch: less padding to encode
        rows = []
        for start in range(0, len(captions), batch_size):
            emb, mask = self._encoder(captions[start:start + batch_size])  # [b, max_length, d], [b, max_length]
            rows += [e[m] for e, m in zip(emb.half().cpu(), mask.cpu())]  # each [length, d]
            if bar is not None:
                bar.update(len(emb))
        lengths = [len(row) for row in rows]
        index = {c: [int(o), n] for c, o, n in zip(captions, np.cumsum([0] + lengths[:-1]), lengths)}
        stem = f"shard-{os.getpid()}-{uuid.uuid4().hex}"

        def write_rows(tmp):
            with open(tmp, "wb") as f:
                np.save(f, torch.cat(rows).numpy())
        write_atomically(self.dir / f"{stem}.npy", write_rows)
        write_atomically(self.dir / f"{stem}.json", lambda tmp: tmp.write_text(json.dumps(index)))
        self._read_shard(stem)

