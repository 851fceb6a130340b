"""Stage 1's answers drawn by vLLM (``--backend vllm``): the only module of ka2l that imports vllm, and
only when that backend is chosen (the import alone takes seconds and the PyPI wheel is a CUDA build).

What it returns means exactly what the HF path's answers mean (:func:`ka2l.models.llm.generate_answers`):

- **log-probs**: the model's raw (temperature-1) log-prob of each sampled token, as the HF path stores
  (``log_softmax(logits)`` in ``ka2l.models.llm._draw``). The engine is built with
  ``logprobs_mode="raw_logprobs"`` (vLLM's "processed" modes return log-probs after temperature and
  top-p, which would make a T=1.0 sample and a T=0.1 answer incomparable with the HF path's);
  ``SamplingParams(logprobs=0)`` returns the chosen token's log-prob alone.
- **text**: the tokens vLLM drew are cut by the HF path's own ``_cut_at_stop`` (first stop string or
  special token, leading whitespace ignored), so a kept token count, the stop token standing for an
  empty answer and the stripped text are the same rules. vLLM is also given the stop strings and every
  special token id, so it stops generating where the HF path would.
- **prompts**: token ids encoded by the HF tokenizer as the HF path encodes them (no second BOS when the
  chat template already starts with one), handed to vLLM as ``{"prompt_token_ids": ...}``.
- **seeds**: one request per answer, each with its own seed derived from the question's seed and the
  answer's index (:func:`sample_seed`): an answer depends on its question's seed and its index alone,
  not on the batch it was drawn in, so a retried block draws the same answers. (vLLM's own ``n=k`` fans
  out into k seeded child requests the same way, seed + index; explicit requests keep the seeds ours,
  independent of that internal rule, and prefix caching shares the prompt's cache between them.)
  The same seed gives the same draw from the same logits; vLLM's kernels can change logits in the last
  bits with the batch around a request, so bit-exact replays across different batches need vLLM's
  batch-invariant mode (``VLLM_BATCH_INVARIANT=1`` in recent vLLM, e.g. 0.34).
- **over-long prompts**: a prompt whose tokens plus ``max_new_tokens`` exceed the engine's
  ``max_model_len`` is refused by :meth:`VllmSampler.refusals` with a sentence naming the numbers; the
  caller leaves that question out and answers the rest.

Not supported here: GGUF files (load the model folder instead), a fine-tune's LoRA adapter (the HF path
merges it; use ``--backend hf``), hidden states (always the HF forward pass).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..config import ModelSpec, SamplingConfig
from ..errors import ConfigError, ModelLoadError
from .llm import Generation, LoadedLM, _cut_at_stop, _stop_token_ids, resolve_source

log = logging.getLogger(__name__)

LOGPROBS_MODE = "raw_logprobs"  # the HF path's meaning: log_softmax of the model's logits, before temperature / top-p
NO_GPU = "vLLM's PyPI build needs an NVIDIA GPU; use --backend hf here."


def sample_seed(question_seed: int, index: int) -> int:
    """The seed of answer ``index`` of the question seeded ``question_seed``: a 63-bit hash of both, so
    neighbouring questions' seeds (Stage 1 gives question i the seeds 2i and 2i + 1) never share a stream.

    >>> sample_seed(4, 0) == sample_seed(4, 0) != sample_seed(4, 1)
    True
    """
    digest = hashlib.blake2b(f"{int(question_seed)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def check_supported(spec: ModelSpec) -> tuple[str, str | None]:
    """(model folder or hub id, its revision) for vLLM, or a ConfigError for what this backend cannot load."""
    if spec.adapter is not None:
        raise ConfigError(f"The vLLM backend samples from a plain model, but this model carries the adapter {spec.adapter!r} "
                          f"(the HF path merges it into the weights). Use --backend hf for a fine-tuned model, or export the "
                          f"fine-tune merged into its base (Fine-tune page, Export) and give that folder as the model.")
    source, gguf = resolve_source(spec)
    if gguf:
        raise ConfigError(f"The vLLM backend does not load GGUF files here ({gguf!r} in {source!r}). Give the model's folder "
                          f"(config.json + safetensors) or a hub id, or use --backend hf.")
    return source, spec.revision


def require_engine() -> None:
    """Refuse at once, with the fix, where vLLM cannot run: not installed, or no CUDA device."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("The vLLM backend needs vLLM: pip install 'ka2l[vllm]' on a machine with an NVIDIA GPU, "
                          "or use --backend hf (the default).")
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"{NO_GPU} (torch sees no CUDA device on this machine.)")


def build_engine(spec: ModelSpec, cfg: SamplingConfig, dtype: str) -> Any:
    """A ``vllm.LLM`` for ``spec`` in ``dtype``, returning raw log-probs and ignoring the checkpoint's
    generation_config (as the HF path does). It takes the GPU memory that is free now (the HF model of
    the hidden states may share the GPU), leaving 5% of it."""
    source, revision = check_supported(spec)
    require_engine()
    import torch

    free, total = torch.cuda.mem_get_info()
    share = min(0.9, free / total - 0.05)
    if share < 0.1:
        raise ConfigError(f"Only {free / 2**30:.1f} of {total / 2**30:.1f} GiB of GPU memory are free; vLLM needs room for the model and "
                          f"its cache. Free the GPU (other processes, a larger HF model) or use --backend hf.")
    try:
        from vllm import LLM
    except ImportError as exc:
        raise ConfigError(f"vLLM is installed but does not import here ({exc}). Reinstall it for this machine's CUDA and torch "
                          f"(pip install 'ka2l[vllm]'), or use --backend hf.") from exc
    try:
        return LLM(model=source, tokenizer=source, revision=revision, dtype=dtype, seed=cfg.seed, logprobs_mode=LOGPROBS_MODE,
                   generation_config="vllm", gpu_memory_utilization=share)
    except TypeError as exc:
        raise ConfigError(f"This vLLM does not take logprobs_mode ({exc}); ka2l needs a vLLM that returns raw log-probs "
                          f"(0.11 or later): pip install 'ka2l[vllm]'.") from exc
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"vLLM could not load {spec.name_or_path!r} ({source}): {str(exc).splitlines()[0] if str(exc) else exc!r}. "
                             f"Check that vLLM supports this architecture, or use --backend hf.") from exc


def max_model_len(engine: Any) -> int:
    """The longest sequence (prompt + answer) the engine takes."""
    config = getattr(getattr(engine, "llm_engine", None), "model_config", None) or getattr(engine, "model_config", None)
    if config is None or not getattr(config, "max_model_len", None):
        raise ConfigError(f"{type(engine).__name__} does not say its max_model_len (llm_engine.model_config.max_model_len).")
    return int(config.max_model_len)


def _sampling_params(**kw: Any) -> Any:
    from vllm import SamplingParams

    return SamplingParams(**kw)


def _chosen_logprobs(ids: Sequence[int], logprobs: Any, where: str) -> list[float]:
    """The log-prob of each sampled token from vLLM's per-position ``{token id: Logprob}`` (a list, or
    FlatLogprobs, which reads the same)."""
    if logprobs is None or len(logprobs) != len(ids):
        raise ModelLoadError(f"vLLM returned {0 if logprobs is None else len(logprobs)} log-prob positions for the {len(ids)} tokens "
                             f"of {where}; ka2l asks for logprobs=0 (the sampled token's). Is this vLLM too old or patched?")
    out = []
    for t, position in zip(ids, logprobs):
        if position is None or t not in position:
            raise ModelLoadError(f"vLLM's log-probs of {where} lack the sampled token {t}.")
        out.append(float(position[t].logprob))
    return out


@dataclass
class VllmSampler:
    """Answers from a vLLM engine (anything with ``generate(prompts, sampling_params, use_tqdm=...)`` that
    returns ``vllm.outputs.RequestOutput``s), with the HF path's tokenizer for prompts and stop rules."""

    cfg: SamplingConfig
    engine: Any
    tokenizer: Any  # the HF tokenizer of the model
    stop_ids: frozenset[int]  # eos id(s) and every special token, as the HF path stops on
    max_len: int
    backend: str = "vllm"

    @classmethod
    def build(cls, cfg: SamplingConfig, lm: LoadedLM | None, spec: ModelSpec, engine: Any = None) -> "VllmSampler":
        """The engine of ``spec`` (built here unless given) with the tokenizer and stop tokens of ``lm``
        (read from the model folder when no HF model is loaded, e.g. in a Ray sampling actor)."""
        check_supported(spec)
        if lm is not None:
            tokenizer, stop_ids = lm.tokenizer, _stop_token_ids(lm)
        else:
            tokenizer, stop_ids = _tokenizer_and_stops(spec)
        if engine is None:
            from ..device import dtype_name, resolve_dtype_name

            dtype = dtype_name(lm.model.dtype) if lm is not None else resolve_dtype_name(spec.dtype, "cuda")
            engine = build_engine(spec, cfg, dtype)
        return cls(cfg=cfg, engine=engine, tokenizer=tokenizer, stop_ids=frozenset(stop_ids), max_len=max_model_len(engine))

    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids as the HF path feeds them (no BOS added when the text starts with one)."""
        bos = self.tokenizer.bos_token
        special = not (bos and prompt.startswith(bos))
        return list(self.tokenizer(prompt, add_special_tokens=special)["input_ids"])

    def refusals(self, prompts: Sequence[str]) -> dict[int, str]:
        limit = self.max_len - self.cfg.max_new_tokens
        out = {}
        for j, p in enumerate(prompts):
            n = len(self.encode(p))
            if n > limit:
                out[j] = (f"its prompt is {n} tokens, and {n} + max_new_tokens {self.cfg.max_new_tokens} exceeds the vLLM engine's "
                          f"max_model_len {self.max_len}: shorten the question (or the prompt's instruction and few-shot examples), "
                          f"or lower --max-new-tokens")
        return out

    def generate(self, prompts: Sequence[str], temperature: float, n: int, seeds: Sequence[int]) -> list[list[Generation]]:
        if len(seeds) != len(prompts):
            raise ValueError(f"VllmSampler.generate got {len(seeds)} seeds for {len(prompts)} prompts; give one per prompt")
        refused = self.refusals(prompts)
        if refused:
            j, why = next(iter(refused.items()))
            raise ConfigError(f"Prompt {j + 1} of this batch cannot be answered by vLLM: {why}. Leave such prompts out "
                              f"(VllmSampler.refusals names them).")
        stops = [s for s in self.cfg.stop if s]
        requests, params = [], []
        for p, seed in zip(prompts, seeds):
            ids = self.encode(p)
            for i in range(n):
                requests.append({"prompt_token_ids": ids})
                params.append(_sampling_params(n=1, temperature=temperature, top_p=self.cfg.top_p, max_tokens=self.cfg.max_new_tokens,
                                               stop=stops, stop_token_ids=sorted(self.stop_ids), logprobs=0,
                                               seed=sample_seed(seed, i)))
        outputs = self.engine.generate(requests, params, use_tqdm=False)
        if len(outputs) != len(requests):
            raise ModelLoadError(f"vLLM answered {len(outputs)} of {len(requests)} requests.")
        special = set(self.tokenizer.all_special_ids)
        result: list[list[Generation]] = [[] for _ in prompts]
        for r, out in enumerate(outputs):
            j, i = divmod(r, n)
            where = f"answer {i + 1} of prompt {j + 1}"
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            if not ids:
                raise ModelLoadError(f"vLLM returned no token for {where} (finish reason {completion.finish_reason!r}).")
            lps = _chosen_logprobs(ids, completion.logprobs, where)
            text, kept = _cut_at_stop(self.tokenizer, ids, self.cfg.stop, special)
            kept = max(kept, 1)  # nothing kept: the stop token stands for the (empty) answer, as in the HF path
            result[j].append(Generation(text=text, token_logprobs=tuple(lps[:kept]), token_ids=tuple(ids[:kept])))
        return result


def _tokenizer_and_stops(spec: ModelSpec) -> tuple[Any, set[int]]:
    """The model's tokenizer and the tokens the HF path stops on, without loading its weights."""
    from transformers import AutoTokenizer, GenerationConfig

    source, revision = check_supported(spec)
    kw = {"revision": revision} if revision else {}
    try:
        tok = AutoTokenizer.from_pretrained(source, **kw)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not load the tokenizer of {spec.name_or_path!r} ({source}): {str(exc).splitlines()[0]}") from exc
    try:
        eos = GenerationConfig.from_pretrained(source, **kw).eos_token_id
    except (OSError, ValueError):
        eos = None
    eos = tok.eos_token_id if eos is None else eos
    ids = set(tok.all_special_ids)
    ids.update([] if eos is None else eos if isinstance(eos, (list, tuple)) else [eos])
    return tok, ids
