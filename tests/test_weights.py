"""Run-directory weights: safetensors written by ``save_weights``, read back tensor by tensor."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from zotune.errors import DataError
from zotune.train.weights import load_weights, save_weights


def _params():
    g = torch.Generator().manual_seed(0)
    return [("a.weight", torch.nn.Parameter(torch.randn(7, 5, generator=g))),
            ("b.bf16", torch.nn.Parameter(torch.randn(3, 33, generator=g).bfloat16())),
            ("c.half", torch.nn.Parameter(torch.randn(11, generator=g).half())),
            ("d.scalar", torch.nn.Parameter(torch.tensor(2.5))),
            ("e.empty", torch.nn.Parameter(torch.empty(0, 4)))]


def test_weights_round_trip_bit_for_bit_in_every_dtype(tmp_path):
    saved = _params()
    save_weights(tmp_path / "w.safetensors", saved, metadata={"k": "v"})
    assert set(load_file(tmp_path / "w.safetensors")) == {n for n, _ in saved}  # a plain safetensors file
    target = [(n, torch.nn.Parameter(torch.zeros_like(p))) for n, p in saved]
    load_weights(tmp_path / "w.safetensors", target)
    for (_, want), (_, got) in zip(saved, target):
        assert got.dtype == want.dtype and torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8))


def test_weights_load_into_a_parameter_that_is_not_contiguous(tmp_path):
    save_weights(tmp_path / "w.safetensors", [("t", torch.arange(12.0).reshape(3, 4))])
    base = torch.zeros(4, 3)
    transposed = base.t()  # 3 x 4, not contiguous
    load_weights(tmp_path / "w.safetensors", [("t", transposed)])
    assert torch.equal(transposed, torch.arange(12.0).reshape(3, 4))


@pytest.mark.parametrize("change, message", [
    (lambda ps: ps[:-1], "do not fit this model"),
    (lambda ps: [(n, torch.nn.Parameter(p.detach().double())) if n == "a.weight" else (n, p) for n, p in ps], "model has"),
    (lambda ps: [(n, torch.nn.Parameter(torch.zeros(5, 7))) if n == "a.weight" else (n, p) for n, p in ps], "model has"),
])
def test_weights_that_do_not_fit_are_refused_before_anything_is_written(tmp_path, change, message):
    save_weights(tmp_path / "w.safetensors", _params())
    target = change([(n, torch.nn.Parameter(torch.full_like(p, 7))) for n, p in _params()])
    before = [p.detach().clone() for _, p in target]
    with pytest.raises(DataError, match=message):
        load_weights(tmp_path / "w.safetensors", target)
    assert all(torch.equal(p, b) for (_, p), b in zip(target, before))


def test_truncated_or_foreign_files_get_a_clear_error(tmp_path):
    save_weights(tmp_path / "w.safetensors", _params())
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-20])
    with pytest.raises(DataError, match="truncated"):
        load_weights(tmp_path / "cut.safetensors", _params())
    for junk in (b"junk", b"\xff" * 8 + b"{}", (100).to_bytes(8, "little") + b"not json" * 20):
        (tmp_path / "junk.safetensors").write_bytes(junk)
        with pytest.raises(DataError, match="cannot read weights"):
            load_weights(tmp_path / "junk.safetensors", _params())
