"""pip's settings for a virtualenv as uv's environment, or why uv must not install into it.

    python scripts/uv_settings.py VENV

Prints one KEY=VALUE line per setting uv needs to install what pip would (pip's indexes, local
wheel folders, constraints and certificate, from its PIP_* variables and config files: `pip config
list`). Exits 1, naming the reason on stderr, where uv would not install what pip would: a pip
setting this does not hand over (uv reads no pip configuration), or an environment that also sees
packages from outside itself (system site-packages, which uv does not count as installed: it would
install a second torch, CUDA wheels included, over the one the environment has).
Hand-written: uv offers no import of pip's configuration.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

# pip option -> (uv's environment variable, how uv joins several values)
HANDED_OVER = {
    "find-links": ("UV_FIND_LINKS", ","),
    "index-url": ("UV_INDEX_URL", " "),
    "extra-index-url": ("UV_EXTRA_INDEX_URL", " "),
    "constraint": ("UV_CONSTRAINT", " "),
    "cert": ("SSL_CERT_FILE", " "),
}
IRRELEVANT = {"default-timeout", "timeout", "retries", "disable-pip-version-check", "progress-bar", "quiet",
              "verbose", "no-input", "root-user-action", "cache-dir", "no-cache-dir", "no-color"}  # fmt: skip
PRECEDENCE = {"global": 0, "install": 1, ":env:": 2}  # pip: the command's section over global, PIP_* over files


def refuse(why: str) -> None:
    print(f"uv not used: {why}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    venv = Path(sys.argv[1])
    config = venv / "pyvenv.cfg"
    if not config.exists():
        refuse(f"{venv} is not a virtualenv")
    if re.search(r"^include-system-site-packages\s*=\s*true", config.read_text(), re.M | re.I):
        refuse(f"{venv} also sees the system's site-packages")
    listed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    settings: dict[str, tuple[int, str]] = {}
    for line in listed.splitlines():
        section, _, rest = line.partition(".")
        key, _, value = rest.partition("=")
        if section not in PRECEDENCE:
            continue
        if key not in HANDED_OVER and key != "no-index" and key not in IRRELEVANT:
            refuse(f"pip's setting {section}.{key} has no uv counterpart here")
        if settings.get(key, (-1, ""))[0] < PRECEDENCE[section]:
            settings[key] = (PRECEDENCE[section], str(ast.literal_eval(value)))
    for key, (_, value) in sorted(settings.items()):
        if key == "no-index" and value.lower() in ("1", "true", "yes", "on"):
            print("UV_NO_INDEX=1")
        elif key in HANDED_OVER:
            variable, separator = HANDED_OVER[key]
            print(f"{variable}={separator.join(value.split())}")


if __name__ == "__main__":
    main()
