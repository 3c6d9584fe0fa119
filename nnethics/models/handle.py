"""The model handle: the nnsight model, its adapter and facts, and the one seam that decides where traces run.

Analyses never ask where they run. They open traces with :meth:`ModelHandle.trace` and group the
traces of one unit of work (a chunk's forwards that pass tensors to each other) with
:meth:`ModelHandle.session`. The handle's ``remote`` decides the transport:

* ``False``: traces run here, on the local weights; a session is a plain call;
* ``True`` or a server URL: every trace is one NDIF request, a session is **one** request for all of
  its traces (only its return value comes back);
* ``"local"``: nnsight's dry run of the remote path (serialise the request, run it here), for tests;
  pick it with :meth:`ModelHandle.using`.

Requests are labelled in :data:`nnethics.models.remote.STATS` by the scope they are sent in (the
runner opens one per chunk with the analysis name), never by the code that sends them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .adapters import Adapter, get_path
from .remote.backend import register_nnethics

T = TypeVar("T")


def slug_of(name: str, quantization: str | None = None) -> str:
    """The store folder of a model named ``name`` (a hub id's last part, a ``.gguf`` file's stem, a folder's name),
    with its runtime quantization: :attr:`ModelHandle.slug`, and :func:`~nnethics.models.loading.store_slug` before
    the model loads."""
    base = name.rstrip("/").split("/")[-1] if "/" in name else name
    base = re.sub(r"\.gguf$", "", base)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-").lower()
    if quantization:
        slug += f"-{quantization}"
    return slug or "model"


@dataclass
class ModelHandle:
    """An nnsight-wrapped model with everything the analyses need to address it uniformly.

    ``lm`` is the :class:`nnsight.TransformersModel`; ``remote`` is ``False`` for a local model,
    ``True`` for NDIF, a server URL, or ``"local"`` for nnsight's serialise-and-run-here dry run.
    ``in_session`` is set on the copy of the handle that :meth:`session` hands to its function.
    """

    lm: Any
    tokenizer: Any
    adapter: Adapter
    name: str
    revision: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    quantization: str | None = None
    remote: bool | str = False
    source: str = ""
    extra: dict = field(default_factory=dict)
    folder: str = ""  # where its results go under the store, when not its slug (a framing's: <slug>/framings/<id>)
    in_session: bool = field(default=False, repr=False, compare=False)

    @property
    def config(self) -> Any:
        return self.lm.config if hasattr(self.lm, "config") else self.lm._module.config

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers if hasattr(self.config, "num_hidden_layers") else self.config.n_layer)

    @property
    def n_heads(self) -> int:
        cfg = self.config
        return int(getattr(cfg, "num_attention_heads", None) or cfg.n_head)

    @property
    def d_model(self) -> int:
        cfg = self.config
        return int(getattr(cfg, "hidden_size", None) or cfg.n_embd)

    @property
    def context_length(self) -> tuple[int, str] | None:
        """The most tokens the model reads, and where that number comes from (config or tokenizer); None if unknown."""
        found = []
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(self.config, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                found.append((value, f"{key} in its config"))
                break
        value = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(value, int) and 0 < value < 10**8:  # transformers uses a huge sentinel for "no limit"
            found.append((value, "model_max_length of its tokenizer"))
        return min(found) if found else None

    @property
    def slug(self) -> str:
        """Folder name for this model under the store."""
        return slug_of(self.name, self.quantization)

    @property
    def store_folder(self) -> str:
        """The folder of its results under the store: :attr:`slug`, or ``folder`` where a run set one (framings)."""
        return self.folder or self.slug

    @property
    def weights_quantization(self) -> str:
        """The quantization of the weights' source file where they were de-quantized on load (a GGUF such as the
        built-in model's ``….Q4_1.gguf``: ``"gguf-q4_1 (dequantized to float32)"``), else "". Provenance only:
        the :attr:`slug` follows ``quantization`` (runtime quantization) alone, so store folders keep their names."""
        found = re.search(r"\.((?:I?Q\d\w*)|F16|BF16|F32)\.gguf$", self.source or "", re.IGNORECASE)
        return f"gguf-{found.group(1).lower()} (dequantized to {self.dtype})" if found else ""

    # --- where traces run ---------------------------------------------------------------------

    @property
    def serialized(self) -> bool:
        """Whether traces travel as serialised requests (NDIF, or the ``"local"`` dry run), so that what
        they bring back is paid for in bytes."""
        return bool(self.remote)

    @property
    def input_device(self) -> Any:
        """Where to put input tensors: the model's device for a local cpu/cuda model, else None (leave them
        on the CPU: a request carries them, or accelerate places them)."""
        if self.remote or not (self.device == "cpu" or self.device.startswith("cuda")):
            return None
        return self.device

    @property
    def weights_device(self) -> Any:
        """The device of the unembedding weights, or None when there are no local weights (NDIF, dry run)."""
        return None if self.remote else self.lm.lm_head._module.weight.device

    def using(self, remote: bool | str) -> ModelHandle:
        """A copy of this handle whose traces run through ``remote`` (``"local"``: nnsight's dry run of the
        remote path on this machine; ``False``: plainly here). The model itself is shared, not copied."""
        return dataclasses.replace(self, remote=remote, in_session=False)

    def trace(self, *inputs: Any, **kwargs: Any) -> Any:
        """``lm.trace(*inputs, **kwargs)`` where this handle runs traces: a request of its own, or part of
        the enclosing :meth:`session`. Pick the transport with :meth:`using`, not with ``remote=``."""
        if "remote" in kwargs:
            raise TypeError("the handle decides where traces run: use handle.using(remote=...) instead of remote=")
        if self.remote and not self.in_session:
            register_nnethics()  # the dry run too ships nnethics by value, as NDIF (which lacks it) needs
            kwargs["remote"] = self.remote
        return self.lm.trace(*inputs, **kwargs)

    def session(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(handle, *args)`` as one unit of work where this handle runs traces.

        Locally it is a plain call. Remotely it is one nnsight session, so **one request** whatever
        number of traces ``fn`` opens through the handle it is given; nothing but the return value comes
        back, so return small things. A value that one trace hands to the next is ``.save()``-d in the
        first, as in any local code (the plain call needs it; in a session it just stays on the server).
        A function, not a ``with`` block: nnsight compiles a session's body from its source, which must
        be this method's.
        """
        if not self.remote:
            return fn(self, *args)
        import nnsight

        register_nnethics()
        inner = dataclasses.replace(self, in_session=True)
        with self.lm.session(remote=self.remote):
            out = nnsight.save(fn(inner, *args))
        return out

    # --- uniform accessors --------------------------------------------------------------------

    def layer(self, i: int) -> Any:
        return self.lm.model.layers[i]

    def attn_out(self, i: int) -> Any:
        return get_path(self.layer(i), self.adapter.attn_out)

    def mlp_out(self, i: int) -> Any:
        return get_path(self.layer(i), self.adapter.mlp_out)

    def o_proj(self, i: int) -> Any:
        return get_path(self.layer(i), self.adapter.o_proj)

    def provenance(self) -> dict[str, str]:
        return {
            "model_id": self.name,
            "model_revision": self.revision or "",
            "model_family": self.adapter.family,
            "model_type": str(self.config.model_type),
            "dtype": self.dtype,
            "device": self.device,
            "quantization": self.quantization or self.weights_quantization,
            "remote": "ndif" if self.remote is True else (str(self.remote) if self.remote else ""),
        }
