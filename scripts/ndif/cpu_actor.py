"""A CPU model actor for the real NDIF server (``ndif`` 0.1.2), for testing it on a machine without a GPU.

Runs inside the server's own Python (its venv has ``ndif``; it never imports nnethics). The stock actor
(``ndif.services.ray.deployments.modeling.base.ModelActor``) calls CUDA unconditionally: it sets the device and a
per-process memory fraction, synchronises, checks that every weight sits on an assigned GPU and reads GPU memory
peaks around each request. This subclass loads the checkpoint on the CPU and leaves the GPU bookkeeping out;
everything else (deserialising the request, running the traced block, the status stream, results through redis or
the object store, errors with the server's traceback) is the stock code path.

The stack names it with ``NDIF_DEFAULT_MODEL_ACTOR_CLASS=cpu_actor.CpuModelActor`` and puts this folder on the
Ray processes' ``PYTHONPATH``.
"""

from __future__ import annotations

import gc
import logging

import ray
from ndif.services.ray.deployments.modeling.base import BaseModelDeployment
from nnsight.modeling.huggingface import HuggingFaceModel

logger = logging.getLogger("ndif.modeling")


class _CpuDeployment(BaseModelDeployment):
    CACHEABLE = False  # there is no GPU to free: evict rather than park HOT -> WARM

    def load_from_disk(self) -> HuggingFaceModel:
        # The controller assigns the (pretended) GPU 0; an empty map keeps every GPU memory reading a no-op.
        self.gpu_mem_bytes_by_id = {}
        model = HuggingFaceModel.from_model_key(self.model_key, dispatch=True, dtype=self.dtype_name,
                                                device_map={"": "cpu"}, **self.kwargs)
        model._module.requires_grad_(False)
        logger.info(f"Loaded {self.model_key} on the CPU")
        return model

    async def to_cache(self) -> None:
        await self.cancel("preempted")
        self.cached = True

    def from_cache(self, gpu_mem_bytes_by_id: dict) -> None:
        self.cached = False

    def cleanup(self) -> None:
        self.kill_switch.clear()
        self.kill_reason = None
        self.execution_ident = None
        self.model.interleaver.cancel()
        gc.collect()


@ray.remote(num_cpus=1, max_restarts=-1)
class CpuModelActor(_CpuDeployment):
    """The Ray actor class deployed for each model replica."""
