"""A mutation check that keeps the secure-aggregation tests honest (issue 14, rel-09).

Each mutation below breaks one protection of the protocol while keeping every sum exact (what
the older tests checked); `tests/test_secagg_guarantees.py`, run against a copy of fedtune/ with
the mutation applied, must fail for each. Hand-written rather than a mutation-testing tool
(mutmut, cosmic-ray): these are the specific attacks the guarantees exist for, not random edits.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRIMITIVES, PROTOCOL = "fedtune/privacy/secagg/primitives.py", "fedtune/privacy/secagg/protocol.py"
MUTATIONS = {  # name: [(file, text, replacement)]
    "zero_masks": [
        (PRIMITIVES, "    if len(seed) != 32:", "    return np.zeros(length, np.uint64)\n    if len(seed) != 32:"),
    ],
    "no_pairwise_masks": [
        (PROTOCOL, "            if v == self.client or v not in sharers:", "            if True:"),
        (PROTOCOL, "                if u in request.alive:", "                if False:"),
    ],
    "no_self_masks": [
        (PROTOCOL, "        total += primitives.mask(self._seed, length, bits)\n", ""),
        (PROTOCOL, "            total -= primitives.mask(seed, self.length, bits)\n", ""),
    ],
    "reveal_both_shares": [
        (PROTOCOL, "        seed_shares = {v: self._held[v][1] for v in alive if v in self._held}",
         "        seed_shares = {v: self._held[v][1] for v in [*alive, *dropped] if v in self._held}"),
        (PROTOCOL, "        key_shares = {v: self._held[v][0] for v in dropped if v in self._held}",
         "        key_shares = {v: self._held[v][0] for v in [*alive, *dropped] if v in self._held}"),
    ],
    "seed_of_32_bits": [
        (PRIMITIVES, "    encryptor = Cipher(algorithms.AES(seed)",
         "    seed = seed[:4] + bytes(28)\n    encryptor = Cipher(algorithms.AES(seed)"),
    ],
    "non_cryptographic_generator": [
        (PRIMITIVES, "    if len(seed) != 32:",
         '    return np.random.default_rng(int.from_bytes(seed[:4], "little")).integers(0, 1 << bits, size=length, '
         "dtype=np.uint64)\n    if len(seed) != 32:"),
    ],
    "pairwise_key_from_public_values": [
        (PROTOCOL, 'primitives.agree(self._mask, self._roster[v][1], b"mask")', "bytes(32)"),
        (PROTOCOL, 'primitives.agree(key, self._roster[u][1], b"mask")', "bytes(32)"),
    ],
}  # fmt: skip


@pytest.mark.parametrize("name", ["unchanged", *sorted(MUTATIONS)])
def test_the_guarantee_tests_fail_when_a_protection_is_removed(tmp_path: Path, name: str) -> None:
    """The unchanged copy passes (the harness works); every mutated one fails its tests (exit 1)."""
    shutil.copytree(ROOT / "fedtune", tmp_path / "fedtune", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "__init__.py").write_text("")
    shutil.copy(ROOT / "tests" / "test_secagg_guarantees.py", tmp_path / "tests")
    for file, text, replacement in MUTATIONS.get(name, []):
        path = tmp_path / file
        source = path.read_text()
        assert source.count(text) == 1, f"{name}: the code to mutate changed ({file}: {text!r})"
        path.write_text(source.replace(text, replacement))
    # tmp_path has no pyproject.toml: the plugins it turns off (and xdist, coverage) are named here
    off = ("cacheprovider", "hydra_pytest", "anyio", "xdist", "pytest_cov")
    plugins = [arg for name in off for arg in ("-p", f"no:{name}")]
    command = [sys.executable, "-m", "pytest", "-q", *plugins, "tests/test_secagg_guarantees.py"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == (0 if name == "unchanged" else 1), f"{name}:\n{done.stdout[-1500:]}"
