"""Low-rank directions ``Z = L R`` (optim/low_rank.py): any chunk equals the same slice of ``L @ R``."""

import torch

from zotune.optim.low_rank import low_rank_shape


def test_every_chunk_is_its_slice_of_the_product_and_one_key_is_kept():
    m, n, r = 37, 11, 3
    left = {k: torch.randn(m, r, generator=torch.Generator().manual_seed(k)) for k in (1, 2)}
    right = {k: torch.randn(r, n, generator=torch.Generator().manual_seed(10 + k)) for k in (1, 2)}
    calls: list[int] = []

    def draw_left(key):
        calls.append(key)
        return left[key]

    shape = low_rank_shape(n, draw_left, lambda key: right[key])
    spans = [(0, m * n), (n, 4 * n), (3, 2 * n + 1), (5, 7), (m * n - 4, m * n), (2 * n, 2 * n + 1)]
    for key in (1, 2, 1):  # whole rows (written in place), part rows (through the scratch), one value
        for a, b in spans:
            out = torch.full((b - a,), float("nan"))
            assert shape(key, a, b, torch.device("cpu"), None, out) is not None
            first, last = a // n, (b - 1) // n  # the rows the chunk overlaps, as one product (the same kernel)
            expected = (left[key][first : last + 1] @ right[key]).view(-1)[a - first * n : b - first * n]
            assert torch.equal(out, expected), (key, a, b)
            assert torch.allclose(out, (left[key] @ right[key]).view(-1)[a:b], atol=1e-6)
    assert calls == [1, 2, 1]  # each factor drawn once per pass over a key; only the last key's is kept
