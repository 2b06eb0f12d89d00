#!/usr/bin/env bash
# Creates the separate virtualenv with the real keystone and glance (and psycopg2-binary) that the dcsync
# tests use for their database schemas and their own code, and prints its path on stdout.
# Its pins (tests/openstack/constraints.txt) never touch roost's .venv.  Idempotent: pip runs again only when
# requirements.txt or constraints.txt changed since the last successful install (a stamp file holds their hash).
# Default location: <repository>/.venv-openstack; ROOST_OPENSTACK_VENV overrides it.  Needs python3 and PyPI.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ROOST_OPENSTACK_VENV:-$root/.venv-openstack}"
python="${PYTHON:-python3}"
requirements="$root/tests/openstack/requirements.txt"
constraints="$root/tests/openstack/constraints.txt"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "the openstack test venv needs Python 3.11 or newer ($python is $("$python" --version 2>&1))" >&2
  exit 1
fi
want="$(cat "$requirements" "$constraints" | "$python" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
stamp="$venv/.roost-openstack-installed"
mkdir -p "$venv"
[ -f "$venv/.gitignore" ] || printf '*\n' > "$venv/.gitignore"   # keep it out of git status (inside the checkout)
# Two processes (two pytest runs) may get here at once: one installs, the other waits for it.
exec 9>"$venv/.roost-lock"
if command -v flock >/dev/null; then flock 9; fi
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/keystone-manage" ] \
   && [ -x "$venv/bin/glance-manage" ]; then
  echo "$venv"
  exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv" >&2
fi
rm -f "$stamp"
echo "installing keystone and glance into $venv (new or changed pins; a first install takes about a minute)" >&2
if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      -r "$requirements" -c "$constraints" >&2; then
  echo "pip could not install $requirements into $venv (with the pins of $constraints)" >&2
  exit 1
fi
"$venv/bin/keystone-manage" --version >/dev/null 2>&1 || {
  echo "keystone-manage in $venv does not run after the install" >&2
  exit 1
}
echo "$want" > "$stamp"
echo "$venv"
