"""Requests that run on a server whose Python differs from the client's: dataclasses rebuilt there, not shipped as
bytecode.

nnethics travels by value, and nnsight's pickler ships a function by its *source*, recompiled on the server. A
function without source falls back to cloudpickle's bytecode, and bytecode belongs to one Python version: the
methods that ``@dataclass`` generates (``__init__``, ``__eq__``, ``__hash__``, ``__setattr__``...) have none. The
NDIF server runs Python 3.12 or newer (``ndif`` 0.1.2 requires it) and this client may run 3.10 or 3.11; there the
first request that hashed a patching row (``Row.__hash__``, 3.11 bytecode) killed the model actor with a segmentation
fault (found against ``ndif`` 0.1.2 by ``make test-ndif``; an imitation server in the client's own Python never
sees it).

:func:`portable` makes nnsight's pickler send a by-value dataclass as its class body without the generated methods,
plus the dataclass' parameters and fields; :func:`_finish_dataclass` (shipped by source, like all of nnethics) applies
``@dataclass`` again on the server, which generates the methods in the server's own Python. Same class, same
behaviour, no bytecode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

GENERATED = frozenset({"__init__", "__repr__", "__eq__", "__hash__", "__setattr__", "__delattr__", "__lt__", "__le__",
                       "__gt__", "__ge__", "__replace__", "__getstate__", "__setstate__"})
"""The methods ``@dataclass`` may generate (kept when the class defines them in its source)."""

BOOKKEEPING = frozenset({"__dataclass_fields__", "__dataclass_params__", "__match_args__"})
PARAMS = ("init", "repr", "eq", "order", "unsafe_hash", "frozen")
FIELD_FLAGS = ("init", "repr", "hash", "compare", "kw_only")


def _generated(name: str, value: Any) -> bool:
    """Whether ``name`` in a dataclass' namespace is ``@dataclass``'s work: its bookkeeping, a ``__hash__ = None``,
    or a generated method (compiled from a string, so its code has no file: ``<string>``)."""
    if name in BOOKKEEPING or (name == "__hash__" and value is None):
        return True
    code = getattr(getattr(value, "__wrapped__", value), "__code__", None)  # __repr__ is wrapped by _recursive_repr
    return name in GENERATED and code is not None and code.co_filename.startswith("<")


def _field_spec(f: dataclasses.Field) -> tuple[str, dict]:
    """A field as the keyword arguments of :func:`dataclasses.field` (``MISSING`` left out: it is a sentinel, and a
    pickled copy of it would not be the server's)."""
    kwargs = {k: getattr(f, k) for k in FIELD_FLAGS if getattr(f, k, dataclasses.MISSING) is not dataclasses.MISSING}
    if f.default is not dataclasses.MISSING:
        kwargs["default"] = f.default
    if f.default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = f.default_factory
    if f.metadata:
        kwargs["metadata"] = dict(f.metadata)
    return f.name, kwargs


def _rebuildable(cls: type) -> bool:
    """A dataclass in its own right (not only by inheritance) whose rebuild keeps its identity (no ``slots=True``,
    which makes a new class) and whose fields are all plain ones (no ``InitVar``/``ClassVar`` pseudo-fields)."""
    if "__dataclass_fields__" not in cls.__dict__ or getattr(cls.__dataclass_params__, "slots", False):
        return False
    return all(f._field_type is dataclasses._FIELD for f in cls.__dict__["__dataclass_fields__"].values())  # type: ignore[attr-defined]


def dataclass_reduce(cls: type) -> tuple:
    """cloudpickle's by-value reduction of ``cls`` with the generated methods left out and :func:`_finish_dataclass`
    as the state setter, which generates them again where the class is loaded."""
    from cloudpickle import cloudpickle as cp

    make, args, (namespace, slotstate), items, dict_items, _ = cp._dynamic_class_reduce(cls)
    namespace = {k: v for k, v in namespace.items() if not _generated(k, v)}
    params = {k: getattr(cls.__dataclass_params__, k) for k in PARAMS}
    own = cls.__dict__.get("__annotations__", {})  # a base's fields come from the base, rebuilt before it
    fields = [_field_spec(f) for f in cls.__dict__["__dataclass_fields__"].values() if f.name in own]
    return make, args, ((namespace, slotstate), params, fields), items, dict_items, _finish_dataclass


def _finish_dataclass(cls: type, state: tuple) -> None:
    """On the server: the class body as cloudpickle restores it, then ``@dataclass`` with the client's parameters and
    fields (on the same class object: pickle has already handed it to whatever refers to it). In the process that
    pickled it (an in-process server, a dry run) cloudpickle returns the original class: nothing to do."""
    import dataclasses

    from cloudpickle.cloudpickle import _class_setstate

    if "__dataclass_fields__" in cls.__dict__:
        return  # loaded in the process that pickled it: cloudpickle handed back the original class, already built
    import sys
    import types

    body, params, fields = state
    _class_setstate(cls, body)
    for name, kwargs in fields:
        setattr(cls, name, dataclasses.field(**kwargs))
    # @dataclass reads the class' module from sys.modules (string annotations, Python 3.11); the server does not have
    # nnethics, so an empty stand-in is there for the call
    stand_in = cls.__module__ not in sys.modules
    if stand_in:
        sys.modules[cls.__module__] = types.ModuleType(cls.__module__)
    try:
        dataclasses.dataclass(cls, **params)
    finally:
        if stand_in:
            del sys.modules[cls.__module__]


@contextmanager
def portable() -> Iterator[None]:
    """Inside the block, nnsight's pickler sends every by-value dataclass with :func:`dataclass_reduce` (the
    pickler is nnsight's own class, built inside ``RequestModel.serialize``: there is no instance to configure)."""
    from cloudpickle import cloudpickle as cp
    from nnsight.intervention.serialization import CustomCloudPickler

    original = CustomCloudPickler.reducer_override

    def reducer_override(self: Any, obj: Any) -> Any:
        if isinstance(obj, type) and _rebuildable(obj) and not cp._should_pickle_by_reference(obj):
            return dataclass_reduce(obj)
        return original(self, obj)

    CustomCloudPickler.reducer_override = reducer_override
    try:
        yield
    finally:
        CustomCloudPickler.reducer_override = original
