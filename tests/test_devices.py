"""Device placement: ``model.device`` and ``model.device_map`` (transformers/accelerate)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zotune.cli import main
from zotune.trajectory import read_trajectory


def argv(model_dir: Path, csv: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--out", str(out), f"model.name={model_dir}", f"task.path={csv}",
            "task.text_template={text} It was", 'task.choices={"0": " bad", "1": " good"}', "train.steps=3",
            "train.batch_size=4", "train.eval_every=0", "eval.batch_size=8", "eval.max_examples=8",
            "optimizer.lr=1e-3", *extra]


def test_device_map_places_the_model_and_trains_the_same(tiny_model_dir, reviews_csv, tmp_path):
    """A model placed by ``from_pretrained(device_map=...)`` (accelerate's hooks) tunes to the same
    weights, bit for bit, as one moved with ``.to(device)``."""
    plain, mapped = tmp_path / "plain", tmp_path / "mapped"
    assert main(argv(tiny_model_dir, reviews_csv, plain, "model.device=cpu")) == 0
    assert main(argv(tiny_model_dir, reviews_csv, mapped, "model.device_map=cpu")) == 0
    a, b = load_file(plain / "weights.safetensors"), load_file(mapped / "weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "device_map: cpu" in (mapped / "config.yaml").read_text()


@pytest.mark.parametrize("extra, message", [
    (("model.device=gpu",), "'model.device' must be auto, cpu, mps, cuda or cuda:N, got 'gpu'"),
    (("model.device=cpu", "model.device_map=auto"), "model.device_map"),
])
def test_bad_placement_is_one_line(tiny_model_dir, reviews_csv, tmp_path, capsys, extra, message):
    assert main(argv(tiny_model_dir, reviews_csv, tmp_path / "run", *extra)) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when there is no GPU")
def test_cuda_without_a_gpu_is_one_line(tiny_model_dir, reviews_csv, tmp_path, capsys):
    assert main(argv(tiny_model_dir, reviews_csv, tmp_path / "run", "model.device=cuda")) != 0
    err = capsys.readouterr().err.strip()
    assert "torch sees no CUDA device" in err and len(err.splitlines()) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trains_on_the_gpu(tiny_model_dir, reviews_csv, tmp_path):
    """On a GPU machine: the default (auto) device is the GPU, and replay reproduces the run there."""
    out = tmp_path / "run"
    assert main(argv(tiny_model_dir, reviews_csv, out)) == 0
    assert main(["replay", "--run", str(out), "--out", str(tmp_path / "replayed")]) == 0
    a, b = load_file(out / "weights.safetensors"), load_file(tmp_path / "replayed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_trajectory_records_its_device_type(tiny_model_dir, reviews_csv, tmp_path):
    out = tmp_path / "run"
    assert main(argv(tiny_model_dir, reviews_csv, out, "model.device=cpu")) == 0
    header, _ = read_trajectory(out / "trajectory.bin")
    assert header["device_type"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without the recorded device")
def test_replay_of_a_gpu_run_without_a_gpu_is_refused(tiny_model_dir, reviews_csv, tmp_path, capsys):
    """A trajectory drawn on CUDA cannot be replayed on the CPU (another generator: other
    directions): one line, nothing written."""
    out = tmp_path / "run"
    assert main(argv(tiny_model_dir, reviews_csv, out, "model.device=cpu")) == 0
    data = (out / "trajectory.bin").read_bytes()
    length = struct.unpack("<I", data[8:12])[0]
    header = data[12 : 12 + length].replace(b'"device_type": "cpu"', b'"device_type": "cuda"')
    assert len(header) == length + 1
    (out / "trajectory.bin").write_bytes(data[:8] + struct.pack("<I", len(header)) + header + data[12 + length :])
    capsys.readouterr()
    assert main(["replay", "--run", str(out), "--out", str(tmp_path / "replayed")]) != 0
    err = capsys.readouterr().err.strip()
    assert "trained on cuda" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "replayed").exists()


def test_input_device_sees_through_a_ddp_wrapper():
    """FO baselines under torchrun wrap the model in DistributedDataParallel (``.module``)."""
    from zotune.models.loader import input_device

    from .conftest import tiny_llama

    wrapper = torch.nn.Module()
    wrapper.module = tiny_llama()
    assert input_device(wrapper) == torch.device("cpu") == input_device(wrapper.module)
