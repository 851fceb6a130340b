"""Shared argparse plumbing: commands registered under a stage group, and a help listing grouped by stage."""

from __future__ import annotations

import argparse

GROUPS_ATTR = "_ka2l_groups"


def add_command(sub: argparse._SubParsersAction, group: str, name: str, summary: str) -> argparse.ArgumentParser:
    """Add command `name` to `group`; its one-line summary shows in the grouped top-level help."""
    parser = sub.add_parser(name, help=summary, description=summary)
    groups: dict[str, list[tuple[str, str]]] = getattr(sub, GROUPS_ATTR, {})
    groups.setdefault(group, []).append((name, summary))
    setattr(sub, GROUPS_ATTR, groups)
    return parser


def add_run_flags(parser: argparse.ArgumentParser, background: bool = True) -> None:
    """The flags every long command shares: queue it as a background job instead, and quiet progress."""
    if background:
        parser.add_argument("--background", action="store_true", help="queue as a background job (as the app does) and return at once")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def grouped_listing(sub: argparse._SubParsersAction) -> str:
    """The commands by stage, in the order the stages were registered:

    >>> p = argparse.ArgumentParser(); s = p.add_subparsers()
    >>> _ = add_command(s, "Stage 1: probing", "probe", "run Stage 1")
    >>> print(grouped_listing(s))
    Stage 1: probing:
      probe           run Stage 1
    """
    lines = []
    for group, commands in getattr(sub, GROUPS_ATTR, {}).items():
        lines.append(f"{group}:")
        lines += [f"  {name:<15} {summary}" for name, summary in commands]
    return "\n".join(lines)


def submit_job(kind: str, config: dict, follow: str) -> int:
    """Queue a background job and say where to follow it; the same job already queued or running is
    named instead of queued twice."""
    from .. import jobs

    try:
        job_id = jobs.submit(kind, config)
    except jobs.JobPending as exc:
        print(f"{exc} (Or list jobs with `python -m ka2l jobs`.)")
        return 0
    print(f"submitted job {job_id}: follow it on {follow} or with `python -m ka2l jobs`")
    return 0


def add_launcher_flags(parser: argparse.ArgumentParser, what: str, processes: str, config: str) -> None:
    """--launcher / --num-processes / --accelerate-config for work that trains under ``accelerate launch``."""
    from ..config import LAUNCHERS

    parser.add_argument("--launcher", choices=LAUNCHERS, help=f"none (train in this process, the default) or accelerate ({what} "
                                                             f"in --num-processes workers under `accelerate launch`: several GPUs)")
    parser.add_argument("--num-processes", type=int, help=f"training processes under --launcher accelerate, one per GPU (on CPU: DDP "
                                                          f"over gloo); {processes} (default 1)")
    parser.add_argument("--accelerate-config", help=f"accelerate config file for the launcher{config} (default: plain DDP)")
