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
    adapter: str | None = _f(None, "Folder of a LoRA adapter (holding adapter_config.json, e.g. a finished fine-tune's adapter) "
                                   "applied to the model and merged into its weights when it loads; unset = the plain model. "
                                   "The folder is checked when the model loads, so stored runs stay readable if it moves.")

    def __post_init__(self) -> None:
        from .device import DEVICES, DTYPES

        if not self.name_or_path.strip():
            raise ConfigError("ModelSpec.name_or_path is empty. Give a hub id, a local folder or a .gguf file.")
        _one_of("ModelSpec.device", self.device.split(":")[0], DEVICES)
        _one_of("ModelSpec.dtype", self.dtype, DTYPES)
        if self.adapter is not None and (not isinstance(self.adapter, str) or not self.adapter.strip()):
            raise ConfigError(f"ModelSpec.adapter must be an adapter folder (with adapter_config.json) or unset, got {self.adapter!r}. "
                              f"Leave it unset for the plain model.")


@dataclass(frozen=True)
class PromptConfig:
    instruction: str = _f("Answer the following question as briefly as possible.", "Instruction put before the question.")
    few_shot: tuple[tuple[str, str], ...] = _f((), "Optional (question, answer) examples shown before the question.")
    chat_template: bool = _f(True, "Use the tokenizer's chat template when it has one.")


BACKENDS = ("hf", "vllm")
EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class ExecutorConfig:
    """Where Stage 1 and triage run: in this process (local) or on a Ray cluster (``ka2l.scale``). Not part of a
    run's identity, like the device: both executors store the same rows, so a run may resume under either."""

    kind: str = _f("local", "local (this process, the default) or ray (Ray Data actor pools; pip install 'ka2l[ray]').")
    address: str | None = _f(None, "Ray cluster address (e.g. ray://head:10001 or auto); unset starts a local single-node cluster.")
    num_cpus: int = _f(0, "Logical CPUs of a local Ray cluster; 0 = max(4, the machine's cores) (Ray Data starves below 4).")
    num_actors: int = _f(1, "Actors per model stage (hidden states, sampling, judge), one model load each.")
    gpus_per_actor: float = _f(0.0, "GPUs each model actor reserves (0 on CPU; 1 for one GPU per actor).")
    block_size: int = _f(16, "Questions per Ray Data batch and per checkpointed block.")

    def __post_init__(self) -> None:
        _one_of("ExecutorConfig.kind", self.kind, EXECUTORS)
        _positive("ExecutorConfig.num_cpus", self.num_cpus, allow_zero=True)
        _positive("ExecutorConfig.num_actors", self.num_actors)
        _positive("ExecutorConfig.gpus_per_actor", self.gpus_per_actor, allow_zero=True)
        _positive("ExecutorConfig.block_size", self.block_size)


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
    backend: str = _f("hf", "Sampling engine: hf (transformers generate, the default, needs nothing more) or vllm (vLLM on CUDA, "
                            "pip install 'ka2l[vllm]'). Hidden states always come from the HF forward pass; a run keeps its backend.")

    def __post_init__(self) -> None:
        _one_of("SamplingConfig.backend", self.backend, BACKENDS)
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
    executor: ExecutorConfig = _nested(ExecutorConfig, "Where the run executes (local or Ray); not part of the run's hash.")


@dataclass(frozen=True)
class TriageConfig:
    probe_id: int = _f(0, "Id of the saved probe that scores the pool.")
    batch_size: int = _f(16, "Questions per forward pass.")
    device: str = _f("auto", "Device for the forward passes.")
    executor: ExecutorConfig = _nested(ExecutorConfig, "Where the triage executes (local or Ray); not part of its hash.")

    def __post_init__(self) -> None:
        _positive("TriageConfig.batch_size", self.batch_size)


POOLINGS = ("mean", "last")
LAUNCHERS = ("none", "accelerate")  # where training runs: the job's own process, or `accelerate launch` workers


def _check_launcher(owner: str, launcher: str, num_processes: int) -> None:
    _one_of(f"{owner}.launcher", launcher, LAUNCHERS)
    _positive(f"{owner}.num_processes", num_processes)
    if num_processes > 1 and launcher == "none":
        raise ConfigError(f"{owner}.num_processes is {num_processes} but launcher is 'none': set launcher to 'accelerate' "
                          f"to train with several processes, or num_processes to 1.")


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
    launcher: str = _f("none", "none (train in the job's own process) or accelerate (the training steps run in num_processes "
                               "data-parallel workers started by `accelerate launch`; vectors and reports stay in the job's process).")
    num_processes: int = _f(1, "Training processes under the accelerate launcher (one per GPU; on CPU, DDP over gloo). Each takes "
                               "its share of every batch of batch_size questions, so the steps match one process's.")
    accelerate_config: str = _f("", "Optional accelerate config file for the launcher: a DDP (MULTI_GPU) one, e.g. to pin GPUs; the "
                                    "decoder is not sharded (FSDP / ZeRO-3 are for fine-tunes). Empty = plain DDP.")

    def __post_init__(self) -> None:
        _one_of("DecoderConfig.pooling", self.pooling, POOLINGS)
        _check_launcher("DecoderConfig", self.launcher, self.num_processes)
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
    max_repeats: int = _f(2, "Candidates in which a stretch of 3-30 characters occurs more than this many times back to back "
                             "(a decoder loop: 'What isWhat isWhat is') are dropped; 0 = no check.")
    similarity: float = _f(0.97, "Cosine similarity (of centred decoder input vectors) at or above which a candidate duplicates "
                                 "an existing question or an earlier candidate.")
    word_overlap: float = _f(0.9, "Lexical near-duplicate check beside the vector one: the share of the shorter question's content "
                                  "words (case, punctuation and function words ignored; question words, negations and numbers kept) "
                                  "found in the other, at or above which a candidate duplicates a pool question, an extra-corpus "
                                  "question or an earlier candidate. 1 = only when all of them are.")

    def __post_init__(self) -> None:
        _positive("FilterConfig.max_chars", self.max_chars)
        _positive("FilterConfig.min_words", self.min_words, allow_zero=True)
        _positive("FilterConfig.max_repeats", self.max_repeats, allow_zero=True)
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
    """Stable short hash of a config (ignores device: the same run may resume on other hardware). Settings
    added after runs were stored (``ModelSpec.adapter``) count only when set, so an old run's hash is unchanged:

    >>> stored = {"name_or_path": "m", "gguf_file": None, "revision": None, "dtype": "auto"}  # saved before adapter existed
    >>> config_hash(from_dict(ModelSpec, stored)) == hashlib.sha256(json.dumps(stored, sort_keys=True).encode()).hexdigest()[:16]
    True
    >>> config_hash(ModelSpec(name_or_path="m", adapter="data/finetunes/finetune-1/adapter")) != config_hash(ModelSpec(name_or_path="m"))
    True
    >>> config_hash(Stage1Config(model=ModelSpec(adapter="data/finetunes/finetune-1/adapter"))) != config_hash(Stage1Config())
    True
    >>> config_hash(Stage1Config(executor=ExecutorConfig(kind="ray"))) == config_hash(Stage1Config())
    True
    >>> config_hash(Stage1Config(sampling=SamplingConfig(backend="vllm"))) != config_hash(Stage1Config())
    True
    """
    d = to_dict(cfg)
    _drop_device(d)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# Settings added after runs were stored, hashed only when they differ from their default: runs stored before
# they existed keep their hash. Where work runs (device, executor) is never hashed: a run may resume elsewhere.
_ADDED_LATER = {"adapter": None, "backend": "hf", "launcher": "none", "num_processes": 1, "accelerate_config": "", "max_repeats": 2}
_NOT_HASHED = ("device", "executor")


def _drop_device(d: Any) -> None:
    if isinstance(d, dict):
        for key in _NOT_HASHED:
            d.pop(key, None)
        for key, default in _ADDED_LATER.items():
            if key in d and d[key] == default:
                del d[key]
        for v in d.values():
            _drop_device(v)


def field_help(cls: type) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


ALL_CONFIGS = (ModelSpec, PromptConfig, ExecutorConfig, SamplingConfig, JudgeConfig, ThresholdConfig, ProbeConfig, Stage1Config, TriageConfig,
               DecoderConfig, FilterConfig, GenerateConfig)


# -- Stage 3b: fine-tuning -----------------------------------------------------------------------

FINETUNE_SOURCES = ("labelstudio", "gold", "file")
GOLD_SETS = ("unknown", "all")
LR_SCHEDULERS = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class FinetuneConfig:
    """A LoRA fine-tune of a Stage 1 run's model on (question, answer) pairs. Defaults are the paper's
    (LLaMA-Factory, LoRA target "all", 3 epochs, lr 1e-4, batch 4, grad-accum 4); ``FINETUNE_PRESETS``
    holds a CPU-sized and the GPU / paper setting. The pool is given beside the config (like Stage 1)."""

    source: str = _f("labelstudio", "Where the pairs come from: labelstudio (answers pulled from the pool's Label Studio project), "
                                    "gold (the pool's own gold answers, the first one per question) or file (a CSV / JSONL upload).")
    project: int = _f(0, "ka2l's id of the Label Studio project whose answers are used (0 = the pool's newest); source labelstudio only.")
    file: str = _f("", "Path of a .csv or .jsonl file with 'question' and 'answer' columns; source file only.")
    gold_set: str = _f("unknown", "Which questions the gold source uses: unknown (BiSE = 1 in the run, the method's choice) or all.")
    run_id: int = _f(0, "Stage 1 run whose model (and prompt) is tuned; 0 = the pool's newest finished run.")
    lora_r: int = _f(8, "LoRA rank r (LLaMA-Factory default 8).")
    lora_alpha: float = _f(16.0, "LoRA scaling alpha (LLaMA-Factory default 2 r).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA branch (LLaMA-Factory default 0).")
    targets: tuple[str, ...] = _f(("all-linear",), "Modules that get LoRA: all-linear (every linear layer but the output head, "
                                                   "the paper's 'all') or module names such as q_proj v_proj.")
    epochs: float = _f(3.0, "Passes over the training pairs (paper: 3).")
    lr: float = _f(1e-4, "Peak learning rate (paper: 5e-5 to 1e-4).")
    lr_scheduler: str = _f("cosine", "Learning-rate schedule after warm-up: cosine (LLaMA-Factory default), linear or constant.")
    warmup_ratio: float = _f(0.0, "Share of the steps spent warming the learning rate up from 0.")
    batch_size: int = _f(4, "Pairs per device per forward pass (paper: 4).")
    grad_accum: int = _f(4, "Forward passes accumulated per optimizer step (paper: 2 to 8); effective batch = batch_size x grad_accum.")
    max_length: int = _f(2048, "Longest prompt + answer in tokens; longer pairs lose the answer's end (LLaMA-Factory cutoff_len 2048).")
    eval_share: float = _f(0.1, "Share of the pairs held out for evaluation (by seed and item key: an item keeps its split as data grows); "
                                "training never sees them.")
    eval_every: int = _f(10, "Evaluate the held-out loss every N optimizer steps (and once before training and at the end).")
    patience: int = _f(3, "Early stopping: stop after this many evaluations without a lower held-out loss (0 = off). "
                          "With early stopping the adapter kept is the one with the lowest held-out loss; without, the last.")
    checkpoint_every: int = _f(50, "Save a resumable checkpoint every N optimizer steps (and on cancel).")
    seed: int = _f(0, "Seed for the split, the known mix, LoRA initialisation and data order.")
    mix_known: int = _f(0, "Mix in k known questions (BiSE = 0 in the run) with the model's own low-temperature answers, "
                           "against forgetting and hallucination (Gekhman et al. 2024); 0 = off.")
    device: str = _f("auto", "Device: auto (cuda -> mps -> cpu), cpu, cuda or mps; `accelerate launch` may place it instead.")
    dtype: str = _f("auto", "Base weights dtype: auto (bf16 on CUDA, else float32), float32, float16, bfloat16. LoRA weights stay float32.")
    launcher: str = _f("none", "none (train in the job's own process) or accelerate (the job starts `accelerate launch` with "
                               "num_processes data-parallel workers; accelerate is already one of ka2l's dependencies).")
    num_processes: int = _f(1, "Training processes under the accelerate launcher (one per GPU; on CPU, DDP over gloo). "
                               "Effective batch = batch_size x grad_accum x num_processes.")
    accelerate_config: str = _f("", "Optional accelerate config file for the launcher (e.g. an FSDP or DeepSpeed ZeRO-3 one for large "
                                    "models; ka2l ships examples in configs/accelerate/); empty = plain DDP.")

    def __post_init__(self) -> None:
        from .device import DEVICES, DTYPES

        _one_of("FinetuneConfig.source", self.source, FINETUNE_SOURCES)
        _check_launcher("FinetuneConfig", self.launcher, self.num_processes)
        _one_of("FinetuneConfig.gold_set", self.gold_set, GOLD_SETS)
        _one_of("FinetuneConfig.lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _one_of("FinetuneConfig.device", self.device.split(":")[0], DEVICES)
        _one_of("FinetuneConfig.dtype", self.dtype, DTYPES)
        if self.source == "file" and not self.file.strip():
            raise ConfigError("FinetuneConfig.source is 'file' but no file is given: set file to a .csv or .jsonl with question and answer columns.")
        if self.file and not self.file.lower().endswith((".csv", ".jsonl")):
            raise ConfigError(f"FinetuneConfig.file must end in .csv or .jsonl, got {self.file!r}.")
        if not self.targets or any(not str(t).strip() for t in self.targets):
            raise ConfigError("FinetuneConfig.targets is empty. Use ('all-linear',) or module names such as ('q_proj', 'v_proj').")
        _positive("FinetuneConfig.project", self.project, allow_zero=True)
        _positive("FinetuneConfig.run_id", self.run_id, allow_zero=True)
        _positive("FinetuneConfig.lora_r", self.lora_r)
        _positive("FinetuneConfig.lora_alpha", self.lora_alpha)
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"FinetuneConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        _positive("FinetuneConfig.epochs", self.epochs)
        _positive("FinetuneConfig.lr", self.lr)
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"FinetuneConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        _positive("FinetuneConfig.batch_size", self.batch_size)
        _positive("FinetuneConfig.grad_accum", self.grad_accum)
        if self.max_length < 8:
            raise ConfigError(f"FinetuneConfig.max_length must be at least 8 tokens, got {self.max_length}.")
        if not 0 < self.eval_share < 0.9:
            raise ConfigError(f"FinetuneConfig.eval_share must be in (0, 0.9): early stopping and the evaluation need held-out pairs; got {self.eval_share}.")
        _positive("FinetuneConfig.eval_every", self.eval_every)
        _positive("FinetuneConfig.patience", self.patience, allow_zero=True)
        _positive("FinetuneConfig.checkpoint_every", self.checkpoint_every)
        _positive("FinetuneConfig.mix_known", self.mix_known, allow_zero=True)


FINETUNE_PRESETS: dict[str, dict[str, Any]] = {
    # A few minutes on a laptop CPU with SmolLM2-135M: float32, short sequences, frequent evals and checkpoints.
    "cpu-small": {"lora_r": 8, "lora_alpha": 16.0, "lora_dropout": 0.05, "epochs": 3.0, "lr": 2e-4, "batch_size": 4, "grad_accum": 2,
                  "max_length": 256, "eval_every": 10, "checkpoint_every": 20, "patience": 3, "device": "cpu", "dtype": "float32"},
    # The paper's setting (METHOD.md): LLaMA-Factory, LoRA on all linear modules, 3 epochs, lr 1e-4, batch 4, grad-accum 8, bf16.
    "gpu-paper": {"lora_r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0, "targets": ("all-linear",), "epochs": 3.0, "lr": 1e-4,
                  "batch_size": 4, "grad_accum": 8, "max_length": 2048, "eval_every": 20, "checkpoint_every": 100, "patience": 3,
                  "device": "cuda", "dtype": "bfloat16"},
}


def finetune_preset(name: str, **overrides: Any) -> FinetuneConfig:
    """A preset's ``FinetuneConfig`` with ``overrides`` on top.

    >>> finetune_preset("gpu-paper").grad_accum, finetune_preset("cpu-small", lr=1e-4).lr
    (8, 0.0001)
    """
    if name not in FINETUNE_PRESETS:
        raise ConfigError(f"No fine-tune preset {name!r}. Presets: {', '.join(FINETUNE_PRESETS)}.")
    return from_dict(FinetuneConfig, {**FINETUNE_PRESETS[name], **overrides})


ALL_CONFIGS = ALL_CONFIGS + (FinetuneConfig,)


EVALUATE_MODELS = ("base", "tuned")


@dataclass(frozen=True)
class EvaluateConfig:
    """Base vs tuned on a fine-tune's held-out questions (``ka2l.finetune.evaluate.evaluate``'s arguments), as a job."""

    finetune_id: int = _f(0, "Id of the fine-tune whose held-out questions are answered (see `python -m ka2l finetunes`).")
    models: tuple[str, ...] = _f(EVALUATE_MODELS, "Which models answer: base, tuned or both. The base alone works while training still runs.")
    temperature: float = _f(0.1, "Answer temperature, in (0, 2] (the method's 0.1).")
    seed: int = _f(0, "Sampling and bootstrap seed.")
    batch_size: int = _f(16, "Questions per generate call (and BERTScore batch).")
    bootstrap: int = _f(1000, "Bootstrap resamples for the 95% intervals (0 = none).")
    bertscore_model: str | None = _f(None, "Local model folder for BERTScore; unset = the offline all-MiniLM-L6-v2. Changing it "
                                           "scores BERTScore again and keeps the answers.")
    device: str | None = _f(None, "Device: auto, cpu, cuda, cuda:N or mps; unset = the fine-tune's own.")
    fresh: bool = _f(False, "Forget the stored answers and answer every question again.")

    def __post_init__(self) -> None:
        from .device import DEVICES

        _positive("EvaluateConfig.finetune_id", self.finetune_id, allow_zero=True)
        if not self.models or any(m not in EVALUATE_MODELS for m in self.models) or len(set(self.models)) != len(self.models):
            raise ConfigError(f"EvaluateConfig.models must be some of {', '.join(EVALUATE_MODELS)}, each once; got {self.models!r}.")
        if not 0 < self.temperature <= 2:
            raise ConfigError(f"EvaluateConfig.temperature must be in (0, 2]; the method uses 0.1. Got {self.temperature}.")
        _positive("EvaluateConfig.batch_size", self.batch_size)
        _positive("EvaluateConfig.bootstrap", self.bootstrap, allow_zero=True)
        if self.device is not None:
            _one_of("EvaluateConfig.device", self.device.split(":")[0], DEVICES)


@dataclass(frozen=True)
class ReprobeConfig:
    """Stage 1 again with a finished fine-tune's adapter, on its base run's pool and settings (``ka2l.finetune.reprobe``)."""

    finetune_id: int = _f(0, "Id of the finished fine-tune whose adapter is re-probed (see `python -m ka2l finetunes`).")
    device: str | None = _f(None, "Device for the model and the probes: auto, cpu, cuda, cuda:N or mps; unset = the base run's.")

    def __post_init__(self) -> None:
        from .device import DEVICES

        _positive("ReprobeConfig.finetune_id", self.finetune_id, allow_zero=True)
        if self.device is not None:
            _one_of("ReprobeConfig.device", self.device.split(":")[0], DEVICES)


ALL_CONFIGS = ALL_CONFIGS + (EvaluateConfig, ReprobeConfig)


# -- Stage 3: the RQ1-RQ3 experiment -----------------------------------------------------------------

EXPERIMENT_STRATEGIES = ("random", "entropy", "coreset", "badge", "ka2l-unknown", "ka2l-known", "combine", "ka2l-augmented")
EXPERIMENT_METRICS = ("rouge_l", "bleu", "meteor", "bertscore", "correct")


def _experiment_finetune() -> FinetuneConfig:
    return FinetuneConfig(source="gold", gold_set="all", patience=0)


@dataclass(frozen=True)
class ExperimentConfig:
    """Fine-tune on what each selection strategy picks at equal budgets, evaluate every cell on one fixed
    test split (gold answers play the annotator), and compare (paper RQ1-RQ3). The pool is given beside
    the config (like Stage 1); the strategies are those of ``ka2l.finetune.selection``."""

    run_id: int = _f(0, "Stage 1 run whose model, hidden states, labels and probe are used; 0 = the pool's newest finished run.")
    probe_id: int = _f(0, "Probe giving P(unknown) and the layer; 0 = the run's newest probe.")
    layer: int = _f(-1, "Layer whose hidden states coreset and badge compare; -1 = the probe's layer.")
    strategies: tuple[str, ...] = _f(("random", "entropy", "coreset", "badge", "ka2l-unknown", "ka2l-known", "combine"),
                                     f"Selection strategies to compare: any of {', '.join(EXPERIMENT_STRATEGIES)}.")
    budgets: tuple[float, ...] = _f((0.25, 0.5, 1.0), "Budgets as shares of the pool left after the test split (1.0 = all of it).")
    seeds: tuple[int, ...] = _f((0,), "Seeds: each strategy x budget is selected and fine-tuned once per seed.")
    test_share: float = _f(0.2, "Share of the pool's questions held out as the fixed test split (never selected, the fine-tunes' eval split).")
    test_seed: int = _f(0, "Seed of the test split (by a hash of seed and question, as fine-tune splits).")
    augmented_share: float = _f(0.5, "ka2l-augmented: at most this share of a budget is approved decoded questions (answered with their "
                                     "source question's gold answer); the rest is ka2l-unknown.")
    metric: str = _f("rouge_l", f"Metric the RQ comparisons use: one of {', '.join(EXPERIMENT_METRICS)} (all are reported).")
    bootstrap: int = _f(1000, "Bootstrap resamples for every interval (over test questions).")
    eval_batch_size: int = _f(16, "Test questions answered per generate call.")
    bertscore_model: str = _f("", "Local BERTScore model folder; empty = the offline all-MiniLM-L6-v2.")
    finetune: FinetuneConfig = _nested(_experiment_finetune, "The per-cell LoRA fine-tune. Its data settings (source, file, run) are "
                                                             "set per cell; patience must stay 0: the held-out split is the test split.")

    def __post_init__(self) -> None:
        if not self.strategies or len(set(self.strategies)) != len(self.strategies):
            raise ConfigError(f"ExperimentConfig.strategies must name each strategy once, got {self.strategies!r}.")
        for s in self.strategies:
            _one_of("ExperimentConfig.strategies", s, EXPERIMENT_STRATEGIES)
        if not self.budgets or len(set(self.budgets)) != len(self.budgets) or any(not 0 < float(b) <= 1 for b in self.budgets):
            raise ConfigError(f"ExperimentConfig.budgets must be distinct shares in (0, 1] of the non-test pool, e.g. 0.25 0.5 1.0; "
                              f"got {self.budgets!r}.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"ExperimentConfig.seeds must be distinct whole numbers, at least one; got {self.seeds!r}.")
        if not 0 < self.test_share < 0.9:
            raise ConfigError(f"ExperimentConfig.test_share must be in (0, 0.9), got {self.test_share}.")
        if not 0 <= self.augmented_share <= 1:
            raise ConfigError(f"ExperimentConfig.augmented_share must be in [0, 1], got {self.augmented_share}.")
        _one_of("ExperimentConfig.metric", self.metric, EXPERIMENT_METRICS)
        _positive("ExperimentConfig.run_id", self.run_id, allow_zero=True)
        _positive("ExperimentConfig.probe_id", self.probe_id, allow_zero=True)
        _positive("ExperimentConfig.bootstrap", self.bootstrap, allow_zero=True)
        _positive("ExperimentConfig.eval_batch_size", self.eval_batch_size)
        if self.finetune.patience:
            raise ConfigError(f"ExperimentConfig.finetune.patience is {self.finetune.patience}, but early stopping would pick each "
                              f"adapter on the test split. Set it to 0.")
        if self.finetune.mix_known:
            raise ConfigError("ExperimentConfig.finetune.mix_known must be 0: every cell trains on exactly its selected items.")


ALL_CONFIGS = ALL_CONFIGS + (ExperimentConfig,)
