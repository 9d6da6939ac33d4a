"""The README's test command on a fresh clone: the repository's files alone in an empty folder (no ``../shared``
beside it), no network, no schema variable. A fast subset of the suite must pass there and the schema checks must
skip saying how to enable them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import REPO, SCHEMA_ENV

FAST_SUBSET = ["tests/test_network.py", "tests/test_coarse_bundle.py"]
SKIP_SLOW = "not bad_input_is_a_clear_error"  # each starts a process: minutes on two cores, nothing more of the clone

# Loaded by every Python process of the clone's run: any connection that is not to this machine fails at once.
NO_NETWORK = '''
import socket

_connect = socket.socket.connect


def _local_only(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and host not in ("localhost", "127.0.0.1", "::1") and not host.startswith("/"):
        raise OSError(f"network access to {host} during the fresh-clone test")
    return _connect(self, address)


socket.socket.connect = _local_only
'''


def _repository_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (REPO / name).is_file()]


def test_fast_subset_passes_on_a_fresh_clone(tmp_path):
    clone = tmp_path / "empty" / "flare-c2f"  # nothing beside it: no ../shared
    for name in _repository_files():
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, clone / name)
    assert not (clone.parent / "shared").exists()
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NO_NETWORK)
    env = {k: v for k, v in os.environ.items() if k != SCHEMA_ENV and not k.startswith("PYTEST")}
    env["PYTHONPATH"] = os.pathsep.join([str(clone), str(guard)])
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", SKIP_SLOW, *FAST_SUBSET],
        cwd=clone, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout
    assert f"set {SCHEMA_ENV}" in done.stdout  # the schema check skipped and said how to enable it
    assert str(REPO) not in done.stdout  # the clone's own package and tests ran, not this checkout's


def test_no_test_reads_beside_the_repository():
    """The schema (the one file outside the repository that tests used) comes only from the environment."""
    for path in set((REPO / "tests").glob("*.py")) - {Path(__file__)}:
        text = path.read_text()
        assert "REPO.parent" not in text and '"shared"' not in text, f"{path.name} reaches outside the repository"
