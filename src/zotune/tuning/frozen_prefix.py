"""A frozen-prefix activation cache for the ``top`` scheme: probes that start at the lowest tuned layer.

When only the top K layers train, everything below them is a fixed function of the input: the
hidden states entering the lowest tuned layer never change during training. :class:`FrozenPrefix`
computes them once per training example (keyed by its tokens) and runs each training forward from
there, through the tuned layers, the final norm and the head only. A k-shot set is a few dozen
examples, so the cache is a few MB; a probe then costs K / L of a full forward (plus the head).

Exactness: an example's cached states are computed alone, at its own length. A batch of one
example gives the uncached forward's loss bit for bit; in a left-padded batch the states differ
from a padded forward's only by float rounding (the lower layers ran at another batch shape).
Resume and replay stay bit-identical: the cache is recomputed the same way.

Supported where a decoder takes ``inputs_embeds`` as the first layer's input unchanged and every
layer has the same attention type (Llama, Mistral, Qwen2/3, SmolLM); elsewhere the ``top`` scheme
runs full forwards (:func:`supports_frozen_prefix` says which).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from . import transformer_layers

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


class _Captured(Exception):
    """Stops a forward once the hidden states entering the lowest tuned layer are seen."""


def supports_frozen_prefix(model: torch.nn.Module) -> bool:
    """Whether ``model`` can run from cached hidden states: a Llama, Mistral or Qwen2/3 decoder whose layers share
    one attention type."""
    config = getattr(model, "config", None)
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    return getattr(config, "model_type", None) in SUPPORTED and len(types) == 1 and hasattr(model, "get_decoder")


class FrozenPrefix:
    """Stands in for ``model`` in training forwards (``model(input_ids, attention_mask,
    position_ids, logits_to_keep)``): the lower ``start`` layers are read from the cache. Any other
    call (generation, hidden states) goes to the model itself."""

    def __init__(self, model: torch.nn.Module, start: int):
        self.model, self.start, self.config = model, start, model.config
        self.decoder = model.get_decoder()
        self.layers = transformer_layers(model)
        if getattr(self.decoder, "layers", None) is not self.layers:
            raise ValueError("the model's layers are not its decoder's `layers`")
        self.cache: dict[tuple[int, ...], torch.Tensor] = {}

    def get_input_embeddings(self) -> torch.nn.Module:
        """The model's input embeddings."""
        return self.model.get_input_embeddings()

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The model's parameters."""
        return self.model.parameters()

    def train(self, mode: bool = True) -> FrozenPrefix:
        """The model's training mode (train.dropout=model_default for first-order steps)."""
        self.model.train(mode)
        return self

    def eval(self) -> FrozenPrefix:
        """The model in evaluation mode; returns self."""
        return self.train(False)

    @property
    def cache_bytes(self) -> int:
        """Bytes held by the cached hidden states."""
        return sum(t.numel() * t.element_size() for t in self.cache.values())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, logits_to_keep: int = 0, **kwargs):
        """A training forward from the cached hidden states through the tuned layers, the final norm and the head
        (an example's states computed when first seen); any other call goes to the model."""
        if kwargs or attention_mask is None or position_ids is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              logits_to_keep=logits_to_keep, **kwargs)
        rows = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(input_ids, attention_mask)]
        for row in dict.fromkeys(rows):
            if row not in self.cache:
                self.cache[row] = self._entering(row, input_ids.device)
        width = input_ids.shape[1]
        first = self.cache[rows[0]]
        hidden = first.new_zeros((len(rows), width, first.shape[-1]))
        for i, row in enumerate(rows):
            hidden[i, width - len(row):] = self.cache[row]
        with self._top_layers():
            return self.model(inputs_embeds=hidden, attention_mask=attention_mask, position_ids=position_ids,
                              logits_to_keep=logits_to_keep)

    __call__ = forward

    @torch.no_grad()
    def _entering(self, row: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The hidden states entering layer ``start`` for one example alone, (n, H)."""
        captured: list[torch.Tensor] = []

        def grab(module, args, kwargs):
            captured.append((args[0] if args else kwargs["hidden_states"])[0].detach().clone())
            raise _Captured

        ids = torch.tensor([row], device=device)
        handle = self.layers[self.start].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                       position_ids=torch.arange(len(row), device=device)[None])
        except _Captured:
            pass
        finally:
            handle.remove()
        return captured[0]

    @contextmanager
    def _top_layers(self) -> Iterator[None]:
        """The decoder with only the layers from ``start`` on, for one forward."""
        self.decoder.layers = torch.nn.ModuleList(list(self.layers)[self.start:])
        try:
            yield
        finally:
            self.decoder.layers = self.layers
