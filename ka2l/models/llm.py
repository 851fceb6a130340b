"""Causal language models: loading (hub id, local folder, GGUF, the embedded default), prompts,
last-prompt-token hidden states for every layer, and answer sampling with token log-probs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import EMBEDDED_MODEL, ModelSpec, PromptConfig, SamplingConfig
from ..device import resolve_device, resolve_dtype
from ..errors import ModelLoadError
from ..paths import models_dir

log = logging.getLogger(__name__)


@dataclass
class LoadedLM:
    model: object  # transformers PreTrainedModel
    tokenizer: object  # transformers PreTrainedTokenizerBase, padding_side='left'
    device: str
    spec: ModelSpec
    source: str  # what was actually loaded (folder or hub id)

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)


def resolve_source(spec: ModelSpec) -> tuple[str, str | None]:
    """(name_or_path, gguf_file) to hand to from_pretrained."""
    if spec.name_or_path == EMBEDDED_MODEL:
        from .embedded import ensure_embedded_model

        return str(ensure_embedded_model(models_dir())), None
    path = Path(spec.name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {str(path)!r} does not exist. Check the path.")
        return str(path.parent), path.name
    if path.exists() and not path.is_dir():
        raise ModelLoadError(f"{str(path)!r} is a file but not a .gguf file. Give a model folder, a .gguf file or a hub id.")
    return (str(path) if path.is_dir() else spec.name_or_path), spec.gguf_file


def load_model(spec: ModelSpec, device: str | None = None) -> LoadedLM:
    """Load a causal LM and its tokenizer for ``spec``; errors say what was tried."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf = resolve_source(spec)
    adapter = _adapter_folder(spec) if spec.adapter is not None else None  # checked before a long base-model load
    device = device or resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    kw = {"revision": spec.revision} if spec.revision else {}
    if gguf:
        kw["gguf_file"] = gguf
    try:
        tok = AutoTokenizer.from_pretrained(source, **kw)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kw)
    except (OSError, ValueError, EnvironmentError) as exc:
        where = "local folder" if Path(source).is_dir() else "Hugging Face hub id (no local folder of that name exists)"
        raise ModelLoadError(
            f"Could not load model {spec.name_or_path!r}: tried it as a {where}"
            f"{' with GGUF file ' + gguf if gguf else ''}. Cause: {str(exc).splitlines()[0]}\n"
            f"Give a folder with config.json and weights, a .gguf file, a reachable hub id, or {EMBEDDED_MODEL!r}."
        ) from exc
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelLoadError(f"Tokenizer of {spec.name_or_path!r} has neither a pad nor an eos token; batching needs one.")
        tok.pad_token = tok.eos_token
    model.to(device)
    if adapter is not None:
        _apply_adapter(model, adapter, spec)
        source = f"{source} + adapter {adapter}"
    model.eval()
    return LoadedLM(model=model, tokenizer=tok, device=device, spec=spec, source=source)


def _adapter_folder(spec: ModelSpec) -> Path:
    """``spec.adapter`` as a folder holding adapter_config.json, or a ModelLoadError saying what to give."""
    folder = Path(spec.adapter).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise ModelLoadError(f"Adapter folder {str(folder)!r} has no adapter_config.json (the folder {'exists' if folder.is_dir() else 'does not exist'}). "
                             f"Give the adapter folder of a finished fine-tune (`python -m ka2l finetunes` lists them), "
                             f"or leave the adapter unset for the plain model.")
    return folder


def _apply_adapter(model, folder: Path, spec: ModelSpec) -> None:
    """Load the LoRA adapter in ``folder`` into ``model`` through transformers' own PEFT integration
    (``load_adapter``; peft itself is only imported by ``ka2l.finetune``) and fold it into the weights, as
    ``ka2l.finetune.lora.load_tuned`` does: generation and hidden states then come from base + adapter at
    the base model's speed."""
    try:
        model.load_adapter(str(folder), adapter_name="ka2l")  # injected layers start active (set_adapter needs peft >= 0.22)
    except ImportError as exc:
        raise ModelLoadError(f"Applying the adapter in {str(folder)!r} needs peft: pip install -r requirements.txt. ({exc})") from exc
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"Could not apply the adapter in {str(folder)!r} to {spec.name_or_path!r}: {str(exc).splitlines()[0]}. "
                             f"Was it trained on this model? Its ka2l-finetune.json names the model it was trained on.") from exc
    merged = 0
    for name, module in list(model.named_modules()):  # peft's LoRA layers: merge() adds B @ A * scaling to the base weight ...
        if getattr(module, "merged", None) is False and callable(getattr(module, "merge", None)):
            module.merge()
            parent, _, child = name.rpartition(".")  # ... and the merged base layer takes the wrapper's place
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
            merged += 1
    if not merged:
        raise ModelLoadError(f"The adapter in {str(folder)!r} loaded but changed no layer of {spec.name_or_path!r}; "
                             f"its target modules do not match this model. Use the base model it was trained on.")
    # a plain model again, as peft's merge_and_unload leaves it (else save_pretrained would write the adapter alone)
    model._hf_peft_config_loaded = False
    model.__dict__.pop("peft_config", None)


# -- prompts -------------------------------------------------------------------------------------

def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(tokenizer, question: str, cfg: PromptConfig) -> str:
    """The text fed to the model for ``question`` (chat template when available and enabled)."""
    if cfg.chat_template and has_chat_template(tokenizer):
        messages = []
        for q, a in cfg.few_shot:
            messages += [{"role": "user", "content": f"{cfg.instruction}\n{q}"}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": f"{cfg.instruction}\n{question}"})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in cfg.few_shot)
    return f"{cfg.instruction}\n\n{shots}Question: {question}\nAnswer:"


def _encode(lm: LoadedLM, prompts: Sequence[str]):
    # A chat template may already start with BOS; adding the tokenizer's own would double it.
    bos = lm.tokenizer.bos_token
    special = not (bos and all(p.startswith(bos) for p in prompts))
    enc = lm.tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=special)
    return {k: v.to(lm.device) for k, v in enc.items()}


def _position_ids(mask):
    # Left padding shifts positions; count only real tokens so padded rows match unpadded ones.
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(mask) -> "object":
    """Index of the last real (mask == 1) token in each row, whatever side the padding is on."""
    import torch

    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).max(dim=1).values  # (batch,)


# -- hidden states -------------------------------------------------------------------------------

def _body(lm: LoadedLM):
    """The transformer without its LM head (LlamaModel, GPT2Model, ...): hidden states need no logits."""
    return lm.model.base_model


def _decoder_layers(lm: LoadedLM):
    """The model's list of decoder blocks (``model.layers`` for Llama-family models, ``transformer.h`` for GPT-2)."""
    import torch

    body = _body(lm)
    for module in body.children():
        if isinstance(module, torch.nn.ModuleList) and len(module) == lm.n_layers:
            return module
    raise ModelLoadError(f"Could not find the {lm.n_layers} decoder layers of {lm.spec.name_or_path!r} "
                         f"({type(body).__name__} has no ModuleList of that length); a single-layer pass is not possible for it.")


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted layer's input was seen."""


def extract_hidden_states(lm: LoadedLM, prompts: Sequence[str], batch_size: int = 16) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (start, states) per batch; states: float16 (batch, n_layers+1, hidden), the state of
    the last prompt token (the token before generation) at every layer, embeddings as layer 0."""
    import torch

    for start in range(0, len(prompts), batch_size):
        enc = _encode(lm, prompts[start : start + batch_size])
        with torch.no_grad():  # the body alone: the LM head's logits are not needed here
            out = _body(lm)(**enc, position_ids=_position_ids(enc["attention_mask"]), output_hidden_states=True, use_cache=False)
        stacked = torch.stack(out.hidden_states, dim=1)  # (batch, L+1, seq, hidden)
        idx = last_token_index(enc["attention_mask"])  # (batch,)
        rows = stacked[torch.arange(stacked.shape[0]), :, idx]  # (batch, L+1, hidden)
        yield start, rows.float().cpu().numpy().astype(np.float16)


def extract_layer_states(lm: LoadedLM, prompts: Sequence[str], layer: int, batch_size: int = 16) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (start, states) per batch; states: float16 (batch, hidden), the last prompt token's state at
    ``layer`` alone (0 = embeddings), equal to ``extract_hidden_states(...)[:, layer]``. The forward pass
    stops at that layer: the layers above it and the LM head are never run (what triage needs)."""
    import torch

    if not 0 <= layer <= lm.n_layers:
        raise ModelLoadError(f"Layer {layer} does not exist: the model has layers 0..{lm.n_layers}.")
    if layer == lm.n_layers:  # the last state is the final norm's output: the whole body runs anyway
        for start, states in extract_hidden_states(lm, prompts, batch_size):
            yield start, states[:, layer]
        return
    seen: list = []

    def grab(module, args, kwargs):  # the input of decoder layer `layer` is hidden state `layer`
        seen.append(args[0] if args else kwargs["hidden_states"])
        raise _StopForward

    handle = _decoder_layers(lm)[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, len(prompts), batch_size):
            enc = _encode(lm, prompts[start : start + batch_size])
            seen.clear()
            with torch.no_grad():
                try:
                    _body(lm)(**enc, position_ids=_position_ids(enc["attention_mask"]), use_cache=False)
                except _StopForward:
                    pass
            states = seen[0]  # (batch, seq, hidden)
            rows = states[torch.arange(states.shape[0]), last_token_index(enc["attention_mask"])]  # (batch, hidden)
            yield start, rows.float().cpu().numpy().astype(np.float16)
    finally:
        handle.remove()


def _question_mask(lm: LoadedLM, prompts: Sequence[str], questions: Sequence[str], enc: dict):
    """(batch, seq) mask of the tokens that spell each question inside its prompt (by character
    offsets); rows where the question cannot be located fall back to every real token."""
    import torch

    bos = lm.tokenizer.bos_token
    special = not (bos and all(p.startswith(bos) for p in prompts))
    try:
        offsets = lm.tokenizer(list(prompts), return_offsets_mapping=True, padding=True, add_special_tokens=special,
                               return_tensors="pt")["offset_mapping"].to(lm.device)  # (batch, seq, 2)
    except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets
        return enc["attention_mask"].bool()
    mask = torch.zeros_like(enc["attention_mask"], dtype=torch.bool)
    for row, (prompt, question) in enumerate(zip(prompts, questions)):
        start = prompt.rfind(question)
        if start < 0:
            mask[row] = enc["attention_mask"][row].bool()
            continue
        lo, hi = offsets[row, :, 0], offsets[row, :, 1]
        mask[row] = (lo < start + len(question)) & (hi > start) & enc["attention_mask"][row].bool()
        if not mask[row].any():
            mask[row] = enc["attention_mask"][row].bool()
    return mask


def question_states(lm: LoadedLM, prompts: Sequence[str], questions: Sequence[str], layers: Sequence[int],
                    batch_size: int = 16) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (start, mean, last) per batch, float32 (batch, len(layers), hidden), at each of ``layers``
    (0 = embeddings): the mean of the question's own token states inside its prompt, and the state of
    the last prompt token (the one the probes read)."""
    import torch

    for layer in layers:
        if not 0 <= layer <= lm.n_layers:
            raise ModelLoadError(f"Layer {layer} does not exist: the model has layers 0..{lm.n_layers}.")
    for start in range(0, len(prompts), batch_size):
        chunk, qs = prompts[start : start + batch_size], questions[start : start + batch_size]
        enc = _encode(lm, chunk)
        with torch.no_grad():
            out = lm.model(**enc, position_ids=_position_ids(enc["attention_mask"]), output_hidden_states=True, use_cache=False)
        states = torch.stack([out.hidden_states[l] for l in layers], dim=1).float()  # (batch, n_layers, seq, hidden)
        qmask = _question_mask(lm, chunk, qs, enc)[:, None, :, None].float()
        mean = (states * qmask).sum(2) / qmask.sum(2).clamp(min=1)
        last = states[torch.arange(states.shape[0]), :, last_token_index(enc["attention_mask"])]
        yield start, mean.cpu().numpy(), last.cpu().numpy()


# -- sampling ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Generation:
    """One sampled answer. ``token_ids`` are the tokens kept for the answer or, when the model stopped
    at once (its first token a stop token or stop string), that stop token alone, so an empty answer
    is weighed by the probability of stopping, as in Farquhar et al. (2024)."""

    text: str
    token_logprobs: tuple[float, ...]  # model log-probs (temperature 1) of token_ids
    token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.token_ids or len(self.token_ids) != len(self.token_logprobs):
            raise ValueError(f"a Generation needs one log-prob per token and at least one token, got "
                             f"{len(self.token_logprobs)} log-probs for {len(self.token_ids)} tokens")

    @property
    def seq_logprob(self) -> float:
        """Length-normalised sequence log-prob: the mean token log-prob."""
        return float(np.mean(self.token_logprobs))


def _cut_at_stop(tokenizer, ids: Sequence[int], stops: Sequence[str], special: set[int]) -> tuple[str, int]:
    """Decoded answer up to the first stop string or special token (leading whitespace ignored, so
    an answer that starts with a newline is not cut to nothing), and how many tokens it keeps."""
    kept = 0
    for j, t in enumerate(ids):
        if t in special:
            break
        text = tokenizer.decode(ids[: j + 1], skip_special_tokens=True).lstrip()
        cuts = [text.find(s) for s in stops if s and s in text]
        if cuts:
            return text[: min(cuts)].strip(), kept
        kept = j + 1
    return tokenizer.decode(ids[:kept], skip_special_tokens=True).strip(), kept


def _stop_token_ids(lm: LoadedLM) -> set[int]:
    """Tokens that end an answer: the checkpoint's eos id(s) (the tokenizer's when it names none) and every
    special token (``_cut_at_stop`` cuts there, so nothing after one could change the answer)."""
    eos = lm.model.generation_config.eos_token_id
    eos = lm.tokenizer.eos_token_id if eos is None else eos
    ids = set(lm.tokenizer.all_special_ids)
    ids.update([] if eos is None else eos if isinstance(eos, (list, tuple)) else [eos])
    return ids


def _logit_kwargs(model) -> dict:
    """Ask only for the last position's logits where the model allows it (the prefill's other positions
    would cost a (prompt length, vocab) matrix each)."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _top_p_filter(scores, top_p: float):
    """Transformers' TopPLogitsWarper, verbatim in effect: drop the least likely tokens whose cumulative
    probability stays <= 1 - top_p, always keeping the most likely one."""
    import torch

    sorted_scores, order = torch.sort(scores, descending=False)  # (rows, vocab)
    remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))


def _draw(logits, temperature: float, top_p: float, uniforms, chunk: int = 32):
    """One token per row from softmax(logits / temperature) (top-p filtered when top_p < 1), by inverting
    the cumulative distribution at the row's own uniform number; and the token's raw (temperature-1)
    log-prob. logits: float32 (rows, vocab); uniforms: float64 (rows,) in [0, 1). Rows are drawn
    ``chunk`` at a time: the float64 distribution of 160 rows x 49,152 tokens alone is 63 MB per copy."""
    import torch

    if logits.shape[0] > chunk:
        parts = [_draw(logits[i : i + chunk], temperature, top_p, uniforms[i : i + chunk], chunk) for i in range(0, logits.shape[0], chunk)]
        return torch.cat([t for t, _ in parts]), torch.cat([lp for _, lp in parts])
    scores = logits / temperature
    if top_p < 1:
        scores = _top_p_filter(scores, top_p)
    cdf = torch.softmax(scores, dim=-1).double().cumsum(dim=-1)  # (rows, vocab)
    target = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(1)  # (rows, 1), below the total mass
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)  # (rows,)
    logp = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)  # (rows,)
    return tokens, logp


def _has_stop_string(tokenizer, ids: list[int], stops: Sequence[str]) -> bool:
    # As transformers' StopStringCriteria: the raw generated text (leading whitespace included) holds a stop string.
    if not stops:
        return False
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return any(s in text for s in stops)


def _sample_tokens(lm: LoadedLM, enc: dict, cfg: SamplingConfig, temperature: float, n: int,
                   seeds: Sequence[int]) -> list[tuple[list[int], list[float]]]:
    """(token ids, raw log-probs) of ``n`` samples per prompt, rows ordered prompt by prompt.

    Each prompt is prefilled once and its key/value cache repeated ``n`` times; a row leaves the batch
    (and the cache) as soon as it produced a stop token or a stop string, so no row is computed past its
    own end. Row i of prompt j reads its random numbers from a table drawn by a generator seeded with
    ``seeds[j]``: its sample depends on that seed alone, not on the other prompts of the batch, nor on
    which rows finished first."""
    import torch

    model, tok = lm.model, lm.tokenizer
    stops = [s for s in cfg.stop if s]
    stop_ids = _stop_token_ids(lm)
    mask = enc["attention_mask"]  # (P, S)
    out = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=_position_ids(mask), use_cache=True, **_logit_kwargs(model))
    cache = out.cache
    if not callable(getattr(cache, "batch_select_indices", None)):
        raise ModelLoadError(f"{type(model).__name__} returned a {type(cache).__name__} cache, which cannot drop finished rows; "
                             f"ka2l's sampler needs a transformers Cache (DynamicCache).")
    logits = out.logits[:, -1].float()  # (P, vocab)
    if n > 1:
        cache.batch_repeat_interleave(n)
        mask, logits = mask.repeat_interleave(n, dim=0), logits.repeat_interleave(n, dim=0)  # (P*n, S), (P*n, vocab)
    del out
    position = mask.long().sum(-1)  # (P*n,) position of each row's next token
    uniforms = torch.cat([torch.rand((n, cfg.max_new_tokens), generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
                          for s in seeds])  # (P*n, max_new)
    rows = torch.arange(mask.shape[0], device=mask.device)  # original row of each batch row
    ids: list[list[int]] = [[] for _ in range(mask.shape[0])]
    lps: list[list[float]] = [[] for _ in range(mask.shape[0])]
    for step in range(cfg.max_new_tokens):
        tokens, logp = _draw(logits, temperature, cfg.top_p, uniforms[rows.cpu(), step])  # (rows,), (rows,)
        keep = []
        for i, (r, t, lp) in enumerate(zip(rows.tolist(), tokens.tolist(), logp.tolist())):
            ids[r].append(t)
            lps[r].append(lp)
            if t not in stop_ids and not _has_stop_string(tok, ids[r], stops):
                keep.append(i)
        if not keep or step + 1 == cfg.max_new_tokens:
            break
        if len(keep) < len(rows):  # finished rows leave the batch and the cache
            sel = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(sel)
            mask, position, rows, tokens = mask[sel], position[sel], rows[sel], tokens[sel]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)  # (rows, S + step + 1)
        del logits
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position[:, None], cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1].float()  # (rows, vocab)
        del out
        position = position + 1
    return list(zip(ids, lps))


MAX_ROWS = 64  # sampled rows (prompts x n) decoded together: bounds the key/value cache, see generate_answers


def generate_answers(lm: LoadedLM, prompts: Sequence[str], cfg: SamplingConfig, temperature: float, n: int,
                     seed: int | Sequence[int], max_rows: int = MAX_ROWS) -> list[list[Generation]]:
    """``n`` sampled answers per prompt at ``temperature`` (top-p as configured, no top-k, no penalties:
    the checkpoint's own generation_config does not reshape them), each with the model's raw
    (temperature-1) log-prob of every kept token. ``seed``: one per prompt (a prompt's answers then depend
    only on its own seed), or one int for the call (prompt j gets ``seed + j``). Prompts are decoded
    ``max_rows // n`` at a time (at least one): the repeated prompt caches of 16 prompts x 10 samples of
    SmolLM2 alone take about 0.6 GB, and since a row's sample depends on its seed alone, the split
    changes no answer."""
    import torch

    seeds = [seed + j for j in range(len(prompts))] if isinstance(seed, int) else list(seed)
    if len(seeds) != len(prompts):
        raise ValueError(f"generate_answers got {len(seeds)} seeds for {len(prompts)} prompts; give one per prompt or a single int")
    step = max(1, max_rows // n)
    sampled = []
    for start in range(0, len(prompts), step):
        enc = _encode(lm, prompts[start : start + step])
        with torch.no_grad():
            sampled += _sample_tokens(lm, enc, cfg, temperature, n, seeds[start : start + step])
    special = set(lm.tokenizer.all_special_ids)
    result: list[list[Generation]] = [[] for _ in prompts]
    for row, (ids, lps) in enumerate(sampled):
        text, kept = _cut_at_stop(lm.tokenizer, ids, cfg.stop, special)
        kept = max(kept, 1)  # nothing kept: the stop token stands for the (empty) answer
        result[row // n].append(Generation(text=text, token_logprobs=tuple(lps[:kept]), token_ids=tuple(ids[:kept])))
    return result
