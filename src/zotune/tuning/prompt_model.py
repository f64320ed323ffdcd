"""peft prompt tuning with position ids. The class subclasses peft's, so it is defined on first use
(:func:`prompt_tuned_causal_lm`): importing peft takes seconds, and only the ``prompt`` scheme needs it."""

from __future__ import annotations

import functools

import torch


@functools.cache
def prompt_tuned_causal_lm() -> type:
    """The class ``PromptTunedCausalLM`` (below), defined on the first call, which imports peft."""
    from peft import PeftModelForCausalLM

    class PromptTunedCausalLM(PeftModelForCausalLM):
        """peft's causal-LM prompt tuning, keeping position ids.

        peft drops ``position_ids`` under prompt tuning (with a warning), so positions come from
        ``arange`` over [virtual tokens, padding, tokens]: with left padding an example's score then
        depends on the padding its batch gives it. Here the virtual tokens sit at positions
        ``0..n-1`` and the real tokens at ``n + position_ids``, as if the virtual prompt were text
        before them. The virtual tokens are peft's own (``get_prompt``); only the call is wired.
        """

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
            """The virtual tokens' embeddings before the tokens', at positions ``0..n-1`` and ``n + position_ids``
            (labels padded with -100); peft's own forward without ``position_ids`` or with ``inputs_embeds``."""
            if position_ids is None or input_ids is None or kwargs.get("inputs_embeds") is not None:
                return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            kwargs.pop("task_ids", None)
            n = self.active_peft_config.num_virtual_tokens
            batch = input_ids.shape[0]
            embeds = self.word_embeddings(input_ids)
            virtual = self.get_prompt(batch_size=batch).to(embeds.dtype)
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            if kwargs.get("labels") is not None:  # the virtual tokens predict nothing
                kwargs["labels"] = torch.cat((kwargs["labels"].new_full((batch, n), -100), kwargs["labels"]), dim=1)
            first = torch.arange(n, device=position_ids.device, dtype=position_ids.dtype).expand(batch, n)
            return self.get_base_model()(
                inputs_embeds=torch.cat((virtual, embeds), dim=1),
                attention_mask=torch.cat((attention_mask.new_ones((batch, n)), attention_mask), dim=1),
                position_ids=torch.cat((first, position_ids + n), dim=1),
                **kwargs,
            )

    return PromptTunedCausalLM
