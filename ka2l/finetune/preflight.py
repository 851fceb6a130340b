"""Will a LoRA fine-tune fit? A memory estimate against what the device has, before any weight loads.

    weights      every parameter of the base model in its dtype (frozen, no gradient, no optimizer state)
    LoRA         r x (in + out) per targeted linear layer, float32 (peft keeps adapters in float32)
    optimizer    AdamW: per LoRA parameter its gradient (4 bytes) and two moments (8 bytes)
    activations  per layer and token, kept for the backward pass: 17 x hidden values (the attention and MLP
                 inputs and outputs, Korthikanti et al. 2022 "34 s b h" bytes at 2 bytes a value) plus
                 2.5 x heads x length attention values (scores, softmax, dropout: "5 a s^2 b"); plus the
                 logits, float32, twice (values and their gradient): batch x length x vocab x 8 bytes
    overhead     a fixed allowance for the framework and allocator (0.5 GiB), and 10% on top of the sum

Under the accelerate launcher the estimate is per process: an FSDP or ZeRO-3 config splits the weights, LoRA
and optimizer state over its processes (each keeps its own activations), and DDP workers on the CPU each hold
a whole copy in the one machine's RAM (on CUDA each has its own GPU).

A config whose estimate exceeds the device's available memory (free RAM: psutil; a GPU: torch.cuda.mem_get_info)
is refused, and the message says what to change: the largest batch that fits (with grad-accum raised to keep
the effective batch), else the longest sequence at batch 1, else a smaller dtype, model or a bigger device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import FinetuneConfig
from ..errors import ConfigError
from ..launcher import SHARDED

GIB = 1024**3
OVERHEAD = 0.5 * GIB
MARGIN = 1.1
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know of a causal LM, read from its config without loading weights."""

    n_params: int
    hidden: int
    layers: int
    heads: int
    vocab: int
    linears: tuple[tuple[str, int, int], ...]  # (module name, in_features, out_features), output head excluded


def model_shape(source: str, revision: str | None = None) -> ModelShape:
    """The shape of the model in ``source`` (a folder or hub id), built on the meta device: no memory, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..errors import ModelLoadError

    try:
        config = AutoConfig.from_pretrained(source, **({"revision": revision} if revision else {}))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Cannot read the model config of {source!r} for the memory estimate: {str(exc).splitlines()[0]}") from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linears = tuple((name, m.in_features, m.out_features) for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and m is not head)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelShape(n_params=sum(p.numel() for p in model.parameters()), hidden=int(text.hidden_size),
                      layers=int(text.num_hidden_layers), heads=int(text.num_attention_heads), vocab=int(text.vocab_size),
                      linears=linears)


def lora_params(shape: ModelShape, targets: tuple[str, ...], r: int) -> int:
    """Trainable LoRA parameters: r x (in + out) per targeted linear ('all-linear', or names matched at the end).

    >>> s = ModelShape(0, 4, 1, 1, 10, (("l.0.q_proj", 4, 4), ("l.0.v_proj", 4, 2)))
    >>> lora_params(s, ("all-linear",), 2), lora_params(s, ("v_proj",), 2)
    (28, 12)
    """
    chosen = [(i, o) for name, i, o in shape.linears
              if "all-linear" in targets or any(name == t or name.endswith("." + t) for t in targets)]
    if not chosen:
        names = sorted({n.rsplit(".", 1)[-1] for n, _, _ in shape.linears})
        raise ConfigError(f"No linear layer matches targets {list(targets)}. This model's linear layers: {', '.join(names)} "
                          f"(or use 'all-linear').")
    return sum(r * (i + o) for i, o in chosen)


@dataclass(frozen=True)
class Estimate:
    weights: int
    lora: int
    optimizer: int
    activations: int
    overhead: int

    @property
    def total(self) -> int:
        return int(MARGIN * (self.weights + self.lora + self.optimizer + self.activations + self.overhead))

    def describe(self) -> str:
        parts = (("weights", self.weights), ("LoRA", self.lora), ("optimizer", self.optimizer), ("activations", self.activations),
                 ("overhead", self.overhead))
        return f"{gib(self.total)} (" + ", ".join(f"{n} {gib(v)}" for n, v in parts) + f", +{MARGIN - 1:.0%} margin)"


def gib(n: float) -> str:
    """
    >>> gib(1.5 * 1024**3), gib(200 * 1024**2)
    ('1.50 GiB', '0.20 GiB')
    """
    return f"{n / GIB:.2f} GiB"


def activation_bytes(shape: ModelShape, batch: int, length: int, value_bytes: int) -> int:
    per_layer = batch * length * (17 * shape.hidden + 2.5 * shape.heads * length) * value_bytes
    logits = batch * length * shape.vocab * 8
    return int(shape.layers * per_layer + logits)


@dataclass(frozen=True)
class Layout:
    """How a launch spreads a fine-tune over its processes: ``shards`` of them split the weights, LoRA and
    optimizer state (FSDP / ZeRO-3); ``copies`` of them share the memory measured (DDP workers in one RAM)."""

    processes: int = 1
    shards: int = 1
    copies: int = 1

    def describe(self, device: str) -> str:
        if self.shards > 1:
            return f" per process (weights, LoRA and optimizer state sharded over {self.shards} processes)"
        if self.copies > 1:
            return f" per process, x {self.copies} processes sharing {device}"
        return ""


def layout_of(cfg: FinetuneConfig, device: str, kind: str | None = None) -> Layout:
    """The layout ``cfg``'s launcher gives on ``device``; ``kind`` is how the accelerate config distributes: "FSDP" /
    "DEEPSPEED" for configs that shard the weights (read from ``cfg.accelerate_config`` when not given: ZeRO 3,
    FSDP FULL_SHARD; ZeRO 1 / 2 and SHARD_GRAD_OP keep whole weights, as DDP).

    >>> from ka2l.config import FinetuneConfig as F
    >>> layout_of(F(), "cuda"), layout_of(F(launcher="accelerate", num_processes=2), "cpu")
    (Layout(processes=1, shards=1, copies=1), Layout(processes=2, shards=1, copies=2))
    >>> layout_of(F(launcher="accelerate", num_processes=4), "cuda", "FSDP")
    Layout(processes=4, shards=4, copies=1)
    """
    n = cfg.num_processes if cfg.launcher == "accelerate" else 1
    if n == 1:
        return Layout()
    if kind is None:
        from ..launcher import config_kind, shards_weights

        kind = config_kind(cfg.accelerate_config) if cfg.accelerate_config else "MULTI_GPU"
        if kind in SHARDED and not shards_weights(cfg.accelerate_config):
            kind = "MULTI_GPU"  # every process holds the whole weights
    if kind in SHARDED and device.startswith("cuda"):
        return Layout(n, shards=n)
    return Layout(n, copies=1 if device.startswith("cuda") else n)


def estimate(shape: ModelShape, cfg: FinetuneConfig, dtype: str, batch: int | None = None, length: int | None = None,
             shards: int = 1) -> Estimate:
    """The memory one process of a fine-tune with ``cfg`` (batch and length overridable) needs, base weights in
    ``dtype``, the weights, LoRA and optimizer state split over ``shards`` processes."""
    value_bytes = DTYPE_BYTES[dtype]
    n_lora = lora_params(shape, cfg.targets, cfg.lora_r)
    return Estimate(weights=math.ceil(shape.n_params * value_bytes / shards), lora=math.ceil(n_lora * 4 / shards),
                    optimizer=math.ceil(n_lora * 12 / shards),
                    activations=activation_bytes(shape, batch or cfg.batch_size, length or cfg.max_length, value_bytes),
                    overhead=int(OVERHEAD))


@dataclass(frozen=True)
class Verdict:
    fits: bool
    estimate: Estimate
    available: int
    device: str
    message: str


def verdict(shape: ModelShape, cfg: FinetuneConfig, dtype: str, available: int, device: str, layout: Layout = Layout()) -> Verdict:
    """Whether ``cfg`` fits in ``available`` bytes on ``device`` (each process's device under ``layout``), and if
    not, what to change."""
    def need(**kw: int) -> int:
        return estimate(shape, cfg, dtype, shards=layout.shards, **kw).total * layout.copies

    est = estimate(shape, cfg, dtype, shards=layout.shards)
    head = f"Estimated memory for this fine-tune: {est.describe()}{layout.describe(device)}; {device} has {gib(available)} available."
    if need() <= available:
        return Verdict(True, est, available, device, head + " It fits.")
    fixes = []
    batch = max((b for b in range(cfg.batch_size - 1, 0, -1) if need(batch=b) <= available), default=0)
    if batch:
        accum = math.ceil(cfg.batch_size * cfg.grad_accum / batch)
        fixes.append(f"lower batch_size to {batch} and raise grad_accum to {accum} (the same effective batch of {batch * accum})")
    else:
        length = cfg.max_length
        while length > 8 and need(batch=1, length=length) > available:
            length //= 2
        if need(batch=1, length=length) <= available:
            fixes.append(f"set batch_size to 1 (grad_accum {cfg.batch_size * cfg.grad_accum}) and max_length to {length} or less")
    if dtype == "float32" and device.startswith("cuda"):
        fixes.append("load the weights in bfloat16 (dtype bfloat16)")
    if layout.copies > 1:
        fixes.append(f"use fewer processes than {layout.copies} (each holds a whole copy in the same memory)")
    if not fixes:
        more = "; or shard them over more processes" if layout.shards > 1 else ("; or shard them over several GPUs (an FSDP or ZeRO-3 "
                                                                                "accelerate_config)" if device.startswith("cuda") else "")
        fixes.append(f"the weights alone need {gib(est.weights)}{' per process' if layout.shards > 1 else ''}: use a smaller model "
                     f"or a device with more memory{more}")
    else:
        fixes.append("or use a device with more memory")
    return Verdict(False, est, available, device, head + " It does not fit: " + "; ".join(fixes) + ".")


def available_bytes(device: str) -> int:
    """Memory free for this process now: the GPU's free memory for cuda, the system's available RAM otherwise."""
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        return int(torch.cuda.mem_get_info(index)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil is a dependency; /proc/meminfo is the fallback on Linux
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        raise


def check(source: str, cfg: FinetuneConfig, revision: str | None = None, available: int | None = None) -> Verdict:
    """The verdict for fine-tuning the model in ``source`` with ``cfg`` on ``cfg.device`` (``available`` overrides the measurement)."""
    from ..device import dtype_name, resolve_device, resolve_dtype

    device = resolve_device(cfg.device)
    dtype = dtype_name(resolve_dtype(cfg.dtype, device))
    return verdict(model_shape(source, revision), cfg, dtype, available_bytes(device) if available is None else available, device,
                   layout_of(cfg, device))


def require(source: str, cfg: FinetuneConfig, revision: str | None = None, available: int | None = None) -> Verdict:
    """``check``, raising ``ConfigError`` with what to change when it does not fit."""
    v = check(source, cfg, revision, available)
    if not v.fits:
        raise ConfigError(v.message)
    return v
