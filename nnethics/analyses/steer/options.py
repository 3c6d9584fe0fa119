"""The steer analysis' options (the declaration, the engine and the statistics read them)."""

from __future__ import annotations

from dataclasses import dataclass

from ...metrics import DEFAULT_MIN_GAP
from ..base import OptionError, chat_field, check_values, labels_field, max_tokens_field, option, parse_layers, parse_list
from ..decisions import MIN_GAP_HELP
from .directions import KINDS

ALPHAS = (-1.0, -0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.5, 1.0)


def parse_alphas(value: str) -> tuple[float, ...]:
    """``"-1,-0.5,0,0.5,1"`` -> ``(-1.0, -0.5, 0.0, 0.5, 1.0)``, sorted, duplicates dropped; finiteness is checked
    with the other option values (:func:`~nnethics.analyses.base.check_values`)."""
    out = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(float(part))
        except ValueError:
            raise ValueError(f"{part!r} is not a number; use e.g. '-1,-0.5,0,0.5,1' (units of the layer's mean "
                             "residual norm)") from None
    return tuple(sorted(set(out)))


@dataclass(frozen=True)
class SteerOptions:
    """Options of the steer analysis (every one is recorded in provenance)."""

    labels: tuple[str, ...] = labels_field()
    chat: bool | None = chat_field()
    layers: tuple[int, ...] | None = option(
        None, "Layers to steer at (e.g. '20-26'); default: where patching's resid effect at the decision position "
              "crosses 0.5, and 2 layers either side (computed by this analysis on the same pairs).",
        parse=parse_layers, metavar="LAYERS")
    kinds: tuple[str, ...] = option(KINDS, "Directions to steer with (comma-separated): content (cf - base at the "
                                           "decision position, toward the ethical label), caa (after the ethical "
                                           "answer minus after the other, at an appended answer token), position "
                                           "(after answer label 1 minus after label 2: a content-free push toward "
                                           "a label).", choices=KINDS, parse=parse_list,
                                    metavar="KIND[,KIND...]")
    alphas: tuple[float, ...] = option(ALPHAS, "Steering strengths, in units of the layer's mean residual norm at "
                                               "the decision position (comma-separated; negative values push away "
                                               "from the ethical label).", parse=parse_alphas, metavar="A[,A...]",
                                       min=-100, max=100)
    folds: int = option(5, "Folds by pair: each pair is steered with directions from the other folds only.", min=2)
    null_seeds: int = option(4, "Random directions of the same norm (seeds 0..N-1): the null band.", min=2, max=64)
    min_gap: float = option(DEFAULT_MIN_GAP, MIN_GAP_HELP, min=0)
    max_tokens: int = max_tokens_field()

    def __post_init__(self) -> None:
        check_values(self)
        # one grid whatever the order given (the API takes tuples as they come): sorted, each value once
        object.__setattr__(self, "alphas", tuple(sorted({float(a) for a in self.alphas})))
        object.__setattr__(self, "kinds", tuple(dict.fromkeys(self.kinds)))  # each kind once (a coordinate)
        if not any(a != 0 for a in self.alphas):
            raise OptionError("alphas", "needs a non-zero value (alpha 0 is the unsteered row, always computed); "
                                        "e.g. '-1,-0.5,0.5,1'")
