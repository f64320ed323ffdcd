"""Seeded random directions z, regenerated on demand and never stored.

A direction is named by an integer key (derived from the step seed, the query index and the
parameter's index). Its values are produced in fixed-size chunks, each from a generator seeded
with ``mix(key, chunk_index)``, so that

* the same key gives the same z in every process, dtype and call order;
* no temporary larger than one chunk is allocated (memory O(chunk), not O(parameter));
* any chunk can be regenerated on its own, so chunks are generated on two threads at once
  (torch releases the GIL; the generator is the single-threaded part of the work) without
  changing a single value.

z is always generated in float32 and cast where it is used, so a direction does not depend on
the dtype of the weights it perturbs.

Regenerating costs time (a step draws z three times: the + probe, the - probe, the update).
With ``cache_numel > 0`` the chunks drawn first are kept, up to that many values, and handed
out again instead of redrawn (the same values, drawn once), until :meth:`clear_cache` (the
optimizers call it at the end of each step; the buffers are reused by the next step): memory
traded for speed, off by default.

With a noise table (:meth:`DirectionSampler.use_table`) nothing is drawn per step: every chunk
of z is a window of one table drawn once, at a key-named offset. Other directions than without
it (a trajectory records the table's size in its optimizer config), for the table's memory.

JAGUAR's coordinate masks (``"coordinates"``: 1.0 on a random ``fraction`` of the entries) are drawn
once a step and kept as the positions of their ones (``fraction`` x 8 bytes a value, up to
``MASK_POSITIONS``): a mask's later uses in the step (the other probe, the update) rebuild it from
them, the same bits, at a twentieth of a draw's cost. A replayed update, a mask's only use, keeps none
(``keep_masks``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

_MASK64 = (1 << 64) - 1
DISTRIBUTIONS = ("gaussian", "rademacher")  # user-facing; "coordinates" is JAGUAR's block mask
DEFAULT_CHUNK = 1 << 20
# The last noise table drawn on each device in this process, with what it was drawn from: a table is a pure
# function of (distribution, chunk size, size), so the next sampler that asks for the same one (the next run
# in a process: a notebook, a test suite) takes it instead of drawing 64 MB again. At most one per device.
_TABLES: dict[torch.device, tuple[tuple[str, int, int], torch.Tensor]] = {}
_TABLES_LOCK = threading.Lock()


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix(*values: int) -> int:
    """Hash integers into a 63-bit seed; stable across processes and platforms."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


_CPU = torch.device("cpu")
_TABLE_KEY = mix(0x7A6F74756E65)  # names the noise table's chunks ("zotune")
TABLE_MIN_CHUNKS = 8  # windows start at numel - chunk + 1 offsets: a table of one chunk would have one
MASK_POSITIONS = 1 << 22  # the most positions of a step's coordinate masks kept (int64: 32 MB); the rest is redrawn


_SIGNS: dict[torch.device, torch.Tensor] = {}


def _sign_table(device: torch.device) -> torch.Tensor:
    """Row ``b`` holds the 8 signs of byte ``b``, bit 0 first: ``2 * ((b >> i) & 1) - 1``."""
    if device not in _SIGNS:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
        _SIGNS[device] = (2.0 * bits - 1.0).to(device=device, dtype=torch.float32)
    return _SIGNS[device]


def _fill_rademacher(out: torch.Tensor, gen: torch.Generator) -> None:
    """+-1 with equal probability: 8 signs per random byte, unpacked by table lookup."""
    n = out.numel()
    packed = torch.randint(0, 256, ((n + 7) // 8,), dtype=torch.uint8, generator=gen, device=out.device)
    table = _sign_table(out.device)
    if n % 8 == 0:
        torch.index_select(table, 0, packed.long(), out=out.view(-1, 8))
    else:
        out.copy_(table[packed.long()].view(-1)[:n])


ChunkFn = Callable[[int, int, torch.Tensor], None]
# A shaped direction (an optimizer's own: masked, scaled, low-rank): ``shape(start, stop, device, draw, out)``
# returns chunk [start, stop) of the direction, float32, written into ``out`` (this thread's scratch) or
# any tensor it owns; ``draw()`` gives the plain chunk (the sampler's values for the key) when wanted.
Shape = Callable[[int, int, torch.device, Callable[[], torch.Tensor], torch.Tensor], torch.Tensor]


def _one_intra_op_thread() -> None:
    """A pool thread runs its torch ops on itself alone (OpenMP's thread count is per thread). One that
    opened OpenMP teams of its own would leave their threads spinning on the cores that the forward's
    matmuls and softmax need next (a probe's log_softmax took 350 ms against 70 ms in a plain forward). Measured
    on the default model on 2 cores, forwards and steps each in a process of their own
    (``benchmarks/step_isolated.py``): a ZOSGD step at batch 4 x 32 went from 1.73 to 1.44 x two forwards.
    The values are the same: every job is elementwise."""
    torch.set_num_threads(1)


class DirectionSampler:
    """Produces the chunks of z for a key.

    ``apply(numel, key, fn)`` calls ``fn(start, stop, z)`` for every chunk, several chunks at
    once on ``threads`` threads (one when torch itself has one: ``torch.get_num_threads()``):
    ``fn`` must touch only its own slice ``[start, stop)``.
    ``chunks(numel, key)`` yields the same chunks in order, on the calling thread. Either way
    ``z`` is read-only: a view into a reused float32 scratch buffer, valid until ``fn`` returns
    or the next iteration, or a cached chunk.
    """

    def __init__(
        self, distribution: str = "gaussian", chunk_size: int = DEFAULT_CHUNK, threads: int = 2, fraction: float = 1.0
    ):
        if distribution not in (*DISTRIBUTIONS, "coordinates"):
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        if distribution == "coordinates" and not 0.0 < fraction <= 1.0:
            raise ValueError(f"the fraction of coordinates must be in (0, 1], got {fraction!r}")
        self.fraction = fraction
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.distribution = distribution
        self.chunk_size = chunk_size
        self.threads = max(1, threads)
        self._local = threading.local()
        self._executor: ThreadPoolExecutor | None = None
        self.cache_numel = 0  # values of z kept for reuse (0: none); see clear_cache
        self._cache: dict[tuple[int, int, int, torch.device], torch.Tensor] = {}
        self._cached = 0
        self._spare: dict[tuple[int, torch.device], list[torch.Tensor]] = {}  # cleared chunks' buffers
        self._cache_lock = threading.Lock()
        self.table_numel = 0  # values in the noise table (0: none, every chunk drawn); see use_table
        # the dual forward (lockstep.py): a chunk of these keys (the query's probes') drawn by the + probe is
        # kept until the - probe takes it; other keys' chunks (a pending update's, fused.py) are not kept
        self.reuse_keys: frozenset[int] = frozenset()
        self._once: dict[tuple[int, int, int, torch.device], torch.Tensor] = {}
        self._tables: dict[torch.device, torch.Tensor] = {}
        # a step's coordinate masks, as the positions of their ones (JAGUAR): see _mask
        self._masks: dict[tuple[int, int, int, torch.device], torch.Tensor] = {}
        self._mask_positions = 0
        self.keep_masks = True  # off for a replayed update, a mask's only use in its step
        # key -> Shape: a step's directions that are not plain draws (set by the optimizer for the step's
        # keys, forgotten with the cache at its end); probes, updates and replays all read them here
        self.shapes: dict[int, Shape] = {}

    def use_table(self, numel: int) -> None:
        """Take every chunk of z as a window of one table of ``numel`` values drawn once (OpenAI
        ES's shared noise table, Salimans et al. 2017): chunk ``index`` of z(key) is the
        values at offset ``mix(key, index) mod (numel - chunk_size + 1)``. Nothing is drawn
        per step (a window is a view); z is still named by its key, but it is another z than
        without the table, and coordinates of one direction may share a value (each with
        probability ~ chunk/numel). 0 turns it off."""
        if numel and self.distribution == "coordinates":
            raise ValueError("a noise table holds gaussian or rademacher values, not coordinate masks")
        if numel and numel < TABLE_MIN_CHUNKS * self.chunk_size:  # one chunk: every window at offset 0
            raise ValueError(f"the noise table must hold at least {TABLE_MIN_CHUNKS} chunks "
                             f"({TABLE_MIN_CHUNKS * self.chunk_size} values), got {numel}")
        self.table_numel = numel
        self._tables.clear()

    def _table(self, device: torch.device) -> torch.Tensor:
        """The noise table on ``device``, drawn on first use, chunk by chunk from fixed keys (or the same
        table the process last drew, ``_TABLES``). Read-only, like every z."""
        table = self._tables.get(device)
        if table is None:
            spec = (self.distribution, self.chunk_size, self.table_numel)
            with self._cache_lock, _TABLES_LOCK:
                if (table := self._tables.get(device)) is None:
                    last = _TABLES.get(device)
                    if last is not None and last[0] == spec:
                        table = last[1]
                    else:
                        _TABLES.pop(device, None)  # the old table's memory goes before the new one is drawn
                        table = torch.empty(self.table_numel, dtype=torch.float32, device=device)
                        for index, start, stop in self._ranges(self.table_numel):
                            table[start:stop] = self._draw(_TABLE_KEY, index, stop - start, device)
                        _TABLES[device] = (spec, table)
                    self._tables[device] = table
        return table

    def clear_cache(self, release: bool = False) -> None:
        """Forget the cached chunks of z (their keys will not come again: a step's are its own).
        Their buffers are kept for the next step's chunks (the same sizes), so that the cache's
        memory stays what ``cache_numel`` allows instead of churning through the allocator;
        ``release`` frees them too."""
        with self._cache_lock:
            for (_, _, length, device), buf in self._cache.items():
                self._spare.setdefault((length, device), []).append(buf)
            self._cache.clear()
            self._cached = 0
            self._masks.clear()
            self._mask_positions = 0
            self.shapes.clear()
            if release:
                self._spare.clear()

    def _fill(self, key: int, index: int, length: int, device: torch.device) -> torch.Tensor:
        """Chunk ``index`` of z(key), from this thread's own generator and scratch on ``device``.

        On an accelerator z comes from that device's generator: the same key gives the same z
        on every run of that device type, not the same values as on the CPU. The result is
        read-only (it may be a cached chunk, or a window of the noise table, or a shaped chunk)."""
        shape = self.shapes.get(key)
        if shape is not None:
            start = index * self.chunk_size
            return shape(start, start + length, device, lambda: self.plain(key, index, length, device),
                         self._scratch("shaped", length, device))
        return self.plain(key, index, length, device)

    def plain(self, key: int, index: int, length: int, device: torch.device = _CPU) -> torch.Tensor:
        """Chunk ``index`` of the plain z(key), whatever shape the key has this step: drawn, cached or a
        table window (read-only; this thread's scratch may be reused by the next call)."""
        if self.table_numel:
            offset = mix(key, index) % (self.table_numel - self.chunk_size + 1)
            return self._table(device)[offset : offset + length]
        name = (key, index, length, device)
        if self.cache_numel and (hit := self._cache.get(name)) is not None:
            return hit
        reuse = key in self.reuse_keys
        if reuse:
            with self._cache_lock:
                hit = self._once.pop(name, None)
            if hit is not None:  # the + probe's chunk, for the - probe: handed out once, then dropped
                return hit
        z = self._mask(name) if self.distribution == "coordinates" else self._draw(key, index, length, device)
        if self.cache_numel and self._cached + length <= self.cache_numel:
            with self._cache_lock:  # the first chunks drawn are kept; the rest is redrawn
                if self._cached + length <= self.cache_numel and name not in self._cache:
                    spare = self._spare.get((length, device))
                    self._cache[name] = spare.pop().copy_(z) if spare else z.clone()
                    self._cached += length
                    return z
        if reuse:
            with self._cache_lock:
                self._once[name] = z.clone()
        return z

    def _mask(self, name: tuple[int, int, int, torch.device]) -> torch.Tensor:
        """A coordinate mask's chunk: drawn on its first use in a step, rebuilt from the positions of its
        ones after that (zeros, then ones at the positions: the bits of the draw, +0.0 and 1.0)."""
        key, index, length, device = name
        ones = self._masks.get(name)
        if ones is not None:
            return self._scratch("z", length, device).zero_().index_fill_(0, ones, 1.0)
        z = self._draw(key, index, length, device)
        if self.keep_masks and self._mask_positions < MASK_POSITIONS:
            ones = z.bool().nonzero().view(-1)
            with self._cache_lock:
                if self._mask_positions + ones.numel() <= MASK_POSITIONS:
                    self._masks[name] = ones
                    self._mask_positions += ones.numel()
        return z

    def end_reuse_once(self) -> None:
        """Stop keeping drawn chunks for a second use, and drop the ones kept."""
        with self._cache_lock:
            self.reuse_keys = frozenset()
            self._once.clear()

    def _draw(self, key: int, index: int, length: int, device: torch.device) -> torch.Tensor:
        """Generate chunk ``index`` of z(key) into this thread's scratch."""
        generators = self._local.__dict__.setdefault("generators", {})
        if device not in generators:
            generators[device] = torch.Generator(device=device)
        gen = generators[device]
        z = self._scratch("z", length, device)
        gen.manual_seed(mix(key, index))
        if self.distribution == "gaussian":
            z.normal_(generator=gen)
        elif self.distribution == "rademacher":
            _fill_rademacher(z, gen)
        else:  # coordinates: 1 on a random `fraction` of the entries, 0 elsewhere
            z.uniform_(generator=gen).lt_(self.fraction)  # in place: 1.0 / 0.0, no boolean temporary
        return z

    def _scratch(self, name: str, length: int, device: torch.device) -> torch.Tensor:
        """This thread's reused float32 buffer ``name`` on ``device``, at least ``length`` long."""
        buffers = self._local.__dict__.setdefault("scratch", {})
        buf = buffers.get((name, device))
        if buf is None or buf.numel() < length:
            buf = buffers[(name, device)] = torch.empty(length, dtype=torch.float32, device=device)
        return buf[:length]

    def _ranges(self, numel: int) -> list[tuple[int, int, int]]:
        return [(i, s, min(s + self.chunk_size, numel)) for i, s in enumerate(range(0, numel, self.chunk_size))]

    def chunks(self, numel: int, key: int, device: torch.device = _CPU) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, stop, z)`` for every chunk of the ``numel``-element direction named ``key``, in order, on the
        calling thread."""
        for index, start, stop in self._ranges(numel):
            yield start, stop, self._fill(key, index, stop - start, device)

    def apply(
        self,
        numel: int,
        key: int,
        fn: ChunkFn,
        device: torch.device = _CPU,
        span: tuple[int, int] | None = None,
        only: Collection[int] | None = None,
    ) -> None:
        """``fn(start, stop, z[start:stop])`` chunk by chunk; with ``span=(a, b)``, only over the
        elements ``[a, b)`` (the chunks that overlap them, clipped: the same values as without);
        with ``only``, only the chunks of these indices are drawn."""
        a, b = span if span is not None else (0, numel)

        def one(index: int, start: int, stop: int) -> None:
            z = self._fill(key, index, stop - start, device)
            lo, hi = max(start, a), min(stop, b)
            fn(lo, hi, z[lo - start : hi - start])

        self._run(numel, one, device, span, only)

    def apply_sum(self, numel: int, terms: list[tuple[int, float]], fn: ChunkFn, device: torch.device = _CPU) -> None:
        """Like :meth:`apply`, for ``sum_j weight_j * z(key_j)`` over ``terms`` (``(key, weight)``
        pairs, summed in order from zero): ``fn(start, stop, chunk_of_the_sum)``, the chunk a
        reused float32 scratch. Element for element the same sum as adding the directions one
        after the other into a zeroed parameter-sized buffer, with chunk-sized memory instead."""

        def one(index: int, start: int, stop: int) -> None:
            acc = self._scratch("sum", stop - start, device)
            acc.zero_()
            for key, weight in terms:
                acc.add_(self._fill(key, index, stop - start, device), alpha=weight)
            fn(start, stop, acc)

        self._run(numel, one, device)

    def _run(
        self,
        numel: int,
        work: Callable[[int, int, int], None],
        device: torch.device,
        span: tuple[int, int] | None = None,
        only: Collection[int] | None = None,
    ) -> None:
        """``work(index, start, stop)`` for every chunk (that overlaps ``span``, whose index is in
        ``only``), on ``threads`` threads when that helps."""
        ranges = self._ranges(numel)
        if span is not None:
            ranges = [r for r in ranges if r[2] > span[0] and r[1] < span[1]]
        if only is not None:
            ranges = [r for r in ranges if r[0] in only]
        if not ranges:
            return
        if len(ranges) == 1 or device.type != "cpu" or not self._parallel():
            for r in ranges:
                work(*r)
            return
        self._map(lambda r: work(*r), ranges)

    def run_jobs(self, jobs: list[Callable[[], None]]) -> None:
        """Run independent CPU jobs (e.g. one parameter's perturbed copy or update each) on the
        threads, in the order given; inside a job, chunks run one after the other. Values do
        not depend on this: every chunk comes from its own key."""
        if len(jobs) <= 1 or not self._parallel():
            for job in jobs:
                job()
            return

        def run(job: Callable[[], None]) -> None:
            self._local.serial = True  # no nested parallelism: this thread is one of the pool
            try:
                job()
            finally:
                self._local.serial = False

        self._map(run, jobs)

    def _parallel(self) -> bool:
        """Whether to spread work over threads: not inside a pool thread, and within torch's
        thread budget (OMP_NUM_THREADS=1, e.g. one of several processes, is serial)."""
        return not getattr(self._local, "serial", False) and min(self.threads, torch.get_num_threads()) > 1

    def _map(self, fn: Callable[[object], None], items: list) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="zotune-z", initializer=_one_intra_op_thread)
        grad_enabled = torch.is_grad_enabled()  # grad mode is thread-local: carry it over

        def run(item: object) -> None:
            with torch.set_grad_enabled(grad_enabled):
                fn(item)

        for _ in self._executor.map(run, items):  # re-raises a worker's exception here
            pass

    def __getstate__(self) -> dict:
        return {"distribution": self.distribution, "chunk_size": self.chunk_size, "threads": self.threads,
                "fraction": self.fraction, "cache_numel": self.cache_numel, "table_numel": self.table_numel}

    def __setstate__(self, state: dict) -> None:
        cache_numel, table_numel = state.pop("cache_numel", 0), state.pop("table_numel", 0)
        self.__init__(**state)
        self.cache_numel = cache_numel
        self.use_table(table_numel)

    def full(self, numel: int, key: int, device: torch.device = _CPU) -> torch.Tensor:
        """The whole direction as a new float32 tensor (for tests and small parameters)."""
        out = torch.empty(numel, dtype=torch.float32, device=device)
        for start, stop, z in self.chunks(numel, key, device):
            out[start:stop] = z
        return out
