#!/usr/bin/env bash
# Refresh requirements.lock: resolve the newest versions pyproject.toml allows in a throwaway venv, run the fast
# tests there, and only if they pass write that environment's exact versions (pip freeze) to requirements.lock.
# torch is the machine's CPU build (torch==2.13.0 from the local file); an unpinned torch would pull CUDA wheels.
#   usage: scripts/lock.sh            (from the repository root; takes a few minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/newest_venv.sh
"$py" -m pytest -q -m "not slow" -p no:cacheprovider
{
    echo "# Exact versions of every package the README's commands install, for CPython $("$py" -c 'import platform; print(platform.python_version())') on $(uname -m) Linux."
    echo "# Written by scripts/lock.sh on $(date -u +%Y-%m-%d) from a venv whose fast tests passed; do not edit by hand."
    echo "# torch is installed first, from the machine's CPU build (see Makefile); rollflow itself is installed with --no-deps."
    "$py" -m pip freeze --all --exclude-editable | sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/'
} > requirements.lock
echo "wrote requirements.lock ($(grep -vc '^#' requirements.lock) packages)"
