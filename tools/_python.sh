# Sourced by tools/dist_*.sh and tools/slurm_*.sh: the Python interpreter they run.
#
#   PY=$(mmoverlock_python "$ROOT")
#
# Picks <repo>/.venv/bin/python (the environment tools/setup_env.sh builds) when it exists, else
# $PYTHON, else python3 from PATH, so the commands of the README work without activating the
# environment. Exits with status 2 and a message naming the interpreter and the fix when it
# cannot import torch.

mmoverlock_python() {
  local root=$1 py why err
  if [ -x "$root/.venv/bin/python" ]; then
    py="$root/.venv/bin/python" why="the project's environment"
  elif [ -n "${PYTHON:-}" ]; then
    py=$PYTHON why="\$PYTHON, as there is no $root/.venv"
  else
    py=python3 why="python3 from PATH, as there is no $root/.venv and PYTHON is not set"
  fi
  if ! err=$("$py" -c 'import torch' 2>&1 >/dev/null); then
    err=$(printf '%s\n' "$err" | tail -n 1)
    printf "error: %s (%s) cannot import torch (%s). Run 'bash tools/setup_env.sh' to build %s with the pinned stack (the launchers then use it), or set PYTHON to an interpreter that has it.\n" \
      "$py" "$why" "${err:-no message}" "$root/.venv" >&2
    exit 2
  fi
  printf '%s\n' "$py"
}
