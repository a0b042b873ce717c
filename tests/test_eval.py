"""eval.py --data: the retrieval score (each caption's sample ranks all of the data's pictures by distance) and the
metrics extra's --fid, --kid and --clip-score."""
import importlib
import json
import math

import pytest
import torch
from hypothesis import given, strategies as st
from PIL import Image

import eval as eval_module
import imagen
from conftest import FEW, captioned_pictures, seeds
from test_cli import run, train


@FEW
@given(seed=seeds, m=st.integers(1, 60), n=st.integers(1, 40), side=st.sampled_from([8, 16, 32]))
def test_samples_that_are_their_captions_own_pictures_rank_them_first(seed, m, n, side):
    generator = torch.Generator().manual_seed(seed)
    pictures = torch.rand(m, 3, side, side, generator=generator)
    own = torch.randint(m, (n,), generator=generator)  # repeats: duplicate captions, each with its sample's picture
    ranks = eval_module.retrieval_ranks(pictures[own], pictures, own)
    scores = eval_module.retrieval_scores(ranks)
    assert ranks.tolist() == [1] * n and scores == {"n": n, "recall@1": 1.0, "recall@10": 1.0, "median_rank": 1}


def test_samples_unrelated_to_their_captions_score_near_chance():
    generator, m = torch.Generator().manual_seed(0), 400
    pictures, noise = (torch.rand(m, 3, 32, 32, generator=generator) for _ in range(2))
    ranks = eval_module.retrieval_ranks(noise, pictures, torch.arange(m))
    scores, chance = eval_module.retrieval_scores(ranks), eval_module.chance_scores(m)
    assert chance == {"recall@1": 0.0025, "recall@10": 0.025, "median_rank": 200.5}
    assert ranks.min() >= 1 and ranks.max() <= m
    assert abs(scores["median_rank"] - chance["median_rank"]) < 0.15 * m
    assert scores["recall@1"] < 8 * chance["recall@1"] and scores["recall@10"] < 3 * chance["recall@10"]


def test_a_sample_nearer_to_another_picture_ranks_its_own_below_it():
    pictures = torch.stack([torch.full((3, 16, 16), v) for v in (0.0, 0.5, 1.0)])  # [3, 3, 16, 16]
    samples = torch.full((1, 3, 16, 16), 0.8)  # nearest 1.0, then 0.5, then 0.0
    assert eval_module.retrieval_ranks(samples, pictures, torch.tensor([0])).tolist() == [3]
    assert eval_module.retrieval_ranks(samples, pictures, torch.tensor([2])).tolist() == [1]


def test_caption_lookup_answers_with_the_trained_caption_nearest_in_text_space_ignoring_padding():
    tokens = {"a": [[1, 0], [1, 0]], "b": [[0, 1], [0, 1]],  # two real tokens each
              "near a": [[0.9, 0.1], [0, 9]], "near b": [[0.2, 0.8], [9, 0]]}  # one, then padding pointing away

    def cache(captions):
        mask = [[True, len(caption) == 1] for caption in captions]
        return torch.tensor([tokens[c] for c in captions], dtype=torch.float32), torch.tensor(mask)
    captions = ["a", "b", "near a", "near b"]
    assert eval_module.caption_lookup(cache, captions, heldout=[2, 3], trained=[0, 1]) == [0, 1]


def test_eval_data_ranks_the_pictures_of_trained_and_held_out_captions(tmp_path, cache_dir):
    folder, out = captioned_pictures(tmp_path / "pictures", 30), tmp_path / "out"
    train(out, cache_dir, "--data", str(folder), "--steps", "1", "--holdout", "5")
    proc = run("eval.py", "--ckpt", str(out), "--data", str(folder), "--n-trained", "8", "--steps", "2",
               "--cache-dir", cache_dir)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    retrieval = result["retrieval"]
    assert retrieval["pictures"] == 30 and retrieval["chance"] == eval_module.chance_scores(30)
    assert retrieval["trained"]["n"] == 8 and retrieval["heldout"]["n"] == retrieval["caption_lookup"]["n"] == 5
    for scores in (retrieval["trained"], retrieval["heldout"], retrieval["caption_lookup"]):
        assert 0 <= scores["recall@1"] <= scores["recall@10"] <= 1 and 1 <= scores["median_rank"] <= 30
    assert len(result["heldout_loss"]) == 2
    for grid in (result["grid"], result["trained_grid"]):
        Image.open(grid).verify()


@pytest.mark.parametrize("flags, needle", [(["--data", "shapes"], "--data shapes"),
                                           (["--data", "DIR", "--n-trained", "0"], "--n-trained 0"),
                                           (["--data", "DIR", "--fid", "--fid-weights", "DIR/x.pth"], "--fid-weights"),
                                           (["--kid"], "give --data")])
def test_eval_data_refuses_what_it_cannot_rank_with_one_line(trained, tmp_path, cache_dir, flags, needle):
    flags = [flag.replace("DIR", str(tmp_path)) for flag in flags]
    proc = run("eval.py", "--ckpt", str(trained), *flags, "--cache-dir", cache_dir, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert needle in proc.stderr.strip().splitlines()[-1], proc.stderr


# ---- --fid, --kid, --clip-score: the metrics extra, driven with random local weights (offline) ----

def importable(name):
    """The module `name`, or a skip where the metrics extra does not import (e.g. a CUDA torchvision beside a CPU
    torch, whose operators do not load)."""
    try:
        return importlib.import_module(name)
    except (ImportError, RuntimeError) as e:
        pytest.skip(f"{name} does not import ({imagen.first_line(e)}): pip install -e '.[metrics]'")


class TinyFeatures(torch.nn.Module):
    """A seeded stand-in for the Inception network: 8 features per uint8 image (torch-fidelity is an optional extra
    whose torchvision does not install beside the CPU torch here; the metric code around it is what is tested)."""
    num_features = 8

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.conv.reset_parameters()

    def forward(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(self.conv(images.float() / 255), 2).flatten(1)  # [b, 8]


def image_sets(n=8, side=32):
    """Seeded random uint8 images [n, 3, side, side] and the same images brightened by 80 (clipped at 255)."""
    images = torch.randint(0, 256, (n, 3, side, side), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return images, (images.int() + 80).clamp(max=255).to(torch.uint8)


def test_fid_is_zero_for_an_image_set_against_itself_and_grows_when_it_is_brightened():
    importable("torchmetrics")
    images, brighter = image_sets(n=32)
    same = eval_module.frechet_inception_distance(images, images, TinyFeatures(), "cpu")
    shifted = eval_module.frechet_inception_distance(images, brighter, TinyFeatures(), "cpu")
    print(f"FID same {same}, brightened {shifted}")
    assert abs(same) < 1e-3 * shifted and shifted > 0


def test_kid_is_near_zero_for_an_image_set_against_itself_and_grows_when_it_is_brightened():
    importable("torchmetrics")
    images, brighter = image_sets(n=32)
    same, same_std = eval_module.kernel_inception_distance(images, images, TinyFeatures(), "cpu")
    shifted, _ = eval_module.kernel_inception_distance(images, brighter, TinyFeatures(), "cpu")
    print(f"KID same {same} ± {same_std}, brightened {shifted}")
    assert abs(same) < 0.05 * shifted and shifted > 0


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised CLIP model folder of a few thousand parameters, with a character-level BPE tokenizer
    (vocab.json, merges.txt) and a 32 px image processor: what `--clip-score FOLDER` loads."""
    transformers = importable("transformers")
    folder = tmp_path_factory.mktemp("clip")
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)  # a seed whose embeddings of image_sets(5) and their captions agree: CLIP score above 0
        model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                               projection_dim=8))
    model.save_pretrained(folder)
    transformers.CLIPProcessor(
        image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                        crop_size={"height": 32, "width": 32}),
        tokenizer=transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    ).save_pretrained(folder)
    return str(folder)


def test_clip_score_of_samples_and_captions_runs_end_to_end_on_a_local_clip_folder(tiny_clip):
    importable("torchmetrics")
    images, _ = image_sets(n=5)
    score = eval_module.clip_score(images, [f"picture {i}" for i in range(5)], tiny_clip, "cpu", batch=2)
    print(f"CLIP score {score}")
    assert math.isfinite(score) and 0 < score <= 100, score  # CLIPScore clips a negative mean cosine to 0


def test_missing_inception_weights_are_one_line_naming_the_flag_and_the_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # torch hub's download cache: empty
    for path in (None, str(tmp_path / "missing.pth")):
        with pytest.raises(ValueError, match="^--fid-weights ") as error:
            eval_module.inception_weights(path)
        assert "\n" not in str(error.value) and eval_module.INCEPTION_URL in str(error.value)


def test_eval_clip_score_samples_every_caption_through_the_command_line(tmp_path, cache_dir, tiny_clip):
    folder, out = captioned_pictures(tmp_path / "pictures", 8), tmp_path / "out"
    train(out, cache_dir, "--data", str(folder), "--steps", "1", "--holdout", "2")
    proc = run("eval.py", "--ckpt", str(out), "--data", str(folder), "--n-trained", "2", "--steps", "2",
               "--stop-at-unet", "0", "--clip-score", tiny_clip,
               "--cache-dir", cache_dir)
    fidelity = json.loads(proc.stdout.strip().splitlines()[-1])["fidelity"]
    assert fidelity["n_samples"] == fidelity["n_real"] == 8
    assert fidelity["fid"] is None and 0 <= fidelity["clip_score"] <= 100
