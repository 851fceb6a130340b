"""The Ray cluster a Stage 1 or triage run executes on: the one ``executor.address`` names, or a local
single-node cluster started for the run (and stopped after it). Ray is imported here, lazily, and only
when the ray executor is chosen: the local path never needs it installed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..config import ExecutorConfig
from ..errors import ConfigError

log = logging.getLogger(__name__)

MIN_LOCAL_CPUS = 4  # Ray Data's checkpoint filter, read and write tasks need CPUs beside the model actors


def require_ray() -> Any:
    """The ``ray`` module, or a ConfigError that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (ray without its data extra has no Ray Data)
    except ImportError as exc:
        raise ConfigError("The ray executor needs Ray Data, which is not installed here: pip install 'ka2l[ray]' "
                          "(or choose the local executor: --executor local).") from exc
    return ray


def local_cpus(executor: ExecutorConfig) -> int:
    """Logical CPUs of a local cluster: ``executor.num_cpus``, or (0) max(4, this machine's cores)."""
    return executor.num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1)


@contextmanager
def ray_cluster(executor: ExecutorConfig) -> Iterator[Any]:
    """Connect to ``executor.address``, or start a local cluster; a Ray already initialised in this process
    (a notebook's, a test's) is used as it is and left running. Yields the ray module."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if executor.address:
        log.info("connecting to the Ray cluster at %s", executor.address)
        try:
            ray.init(address=executor.address, **kw)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"Could not connect to the Ray cluster at {executor.address!r}: {exc}. Start it first (`ray start "
                              f"--head` on the head node), check the address (e.g. ray://HEAD:10001 or auto), or leave "
                              f"--ray-address unset to start a local cluster.") from exc
    else:
        cpus = local_cpus(executor)
        log.info("starting a local Ray cluster with %d logical CPUs", cpus)
        ray.init(num_cpus=cpus, **kw)
    try:
        yield ray
    finally:
        ray.shutdown()


def actor_cpus(ray: Any, n_model_actors: int) -> float:
    """Logical CPUs each model actor reserves: one, or less on a small cluster so that Ray Data's read,
    write and checkpoint-filter work always finds a CPU beside the actors (else the run starves)."""
    total = float(ray.cluster_resources().get("CPU", 0.0))
    free = max(total - 2.0, 0.5)  # two CPUs kept for Ray Data's own tasks and its checkpoint filter
    return round(min(1.0, free / max(n_model_actors, 1)), 3)


def check_executor(kind: str) -> None:
    """Refuse the ray executor where Ray Data is not installed, before a job is queued (no import of Ray:
    the app stays light)."""
    import importlib.util

    if kind == "ray" and (importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.data") is None):
        raise ConfigError("The ray executor needs Ray Data, which is not installed here: pip install 'ka2l[ray]' "
                          "(or choose the local executor).")
