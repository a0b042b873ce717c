"""Frozen text encoders (Imagen, arXiv 2205.11487 §2.1) and an on-disk cache of their caption embeddings.

An encoder is named by a spec, the plain dict `resolve` returns: dict(name, source, dim), where source is a
Hugging Face id or a local folder and dim is its embedding width (None: read from the model's config).
transformers is imported inside the functions that need it, so `import text` stays cheap.
"""
import argparse
import hashlib
import importlib
import json
import os
import re
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
SHARD_CAPTIONS = 4096  # captions per cache shard written by `precompute`


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
        """Embed captions; padded positions are zeroed and False in the mask."""
        self._warn_once_if_truncated(captions)
        tokens = self.tokenizer(list(captions), padding="longest", truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.model.device)
        with torch.no_grad():  # no_grad, not inference_mode: the U-Net's backward must be able to save these
            emb = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        mask = tokens.attention_mask.bool()  # [b, n]
        emb = emb.float() * mask[..., None]  # [b, n, d]
        # encode the longest caption's n tokens, return max_length as the cache does: one shape for the U-Net
        pad = self.max_length - mask.shape[1]
        return F.pad(emb, (0, 0, 0, pad)), F.pad(mask, (0, pad))  # [b, max_length, d], [b, max_length]

    def _warn_once_if_truncated(self, captions):
        """Warn the first time a caption has more than max_length tokens."""
        if not self._warned_truncation and any(
                len(ids) > self.max_length for ids in self.tokenizer(list(captions)).input_ids):
            warnings.warn(f"text encoder {self.name}: captions longer than {self.max_length} tokens are truncated")
            self._warned_truncation = True


def load_encoder(spec, max_length=32, device="cpu"):
    """Load a spec's tokenizer and encoder (T5 -> T5EncoderModel, others -> their AutoModel), frozen, on device."""
    from transformers import AutoModelForTextEncoding, AutoTokenizer
    model = AutoModelForTextEncoding.from_pretrained(spec["source"]).to(device).eval().requires_grad_(False)
    return TextEncoder(spec["name"], AutoTokenizer.from_pretrained(spec["source"]), model, max_length)


def _write_atomically(path, write):
    """Write a file under a temporary name, then rename it: readers see all of it or nothing."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


class EmbeddingCache:
    """Caption embeddings on disk, one folder per (encoder, max_length), safe for concurrent processes.

    Each shard is `<stem>.npy` (fp16 rows [tokens, d]: every caption's real tokens, concatenated) and
    `<stem>.json` (caption -> [offset, length]), written in that order, each atomically, under a unique stem:
    readers take only shards whose index exists, writers never touch another's files. Shards are memory-mapped.
    """

    def __init__(self, root, spec, max_length, device="cpu"):
        name = re.sub(r"[^\w.-]+", "-", spec["name"]).strip("-")[-40:]
        digest = hashlib.sha1(spec["name"].encode()).hexdigest()[:8]  # keeps folder paths and ids distinct
        self.dir = Path(root) / f"{name}-{digest}-len{max_length}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.spec, self.max_length, self.device, self.dim = spec, max_length, device, encoder_dim(spec)
        self._encoder, self._shards, self._rows = None, set(), {}  # _rows: caption -> fp16 view [length, d]
        self._scan()

    def __call__(self, captions):
        """(emb [b, max_length, d] float32, mask [b, max_length] bool) of captions, encoding only unseen ones."""
        missing = self._missing(captions)
        if missing:
            self._add(missing, batch_size=len(missing))
        emb = np.zeros((len(captions), self.max_length, self.dim), np.float32)
        mask = np.zeros((len(captions), self.max_length), bool)
        for i, caption in enumerate(captions):
            row = self._rows[caption]  # [length, d]
            emb[i, :len(row)], mask[i, :len(row)] = row, True
        return torch.from_numpy(emb), torch.from_numpy(mask)

    def precompute(self, captions, batch_size=256):
        """Encode and store every caption not cached yet; returns how many were encoded."""
        missing = self._missing(captions)
        for start in range(0, len(missing), SHARD_CAPTIONS):
            self._add(missing[start:start + SHARD_CAPTIONS], batch_size)
        return len(missing)

    def _missing(self, captions):
        """Distinct captions in no shard, after re-scanning for other processes' shards if any looked missing."""
        missing = [c for c in dict.fromkeys(captions) if c not in self._rows]
        if missing:
            self._scan()
        return [c for c in missing if c not in self._rows]

    def _scan(self):
        """Map the captions of every complete shard not read yet."""
        for index in self.dir.glob("*.json"):
            if index.stem not in self._shards:
                self._read_shard(index.stem)

    def _read_shard(self, stem):
        """Memory-map one shard and map its captions to their rows."""
        data = np.load(self.dir / f"{stem}.npy", mmap_mode="r")  # [tokens, d] fp16
        for caption, (offset, length) in json.loads((self.dir / f"{stem}.json").read_text()).items():
            self._rows[caption] = data[offset:offset + length]
        self._shards.add(stem)

    def _add(self, captions, batch_size):
        """Encode captions (loading the encoder on first use) and write them as a new shard."""
        self._encoder = self._encoder or load_encoder(self.spec, self.max_length, self.device)
        rows = []
        for start in range(0, len(captions), batch_size):
            emb, mask = self._encoder(captions[start:start + batch_size])  # [b, max_length, d], [b, max_length]
            rows += [e[m] for e, m in zip(emb.half().cpu(), mask.cpu())]  # each [length, d]
        lengths = [len(row) for row in rows]
        index = {c: [int(o), n] for c, o, n in zip(captions, np.cumsum([0] + lengths[:-1]), lengths)}
        stem = f"shard-{os.getpid()}-{uuid.uuid4().hex}"
        _write_atomically(self.dir / f"{stem}.npy", lambda f: np.save(f, torch.cat(rows).numpy()))
        _write_atomically(self.dir / f"{stem}.json", lambda f: f.write(json.dumps(index).encode()))
        self._read_shard(stem)


def main():
    """CLI: precompute the embedding cache of a caption file (one caption per line) ahead of training."""
    import registry  # only the CLI resolves short names; the module itself must not import registry
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--encoder", default="minilm", help="registered name, Hugging Face id or model folder")
    parser.add_argument("--captions", required=True, help="text file, one caption per line")
    parser.add_argument("--cache", required=True, help="cache root folder")
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    spec = resolve(args.encoder, registry.ENCODERS)
    cache = EmbeddingCache(args.cache, spec, args.max_length, args.device)
    encoded = cache.precompute(Path(args.captions).read_text().splitlines(), args.batch_size)
    print(f"encoded {encoded} new captions into {cache.dir}")


if __name__ == "__main__":
    main()
