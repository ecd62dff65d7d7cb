# Sourced by scripts: ensure .venv exists with the project and its test extras installed.
VENV=${SPK_VENV:-$PWD/.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.spk-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[test]'
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
