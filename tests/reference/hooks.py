"""A tiny baukit-style hook helper built on plain PyTorch forward hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn


def first(output: Any) -> Tensor:
    """Return the main tensor of a module output (element 0 of a tuple/list)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_first(output: Any, new: Tensor) -> Any:
    """Return ``output`` with its main tensor replaced by ``new`` (tuples keep the rest)."""
    if isinstance(output, tuple):
        return (new,) + tuple(output[1:])
    if isinstance(output, list):
        return [new] + list(output[1:])
    return new


def _first_input(args: tuple, kwargs: dict) -> Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next(v for v in kwargs.values() if isinstance(v, Tensor))


@contextmanager
def record(
    modules: Mapping[str, nn.Module],
    detach: bool = True,
    inputs: bool = False,
    raw: bool = False,
) -> Iterator[dict[str, Any]]:
    """Record the output (or, with ``inputs=True``, the first input) of named modules.

    Yields a dict filled during the forward pass: name -> tensor. Tuple outputs are
    reduced to element 0 unless ``raw=True`` (then the whole output is stored).
    With ``detach=False`` the stored tensors stay in the autograd graph.
    If a module runs several times, the last call wins.
    """
    store: dict[str, Any] = {}
    handles = []

    def keep(value: Any) -> Any:
        if detach and isinstance(value, Tensor):
            return value.detach()
        if detach and isinstance(value, (tuple, list)):
            return type(value)(v.detach() if isinstance(v, Tensor) else v for v in value)
        return value

    for name, module in modules.items():
        if inputs:

            def pre_hook(mod, args, kwargs, _name=name):
                store[_name] = keep(_first_input(args, kwargs))

            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:

            def hook(mod, args, output, _name=name):
                store[_name] = keep(output if raw else first(output))

            handles.append(module.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@contextmanager
def edit(edits: Sequence[tuple[nn.Module, Callable[[Tensor], Tensor]]]) -> Iterator[None]:
    """Replace module outputs: for each (module, fn), output[0] (or output) <- fn(it).

    ``fn`` receives the main output tensor and returns its replacement (it may
    modify a clone; in-place edits of the original are also fine under no_grad).
    """
    handles = []
    for module, fn in edits:

        def hook(mod, args, output, _fn=fn):
            return replace_first(output, _fn(first(output)))

        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def edit_one(module: nn.Module, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Single-module form of :func:`edit`."""
    with edit([(module, fn)]):
        yield


def set_positions(value: Tensor, positions: int | slice | Sequence[int] | None = None) -> Callable[[Tensor], Tensor]:
    """Build an edit fn that writes ``value`` into batch 0 at ``positions`` (None = all)."""

    def fn(out: Tensor) -> Tensor:
        new = out.clone()
        if positions is None:
            new[0] = value.to(new.dtype)
        else:
            new[0, positions] = value.to(new.dtype)
        return new

    return fn


def add_at(delta: Tensor, start: int, end: int) -> Callable[[Tensor], Tensor]:
    """Build an edit fn that adds ``delta`` [end-start, d] to positions start:end of batch 0."""

    def fn(out: Tensor) -> Tensor:
        new = out.clone()
        new[0, start:end] = new[0, start:end] + delta.to(new.dtype)
        return new

    return fn
