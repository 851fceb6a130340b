"""The sampling engines behind Stage 1's answers, one interface for both.

``make_sampler(cfg, lm)`` gives an object with

    refusals(prompts) -> {position: reason}   prompts this engine cannot answer (the rest still can)
    generate(prompts, temperature, n, seeds) -> list[list[Generation]]

``hf`` (the default) is :func:`ka2l.models.llm.generate_answers` unchanged; ``vllm`` is
:mod:`ka2l.models.vllm_backend` (the only module that imports vLLM, and only when that backend is
chosen). Both return the same :class:`~ka2l.models.llm.Generation`: the answer cut at the first stop
string or special token by the same code, and the model's raw (temperature-1) log-prob of each kept
token, so the stored answers, their ``seq_logprob`` and every score built on them mean the same thing
whichever engine drew them. Hidden states never come from here: they are always the HF forward pass.

Nothing here needs Ray: a Ray sampling actor builds its sampler with the same ``make_sampler``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..config import BACKENDS, ModelSpec, SamplingConfig
from ..errors import ConfigError
from .llm import Generation, LoadedLM, generate_answers


class Sampler(Protocol):
    backend: str

    def refusals(self, prompts: Sequence[str]) -> dict[int, str]:
        """Positions of the prompts this engine cannot answer, each with the reason (a user-facing sentence)."""

    def generate(self, prompts: Sequence[str], temperature: float, n: int, seeds: Sequence[int]) -> list[list[Generation]]:
        """``n`` answers per prompt at ``temperature``; ``seeds``: one per prompt, a prompt's answers depend on it alone."""


@dataclass
class HfSampler:
    """transformers sampling (:func:`ka2l.models.llm.generate_answers`); answers every prompt."""

    lm: LoadedLM
    cfg: SamplingConfig
    backend: str = "hf"

    def refusals(self, prompts: Sequence[str]) -> dict[int, str]:
        return {}

    def generate(self, prompts: Sequence[str], temperature: float, n: int, seeds: Sequence[int]) -> list[list[Generation]]:
        return generate_answers(self.lm, prompts, self.cfg, temperature, n, list(seeds))


def make_sampler(cfg: SamplingConfig, lm: LoadedLM | None = None, model_spec: ModelSpec | None = None) -> Sampler:
    """The sampler ``cfg.backend`` names. ``lm``: the HF model already loaded for the hidden states (the hf
    backend samples with it; the vllm backend only borrows its tokenizer and stop tokens); without it the
    hf backend loads ``model_spec`` and the vllm backend reads only the tokenizer of ``model_spec``."""
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"Unknown sampling backend {cfg.backend!r}; choose one of {', '.join(BACKENDS)}.")
    if lm is None and model_spec is None:
        raise ConfigError("make_sampler needs the loaded model (lm) or the model to load (model_spec).")
    if cfg.backend == "vllm":
        from .vllm_backend import VllmSampler

        return VllmSampler.build(cfg, lm=lm, spec=model_spec or lm.spec)
    if lm is None:
        from .llm import load_model

        lm = load_model(model_spec)
    return HfSampler(lm, cfg)


def check_backend(cfg: SamplingConfig, spec: ModelSpec) -> None:
    """Refuse a backend that cannot run here (vLLM not installed, no CUDA, a GGUF file or an adapter) before
    any model is loaded; nothing to check for hf."""
    if cfg.backend == "vllm":
        from . import vllm_backend

        vllm_backend.check_supported(spec)
        vllm_backend.require_engine()
