# Sourced by scripts/demo and scripts/test: a Python 3.11 virtualenv in .venv with the project
# installed (editable, every extra, versions pinned by constraints/ci-py311.txt). Safe to run
# again: it reinstalls only when pyproject.toml, the constraints or the interpreter changed. Needs Python 3.11 (python3.11 or python3); Java 17 for Spark.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CAPE_VENV:-$ROOT/.venv}"

_find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.11 python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    echo "cape: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2
    return 1
}

if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
    PY="$(_find_python)"
    echo "cape: creating $VENV with $PY" >&2
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
fi

STAMP="$VENV/.cape-install-stamp"
CONSTRAINTS="$ROOT/constraints/ci-py311.txt"
WANT="$(cat "$ROOT/pyproject.toml" "$CONSTRAINTS" "$VENV/pyvenv.cfg" | sha256sum | cut -d' ' -f1) $ROOT"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "cape: installing the project and its extras into $VENV (first run takes a few minutes)" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "pip>=24"
    # The constraints file pins every dependency to the versions CI runs, so a run
    # today and a run next month install the same set.
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        -c "$CONSTRAINTS" -e "$ROOT[all,dev]"
    echo "$WANT" >"$STAMP"
fi

if ! command -v java >/dev/null 2>&1; then
    echo "cape: warning: no 'java' on PATH; Spark (Java 17) will not run" >&2
fi
export PATH="$VENV/bin:$PATH"
