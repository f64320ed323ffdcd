"""The noise table (``ZOOptimizer.noise_table``): every chunk of z a window of one pre-drawn table."""

from __future__ import annotations

import pickle

import pytest
import torch

from zotune.config import load_config
from zotune.errors import ConfigError
from zotune.estimators import DirectionSampler
from zotune.estimators.directions import mix
from zotune.optim import ZOSGD, JaguarSignSGD
from zotune.optim.factory import build_optimizer

from .conftest import counting_draws, tiny_llama


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_chunks_are_key_named_windows_of_a_table_drawn_once(distribution):
    sampler = DirectionSampler(distribution, chunk_size=100)
    sampler.use_table(1000)
    drawn = counting_draws(sampler)
    z = sampler.full(250, key=7)
    assert len(drawn) == 10  # the table, chunk by chunk, once ...
    assert torch.equal(sampler.full(250, key=7), z) and torch.equal(sampler.full(999, key=8)[:5], sampler.full(5, 8))
    assert len(drawn) == 10  # ... and nothing per direction
    table = sampler._table(torch.device("cpu"))
    for index, (start, stop) in enumerate([(0, 100), (100, 200), (200, 250)]):
        offset = mix(7, index) % (1000 - 100 + 1)
        assert torch.equal(z[start:stop], table[offset : offset + stop - start])
    assert not torch.equal(z, sampler.full(250, key=9))  # another key, another window
    plain = DirectionSampler(distribution, chunk_size=100)
    assert torch.equal(table, plain.full(1000, key=0)) is False  # the table is not some direction's z
    if distribution == "rademacher":
        assert set(table.unique().tolist()) == {-1.0, 1.0}
    else:
        assert abs(float(table.mean())) < 0.1 and abs(float(table.std()) - 1) < 0.1


def test_the_table_is_the_same_in_every_sampler_and_survives_pickling():
    a, b = DirectionSampler("gaussian", chunk_size=100), DirectionSampler("gaussian", chunk_size=100, threads=1)
    a.use_table(1000)
    b.use_table(1000)
    assert torch.equal(a.full(300, 3), b.full(300, 3))
    c = pickle.loads(pickle.dumps(a))
    assert c.table_numel == 1000 and torch.equal(c.full(300, 3), a.full(300, 3))


def test_an_optimizer_with_a_table_trains_reproducibly_and_draws_nothing_per_step(tiny_batch):
    def run(table_mb: float):
        model = tiny_llama()
        opt = ZOSGD(model.parameters(), lr=1e-2, eps=1e-2, seed=4)
        opt.estimator.sampler.chunk_size = 512
        opt.noise_table(table_mb)
        drawn = counting_draws(opt.estimator.sampler)
        losses = [float(opt.step(lambda: model(**tiny_batch).loss)) for _ in range(8)]
        return [p.detach().clone() for p in model.parameters()], losses, drawn

    weights, losses, drawn = run(4096 * 4 / 2**20)  # a 4096-value table
    again, losses_again, _ = run(4096 * 4 / 2**20)
    plain, _, drawn_plain = run(0)
    assert all(torch.equal(a, b) for a, b in zip(weights, again)) and losses == losses_again
    assert len(drawn) == 8  # the table's 8 chunks of 512, drawn once in 8 steps
    assert len(drawn_plain) > 8 * 3 * 10  # without it, every chunk of every step
    assert not all(torch.equal(a, b) for a, b in zip(weights, plain))  # other directions
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optimizer.noise_table_mb=2"], "noise_table_mb"),
        (["optimizer.noise_table_mb=4"], "noise_table_mb"),  # one chunk: one window per chunk index
        (["optimizer.noise_table_mb=-1"], "noise_table_mb"),
        (["optimizer.noise_table_mb=64", "optimizer.direction_cache_mb=8"], "exclude each other"),
    ],
)
def test_bad_noise_table_configs_are_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_the_table_comes_from_the_config_and_only_for_tables_of_values():
    model = tiny_llama()
    cfg = load_config(None, ["optimizer.noise_table_mb=32"]).optimizer
    opt = build_optimizer(cfg, model.parameters(), "full", seed=0)
    assert opt.estimator.sampler.table_numel == 8 * 2**20
    for name in ("SGD", "JaguarSignSGD"):
        cfg = load_config(None, ["optimizer.noise_table_mb=32", f"optimizer.name={name}"]).optimizer
        with pytest.raises(ConfigError, match="noise"):
            build_optimizer(cfg, model.parameters(), "full", seed=0)
    with pytest.raises(ValueError, match="noise table"):
        JaguarSignSGD(model.parameters(), lr=1e-3).noise_table(32)


def test_a_table_too_small_for_several_windows_is_refused():
    """A table of one chunk has one offset: every direction's chunk i would be the same values."""
    sampler = DirectionSampler("gaussian", chunk_size=100)
    with pytest.raises(ValueError, match="at least 8 chunks"):
        sampler.use_table(100)
    sampler.use_table(800)
    assert not torch.equal(sampler.full(100, key=1), sampler.full(100, key=2))
