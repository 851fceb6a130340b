"""Stage 2 benchmark: reconstruction BLEU / ROUGE-L of the offline default decoder after a fixed CPU
training budget, candidates per second, and the filter funnel.

    .venv/bin/python bench/bench_decoder.py [--minutes 10] [--sources 50] [--k 4]

1. Stage 1 on the capitals demo pool with the embedded SmolLM2 (a light k, reused if finished):
   it gives the probe, its layer and the unknown questions.
2. A decoder with the embedded SmolLM2 as soft-prefix backbone, mean-pooled states at the probe's
   layer, trained on capitals (minus 10% held out) + the elements pool as extra corpus, for
   ``--minutes`` of training time. Reconstruction is measured before and after on the held-out
   capitals questions (never trained on) and on training questions.
3. ``--per-question`` candidates for each of ``--sources`` unknown questions (noise 0.1, T 0.8):
   candidates/s, the share surviving the filters, the share the probe re-flags as unknown.

Work lives in its own data folder (bench/results/decoder-work, resumable); writes
bench/results/decoder.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="training time budget")
    ap.add_argument("--sources", type=int, default=50, help="unknown questions to augment")
    ap.add_argument("--per-question", type=int, default=4)
    ap.add_argument("--k", type=int, default=4, help="Stage 1 samples per question (light, for the probe)")
    ap.add_argument("--work", default=str(ROOT / "bench" / "results" / "decoder-work"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "decoder.json"))
    args = ap.parse_args()

    work = Path(args.work)
    (work / "models").mkdir(parents=True, exist_ok=True)
    os.environ["KA2L_DATA_DIR"] = str(work)
    shared = ROOT / "data" / "models" / "smollm2-135m-instruct"
    link = work / "models" / shared.name
    if shared.is_dir() and not link.exists():
        link.symlink_to(shared)

    import torch

    from ka2l.store import curation
    from ka2l.augment.candidates import generate_candidates
    from ka2l.config import DecoderConfig, GenerateConfig, SamplingConfig, Stage1Config
    from ka2l.augment.train import train_decoder
    from ka2l.probing.stage1 import run_stage1
    from ka2l.progress import TqdmProgress
    from ka2l.pools.sources import load_builtin
    from ka2l.store import queries as Q
    from ka2l.store import augment as S
    from ka2l.store.db import connect

    with connect() as db:
        names = [p["name"] for p in Q.list_pools(db)]
        for name in ("capitals", "elements"):
            if name not in names:
                Q.insert_pool(db, load_builtin(f"demo:{name}"))
    t0 = time.perf_counter()
    run_id = run_stage1("capitals", Stage1Config(sampling=SamplingConfig(k=args.k, max_new_tokens=16)), progress=TqdmProgress())
    stage1_s = time.perf_counter() - t0
    with connect() as db:
        probe = Q.list_probes(db, run_id)[0]
        pool_id = Q.get_pool(db, "capitals")["id"]
        unknown = [r["question_id"] for r in Q.load_scores(db, run_id) if r["bise"] == 1][: args.sources]

    cfg = DecoderConfig(probe_id=probe["id"], extra_pools=("elements",), epochs=1000, max_minutes=args.minutes, eval_size=64, device="cpu")
    t0 = time.perf_counter()
    decoder_id = train_decoder(cfg, progress=TqdmProgress())
    train_wall = time.perf_counter() - t0
    with connect() as db:
        d = S.get_decoder(db, decoder_id)
        losses = S.losses(db, decoder_id)

    curation.add(pool_id, unknown, source="bench")
    gen = GenerateConfig(decoder_id=decoder_id, source="curation", per_question=args.per_question, noise=0.1, temperature=0.8, device="cpu")
    t0 = time.perf_counter()
    gen_id = generate_candidates(gen, progress=TqdmProgress())
    gen_wall = time.perf_counter() - t0
    with connect() as db:
        summary = S.get_generation(db, gen_id)["summary"]
        examples = [{"source": c["source_question"], "candidate": c["text"], "p_unknown": round(c["p_unknown"], 3),
                     "nearest": c["nearest_question"], "similarity": round(c["nearest_similarity"], 3)}
                    for c in S.candidates(db, pool_id)[:10]]

    m = d["metrics"]
    result = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()},
        "stage1": {"run_id": run_id, "k": args.k, "seconds": stage1_s, "probe_layer": probe["layer"], "unknown_used": len(unknown)},
        "decoder": {"backbone": d["backbone"], "layer": d["layer"], "pooling": d["pooling"], "n_train": m["n_train"], "n_heldout": m["n_heldout"],
                    "budget_minutes": args.minutes, "steps": m["steps"], "train_seconds": m["train_seconds"], "stopped_by": m["stopped"],
                    "wall_seconds_incl_eval": train_wall, "epochs_done": m["steps"] * cfg.batch_size / m["n_train"],
                    "loss_first_20": sum(r["loss"] for r in losses[:20]) / max(1, len(losses[:20])),
                    "loss_last_20": sum(r["loss"] for r in losses[-20:]) / max(1, len(losses[-20:])),
                    "reconstruction": {w: {s: {k: v for k, v in m[w][s].items() if k != "examples"} for s in ("heldout", "train")} for w in ("before", "after")},
                    "heldout_examples": m["after"]["heldout"]["examples"]},
        "generation": {**summary, "wall_seconds": gen_wall, "examples": examples},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    r = result["decoder"]["reconstruction"]
    print(f"decoder {decoder_id}: {m['steps']} steps in {m['train_seconds']:.0f} s of training ({m['stopped']})")
    for w in ("before", "after"):
        for s in ("heldout", "train"):
            print(f"  {w:<6} {s:<7} BLEU {r[w][s]['bleu']:5.1f}  ROUGE-L {r[w][s]['rouge_l']:5.1f}  exact {r[w][s]['exact']:5.1f}%  (n={r[w][s]['n']})")
    print(f"generation: {summary['generated']} candidates at {summary['candidates_per_s']:.2f}/s (decode + filter + re-probe), "
          f"{100 * summary['survival_share']:.0f}% survive the filters, {100 * summary['unknown_share_of_kept']:.0f}% of those re-probed unknown")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
