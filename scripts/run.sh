#!/usr/bin/env bash
# One entry point that works on a fresh machine with only Python 3.11:
#   bash scripts/run.sh repro [dvc repro args]   create .venv if absent, run the DVC pipeline
#   bash scripts/run.sh test  [pytest args]      create .venv if absent, run the whole test suite (CI)
#   bash scripts/run.sh quick [pytest args]      the same without tests marked slow (under a minute)
#   bash scripts/run.sh preset NAME [exp args]   dvc exp run with presets/NAME.yaml (a paper's setup)
# The venv is (re)built when pyproject.toml or constraints.txt change.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

what=${1:-}
shift || true
case "$what" in
  repro|test|quick|preset) ;;
  *) echo "usage: bash scripts/run.sh repro|test|quick|preset [args...]" >&2; exit 2 ;;
esac

py=${PYTHON:-}
if [ -z "$py" ]; then
  for cand in python3.11 python3 python; do
    if command -v "$cand" >/dev/null 2>&1; then py=$cand; break; fi
  done
fi
[ -n "$py" ] || { echo "run.sh: no python3 found; install Python 3.11" >&2; exit 1; }
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "run.sh: $py is $("$py" -V 2>&1); Python >= 3.11 is required" >&2; exit 1; }

stamp=".venv/.installed-$(cat pyproject.toml constraints.txt | "$py" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:16])')"
if [ ! -f "$stamp" ]; then
  echo "run.sh: setting up .venv (torch, PyAV, opencv, zarr, dvc, ...; about 2 minutes)" >&2
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# dvc.yaml runs `python -m stages...`: the venv must come first on PATH.
export PATH="$PWD/.venv/bin:$PATH"

if [ "$what" = repro ]; then
  exec dvc repro "$@"
fi
if [ "$what" = preset ]; then
  exec python scripts/preset.py "$@"
fi
if [ "$what" = quick ]; then
  exec python -m pytest -m "not slow" "$@"
fi
exec python -m pytest "$@"
