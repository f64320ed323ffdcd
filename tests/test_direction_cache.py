"""The direction cache (``ZOOptimizer.cache_directions``): z drawn once per step, same weights."""

from __future__ import annotations

import pytest
import torch

from zotune.config import load_config
from zotune.errors import ConfigError
from zotune.estimators import directions
from zotune.estimators.directions import DirectionSampler
from zotune.estimators.perturb import Perturbation
from zotune.optim import FZOO, LOZO, ZOSGD, HiZOO, ForwardGrad, JaguarSignSGD, SparseMeZO, ZOAdam, ZOMuon, ZOSGDConservative, ZOSGDMomentum, ZOSGDSign
from zotune.optim.factory import build_optimizer

from .conftest import counting_draws, tiny_llama

FAMILY = [ZOSGD, ZOSGDSign, ZOSGDMomentum, ZOSGDConservative, ZOAdam, ForwardGrad, JaguarSignSGD, ZOMuon, SparseMeZO, FZOO, HiZOO, LOZO]


def run(cls, megabytes: float, dtype: torch.dtype, batch, steps: int = 3):
    model = tiny_llama(dtype)
    if getattr(cls, "needs_forward_ad", False):
        model.set_attn_implementation("eager")
    opt = cls(model.parameters(), lr=1e-2, eps=1e-2, seed=3, n_queries=2).cache_directions(megabytes)
    opt.estimator.sampler.chunk_size = 512  # several chunks per matrix, drawn on two threads
    drawn = counting_draws(opt.estimator.sampler)
    for _ in range(steps):
        opt.step(lambda: model(**batch).loss)
        assert opt.estimator.sampler._cached == 0  # freed at the end of the step
    return [p.detach().clone() for p in model.parameters()], drawn


@pytest.mark.parametrize("cls", FAMILY, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", ["in-place", "on-the-fly"])
def test_cached_directions_give_the_same_weights_drawing_each_chunk_once(cls, dtype, path, tiny_batch, monkeypatch):
    monkeypatch.setattr(directions, "MASK_POSITIONS", 0)  # JAGUAR's masks: without their own cache (below)
    if path == "on-the-fly":  # under the mode, the tied embedding read by rows and blocks
        monkeypatch.setattr(Perturbation, "in_place_numel", 0)
        monkeypatch.setattr(Perturbation, "large_numel", 128 * 32)
        monkeypatch.setattr(Perturbation, "block_numel", 300)
    plain, drawn_plain = run(cls, 0, dtype, tiny_batch)
    cached, drawn_cached = run(cls, 64, dtype, tiny_batch)
    assert all(torch.equal(a, b) for a, b in zip(plain, cached))
    assert len(set(drawn_cached)) == len(drawn_cached)  # every chunk drawn once
    assert set(drawn_cached) == set(drawn_plain)  # the same chunks
    assert len(drawn_plain) >= 2 * len(drawn_cached)  # which without the cache are drawn again


def test_a_small_cache_keeps_the_first_chunks_and_redraws_the_rest(tiny_batch):
    plain, drawn_plain = run(ZOSGD, 0, torch.float32, tiny_batch, steps=2)
    small, drawn_small = run(ZOSGD, 4 * 512 * 4 / 2**20, torch.float32, tiny_batch, steps=2)  # 4 chunks
    assert all(torch.equal(a, b) for a, b in zip(plain, small))
    assert len(drawn_plain) > len(drawn_small) > len(set(drawn_small))


@pytest.mark.parametrize("path", ["in-place", "on-the-fly"])
def test_jaguar_draws_each_mask_once_a_step_with_the_same_weights(path, tiny_batch, monkeypatch):
    """A coordinate mask is kept as the positions of its ones for the step's other uses: the weights of
    three steps are those of redrawing it every time, and no chunk is drawn twice in a step."""
    if path == "on-the-fly":
        monkeypatch.setattr(Perturbation, "in_place_numel", 0)
        monkeypatch.setattr(Perturbation, "large_numel", 128 * 32)
        monkeypatch.setattr(Perturbation, "block_numel", 300)
    kept, drawn_kept = run(JaguarSignSGD, 0, torch.float32, tiny_batch)
    monkeypatch.setattr(directions, "MASK_POSITIONS", 0)
    redrawn, drawn_redrawn = run(JaguarSignSGD, 0, torch.float32, tiny_batch)
    assert all(torch.equal(a, b) for a, b in zip(kept, redrawn))
    assert len(set(drawn_kept)) == len(drawn_kept) and set(drawn_kept) == set(drawn_redrawn)
    assert len(drawn_redrawn) >= 2 * len(drawn_kept)


def test_a_rebuilt_mask_has_the_bits_of_the_drawn_one_and_the_positions_are_bounded(monkeypatch):
    sampler = DirectionSampler("coordinates", chunk_size=1000, fraction=0.1)
    drawn = sampler.full(10_000, key=7).clone()
    assert sampler._mask_positions == int(drawn.sum()) > 0  # every chunk's ones kept
    again = sampler.full(10_000, key=7)  # rebuilt from the positions
    assert torch.equal(again.view(torch.int32), drawn.view(torch.int32))  # +0.0 and 1.0, bit for bit
    sampler.clear_cache()
    assert sampler._mask_positions == 0 and not sampler._masks
    monkeypatch.setattr(directions, "MASK_POSITIONS", 250)  # about two chunks' ones (100 each)
    bounded = DirectionSampler("coordinates", chunk_size=1000, fraction=0.1)
    assert torch.equal(bounded.full(10_000, key=7), drawn) and bounded._mask_positions <= 250
    assert torch.equal(bounded.full(10_000, key=7), drawn)


def test_the_sampler_cache_is_bounded_and_cleared():
    sampler = DirectionSampler("gaussian", chunk_size=100)
    sampler.cache_numel = 250
    whole = DirectionSampler("gaussian", chunk_size=100).full(1000, key=5)
    assert torch.equal(sampler.full(1000, key=5), whole) and sampler._cached == 200  # two chunks fit
    assert torch.equal(sampler.full(1000, key=5), whole)
    sampler.clear_cache()
    assert sampler._cached == 0 and not sampler._cache
    kept = [b.data_ptr() for bufs in sampler._spare.values() for b in bufs]
    assert len(kept) == 2  # the buffers wait for the next step's chunks ...
    assert torch.equal(sampler.full(1000, key=6), DirectionSampler("gaussian", chunk_size=100).full(1000, key=6))
    assert sorted(b.data_ptr() for b in sampler._cache.values()) == sorted(kept)  # ... which reuse them
    sampler.clear_cache(release=True)
    assert not sampler._spare


def test_direction_cache_in_config(tiny_batch):
    cfg = load_config(None, ["optimizer.direction_cache_mb=8"])
    model = tiny_llama()
    opt = build_optimizer(cfg.optimizer, model.parameters(), "full", seed=0)
    assert opt.estimator.sampler.cache_numel == 2 * 2**20
    with pytest.raises(ConfigError, match="direction_cache_mb"):
        load_config(None, ["optimizer.direction_cache_mb=-1"])
    with pytest.raises(ConfigError, match="zeroth-order"):
        build_optimizer(load_config(None, ["optimizer.name=AdamW", "optimizer.direction_cache_mb=8"]).optimizer,
                        model.parameters(), "full", seed=0)
    with pytest.raises(ValueError, match=">= 0"):
        ZOSGD(model.parameters(), lr=1e-3).cache_directions(-1)


def test_pool_threads_run_their_ops_on_one_thread():
    """The sampler's pool threads take one intra-op thread each (their own OpenMP teams would spin on the
    cores the forward needs next); the caller keeps its own count."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen: list[int] = []
        DirectionSampler("gaussian", threads=2).run_jobs([lambda: seen.append(torch.get_num_threads())] * 4)
        assert seen == [1, 1, 1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
