#!/usr/bin/env bash
# scripts/install.sh VENV ARGS...: `pip install ARGS` into the virtualenv VENV (created if missing).
#
# Installs with uv where uv can be had: it resolves the same versions as pip (checked: the same 280
# pinned packages for `.[dev]`) in half the time (70 s instead of 136 s on 2 cores: it unpacks and
# byte-compiles in parallel). It byte-compiles at install as pip does: where PYTHONDONTWRITEBYTECODE
# is set (as on this CI) nothing compiled later is kept, and every process would compile torch's
# sources again (a suite run took twice as long that way). uv does not read pip's
# configuration, so pip's own settings (its PIP_* variables, else its config files: the indexes,
# local wheel folders and certificate a machine was set up with) are handed to it, with pip's rule
# of taking the best version across all indexes. Anything uv cannot do, pip then does.
set -euo pipefail
VENV=$1
shift
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

pip_setting() {  # pip's value for an option: its environment variable, else its configuration files
  local variable="PIP_$1"
  if [ -n "${!variable:-}" ]; then echo "${!variable}"; else "${PIP[@]}" config get "global.$2" 2>/dev/null || true; fi
}

with_uv() {
  [ -x "$VENV/bin/uv" ] || "${PIP[@]}" install uv || return 1
  local find_links extra_index index cert
  find_links=$(pip_setting FIND_LINKS find-links | tr -s ' \n' ',' | sed 's/,$//')
  extra_index=$(pip_setting EXTRA_INDEX_URL extra-index-url | tr -s '\n' ' ')
  index=$(pip_setting INDEX_URL index-url)
  cert=$(pip_setting CERT cert)
  env ${find_links:+UV_FIND_LINKS="$find_links"} ${extra_index:+UV_EXTRA_INDEX_URL="$extra_index"} \
    ${index:+UV_INDEX_URL="$index"} ${cert:+SSL_CERT_FILE="$cert"} UV_INDEX_STRATEGY=unsafe-best-match \
    "$VENV/bin/uv" pip install --quiet --compile-bytecode --python "$VENV/bin/python" "$@"
}

if ! with_uv "$@"; then
  echo "uv could not install $*; installing with pip" >&2
  "${PIP[@]}" install "$@"
fi
