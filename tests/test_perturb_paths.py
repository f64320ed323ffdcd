"""The two ways a probe perturbs: in place with saved bits (small trainable sets) and on the fly
under the mode (large ones). They give the same bits; the weights come back exactly."""

from __future__ import annotations

import pytest
import torch

from zotune.estimators import SPSA, DirectionSampler, Perturbation
from zotune.estimators import perturb as perturb_module
from zotune.optim import ZOSGD, JaguarSignSGD, ZOAdam, ZOMuon, ZOSGDConservative, ZOSGDMomentum, ZOSGDSign

from .conftest import tiny_llama

# ForwardGrad is left out: its tangents always take the mode (a dual's primal is the weight)
FAMILY = [ZOSGD, ZOSGDSign, ZOSGDMomentum, ZOSGDConservative, ZOAdam, JaguarSignSGD, ZOMuon]


def counting_modes(monkeypatch) -> list[int]:
    """Count the probes run under the mode."""
    entered: list[int] = []
    enter = perturb_module._PerturbMode.__enter__
    monkeypatch.setattr(perturb_module._PerturbMode, "__enter__", lambda self: entered.append(1) or enter(self))
    return entered


def train(cls, dtype, batch, in_place_numel: int, monkeypatch) -> tuple[list[torch.Tensor], list[list[float]], int]:
    monkeypatch.setattr(Perturbation, "in_place_numel", in_place_numel)
    modes = counting_modes(monkeypatch)
    model = tiny_llama(dtype)
    opt = cls(model.parameters(), lr=1e-2, eps=1e-2, seed=3, n_queries=2)
    grads = []
    for _ in range(3):
        opt.step(lambda: model(**batch).loss)
        grads.append(opt.last_record.projected_grads)
    return [p.detach().clone() for p in model.parameters()], grads, len(modes)


@pytest.mark.parametrize("cls", FAMILY, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_in_place_probes_give_the_bits_of_the_mode(cls, dtype, tiny_batch, monkeypatch):
    on_the_fly, grads_fly, modes_fly = train(cls, dtype, tiny_batch, 0, monkeypatch)
    in_place, grads_in_place, modes_in_place = train(cls, dtype, tiny_batch, 1 << 30, monkeypatch)
    assert modes_fly > 0 and modes_in_place == 0  # each run took its path
    assert grads_in_place == grads_fly  # the same losses at every probe
    assert all(torch.equal(a, b) for a, b in zip(on_the_fly, in_place))
    assert not all(torch.equal(a, b) for a, b in zip(in_place, tiny_llama(dtype).parameters()))  # it trained


def test_small_sets_go_in_place_and_large_ones_under_the_mode(tiny_batch, monkeypatch):
    model = tiny_llama()
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    sampler = DirectionSampler("gaussian")
    for limit, expected in [(total, True), (total - 1, False)]:
        monkeypatch.setattr(Perturbation, "in_place_numel", limit)
        with torch.no_grad(), Perturbation.along(params, list(range(len(params))), 1e-2, sampler) as pert:
            model(**tiny_batch)
        assert pert.in_place is expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_in_place_writes_the_perturbed_weights_and_restores_their_bits(dtype):
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(40, 30).to(dtype)), torch.nn.Parameter(torch.randn(30).to(dtype))
    before = [w.detach().clone(), b.detach().clone()]
    sampler = DirectionSampler("gaussian", chunk_size=500)  # w spans three chunks
    terms = [[(7, 0.3), (8, -0.1)], [(9, 0.2)]]
    expected = [Perturbation([w, b], terms, sampler).materialize(p, t) for p, t in zip((w, b), terms)]
    with Perturbation([w, b], terms, sampler) as pert:
        assert pert.in_place
        assert torch.equal(w, expected[0]) and torch.equal(b, expected[1])  # what the mode hands ops
    assert torch.equal(w, before[0]) and torch.equal(b, before[1])  # exactly back


def test_a_failing_closure_in_place_leaves_the_weights_and_the_next_step_intact(tiny_batch):
    model = tiny_llama()
    opt = ZOSGD(model.parameters(), lr=1e-2, eps=1e-2, seed=1)
    before = [p.detach().clone() for p in model.parameters()]
    calls = {"n": 0}

    def failing():
        calls["n"] += 1
        if calls["n"] == 2:  # inside the - probe, after the + probe wrote and restored
            raise RuntimeError("boom")
        return model(**tiny_batch).loss

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(failing)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    fresh = tiny_llama()
    ZOSGD(fresh.parameters(), lr=1e-2, eps=1e-2, seed=1).step(lambda: fresh(**tiny_batch).loss)
    opt.step(lambda: model(**tiny_batch).loss)  # a retry takes the step the failure did not
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))


def test_in_place_probes_keep_what_the_mode_learned_about_order(tiny_batch, monkeypatch):
    """Block-wise probes may alternate paths (small blocks in place, large under the mode): an
    in-place probe leaves the build-ahead order and the tied weights the mode saw."""
    model = tiny_llama()
    params = list(model.parameters())
    emb = model.model.embed_tokens.weight
    monkeypatch.setattr(Perturbation, "in_place_numel", emb.numel())  # the embedding's block: in place
    modes = counting_modes(monkeypatch)
    spsa = SPSA(eps=1e-2)
    small = [params.index(emb)]
    big = [i for i in range(len(params)) if i not in small]
    spsa.estimate(lambda: model(**tiny_batch).loss, params, list(range(len(params))), 5, blocks=[big, small])
    assert len(modes) == 2  # the big block's two probes
    assert spsa._order and id(emb) in spsa._reuse  # learned under the mode, kept through the small block
