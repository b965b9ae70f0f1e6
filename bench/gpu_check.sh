#!/usr/bin/env bash
# GPU readiness check of pysynth: every CUDA path in one run (under 8 minutes), into one JSON file.
#   bash bench/gpu_check.sh [OUT.json]      (default gpu_check.json; needs the project installed: make setup)
# Without CUDA it says so, writes {"cuda": false, ...} and exits 0. See bench/gpu_check.py for the steps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
exec "$PY" -m pysynth.bench.gpu_check "${1:-gpu_check.json}"
