"""The disk tier (``model.offload: disk``): the layers' weights in mapped files, in memory about a
layer at a time, and training bit-identical to the in-memory model's."""

from __future__ import annotations

import json
import mmap
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from zotune.cli import main
from zotune.estimators.perturb import Perturbation
from zotune.models import load_model
from zotune.models.layers import transformer_layers
from zotune.models.loader import model_offload
from zotune.models.offload import is_offloaded, offload_to_disk, release_span
from zotune.optim import ZOSGD, ZOAdam
from zotune.tensorfile import DTYPES, TensorReader, write_tensors

from .conftest import tiny_llama
from .test_cli import assert_one_line_error, zotune
from .test_optim_family import FAMILY, IDS, prepared
from .test_resume import argv, assert_same_run, interrupt_in_process


def trained(cls, lr, batch, offload: bool, steps: int = 3):
    model = prepared(tiny_llama(), cls)
    if offload:
        offload_to_disk(model)
    opt = cls(model.parameters(), lr=lr, eps=1e-2, seed=3, n_queries=2)
    records = []
    for _ in range(steps):
        opt.step(lambda: model(**batch).loss)
        records.append(opt.last_record)
    return model, opt, records


@pytest.mark.parametrize("cls, lr", FAMILY, ids=IDS)
def test_every_optimizer_trains_bit_identically_offloaded(cls, lr, tiny_batch):
    model, _, records = trained(cls, lr, tiny_batch, offload=False)
    offloaded, opt, records_off = trained(cls, lr, tiny_batch, offload=True)
    layers = {id(p) for p in transformer_layers(offloaded).parameters()}
    assert layers and all(is_offloaded(p) == (id(p) in layers) for p in offloaded.parameters())
    assert records_off == records
    # every parameter's optimizer state (moments, momentum, Hessian estimate) lives in files beside the layers'
    # weights, the embedding's and the final norm's too, and comes back there from a state dict
    state = {id(p): opt.state[p] for p in offloaded.parameters() if opt.state.get(p)}
    again = cls(offloaded.parameters(), lr=lr, eps=1e-2, seed=3, n_queries=2)
    again.load_state_dict(opt.state_dict())
    for p in offloaded.parameters():
        for key, v in state.get(id(p), {}).items():
            if isinstance(v, torch.Tensor) and v.numel() == p.numel():
                assert is_offloaded(v) and is_offloaded(again.state[p][key]), key
                assert torch.equal(v, again.state[p][key])
    start = tiny_llama()
    moved = False
    for (name, p), q, p0 in zip(model.named_parameters(), offloaded.parameters(), start.parameters()):
        assert torch.equal(p, q), name
        moved |= not torch.equal(p, p0)
    assert moved


def test_probes_under_the_perturbation_mode_are_exact_offloaded(tiny_batch, monkeypatch):
    """A large trainable set is probed under the mode (not written in place): the mode reads the
    mapped weights op by op."""
    monkeypatch.setattr(Perturbation, "in_place_numel", 0)
    model, _, records = trained(ZOSGD, 2e-3, tiny_batch, offload=False)
    offloaded, _, records_off = trained(ZOSGD, 2e-3, tiny_batch, offload=True)
    assert records_off == records
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), offloaded.parameters()))


def resident_bytes(paths: set[str]) -> int:
    """Bytes of the files ``paths`` mapped into this process and resident in its memory (smaps' Rss)."""
    total, current = 0, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's first line: range perms offset dev inode [path]
            current = fields[5] if len(fields) > 5 else None
        elif fields and fields[0] == "Rss:" and current in paths:
            total += int(fields[1]) * 1024
    return total


def state_paths(directory: Path) -> set[str]:
    """The optimizer-state files mapped into this process from ``directory`` (unlinked: smaps names them with
    " (deleted)", which resident_bytes reads as the path's first field)."""
    return {line.split()[5] for line in Path("/proc/self/smaps").read_text().splitlines()
            if len(line.split()) > 5 and line.split()[5].startswith(f"{directory}/.state-")}


def test_a_forward_and_a_step_leave_about_no_layer_in_memory():
    """Each layer's pages are dropped once the forward leaves it and once a parameter is updated:
    afterwards the mapped files hold no more resident memory than a few edge pages each; during the
    forward, the layer being computed is resident and the first one is not anymore."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=256, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    offload = offload_to_disk(model)
    paths = {str(f.path) for f in offload.files}
    layer_bytes = offload.files[0].nbytes
    seen = {}
    layers = transformer_layers(model)
    layers[2].mlp.register_forward_hook(lambda *_: seen.update(during=resident_bytes(paths),
                                                               first=resident_bytes({str(offload.files[0].path)})))
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        model(input_ids=ids)
    edges = 2 * mmap.PAGESIZE * len(list(model.parameters()))
    assert seen["during"] >= layer_bytes // 2  # the layer in use is in memory (the mechanism is measured)
    assert seen["first"] <= edges
    assert resident_bytes(paths) <= edges
    opt = ZOSGD(model.parameters(), lr=1e-3, eps=1e-3, seed=0)
    opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    assert resident_bytes(paths) <= edges
    # ZOAdam's two moments per layer weight: in files of their own (unlinked), dropped after each update too
    adam = ZOAdam(model.parameters(), lr=1e-3, eps=1e-3, seed=0)
    adam.step(lambda: model(input_ids=ids, labels=ids).loss)
    moments = [v for p in model.parameters() for v in adam.state[p].values() if isinstance(v, torch.Tensor)]
    assert len(moments) == 2 * len(list(model.parameters())) and all(is_offloaded(m) for m in moments)
    state_files = state_paths(offload.files[0].path.parent)
    assert len(state_files) == len(moments)
    assert resident_bytes(paths | state_files) <= edges + 2 * mmap.PAGESIZE * len(moments)


def test_an_update_holds_about_a_chunk_of_the_embeddings_moments(monkeypatch):
    """The embedding stays in memory on the disk tier, but its Adam moments are in mapped files, and each chunk
    of them leaves memory once updated: during the update no more than a few chunks of the moments are resident
    (the whole of them were before: twice the embedding)."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=32768, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    offload = offload_to_disk(model)
    embedding = model.get_input_embeddings().weight
    assert not is_offloaded(embedding)
    moments_bytes = 2 * embedding.numel() * 4
    peak = {"state": 0, "chunks": 0}

    def measured(t, start, stop):
        release_span(t, start, stop)
        peak["chunks"] += t.numel() == embedding.numel()
        peak["state"] = max(peak["state"], resident_bytes(state_paths(offload.directory)))

    monkeypatch.setattr("zotune.optim.base.release_span", measured)
    ids = torch.randint(0, 32768, (2, 8))
    adam = ZOAdam(model.parameters(), lr=1e-3, eps=1e-3, seed=0)
    for _ in range(2):
        adam.step(lambda: model(input_ids=ids, labels=ids).loss)
    assert all(is_offloaded(v) for v in adam.state[embedding].values() if isinstance(v, torch.Tensor))
    assert peak["chunks"] == 2 * 2 * 8  # 2 steps x 2 moments x 8 chunks of 2**20 values
    assert 0 < peak["state"] <= moments_bytes / 2
    assert adam.state[embedding]["exp_avg"].abs().sum() > 0  # the moments were written


STEPS_RESIDENT = """
import re, sys, torch
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
from zotune.models.offload import offload_to_disk
from zotune.optim import ZOAdam
def anon(): return int(re.search(r"RssAnon:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=8,
                                     num_key_value_heads=8, vocab_size=8192, tie_word_embeddings=True)).eval()
offload = offload_to_disk(model)
ids = torch.randint(0, 8192, (2, 16))
opt = ZOAdam(model.parameters(), lr=1e-5, eps=1e-3, seed=0).dual_forward(model).fuse_update(model)
opt.step(lambda: model(input_ids=ids, labels=ids).loss)
before = anon()
for _ in range(3):
    opt.step(lambda: model(input_ids=ids, labels=ids).loss)
print(anon() - before, offload.nbytes)
"""


def test_steps_on_the_disk_tier_do_not_grow_anonymous_memory():
    """The probes' and updates' chunk-sized temporaries go back to the system when freed
    (``map_large_allocations``): over ZOAdam steps with the dual forward and the fused update, the process's
    anonymous memory grows by far less than its layers' size. (Without it glibc kept 0.7 GB of a 4-layer
    model's 256 MB here, in the heaps of the threads that ran the updates.)"""
    run = subprocess.run([sys.executable, "-c", STEPS_RESIDENT], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert run.returncode == 0, run.stderr[-2000:]
    growth, layers = map(int, run.stdout.split())
    assert growth < layers / 4, (growth, layers)


def test_load_model_offloaded_reads_the_checkpoint_into_layer_files(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(str(tiny_model_dir))
    offloaded, _ = load_model(str(tiny_model_dir), offload="disk", offload_dir=tmp_path / "off")
    layers = transformer_layers(offloaded)
    assert sorted(p.name for p in (tmp_path / "off").iterdir()) == [f"block-{k:03d}.safetensors" for k in range(len(layers))]
    assert model_offload(offloaded).directory == tmp_path / "off"
    layer_ids = {id(p) for p in layers.parameters()}
    assert all(is_offloaded(p) == (id(p) in layer_ids) for p in offloaded.parameters())
    assert offloaded.get_output_embeddings().weight is offloaded.get_input_embeddings().weight  # still tied
    assert not any(p.is_meta for p in offloaded.parameters())
    for (name, p), q in zip(model.named_parameters(), offloaded.parameters()):
        assert torch.equal(p, q), name
    batch = tokenizer(["a short sentence", "and another, longer one"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, offloaded(**batch).logits)
    with safe_open(str(tmp_path / "off" / "block-000.safetensors"), "pt") as f:  # a plain safetensors file
        assert set(f.keys()) == {n for n, _ in layers[0].named_parameters(prefix="model.layers.0")}


def test_load_model_offloaded_to_a_directory_of_its_own_deletes_it_with_the_model(tiny_model_dir):
    import gc

    model, _ = load_model(str(tiny_model_dir), offload="disk")
    directory = model_offload(model).directory
    assert directory.is_dir() and any(directory.iterdir())
    del model
    gc.collect()
    assert not directory.exists()


def test_a_directory_left_by_a_killed_process_is_removed_by_the_next_offload(tmp_path):
    """A DiskOffload that makes its own directory records its process; the next one removes those whose process
    is gone (a SIGKILL skips the clean-up), and leaves a live process's and directories it did not make."""
    from zotune.models.offload import OWNER, DiskOffload

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, live, foreign = tmp_path / "offload-dead", tmp_path / "offload-live", tmp_path / "offload-foreign"
    for d, owner in ((dead, gone.stdout.strip()), (live, str(os.getpid())), (foreign, None)):
        d.mkdir()
        (d / "block-000.safetensors").write_bytes(b"x" * 100)
        if owner:
            (d / OWNER).write_text(owner)
    model = tiny_llama()
    offload = DiskOffload(model, transformer_layers(model), lambda _, p: p, root=tmp_path)
    assert not dead.exists() and live.is_dir() and foreign.is_dir()
    assert (offload.directory / OWNER).read_text() == str(os.getpid())


def test_training_offloaded_matches_in_memory_resumes_and_replays(tiny_model_dir, reviews_csv, tmp_path, monkeypatch,
                                                                 capsys):
    memory, disk = tmp_path / "memory", tmp_path / "disk"
    assert main(argv(tiny_model_dir, reviews_csv, memory)) == 0
    assert main(argv(tiny_model_dir, reviews_csv, disk, "model.offload=disk")) == 0
    assert_same_run(disk, memory)  # the same weights file, byte for byte, and the same trajectory
    resumed = tmp_path / "resumed"
    args = argv(tiny_model_dir, reviews_csv, resumed, "model.offload=disk", f"model.offload_dir={tmp_path / 'files'}")
    interrupt_in_process(args, 5, monkeypatch)
    assert main(args) == 0
    assert "resuming at step" in capsys.readouterr().out
    assert_same_run(resumed, memory)
    assert main(["replay", "--run", str(disk), "--out", str(tmp_path / "replayed")]) == 0
    assert (tmp_path / "replayed" / "weights.safetensors").read_bytes() == (memory / "weights.safetensors").read_bytes()


@pytest.mark.parametrize("args, needle", [
    (["model.offload=ssd"], "model.offload"),
    (["model.offload=disk", "optimizer.name=AdamW"], "zeroth-order"),
    (["model.offload=disk", "tuning.hybrid.zo_layers=1"], "tuning.hybrid.zo_layers"),
    (["model.offload=disk", "model.device=mps"], "model.device"),
    (["model.offload=disk", "model.name=some-org/some-model"], "hub id"),
])
def test_offload_refusals_are_one_line(tmp_path, args, needle):
    assert_one_line_error(zotune("train", "--out", str(tmp_path / "run"), *args), needle)


def test_write_tensors_writes_save_files_bytes_one_tensor_at_a_time(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"{name.lower()}.{i}": torch.randint(0, 2, (3, 2), generator=g).to(dtype)
               for name, dtype in DTYPES.items() for i in range(2)}
    tensors |= {"scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4), "übung": torch.randn(5, generator=g)}
    written = []
    for metadata in (None, {}, {"ü": '"quoted"'}):
        save_file(tensors, str(tmp_path / "reference.safetensors"), metadata=metadata)
        write_tensors(tmp_path / "streamed.safetensors", list(tensors.items()), metadata, after=written.append)
        assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    assert len(written) == 3 * len(tensors)
    # several metadata keys: save_file writes them in a hash map's order, which varies from process to process;
    # write_tensors in the order given
    metadata = {"format": "pt", "ü": "x", "a": "b"}
    write_tensors(tmp_path / "several.safetensors", list(tensors.items()), metadata)
    with safe_open(str(tmp_path / "several.safetensors"), "pt") as f:
        assert f.metadata() == metadata
    save_file(tensors, str(tmp_path / "reference.safetensors"))
    reference_order = list(header_of(tmp_path / "reference.safetensors"))
    assert list(header_of(tmp_path / "several.safetensors")) == ["__metadata__", *reference_order]
    reader = TensorReader([tmp_path / "streamed.safetensors"])
    loaded = load_file(str(tmp_path / "streamed.safetensors"))
    for name, t in tensors.items():
        assert torch.equal(reader.read(name), t) and torch.equal(loaded[name], t) and name in reader
    meta = torch.empty((2, 3), device="meta")
    write_tensors(tmp_path / "from_meta.safetensors", [("w", meta)], value=lambda name, t: torch.ones(2, 3))
    assert torch.equal(load_file(str(tmp_path / "from_meta.safetensors"))["w"], torch.ones(2, 3))
    with pytest.raises(ValueError, match="values of"):
        write_tensors(tmp_path / "bad.safetensors", [("w", meta)], value=lambda name, t: torch.ones(3))


def header_of(path) -> dict:
    """A safetensors file's JSON header, in its order."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length])


@pytest.mark.slow
def test_offloaded_default_model_in_a_subprocess_reports_less_memory(tmp_path):
    """The embedded model, 2 steps in and out of the disk tier: the same weights, less peak RSS."""
    runs = {}
    for tier in ("none", "disk"):
        out = tmp_path / tier
        proc = subprocess.run([sys.executable, "-m", "zotune", "train", "--out", str(out), "train.steps=2",
                               "train.batch_size=4", "eval.max_examples=4", "eval.zero_shot=false",
                               f"model.offload={tier}"], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        runs[tier] = json.loads((out / "summary.json").read_text())
    assert (tmp_path / "none/weights.safetensors").read_bytes() == (tmp_path / "disk/weights.safetensors").read_bytes()
    assert runs["disk"]["peak_rss_mb"] < runs["none"]["peak_rss_mb"] - 200
