"""A model actor for NDIF 0.1.2 that keeps the weights in CPU memory.

NDIF's stock actor (``ndif.services.ray.deployments.modeling.base.ModelActor``)
pins a CUDA device while loading, synchronizes and empties the CUDA cache after
every request, and parks idle models by moving them between GPU and CPU. None of
that works on a machine without a GPU. This actor overrides exactly those steps
and inherits the rest of ``BaseModelDeployment`` unchanged: request execution,
timeouts and cancellation, result upload, and error reporting.

The controller builds it from ``NDIF_MODEL_IMPORT_PATH=cpu_actor.CPUModelActor``
(set in env.sh, with this directory on ``PYTHONPATH`` of the Ray head) or from a
deployment's ``actor_class``. The Ray head still advertises one logical GPU and a
``cuda_memory_bytes`` resource, because the controller places every model by
those resources; this actor ignores the GPU id it is handed.
"""

from __future__ import annotations

import gc
import logging
import os
import time

import ray
import torch
from ndif.common.metrics import ModelLoadTimeMetric
from ndif.common.telemetry import elapsed_ms
from ndif.services.ray.deployments.modeling.base import BaseModelDeployment
from nnsight.modeling.huggingface import HuggingFaceModel

logger = logging.getLogger("ndif.modeling")


class CPUModelDeployment(BaseModelDeployment):
    """``BaseModelDeployment`` with CPU loading and cleanup, and no GPU parking."""

    # The controller reads this before evicting: False makes it remove an idle
    # replica instead of calling to_cache(), which would move weights GPU->CPU.
    CACHEABLE = False

    def load_from_disk(self) -> HuggingFaceModel:
        """Load the model named by ``self.model_key`` onto the CPU, gradients off.

        Raises RuntimeError if any parameter ends up on a device other than the CPU,
        because the base class would otherwise run requests on a half-placed model.
        """
        started_at = time.time()
        # Ray sets OMP_NUM_THREADS to the actor's num_cpus (1), so torch would run the
        # model on one core (measured: 100% CPU during a request). The actor is the only
        # compute-heavy process of the stack, so it uses every core, as a local run does.
        torch.set_num_threads(os.cpu_count() or 1)
        # No device or device_map: nnsight's dispatch then leaves the weights on CPU.
        model = HuggingFaceModel.from_model_key(
            self.model_key, dispatch=True, dtype=self.dtype_name, **self.kwargs
        )
        model._module.requires_grad_(False)

        devices = sorted({parameter.device.type for parameter in model._module.parameters()})
        if devices != ["cpu"]:
            raise RuntimeError(
                f"Model {self.model_key} loaded onto devices {devices}; "
                "the CPU actor expects every parameter on 'cpu'."
            )

        logger.info(f"Loaded {self.model_key} onto the CPU as {self.dtype_name}")
        ModelLoadTimeMetric.update(
            model_key=self.model_key,
            duration_ms=elapsed_ms(started_at),
            load_type="initial",
            num_gpus=0,
        )
        return model

    async def to_cache(self) -> None:
        raise RuntimeError(f"{type(self).__name__} cannot be parked (CACHEABLE is False).")

    def from_cache(self, gpu_mem_bytes_by_id) -> None:
        raise RuntimeError(f"{type(self).__name__} cannot be parked (CACHEABLE is False).")

    def cleanup(self) -> None:
        """Reset the per-request state after a request, as the base class does without CUDA calls."""
        self.kill_switch.clear()
        self.kill_reason = None
        self.execution_ident = None
        self.model.interleaver.cancel()
        gc.collect()


# The same Ray options as NDIF's own ModelActor: max_restarts=-1 lets Ray bring
# a replica back after BaseModelDeployment.restart() kills it.
@ray.remote(num_cpus=1, max_restarts=-1)
class CPUModelActor(CPUModelDeployment):
    """The Ray actor class that ``NDIF_MODEL_IMPORT_PATH`` names."""
