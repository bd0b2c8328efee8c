"""Model wrapping for training: FSDP2 sharding, activation checkpointing, optional LoRA.

In:  a Hugging Face causal LM (optionally already wrapped by peft), an initialised
     torch.distributed process group (for FSDP2) and an optional DeviceMesh.
Out: the same module object, modified in place (FSDP2 turns parameters into sharded DTensors and
     changes the module's class to an FSDP subclass), returned for chaining.

Order: apply_lora → apply_activation_checkpointing → apply_fsdp2 → build the optimizer.
FSDP2 (`torch.distributed.fsdp.fully_shard`) is applied to each decoder layer, then to the root
(which holds the embeddings, final norm and LM head, so tied embeddings stay one parameter).
Ray Train's `prepare_model(parallel_strategy="fsdp")` is FSDP1 and CUDA-only, hence this module.
bf16 mixed precision needs NCCL: gloo has no bf16 collectives, so CPU parameters, gradients and
collectives stay fp32; with `model.dtype=bfloat16` a CPU run computes its forward under
`torch.autocast("cpu", bfloat16)` instead (`compute_precision`): matrix products in bf16, which CPUs
with AMX or AVX512-BF16 run ~1.5x faster for SmolLM2-135M (measured: a frozen-base drafter step of
4 × 128 clean + 1 024 draft tokens, 5.2 s fp32 → 3.5 s).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
from torch import nn

from pipeline.errors import FluidError

# Where decoder layers live, relative to the (peft-unwrapped) causal-LM module.
_LAYER_PATHS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers", "transformer.blocks")


def resolve_device(use_gpu: bool, dtype: str) -> tuple[torch.device, bool]:
    """(device, use bf16 mixed precision). Parameters always load in fp32; FSDP2 casts on CUDA."""
    cuda = use_gpu and torch.cuda.is_available()
    if use_gpu and not cuda:
        raise FluidError("train.use_gpu is true but this worker has no CUDA device")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return device, cuda and dtype in ("auto", "bfloat16")


def compute_precision(device: torch.device, dtype: str):
    """The context a training forward runs in: bf16 autocast on CPU for `model.dtype=bfloat16`
    (weights, optimizer state and gradients stay fp32), nothing otherwise (CUDA casts through FSDP2's
    MixedPrecisionPolicy)."""
    if torch.device(device).type == "cpu" and dtype == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _unwrap_peft(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (Llama/Qwen/Mistral: model.layers; GPT-2: transformer.h)."""
    base = _unwrap_peft(model)
    for path in _LAYER_PATHS:
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise FluidError(
        f"cannot find the decoder layers of {type(base).__name__} (looked for {', '.join(_LAYER_PATHS)}); "
        "FSDP2 needs them to shard per layer"
    )


def apply_fsdp2(model: nn.Module, *, mesh=None, mixed_precision: bool, reshard_root: bool = False) -> nn.Module:
    """Shard `model` with FSDP2: each decoder layer, then the root. Gradients are averaged over ranks.

    mixed_precision=True: bf16 parameters/activations, fp32 gradient reduction (CUDA/NCCL only;
    requesting it on a gloo group raises FluidError). False: everything stays fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise FluidError("apply_fsdp2 needs an initialised torch.distributed process group")
    group = mesh.get_group() if mesh is not None else None
    backend = str(dist.get_backend(group)).lower()
    if mixed_precision and "gloo" in backend and "nccl" not in backend:
        raise FluidError(
            "bf16 mixed precision was requested on a gloo process group, but gloo has no bf16 "
            "collectives: use fp32 on CPU (mixed_precision=False) or NCCL on CUDA"
        )
    if mixed_precision:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    kwargs = {"mesh": mesh, "mp_policy": mp}
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    # The root's parameters are needed again right at the start of backward: keeping them
    # unsharded after forward saves one all-gather (the usual FSDP2 recipe).
    fully_shard(model, reshard_after_forward=reshard_root, **kwargs)
    model._fluid_param_dtype = torch.bfloat16 if mixed_precision else None
    return model


def set_gradient_sync(model: nn.Module, sync: bool) -> bool:
    """Whether the next backward of an FSDP2 `model` reduce-scatters its gradients (`sync=True`) or
    only adds them to this rank's unsharded accumulator (`sync=False`); the next synced backward then
    reduces the accumulated sum once. Gradient accumulation calls it with False for every micro-batch
    but the last of a step. Returns whether `model` is FSDP2; a plain module is left as it is.

    With `sync=False` the parameters also stay unsharded after backward, so the next micro-batch's
    forward all-gathers nothing (its backward still does); the synced backward reshards them before
    the optimizer step. Between micro-batches a rank then holds the whole model's parameters and
    gradients, as DDP does (benchmarks/records/grad_accum_step_time.json: what each saves on CPU)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return False
    model.set_requires_gradient_sync(sync)
    model.set_reshard_after_backward(sync)
    return True


def is_sharded(model: nn.Module) -> bool:
    """True when any parameter is a DTensor (the model went through fully_shard)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each decoder layer in backward (non-reentrant; composes with FSDP2). Apply before FSDP2."""
    base = _unwrap_peft(model)
    if getattr(base, "supports_gradient_checkpointing", False):
        kwargs = {"use_reentrant": False}
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if getattr(base.config, "use_cache", False):
            base.config.use_cache = False
        if base is not model and hasattr(model, "enable_input_require_grads"):
            # peft with frozen embeddings: checkpointed blocks need an input that requires grad.
            model.enable_input_require_grads()
        return model
    # Fallback for models without HF support: torch's wrapper (parameter names gain a
    # `_checkpoint_wrapped_module.` segment; its state_dict hook strips it again).
    from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as cw

    layer_types = tuple({type(layer) for layer in decoder_layers(model)})
    wrap = functools.partial(cw.checkpoint_wrapper, checkpoint_impl=cw.CheckpointImpl.NO_REENTRANT)
    cw.apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrap, check_fn=lambda m: isinstance(m, layer_types))
    return model


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: list[str] | str,
    *,
    dropout: float = 0.0,
    train_mask_token: bool = True,
) -> nn.Module:
    """Wrap `model` with peft LoRA adapters on the `targets` modules (e.g. ["q_proj", "v_proj"]).

    With train_mask_token (default) the `[M]` input-embedding row recorded by add_mask_token stays
    trainable (peft `trainable_token_indices`), otherwise `[M]` would stay frozen at its mean init.
    Returns the peft model; export_hf merges the adapters before saving.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise FluidError("LoRA needs the 'peft' package: pip install peft (or disable LoRA)") from e
    if rank <= 0:
        raise FluidError(f"LoRA rank must be > 0, got {rank}")
    extra = {}
    mask_id = getattr(model.config, "fluid_mask_token_id", None)
    if train_mask_token and mask_id is not None:
        extra["trainable_token_indices"] = [int(mask_id)]
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets,
        lora_dropout=dropout,
        bias="none",
        task_type="CAUSAL_LM",
        **extra,
    )
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        raise FluidError(f"cannot apply LoRA to targets {targets!r}: {e}") from e
