"""Sampling throughput of Stage 1's two backends, HF (transformers, ka2l's own sampler) and vLLM, on the same
model, questions and k: answers per second for what Stage 1 draws per question (one low-temperature answer
and k samples), through ``ka2l.models.sampling.make_sampler`` exactly as Stage 1 calls it.

    .venv/bin/python bench/bench_vllm.py [--model ka2l:smollm2] [--n 64] [--k 10] [--max-new-tokens 32] [--batch-size 16]

The HF half runs anywhere (on the GPU when there is one). The vLLM half runs only where vLLM's engine can:
an NVIDIA GPU and ``pip install 'ka2l[vllm]'``; elsewhere it is skipped and the JSON says why. Where both
run, the low-temperature answers of the two engines are compared as a check of meaning: the share of
questions whose answer text is the same, and, over those, the largest difference of the stored token
log-probs (both engines store the model's raw, temperature-1 log-prob of each token). Engine start-up
(model load, vLLM's CUDA graphs) is timed apart from sampling. Writes bench/results/vllm.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _prompts(lm, n: int, prompt_cfg) -> list[str]:
    from ka2l.models.llm import build_prompt
    from ka2l.pools.sources import load_builtin

    rows = load_builtin("demo:capitals").rows[:n]
    return [build_prompt(lm.tokenizer, r.question, prompt_cfg) for r in rows]


def _draw(sampler, prompts: list[str], cfg) -> tuple[float, list]:
    """Seconds to draw Stage 1's answers (low + k samples) for every prompt, batch by batch, and the low answers."""
    seeds = [2 * (cfg.seed * 1_000_003 + i) for i in range(len(prompts))]
    low = []
    t0 = time.perf_counter()
    for b in range(0, len(prompts), cfg.batch_size):
        chunk, s = prompts[b : b + cfg.batch_size], seeds[b : b + cfg.batch_size]
        low += [g[0] for g in sampler.generate(chunk, cfg.low_temperature, 1, s)]
        sampler.generate(chunk, cfg.temperature, cfg.k, [x + 1 for x in s])
    return time.perf_counter() - t0, low


def _vllm_skip_reason() -> str | None:
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return "no CUDA device here: vLLM's PyPI build needs an NVIDIA GPU"
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install 'ka2l[vllm]')"
    try:
        from vllm import LLM  # noqa: F401  (the engine, not only its output types)
    except ImportError as exc:
        return f"vLLM's engine does not import here: {exc}"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model id, folder or the embedded default")
    ap.add_argument("--n", type=int, default=64, help="questions (capitals demo pool)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16, help="questions per generate call (as SamplingConfig.batch_size)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm.json"))
    args = ap.parse_args()

    import torch

    from ka2l.config import EMBEDDED_MODEL, ModelSpec, PromptConfig, SamplingConfig
    from ka2l.models.llm import load_model
    from ka2l.models.sampling import make_sampler

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = ModelSpec(name_or_path=args.model or EMBEDDED_MODEL)
    cfg = SamplingConfig(k=args.k, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    result: dict = {"machine": {"platform": platform.platform(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                                "torch_threads": torch.get_num_threads()},
                    "model": spec.name_or_path, "n_questions": args.n, "k": args.k, "max_new_tokens": args.max_new_tokens,
                    "batch_size": args.batch_size, "answers_per_question": args.k + 1}
    t0 = time.perf_counter()
    lm = load_model(spec)
    prompts = _prompts(lm, args.n, PromptConfig())
    answers = len(prompts) * (args.k + 1)
    result["hf"] = {"device": lm.device, "dtype": str(lm.model.dtype).removeprefix("torch."), "load_s": time.perf_counter() - t0}
    seconds, hf_low = _draw(make_sampler(cfg, lm), prompts, cfg)
    result["hf"].update(sample_s=seconds, answers_per_s=answers / seconds)
    print(f"hf:   {answers} answers in {seconds:.1f} s = {answers / seconds:.1f} answers/s on {lm.device}")

    reason = _vllm_skip_reason()
    if reason:
        result["vllm"] = {"skipped": reason}
        print(f"vllm: skipped ({reason})")
    else:
        vcfg = replace(cfg, backend="vllm")
        t0 = time.perf_counter()
        sampler = make_sampler(vcfg, lm)
        load_s = time.perf_counter() - t0
        seconds, v_low = _draw(sampler, prompts, vcfg)
        same = [(h, v) for h, v in zip(hf_low, v_low) if h.text == v.text and len(h.token_ids) == len(v.token_ids)]
        diff = max((abs(a - b) for h, v in same for a, b in zip(h.token_logprobs, v.token_logprobs)), default=None)
        result["vllm"] = {"load_s": load_s, "sample_s": seconds, "answers_per_s": answers / seconds, "max_model_len": sampler.max_len,
                          "low_answers_same_text": len(same) / len(prompts), "max_abs_logprob_diff_same_low_answers": diff}
        result["vllm_over_hf_answers_per_s"] = result["vllm"]["answers_per_s"] / result["hf"]["answers_per_s"]
        print(f"vllm: {answers} answers in {seconds:.1f} s = {answers / seconds:.1f} answers/s "
              f"({result['vllm_over_hf_answers_per_s']:.1f}x hf); low answers the same text: {len(same)}/{len(prompts)}, "
              f"largest token log-prob difference there: {diff}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
