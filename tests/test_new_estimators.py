"""The newer estimators (issue 24), each by its defining property on a small problem; the family
guarantees (lr 0, determinism, state_dict, dtypes, direction cache) are in test_optim_family.py and
test_direction_cache.py, replay through `zotune replay` below."""

from __future__ import annotations

import signal

import pytest
import torch
from safetensors.torch import load_file

from zotune.cli import main
from zotune.config import load_config
from zotune.errors import ConfigError
from zotune.optim import FZOO, LOZO, HiZOO, SparseMeZO, ZOMuon
from zotune.optim.sparse import quantile as sparse_quantile
from zotune.train.trainer import run_train


def run_config(model_dir, csv, *extra):
    return load_config(None, [
        f"model.name={model_dir}", f"task.path={csv}", "task.text_template={text} It was",
        'task.choices={"0": " bad", "1": " good"}', "task.k_shot=4", "train.steps=4", "train.batch_size=4",
        "train.eval_every=0", "eval.max_examples=4", "eval.zero_shot=false", *extra,
    ])


# -- Sparse-MeZO ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_queries", [1, 3])
def test_sparse_mezo_leaves_the_large_weights_bit_identical(dtype, n_queries):
    torch.manual_seed(0)
    layer = torch.nn.Linear(300, 200).to(dtype)
    x = torch.randn(16, 300, dtype=dtype)
    opt = SparseMeZO(layer.parameters(), lr=1e-2, eps=1e-2, seed=3, n_queries=n_queries, sparsity=0.75)
    for _ in range(3):
        before = [p.detach().clone() for p in layer.parameters()]
        thresholds = [opt.threshold(i, p) for i, p in enumerate(layer.parameters())]
        opt.step(lambda: layer(x).float().pow(2).mean())
        for p, b, t in zip(layer.parameters(), before, thresholds):
            large, moved = b.abs() > t, p.detach() != b
            assert not (moved & large).any()  # every large weight: the same bits
            assert moved[~large].float().mean() > 0.5  # the small ones move (bfloat16 rounds some updates away)
            assert 0.6 < large.float().mean() < 0.9  # about 75% left out (a sampled threshold)


@pytest.mark.parametrize("q", [0.25, 0.2, 0.5, 1 / 3, 0.0, 1.0])
def test_sparse_mezo_quantile_is_torch_quantile_bit_for_bit(q):
    """The threshold selects its two order statistics instead of sorting: runs recorded with
    torch.quantile must replay with the same masks (ties, rounded values, n = 1 and an exact rank too)."""
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        n = 1 if seed == 0 else int(torch.randint(2, 5000, (1,), generator=gen))
        x = torch.randn(n, generator=gen).abs() * 10 ** (seed % 5 - 2)
        if seed % 3 == 0:
            x = x.round()  # many ties
        if seed % 4 == 0:
            x = x.bfloat16().float()
        assert torch.equal(sparse_quantile(x, q), torch.quantile(x, q)), (seed, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sparse_mezo_direction_is_z_on_the_small_weights_and_zero_elsewhere(dtype):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3000).to(dtype))
    opt = SparseMeZO([p], lr=1e-3, seed=1)
    threshold = opt.threshold(0, p)
    shape = opt.direction_shape(0, p, {})
    for start, stop in [(0, 1000), (1000, 3000), (17, 18)]:
        z = torch.randn(stop - start)
        out = shape(5, start, stop, p.device, lambda z=z: z, torch.empty(stop - start))
        reference = (p.detach()[start:stop].abs() <= threshold).float() * z
        assert torch.equal(out, reference) and torch.equal(out.signbit(), reference.signbit())


def test_sparse_mezo_refuses_what_would_write_the_left_out_weights():
    with pytest.raises(ValueError, match="does not take weight_decay"):
        SparseMeZO([torch.nn.Parameter(torch.ones(4))], lr=1e-3, weight_decay=0.1)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        SparseMeZO([torch.nn.Parameter(torch.ones(4))], lr=1e-3, sparsity=1.0)


# -- FZOO ---------------------------------------------------------------------------------------
def test_fzoo_normalises_its_step_by_the_spread_of_the_losses():
    """N + 1 forwards; the step does not depend on the loss's scale; each coordinate moves by about
    lr / sqrt(N) (Rademacher probes of a 4,000-dimensional linear loss)."""
    a = torch.randn(4000, generator=torch.Generator().manual_seed(1))
    moves = {}
    for scale in (1.0, 1000.0):
        x = torch.nn.Parameter(torch.zeros(4000))
        calls = []
        opt = FZOO([x], lr=1e-3, eps=1e-3, seed=5, n_queries=8)
        opt.step(lambda: calls.append(1) or scale * (a @ x))
        assert len(calls) == 9 == opt.forwards_per_step
        moves[scale] = x.detach().clone()
    assert torch.allclose(moves[1.0], moves[1000.0], rtol=1e-3, atol=1e-9)  # scale-free
    rms = float(moves[1.0].pow(2).mean().sqrt()) / 1e-3
    assert 0.25 < rms < 0.5, rms  # 1 / sqrt(8) = 0.35
    assert set(moves[1.0].abs().unique().tolist()) != {0.0}


def test_fzoo_lowers_a_loss_and_refuses_a_single_probe():
    torch.manual_seed(0)
    x = torch.nn.Parameter(torch.randn(50))
    opt = FZOO([x], lr=2e-2, eps=1e-3, seed=0, n_queries=4)
    start = float((x ** 2).sum())
    for _ in range(200):
        opt.step(lambda: (x ** 2).sum())
    assert float((x ** 2).sum()) < 0.2 * start
    with pytest.raises(ValueError, match="FZOO needs n_queries >= 2"):
        FZOO([x], lr=1e-3, n_queries=1)
    cfg = load_config(None, ["optimizer.name=FZOO"]).optimizer
    assert (cfg.n_queries, cfg.distribution) == (8, "rademacher")  # its own defaults
    assert load_config(None, ["optimizer.name=ZOSGD"]).optimizer.n_queries == 1


# -- HiZOO --------------------------------------------------------------------------------------
def test_hizoo_estimates_the_hessian_diagonal_of_a_quadratic():
    """On f = 1/2 sum h_i x_i^2 (h from 0.5 to 4) the running estimate D approaches h, though every
    step probes along D^-1/2 z, which D itself keeps changing."""
    torch.manual_seed(0)
    h = torch.linspace(0.5, 4.0, 20)
    x = torch.nn.Parameter(torch.randn(20))
    opt = HiZOO([x], lr=1e-9, eps=1e-2, seed=1, n_queries=4, alpha=1e-3)
    for _ in range(6000):
        opt.step(lambda: 0.5 * (h * x * x).sum())
    d = opt.hessian(x)
    assert float((d - h).abs().div(h).mean()) < 0.3
    assert float(torch.corrcoef(torch.stack([d, h]))[0, 1]) > 0.8
    assert opt.forwards_per_step == 9 and len(opt.last_record.extra["values"]) == 4


def test_defaults_follow_the_config_version():
    """A default holds from its config version until a later one changes it: HiZOO's alpha (1e-3 until
    version 4, the sweep's 1e-5 since 5; the library's own default is the current one), FZOO's, ZOAdam's and
    ZOMuonSubspace's lr; what the config gives wins."""
    from zotune.config import CONFIG_VERSION, OptimizerConfig
    from zotune.optim.factory import build_optimizer, resolved_hparams

    params = [torch.nn.Parameter(torch.zeros(3))]
    alphas = {v: build_optimizer(OptimizerConfig(name="HiZOO"), params, "full", seed=0, version=v).alpha for v in (1, 4, 5, 8, 15, 16, 18, 19, 20, 21, 22, 23, 24)}
    assert alphas == {1: 1e-3, 4: 1e-3, 5: 1e-5, 8: 1e-5, 15: 1e-5, 16: 1e-5, 18: 1e-5, 19: 1e-5, 20: 1e-5, 21: 1e-5, 22: 1e-5, 23: 1e-5, 24: 1e-5} and HiZOO(params, lr=1e-4).alpha == alphas[CONFIG_VERSION]
    given = OptimizerConfig(name="HiZOO", options={"alpha": 1e-6})
    assert build_optimizer(given, params, "full", seed=0, version=4).alpha == 1e-6
    lrs = {name: [resolved_hparams(OptimizerConfig(name=name), "full", v)[0] for v in range(1, 16)]
           for name in ("FZOO", "ZOAdam", "ZOSGD", "ZOSGDSign", "ZOSGDMomentum", "ZOMuon", "ZOMuonSubspace",
                        "JaguarSignSGD", "LOZO", "SparseMeZO")}
    assert lrs == {"FZOO": [1e-6, 1e-6, 1e-4] + [3e-3] * 12,
                   "ZOAdam": [1e-5, 1e-5, 1e-4, 1e-4, 1e-4, 1e-4] + [1e-3] * 9,
                   "ZOSGD": [1e-6, 1e-6] + [1e-4] * 13,
                   "ZOSGDSign": [1e-6, 1e-6, 1e-4, 1e-4, 1e-4] + [1e-3] * 10,
                   "ZOSGDMomentum": [1e-6, 1e-6, 1e-4, 1e-4, 1e-4] + [3e-6] * 10,
                   "ZOMuon": [1e-6, 1e-6] + [1e-4] * 12 + [3e-3],  # 15: its full sweep's pick
                   "ZOMuonSubspace": [1e-2] * 7 + [3e-1] * 8,
                   "JaguarSignSGD": [1e-6, 1e-6] + [1e-4] * 13,
                   "LOZO": [1e-6, 1e-6] + [1e-4] * 13,  # their LoRA-FA picks leave full fine-tuning the family's
                   "SparseMeZO": [1e-6, 1e-6] + [1e-4] * 13}
    # version 9: the LoRA-FA sweeps' picks of ZO-Adam, ZO-SGD-Sign, FZOO and JAGUAR; 10: LOZO's; 11: Sparse-MeZO's;
    # 12: ZO-SGD-Momentum's; 13: ZOMuonSubspace's (1e-2, its paper's, before); 14: ZO-Muon's; the others keep the
    # family's 3e-2
    lora_fa = {name: [resolved_hparams(OptimizerConfig(name=name), "lora-fa", v)[0] for v in (3, 8, 9, 10, 11, 12, 13, 14)]
               for name in ("ZOAdam", "ZOSGDSign", "FZOO", "JaguarSignSGD", "ZOSGD", "LOZO", "SparseMeZO", "HiZOO",
                            "ZOSGDMomentum", "ZOMuonSubspace", "ZOSGDConservative", "ZOMuon")}
    assert lora_fa == {"ZOAdam": [3e-2, 3e-2] + [1e-2] * 6, "ZOSGDSign": [3e-2, 3e-2] + [1e-2] * 6,
                       "FZOO": [3e-2, 3e-2] + [1e-1] * 6, "JaguarSignSGD": [3e-2, 3e-2] + [1e-2] * 6,
                       "ZOSGD": [3e-2] * 8, "LOZO": [3e-2] * 3 + [1e-2] * 5,
                       "SparseMeZO": [3e-2] * 4 + [1e-1] * 4, "HiZOO": [3e-2] * 8,  # HiZOO: its sweep picked 3e-2
                       "ZOSGDMomentum": [3e-2] * 5 + [3e-3] * 3, "ZOMuonSubspace": [1e-2] * 6 + [3e-2] * 2,
                       "ZOSGDConservative": [3e-2] * 8,  # ZO-SGD-Cons: its sweep picked 3e-2
                       "ZOMuon": [3e-2] * 7 + [1e-2]}
    # 16: ZO-Muon's and JAGUAR's LoRA-FA lr measured at the fewer-forwards grid's length; their full lr stays
    assert [resolved_hparams(OptimizerConfig(name="ZOMuon"), row, v)[0] for row in ("lora-fa", "full") for v in (14, 15, 16)] \
        == [1e-2, 1e-2, 3e-3, 1e-4, 3e-3, 3e-3]
    assert [resolved_hparams(OptimizerConfig(name="JaguarSignSGD"), row, v)[0] for row in ("lora-fa", "full") for v in (15, 16)] \
        == [1e-2, 1e-3, 1e-4, 1e-4]
    # 17: JAGUAR's and LOZO's full lr measured at the grid's length (1e-4 walks off, diverges); LoRA-FA stays
    assert [resolved_hparams(OptimizerConfig(name=name), row, v)[0] for name in ("JaguarSignSGD", "LOZO")
            for row in ("full", "lora-fa") for v in (16, 17)] == [1e-4, 3e-5, 1e-3, 1e-3, 1e-4, 3e-5, 1e-2, 1e-2]
    # 18: FZOO's LoRA-FA lr measured at the grid's length (1e-1 walks off); its full lr stays
    assert [resolved_hparams(OptimizerConfig(name="FZOO"), row, v)[0] for row in ("lora-fa", "full") for v in (17, 18)] \
        == [1e-1, 3e-2, 3e-3, 3e-3]
    # 19: ZO-SGD's LoRA-FA lr measured at the grid's length on three seeds (3e-2 overfits or walks off); its full
    # lr stays, and its subclasses that were not measured (ZO-SGD-Cons, Forward-Grad) keep the family's 3e-2
    assert [resolved_hparams(OptimizerConfig(name="ZOSGD"), row, v)[0] for row in ("lora-fa", "full") for v in (18, 19)] \
        == [3e-2, 1e-2, 1e-4, 1e-4]
    assert [resolved_hparams(OptimizerConfig(name=name), "lora-fa", 19)[0]
            for name in ("ZOSGDConservative", "ForwardGrad", "HiZOO", "LOZO")] == [3e-2, 3e-2, 3e-2, 1e-2]
    # 20: Sparse-MeZO's LoRA-FA lr measured at the grid's length on three seeds (1e-1 overfits or walks off); its
    # full lr stays
    assert [resolved_hparams(OptimizerConfig(name="SparseMeZO"), row, v)[0] for row in ("lora-fa", "full")
            for v in (19, 20)] == [1e-1, 3e-2, 1e-4, 1e-4]
    # 21: HiZOO's LoRA-FA lr measured at the grid's length on three seeds (3e-2 walks off on seed 2); its full lr
    # stays, and ZO-SGD-Cons and Forward-Grad keep the family's 3e-2
    assert [resolved_hparams(OptimizerConfig(name="HiZOO"), row, v)[0] for row in ("lora-fa", "full")
            for v in (20, 21)] == [3e-2, 1e-2, 1e-4, 1e-4]
    assert [resolved_hparams(OptimizerConfig(name=name), "lora-fa", 21)[0]
            for name in ("ZOSGDConservative", "ForwardGrad")] == [3e-2, 3e-2]
    # 22: ZOMuonSubspace's full lr measured at the grid's length (its sweep's 3e-1 walks off there); LoRA-FA stays
    assert [resolved_hparams(OptimizerConfig(name="ZOMuonSubspace"), row, v)[0] for row in ("full", "lora-fa")
            for v in (21, 22)] == [3e-1, 1e-1, 3e-2, 3e-2]
    # 23: HiZOO's full lr measured at the grid's length (the family's 1e-4 diverges on one seed there); LoRA-FA stays
    assert [resolved_hparams(OptimizerConfig(name="HiZOO"), row, v)[0] for row in ("full", "lora-fa")
            for v in (22, 23)] == [1e-4, 3e-5, 1e-2, 1e-2]
    # ZO-Muon (Veprikov et al.): full rank, one two-sided query; ZOMuonSubspace (Lang et al.): its paper's settings
    muon = build_optimizer(load_config(None, ["optimizer.name=ZOMuon"]).optimizer, params, "full", seed=0)
    assert (muon.rank, muon.n_queries, muon.forwards_per_step, muon.param_groups[0]["momentum"]) == (None, 1, 2, 0.95)
    sub = build_optimizer(load_config(None, ["optimizer.name=ZOMuonSubspace"]).optimizer, params, "full", seed=0)
    assert (sub.rank, sub.refresh, sub.n_queries, sub.forwards_per_step) == (64, 100, 4, 5)
    assert sub.param_groups[0]["momentum"] == 0.0 and sub.param_groups[0]["plain_lr"] == 1e-7
    # 15: ZO-Muon's full-rank step at 3e-3, its embeddings and norms at plain_lr 5e-6 (its sweep's); before, and on
    # LoRA-FA, no plain_lr (lr for every parameter)
    plain = {(v, row): build_optimizer(OptimizerConfig(name="ZOMuon"), params, row, seed=0, version=v).param_groups[0]["plain_lr"]
             for v in (14, 15) for row in ("full", "lora-fa")}
    assert plain == {(14, "full"): None, (14, "lora-fa"): None, (15, "full"): 5e-6, (15, "lora-fa"): None}
    assert build_optimizer(OptimizerConfig(name="ZOMuonSubspace"), params, "full", seed=0, version=15).param_groups[0]["plain_lr"] == 1e-7
    # 24: ZO-Muon's full-rank Newton-Schulz in its spectral form on a CPU ("auto"), plain_lr kept; LoRA-FA (its
    # matrices small) and ZOMuonSubspace (r x n) keep the iteration, and so does a run recorded before
    forms = {(v, row): build_optimizer(OptimizerConfig(name="ZOMuon"), params, row, seed=0, version=v).param_groups[0]
             for v in (23, 24) for row in ("full", "lora-fa")}
    assert {k: (g["ns_form"], g["plain_lr"]) for k, g in forms.items()} == {
        (23, "full"): ("iterative", 5e-6), (23, "lora-fa"): ("iterative", None),
        (24, "full"): ("auto", 5e-6), (24, "lora-fa"): ("iterative", None)}
    assert build_optimizer(OptimizerConfig(name="ZOMuonSubspace"), params, "full", seed=0, version=24).param_groups[0]["ns_form"] == "iterative"
    # a row's own entry (momentum's lr on full) leaves the other rows the family's; an entry for "*" (HiZOO's alpha)
    # holds in every row
    assert resolved_hparams(OptimizerConfig(name="ZOSGDMomentum"), "lora-fa", 6)[0] == 3e-2
    assert resolved_hparams(OptimizerConfig(name="ZOAdam"), "lora-fa", 7)[0] == 3e-2
    assert resolved_hparams(OptimizerConfig(name="ZOMuonSubspace"), "lora-fa", 8)[0] == 1e-2  # "*": the paper's
    assert build_optimizer(OptimizerConfig(name="HiZOO"), params, "lora-fa", seed=0, version=6).alpha == 1e-5


def test_hizoo_preconditions_its_probes():
    """The probes run along D^-1/2 z: with D = 4 everywhere, half as far as ZO-SGD's."""
    x = torch.nn.Parameter(torch.zeros(1000))
    opt = HiZOO([x], lr=1e-3, eps=1e-3, seed=2)
    opt.hessian(x).fill_(4.0)
    seen = []
    opt.step(lambda: seen.append(x.detach().clone()) or x.sum())
    probe = seen[1]  # f(x) first, then x + eps D^-1/2 z
    assert abs(float(probe.std()) - 0.5e-3) < 0.05e-3


# -- LOZO ---------------------------------------------------------------------------------------
def test_lozo_perturbs_matrices_with_rank_r_within_a_lazily_refreshed_row_space():
    torch.manual_seed(0)
    layer = torch.nn.Linear(40, 30)
    x = torch.randn(8, 40)
    opt = LOZO(layer.parameters(), lr=1e-3, eps=1e-3, seed=0, rank=3, refresh=2)
    w0, directions = layer.weight.detach().clone(), []
    for _ in range(4):
        w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
        seen = []
        opt.step(lambda: seen.append((layer.weight.detach().clone(), layer.bias.detach().clone())) or layer(x).pow(2).mean())
        z = (seen[0][0] - w) / 1e-3
        assert torch.linalg.matrix_rank(z, atol=1e-3 * float(z.abs().max())) == 3  # U V^T, rank 3
        assert torch.linalg.matrix_rank((seen[0][1] - b).unsqueeze(0)) == 1 and (seen[0][1] != b).all()  # bias: dense z
        directions.append(z)
    def row_space(z):
        return torch.linalg.svd(z, full_matrices=False).Vh[:3]
    same = lambda a, b: float(torch.linalg.matrix_norm(row_space(a) @ row_space(b).T)) ** 2  # 3 when equal
    assert abs(same(directions[0], directions[1]) - 3) < 1e-3 and abs(same(directions[2], directions[3]) - 3) < 1e-3
    assert same(directions[1], directions[2]) < 2.5  # V redrawn after `refresh` steps
    assert torch.linalg.matrix_rank(layer.weight.detach() - w0, atol=1e-6) <= 6  # two periods: within 2 x rank


# -- ZO-Muon in a subspace ------------------------------------------------------------------------
def test_zo_muon_steps_within_a_refreshed_subspace_with_unit_singular_values():
    """Subspace ZO-Muon (Lang et al.'s): the probes move W along P U_j (rank r, columns in span(P)); the step is
    lr * P NS(G), so its r singular values are about lr; P is redrawn every ``refresh`` steps; one-sided
    queries cost q + 1 forwards; vectors take dense z."""
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(40, 30)), torch.nn.Parameter(torch.randn(30))
    target = torch.randn(40, 30)
    opt = ZOMuon([w, b], lr=0.1, eps=1e-3, seed=0, rank=3, refresh=2, n_queries=4, one_sided=True, momentum=0.0)
    assert opt.forwards_per_step == 5 and not opt.takes_fused_update and not opt.takes_dual_forward
    spans = []
    for _ in range(4):
        w0, b0, seen = w.detach().clone(), b.detach().clone(), []
        opt.step(lambda: seen.append((w.detach().clone(), b.detach().clone())) or ((w - target) ** 2).sum() + b.sum())
        assert len(seen) == 5 and torch.equal(seen[0][0], w0)  # f(x), then the four probes
        probes = torch.cat([(p - w0) / 1e-3 for p, _ in seen[1:]], dim=1)  # 40 x (4 * 30): every probe's columns
        assert torch.linalg.matrix_rank(probes, atol=1e-3 * float(probes.abs().max())) == 3  # all within one P
        assert (seen[1][1] != b0).all()  # the bias: dense z
        step = torch.linalg.svdvals(w.detach() - w0)
        assert float(step[2]) > 0.1 * 0.6 and float(step[0]) < 0.1 * 1.25 and float(step[3]) < 1e-5
        spans.append(torch.linalg.svd(probes, full_matrices=False).U[:, :3])
    overlap = lambda a, c: float(torch.linalg.matrix_norm(a.T @ c)) ** 2  # 3 when the spans are equal
    assert abs(overlap(spans[0], spans[1]) - 3) < 1e-3 and abs(overlap(spans[2], spans[3]) - 3) < 1e-3
    assert overlap(spans[1], spans[2]) < 2.5  # P redrawn after `refresh` steps


def test_zo_muon_in_a_subspace_fits_a_matrix():
    torch.manual_seed(0)
    w, target = torch.nn.Parameter(torch.zeros(12, 10)), torch.randn(12, 10)
    loss = lambda: ((w.detach() - target) ** 2).sum()  # noqa: E731
    start = float(loss())
    opt = ZOMuon([w], lr=0.1, seed=0, rank=2, refresh=5, n_queries=4, one_sided=True, momentum=0.0)
    for _ in range(300):
        opt.step(loss)
    assert float(loss()) < 0.4 * start


def test_zo_muon_resets_its_subspace_momentum_with_the_basis():
    w = torch.nn.Parameter(torch.randn(20, 10))
    opt = ZOMuon([w], lr=1e-2, seed=0, rank=2, refresh=3, momentum=0.9)
    norms = []
    for _ in range(4):
        opt.step(lambda: (w ** 2).sum())
        norms.append(float(opt.state[w]["subspace_momentum"].norm()))
    assert opt.state[w]["subspace_momentum"].shape == (2, 10)
    assert norms[3] < norms[2]  # step 3 starts a period: the buffer holds that step's estimate only


# -- every new method through the trainer and `zotune replay` ---------------------------------------
@pytest.mark.parametrize("extra", [
    ["optimizer.name=SparseMeZO", "optimizer.options={sparsity: 0.8}", "optimizer.n_queries=2"],
    ["optimizer.name=SparseMeZO", "tuning.scheme=lora"],
    ["optimizer.name=FZOO", "optimizer.n_queries=3"],
    ["optimizer.name=FZOO", "tuning.scheme=lora"],
    ["optimizer.name=HiZOO", "optimizer.n_queries=2", "optimizer.options={alpha: 0.1}"],
    ["optimizer.name=HiZOO", "tuning.scheme=lora", "optimizer.options={alpha: 0.1}"],
    ["optimizer.name=LOZO", "optimizer.n_queries=2", "optimizer.options={rank: 2, refresh: 2}"],
    ["optimizer.name=LOZO", "tuning.scheme=lora"],
    ["optimizer.name=ZOMuonSubspace", "optimizer.options={rank: 2, refresh: 2}"],
], ids=["sparse-full", "sparse-lora", "fzoo-full", "fzoo-lora", "hizoo-full", "hizoo-lora", "lozo-full", "lozo-lora",
        "muon-subspace"])
def test_new_methods_train_and_replay_bit_identically(tiny_model_dir, reviews_csv, tmp_path, extra):
    run = tmp_path / "run"
    run_train(run_config(tiny_model_dir, reviews_csv, "optimizer.lr=1e-3", *extra), run, log=lambda *_: None)
    assert main(["replay", "--run", str(run), "--out", str(tmp_path / "again")]) == 0
    trained, again = load_file(run / "weights.safetensors"), load_file(tmp_path / "again" / "weights.safetensors")
    assert trained.keys() == again.keys() and all(torch.equal(trained[k], again[k]) for k in trained)


@pytest.mark.parametrize("extra", [
    ("optimizer.name=HiZOO", "optimizer.options={alpha: 0.1}"),  # D: state to checkpoint
    ("optimizer.name=LOZO", "optimizer.options={rank: 2, refresh: 3}"),  # V: a function of the step
    ("optimizer.name=FZOO", "optimizer.n_queries=2"),
    ("optimizer.name=SparseMeZO",),
    ("optimizer.name=ZOMuonSubspace", "optimizer.options={rank: 2, refresh: 3, momentum: 0.9}"),  # M: reset with P
], ids=["hizoo", "lozo", "fzoo", "sparse", "muon-subspace"])
def test_an_interrupted_run_resumes_bit_identically(tiny_model_dir, reviews_csv, tmp_path, tmp_path_factory, monkeypatch,
                                                   extra):
    from .test_resume import argv, assert_same_run, interrupt_in_process, reference

    ref = reference(tiny_model_dir, reviews_csv, tmp_path_factory, *extra)
    args = argv(tiny_model_dir, reviews_csv, tmp_path / "run", *extra)
    interrupt_in_process(args, 7, monkeypatch, signal.SIGTERM)
    assert main(args) == 0
    assert_same_run(tmp_path / "run", ref)


@pytest.mark.parametrize("name", ["FZOO", "HiZOO"])
def test_block_wise_is_refused_in_one_line(name):
    from zotune.optim.factory import forwards_per_step

    cfg = load_config(None, [f"optimizer.name={name}", "optimizer.blockwise=true"]).optimizer
    with pytest.raises(ConfigError, match=f"{name} does not offer block-wise ZO") as info:
        forwards_per_step(cfg, 3)
    assert "\n" not in str(info.value)
