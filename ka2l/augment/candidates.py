"""New questions from perturbed hidden vectors (Stage 2 generation) and the filters every candidate
passes before a curator sees it (beyond the paper):

    screen     normalise; drop empty, non-question, too short and over-long outputs
    exact      drop copies of a pool question, of an extra-corpus question the decoder trained on, or of
               another candidate (case and punctuation ignored)
    words      drop lexical near-copies of the same: most of the shorter question's content words are in
               the other ("Who wrote '1984'?" beside "Who wrote the novel '1984'?")
    similar    drop near-copies: cosine similarity of centred decoder-space vectors at or above a threshold
    re-probe   the saved probe scores each kept candidate from one forward pass: P(unknown) is stored
               and candidates it calls known are flagged

Every candidate is stored, dropped ones with their reason, so the funnel can be inspected. Work is
committed per batch of source questions; a re-run of the same batch continues where it stopped.

>>> normalise('  "Question:  what is the  capital of Peru?  It is Lima."')
'What is the capital of Peru?'
>>> screen('the capital of Peru', FilterConfig())
('The capital of Peru', 'not a question')
>>> word_overlap(content_words("Who wrote '1984'?"), content_words("Who wrote the novel '1984'?"))
1.0
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter, defaultdict
from typing import Any

import numpy as np

from ..config import FilterConfig, GenerateConfig, ModelSpec, PromptConfig, config_hash, from_dict, to_dict
from ..errors import ConfigError
from ..progress import NullProgress, Progress, marks_status
from ..store import queries as Q
from ..store import augment as S
from ..store.db import connect

log = logging.getLogger(__name__)

QUESTION_WORDS = {"what", "who", "whom", "whose", "which", "where", "when", "why", "how", "name", "identify"}
_LABEL = re.compile(r"^(question|q)\s*[:.)-]\s*", re.IGNORECASE)
_QUOTES = "\"'`“”‘’*"


# A decoder often glues a stray fragment to the question it then writes: 'AustWhat is the capital of ...?'
_GLUED = re.compile(r"^\S+?(?=(?:What|Who|Whom|Whose|Which|Where|When|Why|How)\s)")
LOOP_MIN, LOOP_MAX = 3, 30  # the lengths of stretch a decoder loop repeats ('What isWhat isWhat is')


def normalise(text: str) -> str:
    """Collapse whitespace, drop a 'Question:' label, wrapping quotes and a fragment glued to the question
    word, keep text up to the first '?', capitalise the first letter.

    >>> normalise("WFWhat is the capital of the Czech Republic?")
    'What is the capital of the Czech Republic?'
    """
    t = " ".join(text.split()).strip(_QUOTES + " ")
    t = _LABEL.sub("", t).strip(_QUOTES + " ")
    t = _GLUED.sub("", t, count=1)
    if "?" in t:
        t = t[: t.index("?") + 1]
    t = re.sub(r"\s+\?$", "?", t)
    return t[:1].upper() + t[1:]


def is_question(text: str) -> bool:
    words = re.findall(r"[a-z]+", text.casefold())
    return text.endswith("?") or (bool(words) and words[0] in QUESTION_WORDS)


def longest_loop(text: str) -> int:
    """How many times the most repeated stretch of 3-30 characters occurs back to back (casefolded).

    >>> longest_loop("What isWhat isWhat isWhat is"), longest_loop("What is the capital of Peru?")
    (4, 1)
    """
    t, best = text.casefold(), 1
    for i in range(len(t)):
        for n in range(LOOP_MIN, min(LOOP_MAX, (len(t) - i) // 2) + 1):
            unit, times = t[i : i + n], 1
            while t.startswith(unit, i + times * n):
                times += 1
            best = max(best, times)
    return best


def screen(raw: str, cfg: FilterConfig) -> tuple[str, str | None]:
    """(normalised text, reason to drop it or None)."""
    t = normalise(raw)
    if not t:
        return t, "empty"
    if cfg.max_repeats and longest_loop(t) > cfg.max_repeats:
        return t, "repeats itself"
    if len(t) > cfg.max_chars:
        return t, f"over {cfg.max_chars} characters"
    if len(t.split()) < cfg.min_words:
        return t, f"under {cfg.min_words} words"
    if cfg.require_question and not is_question(t):
        return t, "not a question"
    return t, None


def dedupe_key(text: str) -> str:
    """'What is the capital of Peru?' and 'what is the capital of peru' share a key."""
    return " ".join(re.sub(r"[^\w]+", " ", text.casefold()).split())


# Words that change no question's meaning. Question words, negations and numbers are content: "Who
# wrote X?" and "When was X written?" differ, and so do "... Paris?" and "... not Paris?".
FUNCTION_WORDS = frozenset("""
    a an the of in on at to for from by with as into onto about over under than then
    and or but nor so is are was were be been being am do does did has have had will would shall should can could may might
    it its this that these those there here their his her hers him he she they them we us our you your i me my mine
    s very also just please tell me
""".split()) - QUESTION_WORDS


def content_words(text: str) -> frozenset[str]:
    """The words of a question that carry its meaning: casefolded, possessive 's and punctuation dropped,
    function words left out."""
    t = re.sub(r"['’]s\b", "", text.casefold())
    return frozenset(w for w in re.findall(r"\w+", t) if w not in FUNCTION_WORDS)


def word_overlap(a: frozenset[str], b: frozenset[str]) -> float:
    """Share of the smaller word set found in the other (1.0: one question's words all in the other)."""
    if not a or not b:
        return 0.0
    return len(a & b) / min(len(a), len(b))


class WordIndex:
    """Questions by content word, to find the one that shares the most of a new question's words."""

    def __init__(self, texts: list[str] = ()):
        self.texts: list[str] = []
        self.words: list[frozenset[str]] = []
        self.by_word: dict[str, list[int]] = defaultdict(list)
        for t in texts:
            self.add(t)

    def add(self, text: str) -> None:
        words = content_words(text)
        for w in words:
            self.by_word[w].append(len(self.texts))
        self.texts.append(text)
        self.words.append(words)

    def nearest(self, words: frozenset[str]) -> tuple[str | None, float]:
        """(text, overlap) of the indexed question with the highest word overlap, or (None, 0.0)."""
        shared = Counter(i for w in words for i in self.by_word.get(w, ()))
        best, score = None, 0.0
        for i, n in shared.items():
            s = n / min(len(words), len(self.words[i]))
            if s > score:
                best, score = self.texts[i], s
        return best, score


class Similarity:
    """Cosine similarity after removing the pool's mean vector (raw LLM states all point one way)."""

    def __init__(self, pool_vectors: np.ndarray):
        self.centre = pool_vectors.mean(0)
        self.pool = self.unit(pool_vectors)

    def unit(self, x: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(np.asarray(x, dtype=np.float32)) - self.centre
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)

    def nearest_pool(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index, similarity) of the nearest pool vector for each row of ``x``."""
        sims = self.unit(x) @ self.pool.T
        idx = sims.argmax(1)
        return idx, sims[np.arange(len(idx)), idx]


def vector_space(db, decoder: dict[str, Any]) -> str:
    """What a decoder's input vectors (and its candidates' vectors) are: states of the probed model (on
    whatever device), under its prompt, at one layer, pooled one way. Vectors of different spaces are
    never compared (they may not even have the same size)."""
    import json

    stage1 = Q.get_run(db, decoder["run_id"])["config"]
    model = {k: v for k, v in stage1.get("model", {}).items() if k != "device"}
    return json.dumps({"model": model, "prompt": stage1.get("prompt"), "layer": decoder["layer"], "pooling": decoder["pooling"]},
                      sort_keys=True)


def same_space_decoders(db, decoder: dict[str, Any]) -> list[int]:
    """Ids of the pool's decoders whose vectors live in ``decoder``'s space (itself included)."""
    space = vector_space(db, decoder)
    return [d["id"] for d in S.list_decoders(db, decoder["pool_id"]) if d["id"] == decoder["id"] or vector_space(db, d) == space]


def probe_texts(texts: list[str], lm, prompt: PromptConfig, layer: int, probe_layer: int, pooling: str, probe_net,
                sim: Similarity, pool_q: list[dict]) -> list[dict[str, Any]]:
    """What generation stores of each text: its decoder-space vector, the saved probe's P(unknown) (last
    prompt token at the probe's layer) and the nearest pool question by centred cosine."""
    from .train import decoder_vectors, encode_questions
    from ..probing.probes import predict_unknown

    mean, last = encode_questions(lm, texts, prompt, [layer, probe_layer])  # (n, 2, hidden) each
    vectors = decoder_vectors(mean, last, pooling)  # (n, hidden) at the decoder's layer
    p_unknown = predict_unknown(probe_net, last[:, 1])
    nearest, near_sim = sim.nearest_pool(vectors)
    return [{"p_unknown": float(p), "flagged_known": int(p < 0.5), "nearest_question_id": pool_q[int(n)]["id"],
             "nearest_similarity": float(s), "vector": v} for v, p, n, s in zip(vectors, p_unknown, nearest, near_sim)]


class Reprober:
    """Re-probes a curator's edited candidate text as generation probed the decoder's: with the saved
    probe, in the space of the decoder that made the candidate. Loads the probed model once."""

    def __init__(self, generation_id: int, device: str = "auto", lm=None):
        from .decoder import read_meta
        from ..device import resolve_device
        from ..models.llm import load_model
        from ..paths import decoders_dir
        from ..probing.probes import load_probe

        with connect() as db:
            drow = S.get_decoder(db, S.get_generation(db, generation_id)["decoder_id"])
            self.pool_q = Q.pool_questions(db, drow["pool_id"])
            probe_row = Q.get_probe(db, drow["probe_id"])
        if not drow["path"]:
            raise ConfigError(f"Decoder {drow['id']} has no saved model to re-probe with; it is {drow['status']}.")
        meta = read_meta(drow["path"])
        self.net, probe_meta = load_probe(probe_row["path"])
        vectors = np.load(decoders_dir() / f"decoder-{drow['id']}" / "vectors.npy")[: len(self.pool_q)]  # pool questions come first
        self.sim = Similarity(vectors)
        self.prompt, self.layer, self.pooling = from_dict(PromptConfig, meta["prompt"]), int(meta["layer"]), meta["pooling"]
        self.probe_layer = int(probe_meta["layer"])
        self.lm = lm or load_model(from_dict(ModelSpec, meta["model"]), device=resolve_device(device))

    def __call__(self, texts: list[str]) -> list[dict[str, Any]]:
        return probe_texts(texts, self.lm, self.prompt, self.layer, self.probe_layer, self.pooling, self.net, self.sim, self.pool_q)


def source_questions(db, decoder: dict[str, Any], source: str) -> list[int]:
    if source == "unknown":
        return [r["question_id"] for r in Q.load_scores(db, decoder["run_id"]) if r["bise"] == 1]
    from ..store import curation

    return [m["question_id"] for m in curation.members(decoder["pool_id"])]


class CandidateFilter:
    """Screens, deduplicates and re-probes decoded texts; remembers what it kept across batches."""

    def __init__(self, cfg: FilterConfig, pool_q: list[dict], pool_vectors: np.ndarray, lm, prompt: PromptConfig,
                 layer: int, probe_layer: int, pooling: str, probe_net, kept_texts: list[str], kept_vectors: np.ndarray | None,
                 corpus_texts: list[str] = ()):
        self.cfg, self.pool_q, self.lm, self.prompt, self.pooling, self.net = cfg, pool_q, lm, prompt, pooling, probe_net
        self.layer, self.probe_layer = layer, probe_layer
        self.sim = Similarity(pool_vectors)
        self.pool_keys = {dedupe_key(q["question"]) for q in pool_q}
        self.corpus_keys = {dedupe_key(t) for t in corpus_texts} - self.pool_keys  # the decoder's extra training questions
        self.cand_keys = {dedupe_key(t) for t in kept_texts}
        self.pool_words = WordIndex([q["question"] for q in pool_q])
        self.corpus_words = WordIndex([t for t in corpus_texts if dedupe_key(t) not in self.pool_keys])
        self.cand_words = WordIndex(kept_texts)  # every kept candidate of the pool, whatever decoder made it
        if kept_vectors is not None and kept_vectors.shape[1] != pool_vectors.shape[1]:
            raise ValueError(f"Candidate vectors of size {kept_vectors.shape[1]} cannot be compared with this decoder's "
                             f"size-{pool_vectors.shape[1]} vectors: they come from another vector space.")
        self.cand_unit = self.sim.unit(kept_vectors) if kept_vectors is not None else np.zeros((0, pool_vectors.shape[1]), np.float32)

    def __call__(self, sources: list[int], texts: list[str], per_question: int, noise: float) -> list[dict[str, Any]]:
        """One row per text (sources[j // per_question] made texts[j]); kept or dropped with a reason."""
        rows, fresh = [], []
        for j, raw in enumerate(texts):
            text, reason = screen(raw, self.cfg)
            if reason is None and dedupe_key(text) in self.pool_keys:
                reason = "same as a pool question"
            elif reason is None and dedupe_key(text) in self.corpus_keys:
                reason = "same as an extra-corpus training question"
            if reason is None:
                words = content_words(text)
                for index, what in ((self.pool_words, "a pool question"), (self.corpus_words, "an extra-corpus training question")):
                    near, overlap = index.nearest(words)
                    if overlap >= self.cfg.word_overlap:
                        reason = f"near-copy of {what} (word overlap {overlap:.2f} with {near!r})"
                        break
            row = {"source_question_id": sources[j // per_question], "sample": j % per_question, "noise": noise, "raw_text": raw,
                   "text": text, "status": "dropped", "drop_reason": reason}
            rows.append(row)
            if reason is None:
                fresh.append(row)
        if not fresh:
            return rows
        probed = probe_texts([r["text"] for r in fresh], self.lm, self.prompt, self.layer, self.probe_layer, self.pooling, self.net,
                             self.sim, self.pool_q)
        for r, values in zip(fresh, probed):
            r.update(values)
            s, u = values["nearest_similarity"], self.sim.unit(values["vector"])
            key = dedupe_key(r["text"])
            near, overlap = self.cand_words.nearest(content_words(r["text"]))
            if key in self.cand_keys:
                r["drop_reason"] = "same as another candidate"
            elif overlap >= self.cfg.word_overlap:
                r["drop_reason"] = f"near-copy of another candidate (word overlap {overlap:.2f} with {near!r})"
            elif s >= self.cfg.similarity:
                r["drop_reason"] = f"near-copy of a pool question (similarity {s:.3f})"
            elif len(self.cand_unit) and float((self.cand_unit @ u.T).max()) >= self.cfg.similarity:
                r["drop_reason"] = "near-copy of another candidate"
            else:
                r["status"], r["drop_reason"] = "kept", None
                self.cand_keys.add(key)
                self.cand_words.add(r["text"])
                self.cand_unit = np.concatenate([self.cand_unit, u])
        return rows


def generate_candidates(cfg: GenerateConfig, progress: Progress | None = None, resume: bool = True, lm=None) -> int:
    """Decode ``cfg.per_question`` candidates per source question, filter and re-probe them; returns
    the generation batch id."""
    from .decoder import load_decoder, perturb
    from ..device import resolve_device
    from ..models.llm import load_model
    from ..paths import decoders_dir
    from ..probing.probes import load_probe

    progress = progress or NullProgress()
    with connect() as db:
        drow = S.get_decoder(db, cfg.decoder_id)
        if drow["status"] != "done":
            raise ConfigError(f"Decoder {drow['id']} is {drow['status']}; finish training it (resume its job) before generating.")
        sources = source_questions(db, drow, cfg.source)
        if not sources:
            where = "the run has no unknown (BiSE = 1) questions" if cfg.source == "unknown" else "the pool's curation set is empty"
            raise ConfigError(f"Nothing to augment: {where}. Choose another source or add questions to the curation set.")
        pool_q = Q.pool_questions(db, drow["pool_id"])
        corpus = [q["question"] for name in drow["config"].get("extra_pools", []) for q in Q.pool_questions(db, Q.get_pool(db, name)["id"])]
        probe_row = Q.get_probe(db, drow["probe_id"])
        gen_id, state = S.start_generation(db, drow["id"], drow["pool_id"], to_dict(cfg), config_hash(cfg), resume)
        if state == "done":
            return gen_id
        done = S.generated_sources(db, gen_id)
        kept_texts = S.kept_texts(db, drow["pool_id"])
        kept_vecs = S.kept_vectors(db, drow["pool_id"], same_space_decoders(db, drow))
    device = resolve_device(cfg.device)

    def update(**fields: Any) -> None:
        with connect() as db:
            S.update_generation(db, gen_id, **fields)

    with marks_status(update, progress):
        decoder, meta = load_decoder(drow["path"], device)
        net, probe_meta = load_probe(probe_row["path"])
        vectors = np.load(decoders_dir() / f"decoder-{drow['id']}" / "vectors.npy")[: len(pool_q)]  # pool questions come first
        row_of = {q["id"]: i for i, q in enumerate(pool_q)}
        lm = lm or load_model(from_dict(ModelSpec, meta["model"]), device=device)
        keep = CandidateFilter(cfg.filters, pool_q, vectors, lm, from_dict(PromptConfig, meta["prompt"]), meta["layer"],
                               int(probe_meta["layer"]), meta["pooling"], net, kept_texts, kept_vecs, corpus)
        todo = [q for q in sources if q not in done]
        progress.stage("generating candidates", total=len(sources), done=len(sources) - len(todo))
        per_call = max(1, cfg.batch_size // cfg.per_question)
        for b in range(0, len(todo), per_call):
            chunk = todo[b : b + per_call]
            vecs = np.concatenate([perturb(np.repeat(vectors[row_of[q]][None], cfg.per_question, 0), cfg.noise,
                                           np.random.default_rng([cfg.seed, q])) for q in chunk])
            t0 = time.perf_counter()
            texts = decoder.generate(vecs, cfg.temperature, cfg.top_p, cfg.max_new_tokens, seed=cfg.seed * 1_000_003 + chunk[0])
            rows = keep(chunk, texts, cfg.per_question, cfg.noise)
            with connect() as db:
                S.insert_candidates(db, [{**r, "generation_id": gen_id, "pool_id": drow["pool_id"]} for r in rows])
                S.add_generation_seconds(db, gen_id, time.perf_counter() - t0)
            kept = sum(r["status"] == "kept" for r in rows)
            progress.advance(len(chunk), f"{kept} of {len(rows)} candidates kept in the last batch")
    with connect() as db:
        S.update_generation(db, gen_id, status="done", summary=generation_summary(db, gen_id))
    return gen_id


def generation_summary(db, gen_id: int) -> dict[str, Any]:
    """The filter funnel of one batch: generated, kept, why the rest were dropped, the probe's verdict, speed."""
    rows = list(db.query("SELECT status, drop_reason, flagged_known FROM candidates WHERE generation_id = ?", [gen_id]))
    seconds = S.get_generation(db, gen_id)["seconds"] or 0.0
    kept = [r for r in rows if r["status"] == "kept"]
    reasons = Counter(re.sub(r" \((similarity|word overlap) .*\)$", "", r["drop_reason"]) for r in rows if r["status"] == "dropped")
    return {"generated": len(rows), "kept": len(kept), "survival_share": len(kept) / len(rows) if rows else 0.0,
            "unknown_share_of_kept": sum(1 - r["flagged_known"] for r in kept) / len(kept) if kept else 0.0,
            "dropped": dict(reasons), "seconds": seconds, "candidates_per_s": len(rows) / seconds if seconds else None}
