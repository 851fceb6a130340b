"""Frozen configuration dataclasses. A config crosses every boundary (CLI -> run row -> artifact
sidecar) as JSON via ``to_dict`` / ``from_dict``; every field has a help string (``field_help``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple default")
    return field(default=default, metadata={"help": help}, **kw)


def _nested(factory: Any, help: str) -> Any:
    return field(default_factory=factory, metadata={"help": help})


def _one_of(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed. Choose one of: {', '.join(map(str, allowed))}.")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}.")


@dataclass(frozen=True)
class ModelSpec:
    name_or_path: str = _f(EMBEDDED_MODEL, "Hugging Face hub id, local folder, a .gguf file, or the embedded default.")
    gguf_file: str | None = _f(None, "GGUF file name inside name_or_path (when it is a folder or hub id).")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) to load.")
    device: str = _f("auto", "Device: auto (cuda -> mps -> cpu), cpu, cuda, cuda:N or mps.")
    dtype: str = _f("auto", "Weights dtype: auto (bf16 on CUDA, else float32), float32, float16, bfloat16.")

    def __post_init__(self) -> None:
        from .device import DEVICES, DTYPES

        if not self.name_or_path.strip():
            raise ConfigError("ModelSpec.name_or_path is empty. Give a hub id, a local folder or a .gguf file.")
        _one_of("ModelSpec.device", self.device.split(":")[0], DEVICES)
        _one_of("ModelSpec.dtype", self.dtype, DTYPES)


@dataclass(frozen=True)
class PromptConfig:
    instruction: str = _f("Answer the following question as briefly as possible.", "Instruction put before the question.")
    few_shot: tuple[tuple[str, str], ...] = _f((), "Optional (question, answer) examples shown before the question.")
    chat_template: bool = _f(True, "Use the tokenizer's chat template when it has one.")


@dataclass(frozen=True)
class SamplingConfig:
    k: int = _f(10, "Number of high-temperature samples per question.")
    temperature: float = _f(1.0, "Temperature of the k samples.")
    low_temperature: float = _f(0.1, "Temperature of the single 'most likely' answer (also scored for correctness).")
    max_new_tokens: int = _f(32, "Maximum tokens generated per answer.")
    top_p: float = _f(1.0, "Nucleus sampling mass (1.0 = off).")
    stop: tuple[str, ...] = _f(("\n", "Question:"), "Answers are cut at the first of these strings.")
    batch_size: int = _f(16, "Questions per generate call (each expands to k sequences).")
    hidden_batch_size: int = _f(16, "Questions per forward pass when extracting hidden states.")
    seed: int = _f(0, "Random seed for sampling.")

    def __post_init__(self) -> None:
        if self.k < 2:
            raise ConfigError(f"SamplingConfig.k must be >= 2 to measure disagreement, got {self.k}.")
        _positive("SamplingConfig.temperature", self.temperature)
        _positive("SamplingConfig.low_temperature", self.low_temperature)
        _positive("SamplingConfig.max_new_tokens", self.max_new_tokens)
        _positive("SamplingConfig.batch_size", self.batch_size)
        _positive("SamplingConfig.hidden_batch_size", self.hidden_batch_size)
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}.")


JUDGE_KINDS = ("lexical", "nli", "embedding")


@dataclass(frozen=True)
class JudgeConfig:
    kind: str = _f("lexical", "Equivalence judge: lexical (offline default), nli (a Hugging Face NLI model) or embedding.")
    model: str | None = _f(None, "Model id or folder for nli / embedding judges (e.g. microsoft/deberta-large-mnli).")
    strict: bool = _f(True, "Strict: equivalent only if each answer entails the other. Non-strict: no contradiction and not both neutral.")
    condition_on_question: bool | None = _f(
        None, "Judge 'question + answer' instead of the bare answer. Unset: the judge's own default, on for nli, off for "
        "embedding (answers to one question share the question's text, so conditioned embeddings all look alike). "
        "The lexical judge always drops the question's words from the answers.")
    threshold: float = _f(0.85, "Cosine similarity at or above which the embedding judge calls two answers equivalent.")
    batch_size: int = _f(32, "Pairs per judge forward pass.")
    device: str = _f("auto", "Device for model-based judges.")

    def __post_init__(self) -> None:
        _one_of("JudgeConfig.kind", self.kind, JUDGE_KINDS)
        if self.kind in ("nli", "embedding") and not self.model:
            raise ConfigError(f"The {self.kind} judge needs JudgeConfig.model (a hub id or a local folder).")
        if not -1 <= self.threshold <= 1:
            raise ConfigError(f"JudgeConfig.threshold is a cosine similarity in [-1, 1], got {self.threshold}.")
        _positive("JudgeConfig.batch_size", self.batch_size)
        if self.condition_on_question is not None and not isinstance(self.condition_on_question, bool):
            raise ConfigError(f"JudgeConfig.condition_on_question must be true, false or unset (the judge's default), "
                              f"got {self.condition_on_question!r}.")

    @property
    def conditions_on_question(self) -> bool:
        """condition_on_question, or the judge kind's default when unset (nli: True, embedding: False)."""
        if self.condition_on_question is not None:
            return self.condition_on_question
        return self.kind == "nli"


THRESHOLD_RULES = ("two-means", "paper-mse")


@dataclass(frozen=True)
class ThresholdConfig:
    rule: str = _f("two-means", "Binarisation rule: two-means (authors' code, default) or paper-mse (paper Eq. 3-5).")
    n_candidates: int = _f(100, "Number of candidate thresholds spread over [min SE, max SE].")

    def __post_init__(self) -> None:
        _one_of("ThresholdConfig.rule", self.rule, THRESHOLD_RULES)
        if self.n_candidates < 2:
            raise ConfigError(f"ThresholdConfig.n_candidates must be >= 2, got {self.n_candidates}.")


PROBE_KINDS = ("mlp", "logistic", "llama-mlp")


@dataclass(frozen=True)
class ProbeConfig:
    kind: str = _f("mlp", "Probe: mlp (small, CPU-sized, default), logistic (the SE-probe baseline) or llama-mlp (paper-faithful, GPU-sized).")
    split: tuple[float, float, float] = _f((0.7, 0.2, 0.1), "Train / validation / test shares (stratified).")
    seed: int = _f(0, "Seed for the split, initialisation and bootstrap.")
    hidden_size: int = _f(256, "Width of the mlp probe's hidden layer.")
    intermediate_size: int = _f(14336, "Intermediate width of the llama-mlp probe (paper: 14336).")
    epochs: int = _f(0, "Training epochs; 0 means the kind's default (mlp 60, llama-mlp 20).")
    lr: float = _f(0.0, "Adam learning rate; 0 means the kind's default (mlp 1e-3, llama-mlp 1e-5).")
    batch_size: int = _f(32, "Mini-batch size for the neural probes.")
    weight_decay: float = _f(1e-2, "Adam weight decay of the neural probes (logistic picks its L2 strength C on validation AUROC).")
    bootstrap: int = _f(1000, "Bootstrap resamples for the test-AUROC interval.")
    device: str = _f("auto", "Device for probe training.")

    def __post_init__(self) -> None:
        _one_of("ProbeConfig.kind", self.kind, PROBE_KINDS)
        if len(self.split) != 3 or any(s <= 0 for s in self.split) or abs(sum(self.split) - 1) > 1e-6:
            raise ConfigError(f"ProbeConfig.split must be three positive shares summing to 1, got {self.split}.")
        _positive("ProbeConfig.epochs", self.epochs, allow_zero=True)
        _positive("ProbeConfig.lr", self.lr, allow_zero=True)
        _positive("ProbeConfig.hidden_size", self.hidden_size)
        _positive("ProbeConfig.intermediate_size", self.intermediate_size)
        _positive("ProbeConfig.batch_size", self.batch_size)
        _positive("ProbeConfig.bootstrap", self.bootstrap, allow_zero=True)

    @property
    def resolved_epochs(self) -> int:
        return self.epochs or {"mlp": 60, "llama-mlp": 20, "logistic": 1}[self.kind]

    @property
    def resolved_lr(self) -> float:
        return self.lr or {"mlp": 1e-3, "llama-mlp": 1e-5, "logistic": 0.0}[self.kind]


@dataclass(frozen=True)
class Stage1Config:
    """Everything that determines a Stage 1 run; its hash identifies a resumable run."""

    model: ModelSpec = _nested(ModelSpec, "The language model being probed.")
    prompt: PromptConfig = _nested(PromptConfig, "How questions are put to the model.")
    sampling: SamplingConfig = _nested(SamplingConfig, "Answer sampling.")
    judge: JudgeConfig = _nested(JudgeConfig, "Semantic equivalence judge.")
    threshold: ThresholdConfig = _nested(ThresholdConfig, "SE binarisation.")
    probe: ProbeConfig = _nested(ProbeConfig, "Per-layer probes.")


@dataclass(frozen=True)
class TriageConfig:
    probe_id: int = _f(0, "Id of the saved probe that scores the pool.")
    batch_size: int = _f(16, "Questions per forward pass.")
    device: str = _f("auto", "Device for the forward passes.")

    def __post_init__(self) -> None:
        _positive("TriageConfig.batch_size", self.batch_size)


POOLINGS = ("mean", "last")
T5_SCRATCH = "t5-scratch"


@dataclass(frozen=True)
class DecoderConfig:
    """A hidden-state -> question decoder (Stage 2): what it reads, its backbone and its training."""

    probe_id: int = _f(0, "Saved probe whose Stage 1 run supplies the language model, the layer and the pool questions.")
    layer: int = _f(-1, "Layer whose states are decoded; -1 means the probe's layer.")
    pooling: str = _f("mean", "Input vector: mean (mean-pooled question-token states, the authors' code) or last (last prompt token, the paper's text).")
    backbone: str = _f(EMBEDDED_MODEL, f"Text generator: a causal LM (fed a soft prefix) or a seq2seq model such as t5-base (pseudo-tokens fed through its encoder as inputs_embeds), "
                                       f"as a hub id or folder; or {T5_SCRATCH!r}, a small T5 built from config with the probed model's tokenizer.")
    n_pseudo: int = _f(16, "Pseudo-token embeddings the projection makes from one vector (paper: m = 16).")
    train_backbone: bool = _f(True, "Train the backbone end to end with the projection (paper); off trains the projection only.")
    extra_pools: tuple[str, ...] = _f((), "Names of stored pools used as extra training questions (a one-column question corpus).")
    heldout_share: float = _f(0.1, "Share of the pool's questions held out from training to measure reconstruction.")
    epochs: int = _f(10, "Passes over the training questions (paper: 40 on ~250k questions).")
    max_minutes: float = _f(0.0, "Time budget in minutes for the whole job: question vectors, both reconstruction reports, training and saving (0 = no limit); counted across resumes.")
    lr: float = _f(2e-4, "AdamW learning rate (paper: 2e-4).")
    batch_size: int = _f(8, "Questions per training step.")
    max_length: int = _f(48, "Longest question in tokens; longer training questions are cut.")
    eval_size: int = _f(64, "Held-out (and training) questions decoded for the BLEU / ROUGE-L report.")
    checkpoint_minutes: float = _f(5.0, "Save a resumable checkpoint at least this often (and when cancelled).")
    seed: int = _f(0, "Seed for the split, initialisation and data order.")
    device: str = _f("auto", "Device for the probed model and the decoder.")

    def __post_init__(self) -> None:
        _one_of("DecoderConfig.pooling", self.pooling, POOLINGS)
        if not self.backbone.strip():
            raise ConfigError(f"DecoderConfig.backbone is empty. Give a hub id, a folder, {EMBEDDED_MODEL!r} or {T5_SCRATCH!r}.")
        _positive("DecoderConfig.n_pseudo", self.n_pseudo)
        _positive("DecoderConfig.epochs", self.epochs)
        _positive("DecoderConfig.max_minutes", self.max_minutes, allow_zero=True)
        _positive("DecoderConfig.lr", self.lr)
        _positive("DecoderConfig.batch_size", self.batch_size)
        _positive("DecoderConfig.max_length", self.max_length)
        _positive("DecoderConfig.eval_size", self.eval_size, allow_zero=True)
        _positive("DecoderConfig.checkpoint_minutes", self.checkpoint_minutes)
        if not 0 <= self.heldout_share < 0.9:
            raise ConfigError(f"DecoderConfig.heldout_share must be in [0, 0.9), got {self.heldout_share}.")


@dataclass(frozen=True)
class FilterConfig:
    max_chars: int = _f(300, "Candidates longer than this many characters are dropped.")
    min_words: int = _f(3, "Candidates with fewer words are dropped.")
    require_question: bool = _f(True, "Drop candidates that are not questions (no '?' and no question word at the start).")
    similarity: float = _f(0.97, "Cosine similarity (of centred decoder input vectors) at or above which a candidate duplicates "
                                 "an existing question or an earlier candidate.")
    word_overlap: float = _f(0.9, "Lexical near-duplicate check beside the vector one: the share of the shorter question's content "
                                  "words (case, punctuation and function words ignored; question words, negations and numbers kept) "
                                  "found in the other, at or above which a candidate duplicates a pool question, an extra-corpus "
                                  "question or an earlier candidate. 1 = only when all of them are.")

    def __post_init__(self) -> None:
        _positive("FilterConfig.max_chars", self.max_chars)
        _positive("FilterConfig.min_words", self.min_words, allow_zero=True)
        if not -1 <= self.similarity <= 1:
            raise ConfigError(f"FilterConfig.similarity is a cosine similarity in [-1, 1], got {self.similarity}.")
        if not 0 < self.word_overlap <= 1:
            raise ConfigError(f"FilterConfig.word_overlap is a share of words in (0, 1], got {self.word_overlap}.")


GENERATE_SOURCES = ("unknown", "curation")


@dataclass(frozen=True)
class GenerateConfig:
    """Decoding new questions from perturbed hidden vectors of unknown questions."""

    decoder_id: int = _f(0, "Id of the trained decoder.")
    source: str = _f("unknown", "Which questions to augment: unknown (BiSE = 1 in the decoder's Stage 1 run) or curation (the pool's curation set).")
    per_question: int = _f(4, "Candidates generated per source question.")
    noise: float = _f(0.1, "Gaussian noise added to each vector, as a share of the vector's norm (0 = none).")
    temperature: float = _f(0.8, "Sampling temperature (0 = greedy).")
    top_p: float = _f(0.95, "Nucleus sampling mass.")
    max_new_tokens: int = _f(48, "Longest candidate in tokens.")
    batch_size: int = _f(16, "Vectors decoded per generate call.")
    seed: int = _f(0, "Seed for noise and sampling.")
    filters: FilterConfig = _nested(FilterConfig, "Candidate filters.")
    device: str = _f("auto", "Device for decoding and re-probing.")

    def __post_init__(self) -> None:
        _one_of("GenerateConfig.source", self.source, GENERATE_SOURCES)
        _positive("GenerateConfig.per_question", self.per_question)
        _positive("GenerateConfig.noise", self.noise, allow_zero=True)
        _positive("GenerateConfig.temperature", self.temperature, allow_zero=True)
        _positive("GenerateConfig.max_new_tokens", self.max_new_tokens)
        _positive("GenerateConfig.batch_size", self.batch_size)
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"GenerateConfig.top_p must be in (0, 1], got {self.top_p}.")


@dataclass(frozen=True)
class PushConfig:
    """Sending a pool's approved set to a Label Studio project (Stage 3a). The server's URL and token come
    from the connection (``ka2l.annotate.connection``), never from a config: configs land in job rows."""

    project: int = _f(0, "ka2l's id of the Label Studio project to push to (0 = the pool's newest project, created on first push).")
    title: str = _f("", "Title of a project created by this push (empty = 'ka2l: <pool>').")
    diversity: float = _f(0.3, "Weight of the diversity term in the annotation order (0 = P(unknown) only, 1 = farthest-first only).")
    batch_size: int = _f(200, "Tasks sent per import call.")

    def __post_init__(self) -> None:
        _positive("PushConfig.project", self.project, allow_zero=True)
        _positive("PushConfig.batch_size", self.batch_size)
        if not 0 <= self.diversity <= 1:
            raise ConfigError(f"PushConfig.diversity must be between 0 and 1, got {self.diversity}.")


@dataclass(frozen=True)
class PullConfig:
    """Fetching a Label Studio project's annotations back into ka2l."""

    project: int = _f(0, "ka2l's id of the Label Studio project to pull from (0 = the pool's newest project).")

    def __post_init__(self) -> None:
        _positive("PullConfig.project", self.project, allow_zero=True)


# -- JSON round trip ---------------------------------------------------------------------------

def to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type, data: dict[str, Any] | None) -> Any:
    """Build ``cls`` from a (possibly partial) dict; unknown keys are an error naming the allowed ones."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no setting {', '.join(unknown)}. Allowed: {', '.join(sorted(names))}.")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value)
        elif isinstance(value, list):
            kwargs[name] = _tuplify(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value


def config_hash(cfg: Any) -> str:
    """Stable short hash of a config (ignores device: the same run may resume on other hardware)."""
    d = to_dict(cfg)
    _drop_device(d)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _drop_device(d: Any) -> None:
    if isinstance(d, dict):
        d.pop("device", None)
        for v in d.values():
            _drop_device(v)


def field_help(cls: type) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


ALL_CONFIGS = (ModelSpec, PromptConfig, SamplingConfig, JudgeConfig, ThresholdConfig, ProbeConfig, Stage1Config, TriageConfig,
               DecoderConfig, FilterConfig, GenerateConfig)
