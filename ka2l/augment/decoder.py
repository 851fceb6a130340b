"""Hidden-state -> question decoder (Stage 2), a vec2text-style "zero-step" inverter:

    vector (d) -> standardise -> Linear(d, d) -> GELU -> Linear(d, m * e) -> m pseudo-token embeddings
               -> backbone that writes the question

One interface, two kinds of backbone:

    seq2seq  (T5 and friends)  the pseudo-tokens are the encoder's input embeddings (``inputs_embeds``);
                               the encoder reads them and the decoder cross-attends to its outputs, as in
                               vec2text and the authors' code
    causal   (SmolLM2, Llama)  the pseudo-tokens are a soft prefix (``inputs_embeds``) before the text

Either way the pseudo-tokens stand where token embeddings would, so the projection's output is
scaled to the backbone's embedding scale.

Projection and backbone train end to end on (vector, question) pairs. A saved decoder is a folder:
``decoder.json`` (config, backbone, layer, pooling, versions, metrics), ``projection.safetensors``
and ``backbone/`` (weights + tokenizer, loadable on its own).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import T5_SCRATCH, ModelSpec
from ..errors import ModelLoadError

KINDS = ("causal", "seq2seq")
# Recorded in a seq2seq decoder's sidecar: how its pseudo-tokens enter the backbone. Decoders saved before
# this was recorded fed them as encoder outputs (skipping T5's encoder) and cannot be loaded as they are.
SEQ2SEQ_INPUT = "encoder inputs_embeds"


class Standardise(nn.Module):
    """(x - mean) / std with statistics fixed from the training vectors (LLM states have a few huge dimensions)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def fit(self, x: np.ndarray) -> None:
        x = torch.as_tensor(np.asarray(x, dtype=np.float32))
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp(min=1e-4) if len(x) > 1 else torch.ones_like(self.std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class HiddenStateDecoder(nn.Module):
    def __init__(self, backbone, tokenizer, kind: str, dim: int, n_pseudo: int = 16):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.backbone, self.tokenizer, self.kind = backbone, tokenizer, kind
        self.dim, self.n_pseudo = dim, n_pseudo
        embeddings = backbone.get_input_embeddings().weight.detach()  # (vocab, e); shared by T5's encoder and decoder
        self.embed_dim = int(embeddings.shape[1])
        self.projection = nn.Sequential(Standardise(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, n_pseudo * self.embed_dim))
        # Pseudo-tokens stand in for token embeddings (a causal prefix, or a T5 encoder's input): match their scale.
        scale = float(embeddings.float().std())
        self.register_buffer("out_scale", torch.tensor(scale))
        if tokenizer.eos_token_id is None:
            raise ModelLoadError("The backbone's tokenizer has no end-of-sequence token; a decoder must learn where a question ends.")

    @property
    def device(self) -> torch.device:
        return self.out_scale.device

    def fit_standardisation(self, vectors: np.ndarray) -> None:
        self.projection[0].fit(vectors)

    def pseudo_tokens(self, vectors: torch.Tensor) -> torch.Tensor:
        out = self.projection(vectors.to(self.device, torch.float32)) * self.out_scale  # (b, m*e)
        return out.view(vectors.shape[0], self.n_pseudo, self.embed_dim)

    def _targets(self, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded token ids of ``text + eos`` (cut to ``max_length``) and their mask."""
        tok = self.tokenizer
        ids = [tok(t, add_special_tokens=False)["input_ids"][: max_length - 1] + [tok.eos_token_id] for t in texts]
        width = max(len(i) for i in ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        batch = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            batch[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        return batch.to(self.device), mask.to(self.device)

    def target_tokens(self, texts: Sequence[str], max_length: int = 48) -> int:
        """How many tokens ``loss`` averages over for ``texts``: each text's, cut to ``max_length``, with its eos."""
        return sum(min(len(self.tokenizer(t, add_special_tokens=False)["input_ids"]), max_length - 1) + 1 for t in texts)

    def loss(self, vectors: torch.Tensor, texts: Sequence[str], max_length: int = 48) -> torch.Tensor:
        """Mean token cross-entropy of reconstructing ``texts`` from ``vectors`` (b, d)."""
        prefix = self.pseudo_tokens(vectors)
        ids, mask = self._targets(texts, max_length)
        labels = ids.masked_fill(mask == 0, -100)
        ones = torch.ones(prefix.shape[:2], dtype=torch.long, device=self.device)
        if self.kind == "seq2seq":  # prefix (b, m, e) through the encoder; the decoder learns ids
            return self.backbone(inputs_embeds=prefix, attention_mask=ones, labels=labels).loss
        embeds = torch.cat([prefix, self.backbone.get_input_embeddings()(ids)], dim=1)
        full_labels = torch.cat([torch.full(prefix.shape[:2], -100, dtype=torch.long, device=self.device), labels], dim=1)
        return self.backbone(inputs_embeds=embeds, attention_mask=torch.cat([ones, mask], dim=1), labels=full_labels).loss

    def forward(self, vectors: torch.Tensor, texts: Sequence[str], max_length: int = 48) -> torch.Tensor:
        """The training loss (``loss``), as a module's forward: DDP syncs the gradients of what goes through it."""
        return self.loss(vectors, texts, max_length)

    @torch.no_grad()
    def generate(self, vectors: np.ndarray | torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                 max_new_tokens: int = 48, seed: int = 0) -> list[str]:
        """One question per vector; temperature 0 decodes greedily."""
        torch.manual_seed(seed)
        prefix = self.pseudo_tokens(torch.as_tensor(np.asarray(vectors, dtype=np.float32)))
        ones = torch.ones(prefix.shape[:2], dtype=torch.long, device=self.device)
        tok = self.tokenizer
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 else {"do_sample": False}
        kw = {"attention_mask": ones, "max_new_tokens": max_new_tokens, "eos_token_id": tok.eos_token_id,
              "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, **sampling}
        # seq2seq: the encoder reads the prefix; causal: the prefix precedes the text. Both return only new tokens.
        out = self.backbone.generate(inputs_embeds=prefix, **kw)
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]


def perturb(vectors: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Add Gaussian noise whose expected norm is ``noise`` times each vector's norm."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if noise <= 0:
        return vectors.copy()
    eps = rng.standard_normal(vectors.shape).astype(np.float32) / np.sqrt(vectors.shape[-1])
    return vectors + noise * np.linalg.norm(vectors, axis=-1, keepdims=True) * eps


# -- backbones -----------------------------------------------------------------------------------

def _pad_token(tokenizer) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError("The backbone's tokenizer has neither a pad nor an end-of-sequence token.")
        tokenizer.pad_token = tokenizer.eos_token


def scratch_t5(tokenizer, d_model: int = 256, layers: int = 4, heads: int = 4, seed: int = 0):
    """A small T5 with random weights over ``tokenizer``'s vocabulary (for offline use without T5 weights)."""
    from transformers import T5Config, T5ForConditionalGeneration

    _pad_token(tokenizer)
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // heads, d_ff=4 * d_model, num_layers=layers,
                   num_heads=heads, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                   decoder_start_token_id=tokenizer.pad_token_id)
    return T5ForConditionalGeneration(cfg)


def load_backbone(name: str, fallback_tokenizer=None, seed: int = 0):
    """(model, tokenizer, kind) for a backbone name: hub id, folder, .gguf, the embedded model, or
    ``t5-scratch`` (which needs ``fallback_tokenizer``, normally the probed model's)."""
    import copy

    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from ..models.llm import resolve_source

    if name == T5_SCRATCH:
        if fallback_tokenizer is None:
            raise ModelLoadError(f"{T5_SCRATCH!r} builds its vocabulary from the probed model's tokenizer; none was given.")
        tok = copy.deepcopy(fallback_tokenizer)
        return scratch_t5(tok, seed=seed), tok, "seq2seq"
    source, gguf = resolve_source(ModelSpec(name_or_path=name))
    kw = {"gguf_file": gguf} if gguf else {}
    try:
        config = AutoConfig.from_pretrained(source, **kw)
        kind = "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"
        tok = AutoTokenizer.from_pretrained(source, **kw)
        cls = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
        model = cls.from_pretrained(source, dtype=torch.float32, **kw)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not load decoder backbone {name!r} ({source}): {str(exc).splitlines()[0]}. "
                             f"Give a folder or hub id of a causal or seq2seq model, or {T5_SCRATCH!r}.") from exc
    _pad_token(tok)
    return model, tok, kind


# -- persistence ---------------------------------------------------------------------------------

def save_decoder(decoder: HiddenStateDecoder, folder: Path, meta: dict[str, Any], extra: Callable[[Path], None] | None = None) -> Path:
    """Write the decoder to ``folder`` atomically (a crash mid-save leaves the previous copy);
    ``extra(tmp_folder)`` may add files (a checkpoint's optimizer state) inside the same swap."""
    import safetensors.torch
    import transformers

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    decoder.backbone.save_pretrained(tmp / "backbone")
    decoder.tokenizer.save_pretrained(tmp / "backbone")
    state = {k: v.detach().cpu().contiguous() for k, v in decoder.state_dict().items() if not k.startswith("backbone.")}
    safetensors.torch.save_file(state, str(tmp / "projection.safetensors"))
    sidecar = {"kind": decoder.kind, "dim": decoder.dim, "n_pseudo": decoder.n_pseudo, "embed_dim": decoder.embed_dim,
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__}, **meta}
    if decoder.kind == "seq2seq":
        sidecar["seq2seq_input"] = SEQ2SEQ_INPUT
    (tmp / "decoder.json").write_text(json.dumps(sidecar, indent=1))
    if extra is not None:
        extra(tmp)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def read_meta(folder: Path | str) -> dict[str, Any]:
    path = Path(folder) / "decoder.json"
    if not path.is_file():
        raise ModelLoadError(f"No decoder at {folder} (decoder.json missing). The data folder may have moved; train it again.")
    return json.loads(path.read_text())


def load_decoder(folder: Path | str, device: str = "cpu") -> tuple[HiddenStateDecoder, dict[str, Any]]:
    """(decoder, sidecar) for a folder written by ``save_decoder``."""
    import safetensors.torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    folder = Path(folder)
    meta = read_meta(folder)
    if meta["kind"] == "seq2seq" and meta.get("seq2seq_input") != SEQ2SEQ_INPUT:
        raise ModelLoadError(f"The seq2seq decoder at {folder} was trained by an older ka2l that fed its pseudo-tokens to the "
                             f"backbone as encoder outputs; ka2l now passes them through the encoder (as vec2text does), so "
                             f"this decoder would decode nonsense. Train it again.")
    cls = AutoModelForSeq2SeqLM if meta["kind"] == "seq2seq" else AutoModelForCausalLM
    backbone = cls.from_pretrained(folder / "backbone", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder / "backbone")
    _pad_token(tok)
    decoder = HiddenStateDecoder(backbone, tok, meta["kind"], meta["dim"], meta["n_pseudo"])
    missing = decoder.load_state_dict(safetensors.torch.load_file(str(folder / "projection.safetensors")), strict=False)
    if missing.unexpected_keys or any(not k.startswith("backbone.") for k in missing.missing_keys):
        raise ModelLoadError(f"Decoder weights at {folder} do not match its config (projection keys differ).")
    return decoder.to(device).eval(), meta
