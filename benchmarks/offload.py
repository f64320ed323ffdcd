"""The disk tier's figures (``model.offload: disk``): peak memory and seconds per step of full ZO
fine-tuning with the transformer layers on disk, against the same run in memory.

    .venv/bin/python benchmarks/offload.py                        # the default model, both tiers
    .venv/bin/python benchmarks/offload.py --big --cap-mb 2048    # a 6.8 GB model under a 2 GB cap
    .venv/bin/python benchmarks/offload.py --dual                 # the dual forward against two probes
    .venv/bin/python benchmarks/offload.py --big --memory --tier cpu --device cuda   # the host tier on a GPU

Each run is ``zotune train`` in a subprocess (ZO-SGD, full fine-tuning, rotten_tomatoes), so its
peak RSS is its own; the two default-model runs must write the same weights file, byte for byte.

``--big`` writes a randomly initialised model of SmolLM2-1.7B's shape (24 layers, width 2048,
1.7B parameters, 6.8 GB in float32; the embedded model's tokenizer) under ``runs/offload``
once, tensor by tensor, then tunes it on the disk tier for a few steps. With ``--cap-mb`` the run
is put in a memory cgroup of that limit (cgroup v2 ``memory.max`` or v1
``memory.limit_in_bytes``, where this user may create one; the page cache counts against the
limit too), and the cgroup's own peak is reported beside the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from zotune.train.checkpoint import file_sha256

RUNS = Path("runs/offload")
TRAIN = ["task.name=rotten_tomatoes", "optimizer.name=ZOSGD", "tuning.scheme=full", "eval.zero_shot=false",
         "train.log_every=1"]
# SmolLM2-1.7B's shape (its config.json), randomly initialised
BIG = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
           num_key_value_heads=32, max_position_embeddings=8192, rope_theta=130000.0, tie_word_embeddings=True,
           rms_norm_eps=1e-5)


def train(out: Path, tier: str, extra: list[str], cgroup: Path | None = None) -> dict:
    """One ``zotune train`` run; its summary, with the cgroup's peak (MB) when run in one."""
    cmd = [sys.executable, "-m", "zotune", "train", "--out", str(out), "--overwrite", *TRAIN,
           f"model.offload={tier}", *extra]
    print("$", " ".join(cmd[1:]), flush=True)

    def enter() -> None:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    t0 = time.perf_counter()
    proc = subprocess.run(cmd, preexec_fn=enter if cgroup else None, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"the run failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["losses"] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                         if "loss" in json.loads(line)]
    summary["process_s"] = time.perf_counter() - t0
    if cgroup is not None:
        summary["cgroup_peak_mb"] = cgroup_peak(cgroup) / 2**20
    return summary


def make_cgroup(limit_mb: int) -> Path | None:
    """A memory cgroup limited to ``limit_mb`` under this process's own, or None where none can be made."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            base, limit_file = Path("/sys/fs/cgroup") / path.lstrip("/"), "memory.max"
        elif "memory" in controllers.split(","):
            base, limit_file = Path("/sys/fs/cgroup/memory") / path.lstrip("/"), "memory.limit_in_bytes"
        else:
            continue
        group = base / f"zotune-offload-{os.getpid()}"
        try:
            group.mkdir()
            (group / limit_file).write_text(str(limit_mb * 2**20))
            return group
        except OSError:
            continue
    return None


def cgroup_peak(group: Path) -> int:
    """The cgroup's peak memory use in bytes (v2 ``memory.peak``, v1 ``memory.max_usage_in_bytes``)."""
    for name in ("memory.peak", "memory.max_usage_in_bytes"):
        if (group / name).exists():
            return int((group / name).read_text())
    return 0


def write_big_model(directory: Path) -> Path:
    """A random model of SmolLM2-1.7B's shape as a safetensors model directory, written tensor by
    tensor (never whole in memory); kept for later runs."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    from zotune.models import load_model
    from zotune.tensorfile import write_tensors

    if (directory / "model.safetensors").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    _, tokenizer = load_model()  # the embedded model's tokenizer
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **BIG)
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    model.tie_weights()
    generator = torch.Generator().manual_seed(0)

    def value(name: str, p: torch.Tensor) -> torch.Tensor:
        if p.ndim == 1:  # the norms
            return torch.ones(p.shape)
        return torch.empty(p.shape).normal_(0.0, config.initializer_range, generator=generator)

    print(f"writing a random {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B-parameter model to {directory} ...",
          flush=True)
    write_tensors(directory / ".model.safetensors.tmp", list(model.named_parameters()), {"format": "pt"}, value=value)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    os.replace(directory / ".model.safetensors.tmp", directory / "model.safetensors")
    return directory


def default_model(steps: int) -> None:
    extra = [f"train.steps={steps}", "train.batch_size=16", "train.max_length=40", "eval.max_examples=32"]
    runs = {tier: train(RUNS / f"default-{tier}", tier, extra) for tier in ("none", "disk")}
    same = file_sha256(RUNS / "default-none/weights.safetensors") == file_sha256(RUNS / "default-disk/weights.safetensors")
    print(f"\nSmolLM2-135M, float32, ZO-SGD full, {steps} steps, batch 16 x 40 tokens, "
          f"{torch.get_num_threads()} threads")
    print("| weights | peak RSS (MB) | s/step | loss after |")
    print("|---|---:|---:|---:|")
    for tier, s in runs.items():
        print(f"| {'in memory' if tier == 'none' else 'on disk (its defaults: dual forward, fused update)'} | "
              f"{s['peak_rss_mb']:,.0f} | "
              f"{s['s_per_step']:.2f} | {s['losses'][-1]:.4f} |")
    ratio = runs["disk"]["peak_rss_mb"] / runs["none"]["peak_rss_mb"]
    speed = runs["disk"]["s_per_step"] / runs["none"]["s_per_step"]
    print(f"disk / memory: peak RSS {ratio:.2f}x, s/step {speed:.2f}x; weights byte-identical: {same}")
    if not same:
        sys.exit(1)


def big_model(steps: int, cap_mb: int | None, in_memory: bool, tier: str = "disk", device: str = "cpu",
              optimizer: str = "ZOSGD", fused_only: bool = False) -> None:
    directory = write_big_model(RUNS / "smollm2-1.7b-shape-random")
    extra = [f"model.name={directory}", f"train.steps={steps}", "train.batch_size=2", "train.max_length=32",
             "eval.max_examples=2", "eval.batch_size=2", "optimizer.lr=1e-5", f"model.device={device}",
             f"optimizer.name={optimizer}"]
    runs, names = {}, []
    if in_memory:  # the same run with every weight on the device, uncapped: the speed to compare with
        runs["in memory, no cap"] = train(RUNS / "big-none", "none", extra)
        names.append("big-none")
    cgroup = make_cgroup(cap_mb) if cap_mb else None
    if cap_mb and cgroup is None:
        print(f"no memory cgroup can be made here: the run is not capped at {cap_mb} MB; its peak RSS is measured")
    cap = f", {cap_mb} MB cgroup" if cgroup else ""
    # the host tier always takes the fused update (its updates run on the device)
    variants = [("two probes", False, tier == "cpu"), ("dual forward", True, tier == "cpu")]
    if tier == "disk":
        variants.append(("dual forward + fused update", True, True))
    if fused_only:
        variants = variants[-1:]
    try:
        for label, dual, fused in variants:
            name = f"big-{tier}-{'fused' if fused and dual else 'dual' if dual else 'two'}"
            runs[f"{tier}{cap}, {label}"] = train(
                RUNS / name, tier,
                [*extra, f"optimizer.dual_forward={str(dual).lower()}", f"optimizer.fused_update={str(fused).lower()}"],
                cgroup)
            names.append(name)
            reset = cgroup / "memory.max_usage_in_bytes" if cgroup is not None else None
            if reset is not None and reset.exists():  # cgroup v1: the next run's peak on its own
                reset.write_text("0")
    finally:
        if cgroup is not None:
            cgroup.rmdir()
    size = sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 2**30
    print(f"\nrandom SmolLM2-1.7B shape ({size:.1f} GiB of float32 weights), {optimizer} full, {steps} steps, "
          f"batch 2 x 32 tokens, {torch.get_num_threads()} threads")
    print("| weights | peak RSS (MB) | cgroup peak (MB) | peak CUDA allocated (MB) | s/step | losses |")
    print("|---|---:|---:|---:|---:|---|")
    for name, s in runs.items():
        peaks = [f"{s[k]:,.0f}" if k in s else "-" for k in ("cgroup_peak_mb", "peak_cuda_allocated_mb")]
        print(f"| {name} | {s['peak_rss_mb']:,.0f} | {' | '.join(peaks)} | {s['s_per_step']:.1f} | "
              f"{', '.join(f'{x:.4f}' for x in s['losses'])} |")
    if in_memory:
        base = runs["in memory, no cap"]
        for name, s in runs.items():
            if name != "in memory, no cap":
                print(f"{name} / in memory: s/step {s['s_per_step'] / base['s_per_step']:.2f}x, "
                      f"peak RSS {s['peak_rss_mb'] / base['peak_rss_mb']:.2f}x")
    digests = {file_sha256(RUNS / n / "weights.safetensors") for n in names}
    print(f"weights byte-identical across the runs: {len(digests) == 1}")


def dual_forward(repeats: int) -> None:
    """Step time with the dual forward against two separate probes, in memory and on the disk tier, in one
    process: the four settings take turns, ``repeats`` steps each, and the median is reported."""
    import statistics

    from zotune.models import load_model
    from zotune.optim import ZOSGD

    tiers = {}
    for tier in ("none", "disk"):
        model, tokenizer = load_model(offload=tier)
        tiers[tier] = model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (16, 40), generator=g)
    times: dict[tuple[str, bool], list[float]] = {(t, d): [] for t in tiers for d in (False, True)}
    opts = {(t, d): ZOSGD(tiers[t].parameters(), lr=0.0, eps=1e-3, seed=0).noise_table(64).dual_forward(
        tiers[t] if d else None) for t, d in times}
    for _ in range(repeats + 1):  # the first round warms up
        for (tier, dual), opt in opts.items():
            model = tiers[tier]
            t0 = time.perf_counter()
            opt.step(lambda: model(input_ids=ids, labels=ids).loss)
            times[(tier, dual)].append(time.perf_counter() - t0)
    print(f"\nSmolLM2-135M, ZO-SGD full (lr 0: the weights stay put), batch 16 x 40 tokens, "
          f"{torch.get_num_threads()} threads, median of {repeats} steps each, taking turns")
    print("| weights | two probes (s/step) | dual forward (s/step) | dual / two |")
    print("|---|---:|---:|---:|")
    for tier in tiers:
        two, dual = (statistics.median(times[(tier, d)][1:]) for d in (False, True))
        print(f"| {'in memory' if tier == 'none' else 'on disk (layers)'} | {two:.2f} | {dual:.2f} | {dual / two:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="steps per run (default 5; --big: 3)")
    ap.add_argument("--big", action="store_true", help="the 6.8 GB random model instead of the default one")
    ap.add_argument("--cap-mb", type=int, help="--big: run the disk tier in a memory cgroup of this limit (MB)")
    ap.add_argument("--memory", action="store_true", help="--big: also run it in memory (about 8 GB), for the speed")
    ap.add_argument("--dual", action="store_true", help="the dual forward's step time against two probes")
    ap.add_argument("--tier", choices=("disk", "cpu"), default="disk",
                    help="--big: the disk tier (default) or the host tier (cpu: for a GPU, with --device cuda)")
    ap.add_argument("--device", default="cpu", help="--big: the compute device (cuda for the host tier on a GPU)")
    ap.add_argument("--optimizer", default="ZOSGD", help="--big: the ZO optimizer (e.g. ZOAdam: its moments on disk too)")
    ap.add_argument("--fused-only", action="store_true", help="--big: only the dual forward + fused update run")
    args = ap.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    if args.dual:
        dual_forward(args.steps)
    elif args.big:
        big_model(args.steps if args.steps != 5 else 3, args.cap_mb, args.memory, args.tier, args.device,
                  args.optimizer, args.fused_only)
    else:
        default_model(args.steps)


if __name__ == "__main__":
    main()
