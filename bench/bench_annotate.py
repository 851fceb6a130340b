"""Stage 3a benchmark: push and pull of 10,000 tasks against a real local Label Studio, and the time
to rank 10,000 questions for annotation. Writes bench/results/annotate.json.

    .venv/bin/python bench/bench_annotate.py [--n 10000] [--batch-sizes 200 1000] [--annotate-threads 4]

Needs Label Studio in .venv-ls (`make setup`). The server is started and stopped here by
``ka2l.annotate.server`` in a temporary folder (its own data and HOME), on a free loopback port; ka2l's
data folder is temporary too. Nothing outside the two temporary folders is touched.

What is real and what is synthetic:

- the pool: 10,000 synthetic questions written to a CSV and imported with the pool import of
  ``python -m ka2l import`` (``read_pool`` + ``insert_pool``);
- the Stage 1 run: NOT run (10,000 questions x 11 generations of SmolLM2 would take hours). Its rows are
  written through ``ka2l.store`` functions: a hidden-state array (n, 31, 576) float16 of clustered
  random vectors, one low-temperature answer and 10 sampled answers per question (``insert_answers``),
  their clustering and scores (``insert_scores``), BiSE labels by Stage 1's own thresholding
  (``_stage_labels``) and a logistic probe trained on layer 14 by ``probe_layers`` (``insert_probe``);
- the approved set: all 10,000 questions curated (``curation.add``); no decoded candidates, so the
  ranking space is the probe layer's states (d = 576);
- push and pull: the project's own ``push()`` / ``pull()``, reading the connection from
  KA2L_LABEL_STUDIO_URL / _TOKEN as a job does, each in a fresh Python process so its peak memory
  (VmHWM) is its own; the ranking inside push is included in push's time and reported apart;
- the pulled project: annotating 10,000 tasks one by one through the adapter (``Client.create_annotation``,
  as a person's submit would be) took 0.2 s a call one at a time and ~25 calls/s with 4 threads on a
  2-core machine (7 to 35 minutes for 10,000), so the project pull reads is made in bulk instead: ``push.new_project`` records it, ``push.items`` ranks the approved set,
  each task is ``push.task_of`` (exactly what push sends) plus an ``annotations`` list, imported through
  the adapter's ``Client.import_tasks`` in batches of 1,000, and linked in ka2l's store with
  ``store.annotate.add_links`` as push links them. Annotations: mostly an answer, every 20th task "cannot
  answer", every 50th skipped (was_cancelled), every 25th a second, different answer (a conflict). The
  rate of ``create_annotation`` itself is measured on a sample of the first pushed project's tasks.

Machines are noisy and this one may be shared: the load average is recorded with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POOL = "bench-annotate"
LAYERS, DIM, PROBE_LAYER, K = 30, 576, 14, 10


def rss_mb() -> float:
    """Peak resident set size of this process so far, in MB: VmHWM of /proc/self/status on Linux. Not
    ``ru_maxrss``: a child started by fork/vfork + exec inherits the parent's peak there (the kernel folds
    the pre-exec memory into it), so a phase's own process would report the parent's 1 GB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class StageTimes:
    """A Progress that records when each stage starts (push: ranking, pushing tasks; pull: exporting
    annotations, storing annotations)."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []

    def stage(self, name, total=None, done=0):
        self.marks.append((name, time.perf_counter()))

    def advance(self, n=1, message=None):
        pass

    def close(self):
        pass

    def seconds(self, end: float) -> dict[str, float]:
        out = {}
        for (name, t), nxt in zip(self.marks, [m[1] for m in self.marks[1:]] + [end]):
            out[name] = round(nxt - t, 2)
        return out


# -- the synthetic store --------------------------------------------------------------------------

def build_store(n: int, folder: Path, seed: int = 0) -> dict:
    """The pool (imported from a CSV), the Stage 1 rows and the approved set; see the module docstring."""
    import csv

    import numpy as np

    from ka2l.config import ProbeConfig, Stage1Config, config_hash, to_dict
    from ka2l.models.llm import Generation
    from ka2l.paths import arrays_dir, probes_dir
    from ka2l.pools.reader import read_pool
    from ka2l.probing.probes import probe_layers, save_probe
    from ka2l.probing.runs import versions
    from ka2l.probing.stage1 import _stage_labels
    from ka2l.store import curation
    from ka2l.store import queries as Q
    from ka2l.store.arrays import create_array
    from ka2l.store.db import connect

    rng = np.random.default_rng(seed)
    topics = ["river", "mountain", "treaty", "enzyme", "composer", "novel", "satellite", "dynasty", "theorem", "island"]
    path = folder / f"{POOL}.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "question", "answer"])
        for i in range(n):
            w.writerow([f"b{i}", f"Which {topics[i % len(topics)]} is described by synthetic fact number {i}?", f"answer {i}"])
    pool = read_pool(path, name=POOL)  # what `python -m ka2l import FILE` does
    with connect() as db:
        pool_id = Q.insert_pool(db, pool)
        qids = [q["id"] for q in Q.pool_questions(db, pool_id)]
    cfg = Stage1Config(probe=ProbeConfig(kind="logistic", bootstrap=0))
    signal = rng.integers(0, 2, n)  # 1 = "unknown"
    with connect() as db:
        run_id = Q.create_run(db, pool_id, "stage1", to_dict(cfg), config_hash(cfg), "synthetic (bench_annotate)", versions())
        hpath = arrays_dir() / f"run-{run_id}-hidden.npy"
        hidden = create_array(hpath, (n, LAYERS + 1, DIM))
        centres = rng.normal(size=(50, LAYERS + 1, DIM)) * 2.0  # 50 "topics": near-copies for MMR to spread
        topic = rng.integers(0, 50, n)
        for s in range(0, n, 1000):
            e = min(n, s + 1000)
            block = centres[topic[s:e]] + rng.normal(size=(e - s, LAYERS + 1, DIM))
            block[:, PROBE_LAYER] += signal[s:e, None] * 0.5
            hidden[s:e] = block.astype(np.float16)
        hidden.flush()
        Q.update_run(db, run_id, hidden_path=str(hpath), n_layers=LAYERS, hidden_size=DIM)
        per_question, score_rows = {}, []
        for i, q in enumerate(qids):
            n_clusters = int(1 + signal[i] * rng.integers(1, 5))  # known: one answer; unknown: 2-5 distinct answers
            cluster_ids = sorted(rng.integers(0, n_clusters, K).tolist())
            gen = lambda text: Generation(text=text, token_logprobs=(-0.1, -0.2, -0.3), token_ids=(1, 2, 3))  # noqa: E731
            per_question[q] = (gen(f"answer {i}"), [gen(f"answer {i}" if c == 0 else f"guess {c} for {i}") for c in cluster_ids])
            se = float(np.clip(rng.normal(0.3 + 1.2 * signal[i], 0.3), 0, None))
            score_rows.append({"question_id": q, "cluster_ids": cluster_ids, "n_clusters": len(set(cluster_ids)), "judge_calls": 45,
                               "verdicts": [], "se": se, "se_weighted": se * 0.9, "regular_entropy": se + 1, "mean_loglik": -0.2,
                               "correct": int(signal[i] == 0)})
        Q.insert_answers(db, run_id, per_question)
        Q.insert_scores(db, run_id, score_rows)
        _stage_labels(db, run_id, cfg)
        bise = [r["bise"] for r in Q.load_scores(db, run_id)]
    res = probe_layers(hidden, bise, cfg.probe, layers=[PROBE_LAYER])
    ppath = save_probe(probes_dir() / f"run-{run_id}", res.net, "logistic", PROBE_LAYER, cfg.probe, {"target": "bise"})
    metrics = {"split": res.split.to_dict(), "best_layer": PROBE_LAYER, "baselines": [], "robustness": [], "test_auroc": res.best.test_auroc,
               "test_ci": [res.best.test_ci_low, res.best.test_ci_high], "val_auroc": res.best.val_auroc, "test_auroc_correct": None}
    with connect() as db:
        Q.insert_probe(db, run_id, "logistic", "bise", PROBE_LAYER, str(ppath), to_dict(cfg.probe), metrics, [vars(s) for s in res.layers])
        Q.update_run(db, run_id, status="done", stage="done")
    curation.add(pool_id, qids, "bench")
    return {"pool_id": pool_id, "run_id": run_id, "probe_test_auroc": round(float(res.best.test_auroc), 3)}


# -- ranking ----------------------------------------------------------------------------------------

def time_ranking(pool_id: int, diversity: float, limit: int) -> dict:
    """rank_for_annotation on the pool's P(unknown) and probe-layer states, as push computes them."""
    import numpy as np

    from ka2l.annotate.ordering import rank_for_annotation
    from ka2l.probing.probes import load_probe, predict_unknown
    from ka2l.store import queries as Q
    from ka2l.store.arrays import open_array
    from ka2l.store.db import connect

    with connect() as db:
        run = Q.latest_run(db, "stage1", pool_id)
        net, meta = load_probe(Q.list_probes(db, run["id"])[-1]["path"])
        states = np.asarray(open_array(run["hidden_path"])[:, meta["layer"]], dtype=np.float32)
    p = predict_unknown(net, states)
    out = {"n": int(states.shape[0]), "d": int(states.shape[1]), "diversity": diversity}
    for name, lim in (("full_mmr_s", None), (f"mmr_limit_{limit}_s", limit)):
        t0 = time.perf_counter()
        rank_for_annotation(p, states, diversity=diversity, limit=lim)
        out[name] = round(time.perf_counter() - t0, 2)
        out[name.replace("_s", "_load")] = load()
    return out


# -- one measured phase, in a fresh process ------------------------------------------------------------

def phase(args: argparse.Namespace) -> None:
    """Run push / re-push / pull in this (fresh) process; print one JSON line with time and memory."""
    from ka2l.annotate import pull as PL
    from ka2l.annotate import push as P
    from ka2l.config import PullConfig, PushConfig

    base = rss_mb()
    prog = StageTimes()  # "setup": from the call to its first stage (reading the store, the project)
    if args.phase == "push":
        if args.new_project:
            from ka2l.annotate.connection import require
            from ka2l.annotate.labelstudio import Client

            P.new_project(POOL, args.title, Client.from_connection(require()))  # the pool's newest: push (project 0) goes there
        cfg = PushConfig(title=args.title, batch_size=args.batch_size)
        t0 = time.perf_counter()
        prog.stage("setup")
        result = P.push(POOL, cfg, progress=prog)
    else:
        t0 = time.perf_counter()
        prog.stage("setup")
        result = PL.pull(POOL, PullConfig(project=args.project), progress=prog)
    end = time.perf_counter()
    print(json.dumps({"seconds": round(end - t0, 2), "stages_s": prog.seconds(end), "result": result,
                      "rss_before_mb": round(base, 1), "peak_rss_mb": round(rss_mb(), 1), "load": load()}))


def run_phase(env: dict, *argv: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--phase", *argv], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"phase {argv} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- annotations --------------------------------------------------------------------------------------

def _results(i: int) -> list[dict]:
    """The annotations of the i-th task (see the module docstring)."""
    from ka2l.annotate.push import ANSWER, CANNOT, CANNOT_CHOICE, QUESTION

    def text(t: str) -> list[dict]:
        return [{"from_name": ANSWER, "to_name": QUESTION, "type": "textarea", "value": {"text": [t]}}]

    if i % 50 == 0:
        return [{"result": [], "was_cancelled": True}]
    if i % 20 == 0:
        out = [{"result": [{"from_name": CANNOT, "to_name": QUESTION, "type": "choices", "value": {"choices": [CANNOT_CHOICE]}}],
                "lead_time": 12.5}]
    else:
        out = [{"result": text(f"Answer {i}."), "lead_time": 12.5}]
    if i % 25 == 0:
        out.append({"result": text(f"another answer {i}"), "lead_time": 8.0})
    return out


def annotated_project(url: str, token: str, diversity: float, batch: int = 1000) -> dict:
    """A project holding every approved item as push would send it, each with its annotations imported
    with it; returns ka2l's project row id and how long building it took."""
    from ka2l.annotate import push as P
    from ka2l.annotate.labelstudio import Client
    from ka2l.store import annotate as A
    from ka2l.store.db import connect

    client = Client(url, token, timeout=120)
    t0 = time.perf_counter()
    row = P.new_project(POOL, "bench pull", client)
    ranked = P.items(POOL, diversity).to_dict("records")
    made = 0
    for s in range(0, len(ranked), batch):
        tasks = []
        for i, item in enumerate(ranked[s:s + batch], start=s):
            task = P.task_of(item, POOL, i + 1)
            task["annotations"] = _results(i)
            made += len(task["annotations"])
            tasks.append(task)
        ids = client.import_tasks(row["project_id"], tasks)
        with connect() as db:
            A.add_links(db, row["id"], [{"item_key": t["data"]["ka2l_key"], "task_id": tid, "question": t["data"][P.QUESTION],
                                         "rank": t["data"]["rank"]} for t, tid in zip(tasks, ids)])
    return {"project": row["id"], "tasks": len(ranked), "annotations": made, "seconds": round(time.perf_counter() - t0, 1),
            "load": load()}


def annotation_rate(url: str, token: str, project: int, n: int, threads: int) -> dict:
    """``Client.create_annotation`` on the first ``n`` tasks of ka2l's project ``project`` (one each)."""
    from ka2l.annotate.labelstudio import Client
    from ka2l.store import annotate as A
    from ka2l.store.db import connect

    with connect() as db:
        links = A.links(db, project)[:n]
    local = threading.local()

    def one(i_link) -> int:
        i, link = i_link
        if not hasattr(local, "c"):
            local.c = Client(url, token)
        for a in _results(i)[:1]:
            local.c.create_annotation(link["task_id"], a["result"], lead_time=a.get("lead_time"), was_cancelled=a.get("was_cancelled", False))
        return 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        made = sum(ex.map(one, enumerate(links)))
    seconds = time.perf_counter() - t0
    return {"annotations": made, "threads": threads, "seconds": round(seconds, 1), "annotations_per_s": round(made / seconds, 1),
            "load": load()}


def server_peak_mb(pid: int) -> float | None:
    """The Label Studio server process's own peak RSS (VmHWM), read before it stops."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[200, 1000],
                    help="one push per batch size, each into its own new project (the first is PushConfig's default)")
    ap.add_argument("--diversity", type=float, default=0.3)
    ap.add_argument("--annotate-threads", type=int, default=4, help="threads creating the sample of single annotations")
    ap.add_argument("--annotation-sample", type=int, default=300, help="single create_annotation calls timed")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "annotate.json"))
    ap.add_argument("--phase", choices=["push", "pull"], help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--title", default="", help=argparse.SUPPRESS)
    ap.add_argument("--new-project", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--project", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        phase(args)
        return

    from ka2l.annotate import server
    from ka2l.annotate.push import RANK_MMR_LIMIT
    from ka2l.config import PushConfig

    if not server.installed():
        raise SystemExit(f"Label Studio is not installed in {server.venv_dir()}: run `make setup` first.")
    out: dict = {"n_tasks": args.n, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_at_start": load()},
                 "synthetic": __doc__.split("What is real and what is synthetic:")[1].split("Machines are noisy")[0].strip()}
    with tempfile.TemporaryDirectory(prefix="ka2l-bench-annotate-") as tmp:
        tmp = Path(tmp)
        os.environ["KA2L_DATA_DIR"] = str(tmp / "data")
        t0 = time.perf_counter()
        built = build_store(args.n, tmp)
        out["build_store_s"] = round(time.perf_counter() - t0, 1)
        out["store"] = built
        print(f"store built in {out['build_store_s']} s (probe test AUROC {built['probe_test_auroc']})", flush=True)

        out["ranking"] = time_ranking(built["pool_id"], args.diversity, RANK_MMR_LIMIT)
        print(f"ranking: {out['ranking']}", flush=True)

        t0 = time.perf_counter()
        info = server.start(folder=tmp / "labelstudio", save_connection=False)
        out["server_start_s"] = round(time.perf_counter() - t0, 1)
        try:
            from importlib.metadata import version

            out["machine"]["label_studio_sdk"] = version("label-studio-sdk")
            env = {**os.environ, "KA2L_LABEL_STUDIO_URL": info.url, "KA2L_LABEL_STUDIO_TOKEN": info.token}
            out["push"] = []
            for i, bs in enumerate(args.batch_sizes):
                r = run_phase(env, "push", "--batch-size", str(bs), "--title", f"bench push {bs}", *(["--new-project"] if i else []))
                pushing = r["stages_s"].get("pushing tasks")
                r.update(batch_size=bs, default_batch_size=bs == PushConfig().batch_size, tasks_per_s=round(r["result"]["pushed"] / r["seconds"], 1),
                         tasks_per_s_sending_only=round(r["result"]["pushed"] / pushing, 1) if pushing else None)
                out["push"].append(r)
                print(f"push (batch {bs}): {r['result']['pushed']} tasks in {r['seconds']} s = {r['tasks_per_s']} tasks/s "
                      f"(ranking {r['stages_s'].get('ranking')} s, sending {pushing} s = {r['tasks_per_s_sending_only']} tasks/s); "
                      f"peak RSS {r['peak_rss_mb']} MB (after imports {r['rss_before_mb']} MB); load {r['load']}", flush=True)
                if i == 0:
                    first = r["result"]["project"]
                    rp = run_phase(env, "push", "--batch-size", str(bs), "--title", f"bench push {bs}")
                    out["repush_unchanged"] = rp
                    print(f"re-push unchanged: {rp['result']['pushed']} sent, {rp['result']['skipped']} skipped in {rp['seconds']} s "
                          f"(ranking {rp['stages_s'].get('ranking')} s); peak RSS {rp['peak_rss_mb']} MB", flush=True)

            out["create_annotation_sample"] = annotation_rate(info.url, info.token, first, args.annotation_sample, args.annotate_threads)
            print(f"create_annotation through the adapter: {out['create_annotation_sample']}", flush=True)
            out["annotated_project"] = annotated_project(info.url, info.token, args.diversity)
            pulled = out["annotated_project"]["project"]
            print(f"project to pull (tasks imported with their annotations): {out['annotated_project']}", flush=True)
            out["pull"] = run_phase(env, "pull", "--project", str(pulled))
            p = out["pull"]
            p["tasks_per_s"] = round(p["result"]["tasks"] / p["seconds"], 1)
            p["annotations_per_s"] = round(p["result"]["annotations"] / p["seconds"], 1)
            print(f"pull: {p['result']['tasks']} tasks, {p['result']['annotations']} annotations in {p['seconds']} s = {p['tasks_per_s']} tasks/s "
                  f"(export {p['stages_s'].get('exporting annotations')} s, storing {p['stages_s'].get('storing annotations')} s); "
                  f"peak RSS {p['peak_rss_mb']} MB (after imports {p['rss_before_mb']} MB); load {p['load']}", flush=True)
            again = run_phase(env, "pull", "--project", str(pulled))
            out["pull_again"] = again
            print(f"pull again (nothing new): {again['result']['added']} added, {again['result']['updated']} updated in {again['seconds']} s; "
                  f"peak RSS {again['peak_rss_mb']} MB", flush=True)
            out["label_studio_server_peak_rss_mb"] = server_peak_mb(info.pid)
        finally:
            server.stop(tmp / "labelstudio")
    out["machine"]["load_at_end"] = load()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print(f"\nwritten {args.out}")
    summary = {"push_tasks_per_s": [(r["batch_size"], r["tasks_per_s"]) for r in out["push"]],
               "push_peak_rss_mb": [(r["batch_size"], r["peak_rss_mb"]) for r in out["push"]],
               "repush_unchanged_s": out["repush_unchanged"]["seconds"], "pull_tasks_per_s": out["pull"]["tasks_per_s"],
               "pull_peak_rss_mb": out["pull"]["peak_rss_mb"], "rank_full_s": out["ranking"]["full_mmr_s"],
               f"rank_limit_{RANK_MMR_LIMIT}_s": out["ranking"][f"mmr_limit_{RANK_MMR_LIMIT}_s"],
               "label_studio_server_peak_rss_mb": out["label_studio_server_peak_rss_mb"]}
    for k, v in summary.items():
        print(f"{k:<32} {v}")


if __name__ == "__main__":
    main()
