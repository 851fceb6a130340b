"""Stage 1, knowledge-distribution probing: semantic entropy, the dynamic threshold, per-layer probes,
baselines, the resumable Stage 1 and triage runs, and their report."""
