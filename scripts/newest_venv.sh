# Sourced by lock.sh and check_newest.sh: a throwaway venv ($work/venv, python at $py, removed on exit) holding the
# newest versions pyproject.toml allows, resolved afresh, with torch kept at the machine's CPU build (torch==2.13.0):
# newer torch releases here are CUDA builds of several GB.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install --quiet --upgrade pip setuptools
"$py" -m pip install --quiet torch==2.13.0
echo "torch==2.13.0" > "$work/keep-torch.txt"
"$py" -m pip install --quiet -c "$work/keep-torch.txt" -e ".[dev]"
"$py" -m pip check
