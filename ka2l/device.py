"""The only place that asks torch what hardware exists. ``auto`` is resolved once and passed on."""

from __future__ import annotations

from .errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "float16", "bfloat16")


def resolve_device(name: str = "auto") -> str:
    """Return a concrete torch device string for ``name`` (cuda -> mps -> cpu for ``auto``)."""
    import torch

    base = name.split(":")[0]
    if base not in DEVICES:
        raise ConfigError(f"Unknown device {name!r}. Allowed: {', '.join(DEVICES)} (cuda:N too).")
    if base == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if base == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Device {name!r} was asked for, but torch sees no CUDA GPU. Use 'auto' or 'cpu'.")
    if base == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("Device 'mps' was asked for, but this torch build has no MPS. Use 'auto' or 'cpu'.")
    return name


def resolve_dtype(name: str, device: str):
    """``auto`` means bfloat16 on CUDA GPUs that support it, float32 elsewhere."""
    import torch

    if name not in DTYPES:
        raise ConfigError(f"Unknown dtype {name!r}. Allowed: {', '.join(DTYPES)}.")
    if name == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def dtype_name(dtype) -> str:
    """The name a run records and ``--dtype`` accepts: torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).removeprefix("torch.")


def resolve_dtype_name(name: str, device: str) -> str:
    """What ``name`` means on ``device``, by name: 'auto' on a bf16-capable CUDA GPU -> 'bfloat16'."""
    return dtype_name(resolve_dtype(name, device))


def free_memory() -> None:
    """Hand memory back before other work needs it: Python's garbage, then CUDA's cached blocks."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
