"""Several processes (zotune.distributed): the loss exchange of every ZO optimizer, in threads; then
real torchrun launches (CPU, gloo, the tiny model, 2 processes) against one process.

Tolerance: a data-parallel run sums the shard losses in another order than one process, so its
losses follow the single-process curve within ``LOSS_RTOL`` (float32 over a few steps; the
projected gradients differ more, by about one loss ulp / (2 eps)). A query-parallel run is
bit-identical to one process with the same ``n_queries``."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from zotune.cli import main
from zotune.distributed import LossExchange, World, check_batch, check_queries
from zotune.errors import ConfigError
from zotune.estimators.forward_grad import ForwardGradient
from zotune.optim import ZOSGD, ForwardGrad, JaguarSignSGD, ZOAdam, ZOSGDConservative

LOSS_RTOL = 1e-5
LAUNCH_TIMEOUT = 240  # seconds; a launch takes ~20 s here (two interpreters importing transformers)


# -- the exchange inside every optimizer, two "ranks" as threads --------------------------------
class Board:
    """An all_reduce between threads: sums in rank order, like gloo for two ranks."""

    def __init__(self, size: int):
        self.size, self.slots, self.barrier = size, [None] * size, threading.Barrier(size, timeout=60)

    def all_reduce(self, rank: int, t: torch.Tensor) -> None:
        self.slots[rank] = t.clone()
        self.barrier.wait()
        total = sum(self.slots[1:], self.slots[0].clone())
        self.barrier.wait()
        t.copy_(total)


class ThreadExchange(LossExchange):
    def __init__(self, rank: int, board: Board, parallel: str):
        super().__init__(World(rank=rank, size=board.size), parallel)
        self.board = board

    def all_reduce(self, t: torch.Tensor) -> None:
        self.board.all_reduce(self.world.rank, t)


def regression(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 10, generator=g), torch.randn(64, 1, generator=g)
    model = torch.nn.Linear(10, 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model, x, y


def train(model, x, y, cls, exchange=None, steps: int = 4) -> list[float]:
    opt = cls(model.parameters(), lr=1e-2, eps=1e-3, seed=3, n_queries=2)
    if exchange is not None:
        opt.loss_reducer = exchange
    return [float(opt.step(lambda: ((model(x) - y) ** 2).mean())) for _ in range(steps)]


OPTIMIZERS = [ZOSGD, ZOSGDConservative, ZOAdam, ForwardGrad, JaguarSignSGD]


@pytest.mark.parametrize("parallel", ["queries", "data"])
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=[c.__name__ for c in OPTIMIZERS])
def test_two_ranks_apply_the_single_process_update(cls, parallel, monkeypatch):
    """Every probe (ZO-SGD-Cons's candidates and ForwardGrad's JVPs too) goes through the
    exchange: the ranks end identical; query parallel equals one process bit for bit, data
    parallel (half the rows each) within rounding."""
    lock, jvp = threading.Lock(), ForwardGradient._jvp

    def one_jvp_at_a_time(*args):  # forward-AD levels are per process, not per thread
        with lock:
            return jvp(*args)

    monkeypatch.setattr(ForwardGradient, "_jvp", one_jvp_at_a_time)
    model, x, y = regression()
    ranks = [copy.deepcopy(model) for _ in range(2)]
    single = train(model, x, y, cls)
    board, losses, errors = Board(2), [None, None], []

    def rank(r: int) -> None:
        rows = slice(32 * r, 32 * (r + 1)) if parallel == "data" else slice(None)
        exchange = ThreadExchange(r, board, parallel)
        exchange.begin(1, len(x[rows]))
        try:
            losses[r] = train(ranks[r], x[rows], y[rows], cls, exchange)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)
            board.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert losses[0] == losses[1]
    for a, b in zip(ranks[0].parameters(), ranks[1].parameters()):
        assert torch.equal(a, b)
    if parallel == "queries":
        assert losses[0] == single
        assert all(torch.equal(a, b) for a, b in zip(ranks[0].parameters(), model.parameters()))
    else:
        assert losses[0] == pytest.approx(single, rel=LOSS_RTOL)
        gap = max(float((a - b).detach().abs().max()) for a, b in zip(ranks[0].parameters(), model.parameters()))
        assert gap < 1e-4, gap  # ~ lr * steps * |z| * (a loss rounding, ~1e-6 here) / (2 eps)


def test_the_exchange_weights_shards_and_shares_queries():
    exchange = LossExchange(World(rank=1, size=2), "queries")
    assert exchange.runs_here(4) == [False, False, True, True]  # q = 2: rank 1 takes the second direction
    assert exchange.runs_here(2) == [False, True]  # q = 1: rank 1 the minus probe
    assert LossExchange(World(rank=0, size=2), "queries").runs_here(3) == [True, True, False]
    alone = LossExchange(World(), "data")
    alone.begin(1, 3)
    assert alone.reduce([1.5, float("nan")])[0] == 1.5 and alone.bytes == 4 * 8 and alone.calls == 1
    assert not alone.stop_agreed
    alone.stop = lambda: True
    alone.reduce([0.0])
    assert alone.stop_agreed


def test_batch_sharding_rules():
    check_batch(4, 2, "data")
    check_batch(3, 2, "queries")  # every rank takes the whole batch
    with pytest.raises(ConfigError, match="smaller than the 4 processes"):
        check_batch(2, 4, "data")
    with pytest.raises(ConfigError, match="not a multiple of the 2 processes.*2 or 4"):
        check_batch(3, 2, "data")
    with pytest.raises(ConfigError, match="2 probes.*3"):
        check_queries(2, 3, "queries")
    world = World(rank=1, size=2)
    assert world.shard([5, 6, 7, 8]) == [7, 8]
    assert world.batch_share(list(range(7)), 2) == [2, 3, 6]  # batches 1 and 3 of [01][23][45][6]


# -- torchrun launches ----------------------------------------------------------------------
def overrides(model_dir: Path, csv: Path, *extra: str) -> list[str]:
    return [f"model.name={model_dir}", f"task.path={csv}", "task.text_template={text} It was",
            'task.choices={"0": " bad", "1": " good"}', "train.steps=6", "train.batch_size=4", "train.log_every=1",
            "train.eval_every=3", "train.checkpoint_every=2", "eval.batch_size=4", "eval.max_examples=8",
            "optimizer.lr=1e-3", *extra]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "ZOTUNE_DIST_TIMEOUT": "30", **extra}


def torchrun(launcher: list[str], entry: list[str], args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher, *entry, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **{"env": env(), **kw})


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


TWO = ["--standalone", "--nproc-per-node=2"]
ZOTUNE = ["-m", "zotune"]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def zotune_errors(stderr: str) -> list[str]:
    """zotune's own lines but warnings (torchrun adds its report of failed workers)."""
    return [line for line in stderr.splitlines() if line.startswith("zotune:") and not line.startswith("zotune: warning")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread here, as in the workers (OMP_NUM_THREADS=1): the same arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_data_runs: dict[str, Path] = {}


def data_run(model_dir: Path, csv: Path, tmp_path_factory) -> Path:
    """A 2-process data-parallel ZOSGD run (once per session; the data is the same fixture)."""
    if "run" not in _data_runs:
        out = tmp_path_factory.mktemp("data2") / "run"
        proc = finish(torchrun(TWO, ZOTUNE, ["train", "--out", str(out), *overrides(model_dir, csv)]))
        assert proc.returncode == 0, proc.stderr
        _data_runs["run"] = out
    return _data_runs["run"]


def test_data_parallel_follows_one_process_and_replays_bit_identically(tiny_model_dir, reviews_csv, tmp_path,
                                                                      tmp_path_factory):
    run = data_run(tiny_model_dir, reviews_csv, tmp_path_factory)
    one = tmp_path / "one"
    assert main(["train", "--out", str(one), *overrides(tiny_model_dir, reviews_csv)]) == 0
    got, expected = summary(run), summary(one)
    assert got["world_size"] == 2 and got["parallel"] == "data"
    digests = got["rank_param_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert got["bytes_exchanged_per_step"] == 4 * 8  # f+, f-, the shard size, the stop flag: float64 each
    assert got["forward_passes"] == expected["forward_passes"] and "world_size" not in expected
    assert losses(run) == pytest.approx(losses(one), rel=LOSS_RTOL)  # rank 0 alone wrote one line per step
    assert main(["replay", "--run", str(run), "--out", str(tmp_path / "replayed")]) == 0
    assert summary(tmp_path / "replayed")["weights_sha256"] == digests[0]
    assert (tmp_path / "replayed" / "weights.safetensors").read_bytes() == (run / "weights.safetensors").read_bytes()
    assert not (run / "checkpoints").exists()


def test_nproc_query_parallel_is_bit_identical_to_one_process(tiny_model_dir, reviews_csv, tmp_path):
    args = overrides(tiny_model_dir, reviews_csv, "optimizer.n_queries=2")
    proc = subprocess.run([sys.executable, "-m", "zotune", "train", "--nproc", "2", "--out", str(tmp_path / "q"),
                           *args, "train.parallel=queries"], capture_output=True, text=True, env=env(),
                          timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert main(["train", "--out", str(tmp_path / "one"), *args]) == 0
    got = summary(tmp_path / "q")
    assert got["parallel"] == "queries" and len(set(got["rank_param_sha256"])) == 1
    assert (tmp_path / "q" / "weights.safetensors").read_bytes() == (tmp_path / "one" / "weights.safetensors").read_bytes()
    assert losses(tmp_path / "q") == losses(tmp_path / "one")


def test_nproc_refuses_a_batch_that_does_not_split_in_one_line(tiny_model_dir, reviews_csv, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "zotune", "train", "--nproc", "2", "--out", str(tmp_path / "r"),
                           *overrides(tiny_model_dir, reviews_csv, "train.batch_size=3")],
                          capture_output=True, text=True, env=env(), timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "zotune: error: train.batch_size 3 is not a multiple of the 2 processes: each takes an equal share of the "
        "global batch; use e.g. 2 or 4"]
    assert not (tmp_path / "r").exists()


FAULTY_WORKER = """
import os, signal, sys, time
from zotune.train import trainer
original = trainer.batch_indices

def faulty(step, *rest):
    if step == int(os.environ["FAULT_STEP"]) and os.environ["RANK"] == "1":
        if os.environ["FAULT"] == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # hang until the launcher stops it
        time.sleep(600)
    return original(step, *rest)

trainer.batch_indices = faulty
from zotune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def faulty_run(tmp_path: Path, fault: str, args: list[str], **env_extra: str) -> tuple[subprocess.CompletedProcess, float]:
    script = tmp_path / "faulty_worker.py"
    script.write_text(FAULTY_WORKER)
    t0 = time.monotonic()
    proc = finish(torchrun(TWO, [str(script)], args, env=env(FAULT=fault, FAULT_STEP="3", **env_extra)))
    return proc, time.monotonic() - t0


@pytest.mark.slow
def test_a_dead_rank_stops_the_other_in_one_line_and_the_run_resumes(tiny_model_dir, reviews_csv, tmp_path,
                                                                     tmp_path_factory):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), *overrides(tiny_model_dir, reviews_csv)]
    proc, _ = faulty_run(tmp_path, "die", args)
    assert proc.returncode != 0
    lines = zotune_errors(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("zotune: error: rank 0: the loss exchange of step 4 failed: "
                                                   "another process stopped"), proc.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    resumed = finish(torchrun(TWO, ZOTUNE, args))  # the same command again
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 2" in resumed.stdout
    ref = data_run(tiny_model_dir, reviews_csv, tmp_path_factory)
    assert summary(out)["rank_param_sha256"] == summary(ref)["rank_param_sha256"]
    assert (out / "trajectory.bin").read_bytes() == (ref / "trajectory.bin").read_bytes()


@pytest.mark.slow
def test_a_hung_rank_stops_the_other_within_the_timeout(tiny_model_dir, reviews_csv, tmp_path):
    args = ["train", "--out", str(tmp_path / "run"), *overrides(tiny_model_dir, reviews_csv)]
    proc, elapsed = faulty_run(tmp_path, "hang", args, ZOTUNE_DIST_TIMEOUT="5")
    assert proc.returncode != 0
    lines = zotune_errors(proc.stderr)
    assert len(lines) == 1 and "did not answer within 5 s" in lines[0], proc.stderr
    assert elapsed < 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_launchers_on_127_0_0_1_act_as_two_nodes(tiny_model_dir, reviews_csv, tmp_path, tmp_path_factory):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), *overrides(tiny_model_dir, reviews_csv)]
    port = free_port()
    nodes = [torchrun(["--nnodes=2", f"--node-rank={k}", "--nproc-per-node=1", "--rdzv-backend=c10d",
                       f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=zotune-test"], ZOTUNE, args) for k in (0, 1)]
    for proc in map(finish, nodes):
        assert proc.returncode == 0, proc.stderr
    ref = data_run(tiny_model_dir, reviews_csv, tmp_path_factory)
    assert summary(out)["rank_param_sha256"] == summary(ref)["rank_param_sha256"]


@pytest.mark.slow
def test_first_order_baselines_run_under_ddp(tiny_model_dir, reviews_csv, tmp_path):
    args = overrides(tiny_model_dir, reviews_csv, "optimizer.name=SGD", "optimizer.lr=0.1")
    proc = finish(torchrun(TWO, ZOTUNE, ["train", "--out", str(tmp_path / "ddp"), *args]))
    assert proc.returncode == 0, proc.stderr
    assert main(["train", "--out", str(tmp_path / "one"), *args]) == 0
    got = summary(tmp_path / "ddp")
    assert len(set(got["rank_param_sha256"])) == 1
    assert got["bytes_exchanged_per_step"] >= 4 * got["trainable_params"]  # DDP all-reduces every gradient
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "one"), rel=LOSS_RTOL)
    again = finish(torchrun(TWO, ZOTUNE, ["train", "--out", str(tmp_path / "ddp"), *args]))  # a finished run
    assert again.returncode != 0
    assert zotune_errors(again.stderr) == [f"zotune: error: rank 0: --out {tmp_path / 'ddp'} already holds a run "
                                           "(summary.json); choose another directory or pass --overwrite"]


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_every_rank_after_the_same_step(tiny_model_dir, reviews_csv, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), *overrides(tiny_model_dir, reviews_csv, "train.steps=400",
                                                   "train.eval_every=0", "train.checkpoint_every=0")]
    proc = torchrun(TWO, ZOTUNE, args)
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while proc.poll() is None and time.monotonic() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    done = finish(proc)
    lines = zotune_errors(done.stderr)
    assert len(lines) == 1 and lines[0].startswith("zotune: interrupted (SIGTERM) at step"), done.stderr
    step = int(lines[0].split(" at step ")[1].split(";")[0])
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{step:06d}"]
