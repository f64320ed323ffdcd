"""The host tier (``model.offload: cpu``): the layers' weights in CPU memory, each layer copied to the
compute device for its forward. The schedule runs here with the CPU as the device (plain copies); the
last test runs it on a GPU where there is one."""

from __future__ import annotations

import pytest
import torch

from zotune.cli import main
from zotune.estimators.perturb import HOSTED, Perturbation
from zotune.models import load_model
from zotune.models.layers import transformer_layers
from zotune.models.loader import host_tier, model_offload
from zotune.optim import ZOSGD

from .conftest import tiny_llama
from .test_cli import assert_one_line_error, zotune
from .test_fused_update import TAKES
from .test_optim_family import prepared
from .test_resume import argv, interrupt_in_process


def trained_on_host(cls, lr, batch, device: torch.device, dual: bool, steps: int = 3):
    model = prepared(tiny_llama(), cls).to(device)
    if device.type == "cpu":
        model._zotune_offload = host_tier(model, device)
    else:  # from the CPU, as load_model(offload="cpu") does
        model = model.cpu()
        model._zotune_offload = host_tier(model, device)
    opt = cls(model.parameters(), lr=lr, eps=1e-2, seed=3, n_queries=2).fuse_update(model)
    if dual and opt.takes_dual_forward:
        opt.dual_forward(model)
    records = stepped(opt, model, batch, lr, device, steps)
    opt.flush_update()
    return model, opt, records


def trained_in_memory(cls, lr, batch, device: torch.device, steps: int = 3):
    model = prepared(tiny_llama(), cls).to(device)
    opt = cls(model.parameters(), lr=lr, eps=1e-2, seed=3, n_queries=2)
    return model, stepped(opt, model, batch, lr, device, steps)


def stepped(opt, model, batch, lr, device: torch.device, steps: int) -> list:
    """``steps`` steps on ``batch`` (a schedule: each its own lr); their records."""
    records = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * (1 + step)
        opt.step(lambda: model(**{k: v.to(device) for k, v in batch.items()}).loss)
        records.append(opt.last_record)
    return records


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p.cpu(), q.cpu()), name


@pytest.mark.parametrize("cls, lr", TAKES, ids=[c.__name__ for c, _ in TAKES])
@pytest.mark.parametrize("dual", [False, True], ids=["two-probes", "dual"])
def test_every_optimizer_that_takes_the_fused_update_trains_bit_identically(cls, lr, dual, tiny_batch):
    cpu = torch.device("cpu")
    model, records = trained_in_memory(cls, lr, tiny_batch, cpu)
    hosted, opt, hosted_records = trained_on_host(cls, lr, tiny_batch, cpu, dual)
    assert hosted_records == records
    assert_same_weights(model, hosted)
    layers = transformer_layers(hosted)
    assert all(getattr(p, HOSTED, False) for p in layers.parameters())


def test_the_schedule_copies_each_layer_once_per_query_with_at_most_two_on_the_device(tiny_batch):
    uploads = {}
    for dual in (False, True):
        model, opt, _ = trained_on_host(ZOSGD, 2e-3, tiny_batch, torch.device("cpu"), dual, steps=2)
        offload = model_offload(model)
        before = offload.uploads
        opt.step(lambda: model(**tiny_batch).loss)
        uploads[dual] = offload.uploads - before
        assert offload.peak_resident == 2
        assert opt.fused.pending == len(transformer_layers(model))
        assert all(p.device.type == "cpu" and p.data_ptr() == h.data_ptr()  # between forwards: the host tensors
                   for ps, hs in zip(offload.params, offload.host) for p, h in zip(ps, hs))
    n, q = len(transformer_layers(model)), opt.n_queries
    assert uploads == {False: 2 * q * n, True: q * n}  # the dual forward: one visit per layer per query


def test_load_model_on_the_host_tier(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    hosted, _ = load_model(str(tiny_model_dir), offload="cpu", device="cpu")
    offload = model_offload(hosted)
    assert offload.device.type == "cpu" and len(offload.layers) == len(transformer_layers(hosted))
    batch = tokenizer(["a sentence", "another one, longer"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, hosted(**batch).logits)
    assert offload.uploads == len(offload.layers)


def test_a_run_on_the_host_tier_matches_in_memory_resumes_and_replays(tiny_model_dir, reviews_csv, tmp_path,
                                                                      monkeypatch, capsys):
    monkeypatch.setattr(Perturbation, "in_place_numel", 0)  # under the mode, as a large model's probes run
    memory, host = tmp_path / "memory", tmp_path / "host"
    assert main(argv(tiny_model_dir, reviews_csv, memory, "train.keep_best=true")) == 0
    args = argv(tiny_model_dir, reviews_csv, host, "train.keep_best=true", "model.offload=cpu", "model.device=cpu")
    interrupt_in_process(args, 5, monkeypatch)
    assert main(args) == 0
    assert "resuming at step" in capsys.readouterr().out
    for name in ("weights.safetensors", "best.safetensors"):
        assert (host / name).read_bytes() == (memory / name).read_bytes(), name
    assert main(["replay", "--run", str(host), "--out", str(tmp_path / "replayed")]) == 0
    plain = tmp_path / "plain"  # the last step's weights (the runs above end with the best on dev)
    assert main(argv(tiny_model_dir, reviews_csv, plain)) == 0
    assert (tmp_path / "replayed" / "weights.safetensors").read_bytes() == (plain / "weights.safetensors").read_bytes()


@pytest.mark.parametrize("args, needle", [
    (["model.offload=cpu", "optimizer.name=HiZOO"], "fused update"),
    (["model.offload=cpu", "optimizer.fused_update=false"], "optimizer.fused_update"),
    (["model.offload=cpu", "model.device_map=auto"], "model.device_map"),
])
def test_host_tier_refusals_are_one_line(tmp_path, args, needle):
    assert_one_line_error(zotune("train", "--out", str(tmp_path / "run"), *args), needle)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_host_tier_on_a_gpu_trains_as_the_model_in_gpu_memory(tiny_batch):
    cuda = torch.device("cuda")
    for dual in (False, True):
        model, records = trained_in_memory(ZOSGD, 2e-3, tiny_batch, cuda)
        hosted, _, hosted_records = trained_on_host(ZOSGD, 2e-3, tiny_batch, cuda, dual)
        assert hosted_records == records
        assert_same_weights(model, hosted)
