#!/usr/bin/env bash
# Start the Streamlit app. If the capitals demo has no Stage 1 run yet, queue one as a background job
# first: the Jobs and Probe pages show its progress, and it survives reloads and app restarts
# (cancel it there, or with `python -m ka2l job cancel ID`).
set -euo pipefail
# From the checkout, so .streamlit/config.toml applies (no file watcher: an idle tab must not keep a core busy).
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if ! $PY -m ka2l report --pool capitals >/dev/null 2>&1; then
  $PY -m ka2l probe --pool capitals --background
fi
exec $PY -m streamlit run app.py --server.headless true --server.address 127.0.0.1 "$@"
