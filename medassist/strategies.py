"""What the multi-device strategies need from medassist: the FSDP wrap policy (configs/fsdp.yaml names it)."""

import torch


def fsdp_wrap_policy(module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP units for configs/fsdp.yaml: every decoder layer, and every trainable LoRA weight in a unit of its own.

    FSDP flattens each unit into one tensor of one dtype; the adapters are fp32 beside a bf16 (or nf4 stored as bf16)
    base, so they cannot share their layer's unit. peft's fsdp_auto_wrap_policy makes the same split.
    """
    if recurse:
        return True
    weight = getattr(module, "weight", None)
    trainable_leaf = not any(module.children()) and isinstance(weight, torch.nn.Parameter) and weight.requires_grad
    return trainable_leaf or type(module).__name__.endswith("DecoderLayer")
