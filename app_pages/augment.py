"""Augment (Stage 2): train a hidden-state decoder, decode new questions from the unknowns, review them."""

import pandas as pd
import streamlit as st

from ka2l import jobs
from ka2l.config import EMBEDDED_MODEL, GENERATE_SOURCES, LAUNCHERS, POOLINGS, T5_SCRATCH, DecoderConfig, field_help
from ka2l.errors import Ka2lError
from ka2l.ui import actions, data
from ka2l.ui.jobs_panel import job_panel
from ka2l.ui.review_card import review_queue
from ka2l.ui.state import flash, require_run, show_flash

STEPS = {"decoder": "1 · Decoder", "generate": "2 · Generate", "review": "3 · Review", "approved": "4 · Approved set"}
LIVE_SECONDS = 2  # how often the loss curve of a decoder in training is redrawn

st.title("Augment: decode new unknown questions")
pool, run = require_run()
show_flash("augment")
# The step lives in the URL (?step=review), so a reload or a shared link opens the same step.
section = st.segmented_control("Step", list(STEPS), format_func=STEPS.get, default="decoder", required=True, key="step",
                               bind="query-params", label_visibility="collapsed") or "decoder"
decoders = data.decoders(pool["id"])
done = [d for d in decoders if d["status"] == "done"]


def _decoder_states(rows: list[dict]) -> tuple:
    return tuple((d["id"], d["status"]) for d in rows)


def _watch_decoders(seen: tuple) -> None:
    """While a decoder job is queued or running, redraw the page once its decoder appears or starts training,
    so the live loss curve below shows without a reload (also for a pool's first decoder)."""
    if _decoder_states(data.decoders(pool["id"])) != seen:
        st.rerun(scope="app")


def _label(d: dict) -> str:
    held = d["metrics"].get("after", {}).get("heldout", {})
    score = f" · held-out BLEU {held['bleu']:.1f}" if held.get("n") else ""
    return f"Decoder {d['id']} · {d['backbone'].split('/')[-1]} · layer {d['layer']} ({d['pooling']}) · {d['status']}{score}"


def _loss_curve(decoder_id: int, was_training: bool) -> None:
    """The decoder's loss curve; while it trains, a fragment redraws it every LIVE_SECONDS without a reload."""
    d = next(x for x in data.decoders(pool["id"]) if x["id"] == decoder_id)
    losses = data.decoder_losses(decoder_id)
    if losses:
        st.line_chart(pd.DataFrame(losses).set_index("step")["loss"], height=220)
    if d["status"] == "training":
        st.caption(f"Training: step {d['step']} of {d['total_steps'] or '?'} · the curve updates every {LIVE_SECONDS} s.")
    elif was_training:
        st.rerun(scope="app")  # it just finished: redraw the page with its report


def _submit(kind: str, cfg: dict) -> None:
    try:
        job_id = jobs.submit(kind, {"pool": pool["name"], kind: cfg})
        st.success(f"Job {job_id} submitted; it keeps running if you reload or close the tab.")
    except jobs.JobPending as exc:  # the same work is already queued or running: not an error
        st.info(str(exc))
    except Ka2lError as exc:
        st.error(str(exc))


if section == "decoder":
    probes = actions.probes_of_run(run["id"])
    s = actions.settings.load()
    with st.expander("Train a new decoder", expanded=not decoders):
        others = [p["name"] for p in data.pools() if p["id"] != pool["id"]]
        up = st.file_uploader("Add an extra question corpus (.txt one per line, or a one-column CSV / JSONL)", type=["txt", "csv", "tsv", "jsonl", "json", "parquet"])
        if up is not None and st.button("Store corpus"):
            try:
                corpus = actions.read_corpus(up.name, up.getvalue())
                actions.store_pool(corpus, corpus.name)
                flash("augment", f"Stored {len(corpus.rows)} questions as pool {corpus.name!r}; pick it below." +
                      (f" {len(corpus.skipped)} rows skipped." if corpus.skipped else ""))
                st.rerun()  # the message shows on the next run, where the new pool is in the list
            except Ka2lError as exc:
                st.error(str(exc))
        with st.form("train-decoder"):
            c = st.columns(3)
            probe_id = c[0].selectbox("Probe (gives the layer)", [p["id"] for p in probes],
                                      format_func=lambda i: next(f"Probe {p['id']} · {p['kind']} · layer {p['layer']}" for p in probes if p["id"] == i))
            backbone = c[1].text_input("Backbone", value=run["model"] or EMBEDDED_MODEL,
                                       help=f"Default: the probed model itself, fed a soft prefix. Or another causal LM, a seq2seq model "
                                            f"such as t5-base (hub id or folder), or {T5_SCRATCH!r} for a small T5 built from config.")
            pooling = c[2].selectbox("Input vector", POOLINGS, format_func={"mean": "mean-pooled question states", "last": "last prompt token"}.get)
            c = st.columns(4)
            epochs = c[0].number_input("Epochs", 1, 200, 10)
            minutes = c[1].number_input("Time budget (min, 0 = none)", 0.0, 1440.0, 10.0,
                                        help="The whole job's time: question vectors, the reconstruction reports before and after, "
                                             "training and saving. Reports decode only as many questions as fit, and training stops "
                                             "in time for the last one. Counted across resumes.")
            lr = c[2].number_input("Learning rate", 1e-6, 1e-1, 2e-4, format="%.0e")
            batch = c[3].number_input("Batch size", 1, 256, 8)
            extra = st.multiselect("Extra training questions (stored pools)", others)
            full = st.checkbox("Train the backbone end to end (paper); off trains the projection only", value=True)
            helps = field_help(DecoderConfig)
            with st.expander("Several GPUs (accelerate launch)"):
                c = st.columns(3)
                launcher = c[0].selectbox("Launcher", LAUNCHERS, help=helps["launcher"])
                processes = c[1].number_input("Processes (GPUs)", 1, 1024, 1, help=helps["num_processes"])
                accelerate_config = c[2].text_input("accelerate config file (empty = DDP)", help=helps["accelerate_config"])
            if st.form_submit_button("Train decoder", type="primary"):
                _submit("decoder", {"probe_id": int(probe_id), "backbone": backbone.strip(), "pooling": pooling, "epochs": int(epochs),
                                    "max_minutes": float(minutes), "lr": float(lr), "batch_size": int(batch), "extra_pools": extra,
                                    "train_backbone": full, "device": s["device"], "launcher": launcher, "num_processes": int(processes),
                                    "accelerate_config": accelerate_config.strip()})
    job_panel(kinds=("decoder",), key="decoder")
    if any(j["kind"] == "decoder" and j["status"] in jobs.PENDING for j in jobs.list_jobs(limit=20)):
        st.fragment(_watch_decoders, run_every=LIVE_SECONDS)(_decoder_states(decoders))
    if decoders:
        chosen = st.selectbox("Decoder", [d["id"] for d in reversed(decoders)], format_func=lambda i: _label(next(d for d in decoders if d["id"] == i)))
        d = next(d for d in decoders if d["id"] == chosen)
        training = d["status"] == "training"
        st.fragment(_loss_curve, run_every=LIVE_SECONDS if training else None)(d["id"], training)
        m = d["metrics"]
        rows = [{"when": w, "questions": sp, "n": r["n"], "BLEU": r["bleu"], "ROUGE-L": r["rouge_l"], "exact %": r["exact"]}
                for w in ("before", "after") for sp in ("heldout", "train") if (r := m.get(w, {}).get(sp)) and r.get("n")]
        if rows:
            st.caption("Reconstruction of questions from their own vectors (greedy): held-out questions were never trained on.")
            st.dataframe(pd.DataFrame(rows), hide_index=True)
        if m.get("after", {}).get("heldout", {}).get("examples"):
            with st.expander("Held-out examples"):
                st.dataframe(pd.DataFrame(m["after"]["heldout"]["examples"]), hide_index=True)
        if d["error"]:
            st.error(d["error"])

elif section == "generate":
    if not done:
        st.info("No trained decoder for this pool yet: train one in step 1.")
    else:
        n_unknown, n_curated = len(data.unknown_ids(run["id"])), len(actions.curation.members(pool["id"]))
        gens = data.generations(pool["id"])
        with st.form("generate"):
            c = st.columns(3)
            decoder_id = c[0].selectbox("Decoder", [d["id"] for d in reversed(done)], format_func=lambda i: _label(next(d for d in done if d["id"] == i)))
            source = c[1].radio("Augment", GENERATE_SOURCES, format_func={"unknown": f"unknown questions of run {run['id']} ({n_unknown})",
                                                                          "curation": f"the curation set ({n_curated})"}.get)
            per_q = c[2].number_input("Candidates per question", 1, 32, 4)
            c = st.columns(5)
            noise = c[0].number_input("Noise (share of vector norm)", 0.0, 2.0, 0.1, step=0.05)
            temperature = c[1].number_input("Temperature (0 = greedy)", 0.0, 2.0, 0.8, step=0.1)
            similarity = c[2].number_input("Near-duplicate similarity", 0.5, 1.0, 0.97, step=0.01,
                                           help="Cosine similarity of centred vectors at or above which a candidate copies a pool "
                                                "question or an earlier candidate.")
            overlap = c[3].number_input("Near-duplicate word overlap", 0.05, 1.0, 0.9, step=0.05,
                                        help="Share of the shorter question's content words found in the other at or above which a "
                                             "candidate copies one (\"Who wrote '1984'?\" beside \"Who wrote the novel '1984'?\": 1.0).")
            seed = c[4].number_input("Seed (new seed = new batch)", 0, 10**6, len(gens))
            if st.form_submit_button("Generate candidates", type="primary"):
                _submit("generate", {"decoder_id": int(decoder_id), "source": source, "per_question": int(per_q), "noise": float(noise),
                                     "temperature": float(temperature), "seed": int(seed),
                                     "filters": {"similarity": float(similarity), "word_overlap": float(overlap)},
                                     "device": actions.settings.load()["device"]})
        job_panel(kinds=("generate",), key="generate")
        if gens:
            st.subheader("Batches")
            st.dataframe(pd.DataFrame([{"batch": g["id"], "decoder": g["decoder_id"], "status": g["status"], "source": g["config"]["source"],
                                        "noise": g["config"]["noise"], "generated": g["summary"].get("generated"), "kept": g["summary"].get("kept"),
                                        "survival": g["summary"].get("survival_share"), "re-probed unknown": g["summary"].get("unknown_share_of_kept"),
                                        "candidates/s": g["summary"].get("candidates_per_s"),
                                        "dropped": ", ".join(f"{k}: {v}" for k, v in g["summary"].get("dropped", {}).items())} for g in reversed(gens)]),
                         hide_index=True, column_config={"survival": st.column_config.NumberColumn(format="percent"),
                                                         "re-probed unknown": st.column_config.NumberColumn(format="percent"),
                                                         "candidates/s": st.column_config.NumberColumn(format="%.1f")})

elif section == "review":
    review_queue(pool["id"])

else:
    frame = actions.review.approved_set(pool["id"])
    n_orig, n_dec = int((frame["kind"] == "original").sum()), int((frame["kind"] == "decoded").sum())
    c = st.columns(3)
    c[0].metric("Original (curation set)", n_orig)
    c[1].metric("Approved decoded", n_dec)
    c[2].metric("Approved set", len(frame))
    unknown_ids = data.unknown_ids(run["id"])
    missing = sorted(set(unknown_ids) - {m["question_id"] for m in actions.curation.members(pool["id"])})
    if missing and st.button(f"Add the {len(missing)} unknown questions of run {run['id']} not yet in the curation set",
                             help="Or pick them one by one on the Scores and Map pages."):
        actions.curation.add(pool["id"], missing, source=f"augment/run {run['id']}")
        st.rerun()
    if frame.empty:
        st.info("Nothing approved yet: add unknown questions to the curation set (Scores or Map) and approve candidates in step 3.")
    else:
        st.dataframe(frame, hide_index=True, column_config={"question_id": None, "candidate_id": None, "source_question_id": None,
                                                            "ext_id": "pool id", "source_ext_id": "source pool id",
                                                            "answers": st.column_config.ListColumn("gold answers"),
                                                            "p_unknown": st.column_config.NumberColumn("P(unknown)", format="%.2f"),
                                                            "nearest_similarity": st.column_config.NumberColumn("similarity", format="%.3f")})
        c = st.columns(2)
        # Built eagerly: the approved set is small, and the file is then ready the moment it is clicked.
        c[0].download_button("Download JSONL", actions.export.to_jsonl(frame), file_name=f"{pool['name']}-approved.jsonl", mime="application/jsonl")
        c[1].download_button("Download CSV", actions.export.to_safe_csv(frame), file_name=f"{pool['name']}-approved.csv", mime="text/csv")
