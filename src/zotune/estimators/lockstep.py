"""Dual forward: a query's + and - probes in one pass through the model, layer by layer.

ZO2's dual forward gives each layer the + and - activations on one visit, with z drawn once for
both. Here the two probes run as two closures in turns, on two threads, switching at the end of
every transformer layer (a forward hook): the + probe computes layer k, the - probe computes
layer k, then the + probe computes layer k+1, and so on. Only one of them runs at any time, and
each runs exactly the ops it runs alone, on the same shapes and with the same intra-op threads,
so the two losses are bit-identical to two separate probes (tested for every optimizer that
takes it). What changes is locality: a layer's weights are read by both probes while they are in
memory (on the disk tier, each layer is read once per query instead of twice), and a chunk of z
drawn by the + probe is handed to the - probe instead of drawn again (``DirectionSampler``'s
``reuse_keys``: the query's probe keys, not a pending update's).

The threads switch on the layers' forward hooks (prepended, so that they run before any other
hook of the layer, e.g. the disk tier's, which drops a layer's pages once the second probe has
left it). A closure that raises ends its turns; the other finishes alone, and the error is raised
to the caller once both are done.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch


class Lockstep:
    """Runs two closures in turns, switching after each of ``layers``' forwards."""

    def __init__(self, layers: Sequence[torch.nn.Module]):
        if not len(layers):
            raise ValueError("the dual forward needs the model's stack of transformer layers")
        self.layers = list(layers)
        self.switches = 0  # turns handed over in the last run (a check that the layers were seen)

    def run(self, first: Callable[[], Any], second: Callable[[], Any]) -> tuple[Any, Any]:
        """``(first(), second())``, computed in turns layer by layer; ``first`` starts."""
        turn = threading.Condition()
        state = {"turn": 0, "done": [False, False]}
        results: list[Any] = [None, None]
        errors: list[BaseException | None] = [None, None]
        me = threading.local()
        self.switches = 0

        def hand_over(*_: Any) -> None:
            who = getattr(me, "who", None)
            if who is None:  # a forward of another thread: not ours to schedule
                return
            with turn:
                if state["done"][1 - who]:
                    return
                state["turn"] = 1 - who
                self.switches += 1
                turn.notify_all()
                turn.wait_for(lambda: state["turn"] == who)

        def play(who: int, closure: Callable[[], Any]) -> None:
            me.who = who
            try:
                results[who] = closure()
            except BaseException as err:  # raised to the caller once both are done
                errors[who] = err
            finally:
                with turn:
                    state["done"][who] = True
                    state["turn"] = 1 - who
                    turn.notify_all()

        threads, grad = torch.get_num_threads(), torch.is_grad_enabled()

        def second_player() -> None:
            torch.set_num_threads(threads)  # intra-op threads and grad mode are per thread: as the caller's
            with torch.set_grad_enabled(grad):
                with turn:
                    turn.wait_for(lambda: state["turn"] == 1)
                play(1, second)

        hooks = [layer.register_forward_hook(hand_over, prepend=True) for layer in self.layers]
        try:
            other = threading.Thread(target=second_player, name="zotune-dual-forward", daemon=True)
            other.start()
            play(0, first)
            other.join()
        finally:
            for hook in hooks:
                hook.remove()
        for err in errors:
            if err is not None:
                raise err
        return results[0], results[1]
