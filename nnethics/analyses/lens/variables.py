"""What each variable and coordinate the lens analysis writes is (CF ``long_name`` and ``units``; see
:mod:`nnethics.store.variables`)."""

from __future__ import annotations

from ...store.variables import LOGIT, NATS, ONE

VARIABLES = {  # what each variable and coordinate it writes is (CF long_name, units): see store.variables
    "lens": ("lens (logit: final norm + unembedding; tuned: trained per-layer translator)", ONE),
    "k": ("rank among the lens' top tokens (0 = top)", ONE),
    "kl_to_final": ("KL(final ‖ lens) of the next-token distributions", NATS),
    "top_logit": ("lens logit of its top tokens", LOGIT),
    "top_prob": ("lens probability of its top tokens", ONE),
    "top_token": ("lens' top token (raw tokenizer string, e.g. BPE 'Ġ' for a space)", ONE),
    "top_token_text": ("lens' top token decoded as text", ONE),
    "crossing_layer": ("first layer from which the finally chosen label stays ahead (−1: none)", ONE),
    "final_choice": ("answer label with the highest logit at the last layer", ONE),
    "kl": ("held-out mean KL(final ‖ lens)", NATS),
    "top1_agreement": ("fraction of held-out positions where the lens' top token is the model's", ONE),
}
