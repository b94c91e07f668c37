"""Fully sharded data parallel training (FSDP2, ``torch.distributed.fsdp.fully_shard``) of every family,
through Lightning's ``ModelParallelStrategy``: ``configs/trainer/fsdp.yaml``.

FSDP2 rather than Lightning's ``FSDPStrategy`` (FSDP1): torch 2.13's FSDP1 refuses to run without an
accelerator ("FSDP needs a non-CPU accelerator device"), and Lightning refuses it on CPU too, so it
could never be tested without a GPU; ``fully_shard`` runs on CPU processes with gloo as well.

Units: every transformer layer of the backbones (``SHARDED_LAYERS``) is its own unit, gathered while
it runs and freed after; what is left (embeddings, final norms, projections, fusion heads, losses) is
the root unit, gathered for the whole step. Scalar parameters (the losses' temperatures, CLIP's unused
``logit_scale``) cannot be sharded: they stay whole on every rank and a hook averages their gradients.

Steps run through the root module's ``forward`` (Lightning's forward redirection, as it does for FSDP1):
the families reach their backbones through methods (``encode_query``), not ``forward``, and the root
unit gathers its parameters in its forward.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers.models.blip_2.modeling_blip_2 import Blip2EncoderLayer, Blip2QFormerLayer
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLDecoderLayer, Qwen2VLVisionBlock
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5DecoderLayer, Qwen3_5VisionBlock
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextDecoderLayer, Qwen3VLVisionBlock

# The repeated blocks of every backbone (CLIP, Qwen3.5, Qwen3-VL and Qwen2-VL embedders, BLIP-2).
SHARDED_LAYERS: tuple[type[nn.Module], ...] = (
    CLIPEncoderLayer, Qwen3_5DecoderLayer, Qwen3_5VisionBlock, Qwen3VLTextDecoderLayer, Qwen3VLVisionBlock,
    Qwen2VLDecoderLayer, Qwen2VLVisionBlock, Blip2EncoderLayer, Blip2QFormerLayer)

ParamDtype = Literal["float32", "bfloat16"]


def _average_gradient(mesh: DeviceMesh) -> Any:
    group, world = mesh.get_group(), mesh.size()

    def hook(p: torch.Tensor) -> None:
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)  # gloo has no AVG: sum, then divide
            p.grad.div_(world)

    return hook


def shard_model(model: nn.Module, mesh: DeviceMesh, activation_checkpointing: bool = False,
                reshard_after_forward: bool = True, param_dtype: ParamDtype | None = None) -> int:
    """Shard ``model`` in place over ``mesh``: each ``SHARDED_LAYERS`` block, then the root. Returns the
    number of layer units. Scalar parameters stay replicated with averaged gradients.

    ``activation_checkpointing`` recomputes every sharded layer's activations in backward;
    ``param_dtype`` is the dtype parameters are gathered in (``bfloat16``: half the traffic; gradients
    are reduced in float32)."""
    dtype = getattr(torch, param_dtype) if param_dtype else None
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    if activation_checkpointing:
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, SHARDED_LAYERS))
    scalars = {p for p in model.parameters() if p.ndim == 0}
    for p in scalars:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(_average_gradient(mesh))
    layers = [m for m in model.modules() if isinstance(m, SHARDED_LAYERS)]
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy,
                    ignored_params=scalars & set(layer.parameters()))
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy,
                ignored_params=scalars)
    return len(layers)


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` as plain fully sharded data parallelism over every process, with the
    families' sharding (``shard_model``) applied by ``RetrievalModule.configure_model``.

    Args:
        activation_checkpointing: recompute the activations of every transformer layer in backward
            (the memory of one layer's activations instead of all of them, for ~30% more compute).
        reshard_after_forward: free each gathered layer after its forward (ZeRO-3); false keeps it
            until backward (ZeRO-2: more memory, one all-gather less per layer).
        param_dtype: gather parameters in this dtype (``bfloat16`` halves the traffic); None: as stored.
        save_distributed_checkpoint: one file per rank (a folder); false: the full state dict
            gathered on rank 0 into one ``last.ckpt``, loadable by any command without FSDP.
        process_group_backend, timeout: see ``ModelParallelStrategy``.
    """

    strategy_name = "fsdp2"

    def __init__(self, activation_checkpointing: bool = False, reshard_after_forward: bool = True,
                 param_dtype: ParamDtype | None = None, save_distributed_checkpoint: bool = False,
                 process_group_backend: str | None = None, timeout: timedelta | None = None) -> None:
        kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)
        self.activation_checkpointing = activation_checkpointing
        self.reshard_after_forward = reshard_after_forward
        self.param_dtype = param_dtype
        self._own_group = False

    def setup_environment(self) -> None:
        # Every process is one data-parallel shard (ModelParallelStrategy's "auto" means one per node).
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._own_group = not dist.is_initialized()
        super().setup_environment()

    def teardown(self) -> None:
        super().teardown()
        # A one-process run (tests, a notebook) leaves no process group behind for what runs next in the
        # same interpreter; runs of several processes keep theirs until exit, as Lightning does.
        if self._own_group and self.world_size == 1 and dist.is_initialized():
            dist.destroy_process_group()

    def shard(self, model: nn.Module) -> int:
        """Shard ``model`` over the data-parallel mesh with this strategy's settings."""
        return shard_model(model, self.device_mesh["data_parallel"], self.activation_checkpointing,
                           self.reshard_after_forward, self.param_dtype)

    # Every step through the root's forward, so the root unit gathers its parameters.
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.train_step_context():
            return self._forward_redirection(self.model, self.lightning_module, "training_step", *args, **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.val_step_context():
            return self._forward_redirection(self.model, self.lightning_module, "validation_step", *args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.test_step_context():
            return self._forward_redirection(self.model, self.lightning_module, "test_step", *args, **kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.predict_step_context():
            return self._forward_redirection(self.model, self.lightning_module, "predict_step", *args, **kwargs)


def configure_sharding(module: nn.Module, strategy: object) -> None:
    """``configure_model``'s work: shard ``module`` when the run uses ``FSDP2Strategy``; refuse a plain
    ``ModelParallelStrategy``, which would run the steps outside the root unit's forward."""
    if isinstance(strategy, FSDP2Strategy):
        strategy.shard(module)
    elif isinstance(strategy, ModelParallelStrategy):
        raise ValueError("trainer.strategy: use lightning_modules.core.sharding.FSDP2Strategy "
                         "(configs/trainer/fsdp.yaml) for fully sharded training, not ModelParallelStrategy itself")
