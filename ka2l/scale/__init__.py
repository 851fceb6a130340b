"""Past one machine: Stage 1 and triage on a Ray cluster (``ExecutorConfig.kind == 'ray'``).

    run_stage1(pool, cfg, ...)   ka2l.probing.stage1.run_stage1, its model stages on Ray when cfg.executor says so
    run_triage(pool, cfg, ...)   the same for triage

The CLI and the job runner call these; with the local executor they are the local functions unchanged.
Ray is imported only in this package and only when the ray executor runs (``pip install 'ka2l[ray]'``).
"""

from __future__ import annotations

from typing import Any

from ..config import Stage1Config, TriageConfig
from ..progress import Progress


def run_stage1(pool: int | str, cfg: Stage1Config, progress: Progress | None = None, resume: bool = True, lm: Any = None) -> int:
    from ..probing import stage1

    if cfg.executor.kind != "ray":
        return stage1.run_stage1(pool, cfg, progress=progress, resume=resume, lm=lm)
    from .cluster import require_ray
    from .ray_stage1 import stage1_on_ray

    require_ray()  # said before the run is started
    return stage1.run_stage1(pool, cfg, progress=progress, resume=resume, model_stages=stage1_on_ray)


def run_triage(pool: int | str, cfg: TriageConfig, progress: Progress | None = None, resume: bool = True, lm: Any = None) -> int:
    from ..probing import stage1

    if cfg.executor.kind != "ray":
        return stage1.run_triage(pool, cfg, progress=progress, resume=resume, lm=lm)
    from .cluster import require_ray
    from .ray_stage1 import triage_on_ray

    require_ray()
    return stage1.run_triage(pool, cfg, progress=progress, resume=resume, hidden_stage=triage_on_ray)
