"""The fused update (``optimizer.fused_update``): a layer's update applied when the next forward enters
it, bit-identical to updating at once."""

from __future__ import annotations

import json

import pytest
import torch

from zotune.cli import main
from zotune.estimators.perturb import Perturbation
from zotune.models.layers import transformer_layers
from zotune.optim import ZOSGD, ZOSGDMomentum

from .conftest import tiny_llama
from .test_dual_forward import trained
from .test_optim_family import FAMILY
from .test_resume import argv, interrupt_in_process

TAKES = [(cls, lr) for cls, lr in FAMILY if cls(tiny_llama().parameters(), lr=lr).takes_fused_update]
REFUSES = [cls for cls, lr in FAMILY if (cls, lr) not in TAKES]


def takes_dual(cls) -> bool:
    return cls(tiny_llama().parameters(), lr=1e-3).takes_dual_forward


@pytest.mark.parametrize("cls, lr", TAKES, ids=[c.__name__ for c, _ in TAKES])
@pytest.mark.parametrize("setting", ["memory", "disk-dual"])
def test_the_fused_update_is_bit_identical(cls, lr, setting, tiny_batch, under_the_mode):
    model, opt, records = trained(cls, lr, tiny_batch)
    disk = setting == "disk-dual"
    fused, fused_opt, fused_records = trained(cls, lr, tiny_batch, fused=True, dual=disk and takes_dual(cls),
                                              offload=disk)
    assert fused_records == records
    assert fused_opt.fused.pending == len(transformer_layers(fused))  # every layer's last update waits
    before = [p.detach().clone() for p in fused.parameters()]
    fused_opt.flush_update()
    assert fused_opt.fused.pending == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, fused.parameters()))  # the flush moved the layers
    for (name, p), q in zip(model.named_parameters(), fused.parameters()):
        assert torch.equal(p, q), name
    for p, q in zip(model.parameters(), fused.parameters()):  # momentum, moments, JAGUAR's memory
        for key, value in opt.state[p].items():
            assert torch.equal(value, fused_opt.state[q][key]) if isinstance(value, torch.Tensor) else value == fused_opt.state[q][key]


def test_a_forward_applies_the_pending_update_of_each_layer_it_enters(tiny_batch, under_the_mode):
    model, opt, _ = trained(ZOSGD, 2e-3, tiny_batch, fused=True, steps=1)
    assert opt.fused.pending == len(transformer_layers(model))
    reference, _, _ = trained(ZOSGD, 2e-3, tiny_batch, steps=1)
    with torch.no_grad():
        assert torch.equal(model(**tiny_batch).logits, reference(**tiny_batch).logits)  # an evaluation sees the update
    assert opt.fused.pending == 0


def test_the_state_dict_and_a_small_trainable_set_never_see_a_pending_update(tiny_batch, under_the_mode, monkeypatch):
    model, opt, _ = trained(ZOSGDMomentum, 5e-4, tiny_batch, fused=True, steps=2)
    _, ref_opt, _ = trained(ZOSGDMomentum, 5e-4, tiny_batch, steps=2)
    state = opt.state_dict()
    assert opt.fused.pending == 0
    for key, saved in state["state"].items():
        assert torch.equal(saved["momentum_buffer"], ref_opt.state_dict()["state"][key]["momentum_buffer"])
    monkeypatch.setattr(Perturbation, "in_place_numel", 4 << 20)  # the tiny model: perturbed in place
    small = tiny_llama()
    small_opt = ZOSGD(small.parameters(), lr=1e-3, eps=1e-2, seed=0).fuse_update(small)
    small_opt.step(lambda: small(**tiny_batch).loss)
    assert small_opt.fused.pending == 0


@pytest.mark.parametrize("cls", REFUSES, ids=[c.__name__ for c in REFUSES])
def test_optimizers_with_their_own_update_or_directions_refuse_it(cls):
    model = tiny_llama()
    with pytest.raises(ValueError, match="does not take the fused update"):
        cls(model.parameters(), lr=1e-3).fuse_update(model)


def test_a_run_with_the_fused_update_stops_resumes_and_saves_what_it_would_without(
        tiny_model_dir, reviews_csv, tmp_path, monkeypatch, capsys, under_the_mode):
    plain, fused = tmp_path / "plain", tmp_path / "fused"
    assert main(argv(tiny_model_dir, reviews_csv, plain, "train.keep_best=true")) == 0
    args = argv(tiny_model_dir, reviews_csv, fused, "train.keep_best=true", "optimizer.fused_update=true")
    interrupt_in_process(args, 5, monkeypatch)  # stopped between evaluations: the checkpoint has the pending update
    assert main(args) == 0
    assert "resuming at step" in capsys.readouterr().out
    for name in ("weights.safetensors", "best.safetensors"):
        assert (fused / name).read_bytes() == (plain / name).read_bytes(), name
    assert losses(fused) == losses(plain)


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
