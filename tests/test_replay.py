"""Trajectory replay: a step's record redoes its update bit for bit, without a forward pass."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from zotune.optim import ZOSGD, ZOAdam, ZOSGDConservative
from zotune.tuning import layer_blocks

from .conftest import tiny_llama
from .test_optim_family import FAMILY, IDS, prepared


def train(cls, lr, batch, steps=4, params_of=lambda m: m.parameters(), **kwargs):
    model = prepared(tiny_llama(), cls)
    opt = cls(params_of(model), lr=lr, eps=1e-2, seed=3, weight_decay=0.0 if cls is ZOSGDConservative else 0.1,
              **kwargs)
    records = []
    for step in range(steps):
        if step == 2:  # a schedule: the record carries the lr used
            for group in opt.param_groups:
                group["lr"] = lr / 2
        opt.step(lambda: model(**batch).loss)
        records.append(opt.last_record)
    return model, opt, records


def replayed(cls, lr, records, params_of=lambda m: m.parameters(), **kwargs):
    model = prepared(tiny_llama(), cls)
    opt = cls(params_of(model), lr=lr, eps=1e-2, seed=3, weight_decay=0.0 if cls is ZOSGDConservative else 0.1,
              **kwargs)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    for record in records:
        opt.replay(record)
    assert not forwards  # no forward pass
    return model, opt


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("cls, lr", FAMILY, ids=IDS)
def test_replay_is_bit_identical_for_every_optimizer(cls, lr, tiny_batch):
    model, opt, records = train(cls, lr, tiny_batch, n_queries=2)
    if cls is ZOSGDConservative:
        assert {r.extra["accepted"] for r in records} - {0}  # some step moved
    again, opt2 = replayed(cls, lr, records, n_queries=2)
    assert_same(model, again)
    for p, q in zip(model.parameters(), again.parameters()):  # momentum, moments, memory, counters
        assert opt.state[p].keys() == opt2.state[q].keys()
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[q][k]) if isinstance(v, torch.Tensor) else v == opt2.state[q][k]
    assert opt2.steps_done == opt.steps_done


def test_replay_of_blockwise_steps(tiny_batch):
    def blocks(m):
        return layer_blocks(m, list(m.parameters()))

    model, _, records = train(ZOSGD, 1e-3, tiny_batch, params_of=blocks, blockwise=True)
    again, _ = replayed(ZOSGD, 1e-3, records, params_of=blocks, blockwise=True)
    assert_same(model, again)


def test_replay_to_an_intermediate_step_and_skipped_steps(tiny_batch):
    model = tiny_llama()
    opt = ZOAdam(model.parameters(), lr=1e-3, eps=1e-2, seed=3)
    records, snapshots = [], []
    for step in range(4):
        opt.step((lambda: torch.tensor(float("nan"))) if step == 1 else (lambda: model(**tiny_batch).loss))
        records.append(opt.last_record)
        snapshots.append([p.detach().clone() for p in model.parameters()])
    assert records[1].skipped
    again = tiny_llama()
    opt2 = ZOAdam(again.parameters(), lr=1e-3, eps=1e-2, seed=3)
    for record in records[:3]:
        opt2.replay(record)
    assert all(torch.equal(p, q) for p, q in zip(again.parameters(), snapshots[2]))
    assert opt2.skipped_steps == 1


def test_replay_refuses_a_foreign_or_reordered_record(tiny_batch):
    _, _, records = train(ZOSGD, 1e-3, tiny_batch)
    opt = ZOSGD(tiny_llama().parameters(), lr=1e-3, eps=1e-2, seed=4)
    with pytest.raises(ValueError, match="another run's trajectory"):
        opt.replay(records[0])
    opt = ZOSGD(tiny_llama().parameters(), lr=1e-3, eps=1e-2, seed=3)
    with pytest.raises(ValueError, match="out of order"):
        opt.replay(records[1])
    with pytest.raises(ValueError, match="learning rates"):
        opt.replay(dataclasses.replace(records[0], lrs=[1e-3, 1e-3]))
