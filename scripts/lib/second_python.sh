# Sourced by scripts/test after venv.sh: a second CPython, another minor version than .venv's,
# with the project installed, for the mixed-fleet tests (satellites on two interpreters). The
# tests fail, never skip, without it, so a missing interpreter stops here, loudly.
SECOND_VENV=${SPK_SECOND_VENV:-$PWD/.venv-second}
_find_second_python() {
  local mine v cand root
  mine=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  # The project needs 3.11+; machines of this kind ship 3.10-3.13 under pyenv, whose shims
  # answer only for its global version, so look at the real binaries.
  for v in 3.12 3.13 3.11 3.14; do
    [ "$v" = "$mine" ] && continue
    for cand in "$root"/versions/"$v".*/bin/python"$v" /usr/bin/python"$v" /usr/local/bin/python"$v"; do
      if [ -x "$cand" ] && "$cand" -c 'import venv' 2>/dev/null; then echo "$cand"; return 0; fi
    done
  done
  return 1
}
if [ ! -x "$SECOND_VENV/bin/python" ]; then
  if ! second=$(_find_second_python); then
    echo "no second CPython (3.11-3.14, other than .venv's) on this machine: the mixed-fleet" \
         "tests need one; install it (pyenv install 3.12, or apt-get install python3.12-venv)" >&2
    exit 1
  fi
  "$second" -m venv "$SECOND_VENV"
fi
second_stamp="$SECOND_VENV/.spk-installed"
if [ ! -f "$second_stamp" ] || [ pyproject.toml -nt "$second_stamp" ]; then
  echo "setting up $SECOND_VENV (log: $SECOND_VENV/install.log)" >&2
  # Only what a satellite needs at run time: the project itself, no test or lint tools.
  if ! { "$SECOND_VENV/bin/python" -m pip install --disable-pip-version-check --upgrade pip &&
         "$SECOND_VENV/bin/python" -m pip install --disable-pip-version-check -e .; } \
       >"$SECOND_VENV/install.log" 2>&1; then
    tail -20 "$SECOND_VENV/install.log" >&2
    echo "installing the project into $SECOND_VENV failed; see $SECOND_VENV/install.log" >&2
    exit 1
  fi
  touch "$second_stamp"
fi
export SPK_SECOND_PYTHON="$SECOND_VENV/bin/python"
