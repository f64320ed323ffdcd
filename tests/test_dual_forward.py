"""The dual forward (``optimizer.dual_forward``): a query's + and - probes in one pass, layer by layer,
bit-identical to two separate probes."""

from __future__ import annotations

import threading

import pytest
import torch

from zotune.config import load_config
from zotune.errors import ConfigError
from zotune.estimators.lockstep import Lockstep
from zotune.models.layers import transformer_layers
from zotune.models.offload import offload_to_disk
from zotune.optim import FZOO, ZOSGD, ForwardGrad
from zotune.train.trainer import _engine_mode

from .conftest import counting_draws, tiny_llama
from .test_optim_family import FAMILY, prepared

TWO_SIDED = [(cls, lr) for cls, lr in FAMILY if cls not in (FZOO, ForwardGrad)]


def trained(cls, lr, batch, dual: bool = False, fused: bool = False, offload: bool = False, steps: int = 3):
    """``steps`` steps on the tiny Llama (a schedule: each step its own lr), in memory or on the disk tier,
    with the dual forward and the fused update or without; the model, the optimizer, the step records."""
    model = prepared(tiny_llama(), cls)
    if offload:
        offload_to_disk(model)
    opt = cls(model.parameters(), lr=lr, eps=1e-2, seed=3, n_queries=2)
    if dual:
        opt.dual_forward(model)
    if fused:
        opt.fuse_update(model)
    records = []
    for step in range(steps):
        for group in opt.param_groups:  # a pending update keeps its own step's lr
            group["lr"] = lr * (1 + step)
        opt.step(lambda: model(**batch).loss)
        records.append(opt.last_record)
    return model, opt, records


@pytest.mark.parametrize("cls, lr", TWO_SIDED, ids=[c.__name__ for c, _ in TWO_SIDED])
@pytest.mark.parametrize("offload", [False, True], ids=["memory", "disk"])
def test_the_dual_forward_is_bit_identical_to_two_probes(cls, lr, offload, tiny_batch, under_the_mode):
    model, _, records = trained(cls, lr, tiny_batch, dual=False)
    dual, opt, dual_records = trained(cls, lr, tiny_batch, dual=True, offload=offload)
    assert opt.estimator.lockstep.switches >= 2 * len(transformer_layers(dual))  # the turns were taken
    assert dual_records == records
    for (name, p), q in zip(model.named_parameters(), dual.parameters()):
        assert torch.equal(p, q), name


def test_the_probes_take_turns_layer_by_layer(tiny_batch):
    model = tiny_llama()
    layers = transformer_layers(model)
    with torch.no_grad():
        alone = model(**tiny_batch).loss
    seen = []
    for k, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda *_, k=k: seen.append((threading.current_thread().name, k)))
    lockstep = Lockstep(layers)
    with torch.no_grad():
        plus, minus = lockstep.run(lambda: model(**tiny_batch).loss, lambda: model(**tiny_batch).loss * 2)
    assert torch.equal(plus, alone) and torch.equal(minus, alone * 2)
    first, second = threading.current_thread().name, "zotune-dual-forward"
    assert seen == [(who, k) for k in range(len(layers)) for who in (first, second)]


@pytest.mark.parametrize("failing", [0, 1])
def test_a_probe_that_raises_ends_its_turns_and_the_error_reaches_the_caller(failing, tiny_batch):
    model = tiny_llama()
    layers = transformer_layers(model)
    finished = []

    def probe(who):
        def run():
            with torch.no_grad():
                model.model.embed_tokens(tiny_batch["input_ids"])
                h = model(**tiny_batch).loss
            if who == failing:
                raise RuntimeError(f"probe {who} failed")
            finished.append(who)
            return h
        return run

    with pytest.raises(RuntimeError, match=f"probe {failing} failed"):
        Lockstep(layers).run(probe(0), probe(1))
    assert finished == [1 - failing]
    assert all(t.name != "zotune-dual-forward" for t in threading.enumerate())


def test_a_chunk_of_z_is_drawn_once_for_both_probes(tiny_batch, under_the_mode):
    """Without a noise table, the - probe takes the + probe's chunks instead of drawing them again (counted
    on the second step, once the first has shown that the tied embedding is read twice per probe)."""
    draws = {}
    for dual in (False, True):
        model = tiny_llama()
        opt = ZOSGD(model.parameters(), lr=1e-3, eps=1e-2, seed=3)
        if dual:
            opt.dual_forward(model)
        opt.step(lambda: model(**tiny_batch).loss)
        drawn = counting_draws(opt.estimator.sampler)
        opt.step(lambda: model(**tiny_batch).loss)
        draws[dual] = list(drawn)
        assert not opt.estimator.sampler._once  # nothing kept after the step
    probes = len(draws[False]) * 2 // 3  # two probes, then the update
    assert len(draws[True]) == len(draws[False]) - probes // 2
    assert sorted(draws[True]) == sorted(draws[False][: probes // 2] + draws[False][probes:])


def test_a_pending_update_applied_inside_the_dual_forward_keeps_none_of_its_chunks(tiny_batch, under_the_mode):
    """The fused update draws the previous step's z inside the + probe's forward: those chunks are not the
    - probe's to take, so none may be kept for it. (They were: every layer's update z, until the step ended;
    +375 MB of peak RSS on the default model's disk tier without a noise table.)"""
    peaks = {}
    for fused in (False, True):
        model = tiny_llama()
        opt = ZOSGD(model.parameters(), lr=1e-3, eps=1e-2, seed=3).dual_forward(model)
        if fused:
            opt.fuse_update(model)
        sampler, kept, peak = opt.estimator.sampler, [], [0]
        plain, end = sampler.plain, sampler.end_reuse_once

        def stashed() -> int:  # values of z kept for the - probe
            return sum(t.numel() for t in sampler._once.values())

        def watched(*args, **kwargs):
            z = plain(*args, **kwargs)
            peak[0] = max(peak[0], stashed())
            return z

        def ending():  # what the step kept that no probe took
            kept.append(stashed())
            end()

        sampler.plain, sampler.end_reuse_once = watched, ending
        for _ in range(3):  # from the second step on, each step starts with a pending update
            opt.step(lambda: model(**tiny_batch).loss)
        assert kept == [0, 0, 0], fused
        peaks[fused] = peak[0]
    assert 0 < peaks[True] <= peaks[False]


def test_a_set_small_enough_to_be_written_in_place_is_probed_one_probe_after_the_other(tiny_batch):
    """In place, one probe would see the other's perturbation; under the mode, the kernels would read the weights
    at other addresses than the run without the dual forward: the tiny model's whole set falls back."""
    model, _, records = trained(ZOSGD, 2e-3, tiny_batch)
    dual, opt, dual_records = trained(ZOSGD, 2e-3, tiny_batch, dual=True)
    assert opt.estimator.lockstep.switches == 0 and dual_records == records
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), dual.parameters()))


def test_optimizers_without_pairs_of_probes_refuse_it():
    model = tiny_llama()
    for cls in (FZOO, ForwardGrad):
        with pytest.raises(ValueError, match="does not take the dual forward"):
            cls(model.parameters(), lr=1e-3).dual_forward(model)


def test_the_config_turns_it_on_with_the_disk_tier_and_refuses_it_where_it_does_not_apply():
    model = tiny_llama()
    zosgd, fzoo = ZOSGD(model.parameters(), lr=1e-3), FZOO(model.parameters(), lr=1e-3)

    def dual(overrides, opt):
        return _engine_mode(load_config(None, overrides), opt, "dual_forward", "why not")

    assert dual(["model.offload=disk"], zosgd)
    assert not dual(["model.offload=disk"], fzoo)
    assert not dual([], zosgd)
    assert dual(["optimizer.dual_forward=true"], zosgd)
    assert not dual(["model.offload=disk", "optimizer.dual_forward=false"], zosgd)
    with pytest.raises(ConfigError, match="does not take it"):
        dual(["optimizer.name=FZOO", "optimizer.dual_forward=true"], fzoo)
