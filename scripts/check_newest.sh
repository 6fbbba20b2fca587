#!/usr/bin/env bash
# Early warning: install the newest versions pyproject.toml allows (no lock) in a throwaway venv and run the fast
# tests, so a coming break (a deprecation that our warnings-as-errors suite turns into failures, an API change)
# shows here before a user meets it. torch stays the machine's CPU build (torch==2.13.0): newer releases here are
# CUDA builds of several GB. Prints every package whose newest version differs from requirements.lock.
#   usage: scripts/check_newest.sh [pytest args...]     (default: -m "not slow")
set -euo pipefail
export LC_ALL=C  # one collation for sort and join
cd "$(dirname "$0")/.."
source scripts/newest_venv.sh
echo "== newest allowed versions that differ from requirements.lock (name: lock -> newest)"
"$py" -m pip freeze --all --exclude-editable | sed -E 's/\+cpu$//' | sort > "$work/newest.txt"
grep -v '^#' requirements.lock | sort > "$work/lock.txt"
join -t= -j1 <(sed 's/==/=/' "$work/lock.txt" | tr 'A-Z_' 'a-z-' | sort) <(sed 's/==/=/' "$work/newest.txt" | tr 'A-Z_' 'a-z-' | sort) \
    | awk -F= '$2 != $3 {print "  " $1 ": " $2 " -> " $3; n++} END {if (!n) print "  (none: the lock is the newest set)"}'
comm -13 <(cut -d= -f1 "$work/lock.txt" | tr 'A-Z_' 'a-z-' | sort) <(cut -d= -f1 "$work/newest.txt" | tr 'A-Z_' 'a-z-' | sort) \
    | sed 's/^/  new dependency: /'
if [ $# -eq 0 ]; then set -- -m "not slow"; fi
"$py" -m pytest -q -p no:cacheprovider "$@"
