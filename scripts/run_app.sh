#!/usr/bin/env bash
# Start the Streamlit app; if the capitals demo has no finished Stage 1 run, run it in the
# background meanwhile (the Runs page shows its progress). Stopping the app stops that run;
# it resumes where it stopped the next time.
set -euo pipefail
PY=${PY:-.venv/bin/python}
DATA=$($PY -c 'from ka2l.paths import data_dir; print(data_dir())')
mkdir -p "$DATA/logs"
job=""
if ! $PY -m ka2l report --pool capitals >/dev/null 2>&1; then
  echo "Running Stage 1 on the capitals pool in the background (log: $DATA/logs/demo-probe.log)"
  $PY -m ka2l probe --pool capitals -q >"$DATA/logs/demo-probe.log" 2>&1 &
  job=$!
fi
cleanup() { [ -n "$job" ] && kill "$job" 2>/dev/null || true; }
trap cleanup EXIT
$PY -m streamlit run app.py --server.headless true --server.address 127.0.0.1 "$@"
