# Sourced by scripts: ensure .venv exists with the project and its test extras installed.
VENV=${SPK_VENV:-$PWD/.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.spk-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setting up $VENV (log: $VENV/install.log)" >&2
  if ! { "$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade pip &&
         "$VENV/bin/python" -m pip install --disable-pip-version-check -e '.[test]'; } \
       >"$VENV/install.log" 2>&1; then
    tail -20 "$VENV/install.log" >&2
    echo "installing the project into $VENV failed; see $VENV/install.log" >&2
    exit 1
  fi
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
