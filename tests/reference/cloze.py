"""Reference cloze scoring: one plain, unpadded transformers forward per (stem, option), no nnsight, no nnethics.

The stem is built here from the dilemma's parts (the chat template applied with transformers' own call), the
stem and the continuation are tokenized separately, and the continuation's log-probability is read off
``log_softmax(model(ids).logits)`` position by position.
"""

from __future__ import annotations

import torch
from torch import nn


def stem_and_continuations(tokenizer, scenario: str, options: tuple[str, str], ethical: int, stem: str,
                           chat: bool) -> tuple[str, list[str]]:
    """``(stem text, [ethical option's continuation, other option's continuation])``."""
    user = f"{scenario}\n{stem}"
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
        lead = ""
    else:
        text, lead = user, " "
    return text, [lead + options[ethical], lead + options[1 - ethical]]


@torch.no_grad()
def continuation_logprob(model: nn.Module, tokenizer, stem: str, continuation: str
                         ) -> tuple[float, list[float], list[int]]:
    """``(sum of the continuation tokens' log-probabilities, each token's, the continuation's ids)``."""
    ctx = tokenizer(stem, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
    per = [float(logp[len(ctx) - 1 + t, tok]) for t, tok in enumerate(cont)]
    return sum(per), per, cont
