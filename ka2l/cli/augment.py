"""Stage 2 commands of ``python -m ka2l``: train a decoder, generate candidates, export the approved set."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import GENERATE_SOURCES, POOLINGS, DecoderConfig, FilterConfig, GenerateConfig, from_dict, to_dict
from ..errors import ConfigError
from .parsing import add_command, add_launcher_flags, add_run_flags, submit_job

GROUP = "Stage 2: augmentation"


def _options(args: argparse.Namespace, mapping: dict[str, str]) -> dict[str, Any]:
    return {field: getattr(args, flag) for flag, field in mapping.items() if getattr(args, flag) is not None}


def _submit(kind: str, config: dict[str, Any]) -> int:
    return submit_job(kind, config, "the app's Augment or Jobs page,")


def _cmd_decoder_train(args: argparse.Namespace) -> int:
    from ..augment.train import train_decoder
    from ..progress import TqdmProgress

    cfg = from_dict(DecoderConfig, {"probe_id": args.probe, **_options(args, {
        "backbone": "backbone", "pooling": "pooling", "layer": "layer", "epochs": "epochs", "minutes": "max_minutes", "lr": "lr",
        "batch_size": "batch_size", "device": "device", "seed": "seed", "launcher": "launcher", "num_processes": "num_processes",
        "accelerate_config": "accelerate_config"}),
        **({"extra_pools": tuple(args.extra_pool)} if args.extra_pool else {}),
        **({"train_backbone": False} if args.frozen_backbone else {})})
    if args.background and args.no_resume:
        raise ConfigError("--background always resumes a matching decoder (a job continues where it stopped); "
                          "drop --no-resume, or run `decoder-train` without --background to train a new one.")
    if args.background:
        return _submit("decoder", {"decoder": to_dict(cfg)})
    decoder_id = train_decoder(cfg, progress=TqdmProgress(disable=args.quiet), resume=not args.no_resume)
    print(format_decoder(decoder_id))
    return 0


def format_decoder(decoder_id: int) -> str:
    from ..store import augment as S
    from ..store.db import connect

    with connect() as db:
        d = S.get_decoder(db, decoder_id)
    m = d["metrics"]
    lines = [f"decoder {d['id']}: {d['backbone']} · layer {d['layer']} ({d['pooling']}) · {d['status']} · step {d['step']}/{d['total_steps'] or '?'}"]
    for when in ("before", "after"):
        for split in ("heldout", "train"):
            r = m.get(when, {}).get(split)
            if r and r.get("n"):
                lines.append(f"  {when:<6} training, {split:<7} (n={r['n']:>3}): BLEU {r['bleu']:5.1f}  ROUGE-L {r['rouge_l']:5.1f}  exact {r['exact']:5.1f}%")
    if m.get("train_seconds") is not None:
        lines.append(f"  trained {m['steps']} steps in {m['train_seconds']:.0f} s (stopped by {m['stopped']})")
    return "\n".join(lines)


def _cmd_decoders(args: argparse.Namespace) -> int:
    from ..store import queries as Q
    from ..store import augment as S
    from ..store.db import connect

    with connect() as db:
        pool_id = Q.get_pool(db, args.pool)["id"] if args.pool else None
        rows = S.list_decoders(db, pool_id)
    if not rows:
        print("no decoders yet: train one with `python -m ka2l decoder-train --probe ID`")
    for d in rows:
        print(format_decoder(d["id"]))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from ..augment.candidates import generate_candidates
    from ..progress import TqdmProgress
    from ..store import augment as S
    from ..store.db import connect

    filters = from_dict(FilterConfig, _options(args, {"similarity": "similarity", "max_chars": "max_chars"}))
    cfg = from_dict(GenerateConfig, {"decoder_id": args.decoder, **_options(args, {
        "source": "source", "per_question": "per_question", "noise": "noise", "temperature": "temperature", "seed": "seed",
        "device": "device"})})
    cfg = from_dict(GenerateConfig, {**to_dict(cfg), "filters": to_dict(filters)})
    if args.background:
        return _submit("generate", {"generate": to_dict(cfg)})
    gen_id = generate_candidates(cfg, progress=TqdmProgress(disable=args.quiet))
    with connect() as db:
        s = S.get_generation(db, gen_id)["summary"]
    print(f"generation {gen_id}: {s['generated']} candidates, {s['kept']} kept ({100 * s['survival_share']:.0f}%), "
          f"{100 * s['unknown_share_of_kept']:.0f}% of kept re-probed unknown")
    for reason, n in sorted(s["dropped"].items(), key=lambda kv: -kv[1]):
        print(f"  dropped {n:>4}: {reason}")
    return 0


def _cmd_approved(args: argparse.Namespace) -> int:
    import pandas as pd

    from ..views.export import to_jsonl, to_safe_csv
    from ..augment.review import approved_set
    from ..store import queries as Q
    from ..store.db import connect

    out = Path(args.out)
    if out.suffix not in (".jsonl", ".csv"):
        raise ConfigError(f"--out must end in .jsonl or .csv, got {out.name!r}.")
    with connect() as db:
        pool_id = Q.get_pool(db, args.pool)["id"]
    frame = pd.DataFrame(approved_set(pool_id))
    out.write_bytes(to_jsonl(frame) if out.suffix == ".jsonl" else to_safe_csv(frame))
    kinds = frame["kind"].value_counts().to_dict() if len(frame) else {}
    print(f"wrote {len(frame)} questions to {out}: {kinds.get('original', 0)} original, {kinds.get('decoded', 0)} decoded")
    return 0


def add_commands(sub) -> None:
    p = add_command(sub, GROUP, "decoder-train", "Stage 2: train a hidden-state -> question decoder on a probe's pool (resumable)")
    p.add_argument("--probe", type=int, required=True, help="probe id (see `runs`): gives the model, the layer and the pool")
    p.add_argument("--backbone", help="causal LM or seq2seq model (hub id, folder), the embedded model (default) or t5-scratch")
    p.add_argument("--pooling", choices=POOLINGS, help="mean-pooled question states (default) or the last prompt token")
    p.add_argument("--layer", type=int, help="layer to decode (default: the probe's)")
    p.add_argument("--epochs", type=int, help="passes over the training questions (default 10)")
    p.add_argument("--minutes", type=float, help="time budget in minutes for the whole job: vectors, reports, training, saving (default: none)")
    p.add_argument("--lr", type=float, help="learning rate (default 2e-4)")
    p.add_argument("--batch-size", type=int, help="questions per step (default 8)")
    p.add_argument("--extra-pool", action="append", help="a stored pool whose questions are extra training data (repeatable)")
    p.add_argument("--frozen-backbone", action="store_true", help="train the projection only")
    p.add_argument("--device", help="auto, cpu, cuda, mps")
    p.add_argument("--seed", type=int, help="seed for the held-out split, initialisation and data order (default 0)")
    add_launcher_flags(p, "the training steps run", "each takes its share of every batch",
                       ": a DDP (MULTI_GPU) one; the decoder is not sharded")
    p.add_argument("--no-resume", action="store_true", help="train a new decoder even if one with this config exists")
    add_run_flags(p)
    p.set_defaults(func=_cmd_decoder_train)

    p = add_command(sub, GROUP, "decoders", "list decoders with their reconstruction BLEU / ROUGE-L")
    p.add_argument("--pool", help="only decoders trained on this pool")
    p.set_defaults(func=_cmd_decoders)

    p = add_command(sub, GROUP, "generate", "Stage 2: decode new candidate questions from unknown questions, filter and re-probe them")
    p.add_argument("--decoder", type=int, required=True, help="decoder id (see `decoders`)")
    p.add_argument("--source", choices=GENERATE_SOURCES, help="unknown questions of the run (default) or the curation set")
    p.add_argument("--per-question", type=int, help="candidates per source question (default 4)")
    p.add_argument("--noise", type=float, help="noise as a share of the vector norm (default 0.1)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default 0.8; 0 = greedy)")
    p.add_argument("--similarity", type=float, help="near-duplicate cosine threshold (default 0.97)")
    p.add_argument("--max-chars", type=int, help="drop longer candidates (default 300)")
    p.add_argument("--seed", type=int, help="a new seed makes a new batch; the same seed reuses a finished one")
    p.add_argument("--device", help="auto, cpu, cuda, mps")
    add_run_flags(p)
    p.set_defaults(func=_cmd_generate)

    p = add_command(sub, GROUP, "approved", "export a pool's approved set (curated originals + approved candidates)")
    p.add_argument("--pool", required=True, help="pool name or id")
    p.add_argument("--out", required=True, help="a .jsonl or .csv file to write")
    p.set_defaults(func=_cmd_approved)

