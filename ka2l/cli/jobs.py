"""Job commands of ``python -m ka2l``: list background jobs, run one as a worker, cancel one."""

from __future__ import annotations

import argparse
import logging

from .parsing import add_command

GROUP = "Background jobs"


def _cmd_job_run(args: argparse.Namespace) -> int:
    from ..jobs import run_worker

    logging.getLogger("ka2l").setLevel(logging.INFO)
    return run_worker(args.id)


def _cmd_job_cancel(args: argparse.Namespace) -> int:
    from ..jobs import cancel

    cancel(args.id, wait=True)
    print(f"job {args.id} cancelled")
    return 0


def _cmd_jobs(args: argparse.Namespace) -> int:
    from ..jobs import ACTIVE, list_jobs, refresh
    from ..views.jobs import format_duration, progress_view

    refresh()
    for j in list_jobs():
        view = progress_view(j)
        overall = f"{view['fraction']:>4.0%}" if j["status"] != "queued" else "   -"
        timing = (f"about {format_duration(view['eta_s'])} left" if view["eta_s"] is not None
                  else ("" if j["status"] in ACTIVE or view["elapsed_s"] is None else f"took {format_duration(view['elapsed_s'])}"))
        print(f"{j['id']:>4}  {j['kind']:<9} {j['status']:<10} {overall}  {j['stage'] or '':<26} {j['done']}/{j['total'] or '?'}  "
              f"{timing:<22} {j['error'] or j['message'] or ''}".rstrip())
    return 0


def add_commands(sub) -> None:
    p = add_command(sub, GROUP, "jobs", "list background jobs (started from the app)")
    p.set_defaults(func=_cmd_jobs)
    p = add_command(sub, GROUP, "job", "background job worker and control")
    jsub = p.add_subparsers(dest="job_command", required=True, metavar="ACTION", help="run or cancel")
    jp = jsub.add_parser("run", help="run a queued job in this process (the app starts this for you)")
    jp.add_argument("id", type=int, help="job id")
    jp.set_defaults(func=_cmd_job_run)
    jp = jsub.add_parser("cancel", help="cancel a job: stored work is kept")
    jp.add_argument("id", type=int, help="job id")
    jp.set_defaults(func=_cmd_job_cancel)
