"""eval.py --data's retrieval score: each caption's sample ranks all of the data's pictures by distance."""
import json

import pytest
import torch
from hypothesis import given, strategies as st
from PIL import Image

import eval as eval_module
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


def test_eval_data_ranks_the_pictures_of_trained_and_held_out_captions(tmp_path, cache_dir):
    folder, out = captioned_pictures(tmp_path / "pictures", 30), tmp_path / "out"
    train(out, cache_dir, "--data", str(folder), "--steps", "1", "--holdout", "5")
    proc = run("eval.py", "--ckpt", str(out), "--data", str(folder), "--n-trained", "8", "--steps", "2",
               "--cache-dir", cache_dir)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    retrieval = result["retrieval"]
    assert retrieval["pictures"] == 30 and retrieval["chance"] == eval_module.chance_scores(30)
    assert retrieval["trained"]["n"] == 8 and retrieval["heldout"]["n"] == 5
    for scores in (retrieval["trained"], retrieval["heldout"]):
        assert 0 <= scores["recall@1"] <= scores["recall@10"] <= 1 and 1 <= scores["median_rank"] <= 30
    assert len(result["heldout_loss"]) == 2
    for grid in (result["grid"], result["trained_grid"]):
        Image.open(grid).verify()


@pytest.mark.parametrize("flags, needle", [(["--data", "shapes"], "--data shapes"),
                                           (["--data", "DIR", "--n-trained", "0"], "--n-trained 0")])
def test_eval_data_refuses_what_it_cannot_rank_with_one_line(trained, tmp_path, cache_dir, flags, needle):
    flags = [str(tmp_path) if flag == "DIR" else flag for flag in flags]
    proc = run("eval.py", "--ckpt", str(trained), *flags, "--cache-dir", cache_dir, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert needle in proc.stderr.strip().splitlines()[-1], proc.stderr
