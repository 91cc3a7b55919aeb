#!/usr/bin/env bash
# Set everything up (.venv, torch, the Fashion-MNIST package, the extension) and run the demo:
# `ddfast run` with no arguments (Fashion-MNIST, 40% symmetric noise, IPC 10, DATM + TAD vs the baselines,
# quick preset) -> runs/demo/report.md. Extra arguments go to `ddfast run` (e.g. --quiet).
exec bash "$(dirname "$0")/../.ci/run" --demo "$@"
