"""Stage 1's and triage's model stages on a Ray cluster (``executor.kind == 'ray'``).

``ka2l.probing.stage1.run_stage1`` keeps the run (start / resume, dtype, status, labels, probes, report) and
hands its model stages here: the questions not stored yet are written as Parquet and read as a Ray
Dataset, mapped through actor pools (``HiddenActor`` -> ``SamplingActor`` -> ``JudgeActor``, each
``executor.num_actors`` actors with one model load each), written block by block as Parquet with Ray
Data's checkpointing on the question id, and ingested into the store (``ka2l.scale.ingest``), after which
the run continues locally exactly as a local run does. Triage runs the ``HiddenActor`` alone, at the
probe's layer; its probe scoring then runs locally on the stored states, as a local triage's does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from ..config import ExecutorConfig, Stage1Config, TriageConfig
from ..probing.runs import forget_lost_hidden_states, open_run_hidden
from ..probing.storage import check_hidden_space, model_dims
from ..progress import Progress
from ..store import queries as Q
from .actors import HiddenActor, JudgeActor, SamplingActor, model_spec
from .blocks import WorkDir
from .cluster import actor_cpus, ray_cluster
from .execute import ID_COLUMN, execute
from .ingest import Ingested, ingest

log = logging.getLogger(__name__)

STAGE = "ray: hidden states, answers, SE"
TRIAGE_STAGE = "ray: hidden states"


def _map(ds: Any, ray: Any, cls: type, kwargs: dict[str, Any], ex: ExecutorConfig, cpus: float, gpus: float) -> Any:
    """One actor pool over the dataset: ``ex.num_actors`` actors of ``cls``, blocks of ``ex.block_size`` questions."""
    return ds.map_batches(cls, fn_constructor_kwargs=kwargs, batch_size=ex.block_size, batch_format="pandas",
                          compute=ray.data.ActorPoolStrategy(size=ex.num_actors), num_cpus=cpus, num_gpus=gpus)


def _committed_ids(work: WorkDir) -> set[int]:
    import pyarrow.parquet as pq

    ids: set[int] = set()
    for name in work.committed():
        ids |= {int(x) for x in pq.read_table(work.checkpoint / f"{name}.parquet", columns=[ID_COLUMN])[ID_COLUMN].to_pylist()}
    return ids


def _record(db, run_id: int, earlier: Ingested, got: Ingested, computed: int | None, ex: ExecutorConfig, stage1: bool,
            seconds: float) -> None:
    """The run's summary: the questions the sampler left out (as a local run records them) and, per Ray
    execution, the questions an earlier (killed) execution had written, how many this one computed, and
    how many rows were ingested, and its wall time (cluster start, pipeline and ingest)."""
    summary = dict(Q.get_run(db, run_id)["summary"] or {})
    if stage1 and (earlier.left_out or got.left_out):
        summary["left_out"] = {**summary.get("left_out", {}), **earlier.left_out, **got.left_out}
    if computed is not None or earlier.hidden:
        summary["ray"] = [*summary.get("ray", []), {
            "from_earlier": earlier.hidden, "computed": computed or 0, "seconds": round(seconds, 3),
            "ingested": {"hidden": earlier.hidden + got.hidden, "answers": earlier.answers + got.answers,
                         "scores": earlier.scores + got.scores},
            "address": ex.address or "local", "num_actors": ex.num_actors, "block_size": ex.block_size}]
    Q.update_run(db, run_id, summary=summary)


def stage1_on_ray(db, run_id: int, questions: list[dict], cfg: Stage1Config, dtype: str, progress: Progress):
    """Hidden states, answers and scores of every question not stored yet, computed on Ray and ingested.
    Returns the run's hidden-state store when this call wrote to it (else None: the caller opens it)."""
    t0 = time.perf_counter()
    work, ex, n = WorkDir(run_id), cfg.executor, len(questions)
    spec = model_spec(cfg.model, dtype)
    dims = model_dims(cfg.model)
    if dims is not None:  # refuse a too-small disk before any cluster starts
        check_hidden_space(db, run_id, n, *dims)
    stores: list[Any] = []

    def open_store(n_layers: int, hidden_size: int, source: str):
        stores.append(open_run_hidden(db, run_id, n, n_layers, hidden_size, source))
        return stores[-1]

    got = ingest(db, run_id, questions, work, open_store)  # what a killed execution committed but did not store
    complete = Q.hidden_done_ids(db, run_id) & Q.answered_ids(db, run_id) & Q.scored_ids(db, run_id)
    todo = [i for i, q in enumerate(questions) if q["id"] not in complete]
    waiting = {questions[i]["id"] for i in todo} - _committed_ids(work)
    progress.stage(STAGE, total=n, done=n - len(waiting))
    computed = None
    if waiting:
        work.write_input(questions, todo)
        with ray_cluster(ex) as ray:
            cpus = actor_cpus(ray, 3 * ex.num_actors)
            judge_gpus = ex.gpus_per_actor if cfg.judge.kind != "lexical" else 0.0

            def build(ds):
                ds = _map(ds, ray, HiddenActor, {"spec": spec, "prompt": cfg.prompt, "batch_size": cfg.sampling.hidden_batch_size},
                          ex, cpus, ex.gpus_per_actor)
                ds = _map(ds, ray, SamplingActor, {"spec": spec, "sampling": cfg.sampling}, ex, cpus, ex.gpus_per_actor)
                return _map(ds, ray, JudgeActor, {"judge": cfg.judge}, ex, cpus, judge_gpus)

            computed = execute(ray, work, build, progress, f"{ex.num_actors} actor(s) per stage")
    more = ingest(db, run_id, questions, work, open_store)
    _record(db, run_id, got, more, computed, ex, stage1=True, seconds=time.perf_counter() - t0)
    complete = Q.hidden_done_ids(db, run_id) & Q.answered_ids(db, run_id) & Q.scored_ids(db, run_id)
    left_out = {int(k) for k in (Q.get_run(db, run_id)["summary"] or {}).get("left_out", {})}
    if all(q["id"] in complete or q["id"] in left_out for q in questions):
        work.remove()  # everything is in the store; the blocks are no longer needed
    log.info("run %d on Ray: %d questions from an earlier execution, %s computed now", run_id, got.hidden, computed)
    return stores[-1] if stores else None


def triage_on_ray(db, run_id: int, questions: list[dict], source: Stage1Config, cfg: TriageConfig, dtype: str, layer: int,
                  progress: Progress):
    """The hidden state at the probe's ``layer`` of every question not stored yet, computed on Ray and ingested;
    returns the run's store (n, 1, hidden)."""
    from ..store.hidden import HiddenStates
    from ..probing.storage import run_hidden_path

    t0 = time.perf_counter()
    work, ex, n = WorkDir(run_id), cfg.executor, len(questions)
    spec = replace(model_spec(source.model, dtype), device=cfg.device)
    forget_lost_hidden_states(db, run_id)
    dims = model_dims(source.model)
    if dims is not None:
        check_hidden_space(db, run_id, n, dims[0], dims[1], layer)
    stores: list[Any] = []

    def open_store(n_layers: int, hidden_size: int, source_name: str):
        stores.append(open_run_hidden(db, run_id, n, n_layers, hidden_size, source_name, layer))
        return stores[-1]

    got = ingest(db, run_id, questions, work, open_store, layer=layer)
    done = Q.hidden_done_ids(db, run_id)
    todo = [i for i, q in enumerate(questions) if q["id"] not in done]
    waiting = {questions[i]["id"] for i in todo} - _committed_ids(work)
    progress.stage(TRIAGE_STAGE, total=n, done=n - len(waiting))
    computed = None
    if waiting:
        work.write_input(questions, todo)
        with ray_cluster(ex) as ray:
            cpus = actor_cpus(ray, ex.num_actors)

            def build(ds):
                return _map(ds, ray, HiddenActor, {"spec": spec, "prompt": source.prompt, "batch_size": cfg.batch_size, "layer": layer},
                            ex, cpus, ex.gpus_per_actor)

            computed = execute(ray, work, build, progress, f"{ex.num_actors} actor(s)")
    more = ingest(db, run_id, questions, work, open_store, layer=layer)
    _record(db, run_id, got, more, computed, ex, stage1=False, seconds=time.perf_counter() - t0)
    if len(Q.hidden_done_ids(db, run_id)) >= n:
        work.remove()
    return stores[-1] if stores else HiddenStates.open(run_hidden_path(Q.get_run(db, run_id)))
