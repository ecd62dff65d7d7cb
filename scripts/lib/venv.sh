# Sourced by scripts: ensure a venv exists with the project installed.
#   default (scripts/test, check, bench, stress): .venv with the test extras (pytest, linters, ...)
#   SPK_VENV_PURPOSE=demo (scripts/demo): .venv-demo with the runtime dependencies only
# SPK_VENV overrides the directory.
if [ "${SPK_VENV_PURPOSE:-test}" = demo ]; then
  VENV=${SPK_VENV:-$PWD/.venv-demo}
  SPEC=.
else
  VENV=${SPK_VENV:-$PWD/.venv}
  SPEC='.[test]'
fi
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.spk-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setting up $VENV (log: $VENV/install.log)" >&2
  if ! { "$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade pip &&
         "$VENV/bin/python" -m pip install --disable-pip-version-check -e "$SPEC"; } \
       >"$VENV/install.log" 2>&1; then
    tail -20 "$VENV/install.log" >&2
    echo "installing the project into $VENV failed; see $VENV/install.log" >&2
    exit 1
  fi
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
