"""The edge set-up (`.ci/install-edge`) as a fresh machine runs it.

A new machine's apt has no package lists (arm64 ones least of all, right after `dpkg --add-architecture
arm64`) and its ~/.cache is empty. The test shows apt exactly that through APT_CONFIG (lists and caches in
empty folders of the test's own) and gives the emulated device an empty cache folder, then the set-up must
still succeed and the emulated device must run Python with TVM's runtime. The system's own apt state is
never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INSTALL_EDGE = REPO / ".ci" / "install-edge"
EMULATOR = REPO / "scripts" / "emulated-aarch64.sh"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs a Debian machine (apt-get)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the edge set-up needs root for apt and dpkg"),
]


def fresh_apt_config(folder: Path) -> Path:
    """An APT_CONFIG under which apt knows no package (empty lists) and has no cache."""
    lists, cache = folder / "lists", folder / "cache"
    (lists / "partial").mkdir(parents=True)
    (cache / "archives" / "partial").mkdir(parents=True)
    config = folder / "apt.conf"
    config.write_text(f'Dir::State::Lists "{lists}/";\nDir::Cache "{cache}/";\n')
    return config


def test_apt_config_hides_every_package_list(tmp_path):
    """The premise of the next test: under this configuration apt knows no arm64 package at all."""
    env = {**os.environ, "APT_CONFIG": str(fresh_apt_config(tmp_path / "apt"))}
    shown = subprocess.run(["apt-cache", "show", "python3.11-minimal:arm64"], env=env, capture_output=True, text=True)
    assert shown.returncode != 0
    assert not shown.stdout.strip()


def test_install_edge_succeeds_on_a_fresh_machine(tmp_path):
    home = tmp_path / "home"  # an empty ~/.cache for pip and for bndeploy
    home.mkdir()
    env = {
        **os.environ,
        "APT_CONFIG": str(fresh_apt_config(tmp_path / "apt")),
        "BNDEPLOY_AARCH64_ROOT": str(tmp_path / "aarch64-root"),
        "HOME": str(home),
        "PIP_NO_CACHE_DIR": "1",
    }
    install = subprocess.run(["bash", str(INSTALL_EDGE)], env=env, capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stdout + install.stderr
    assert "ready" in install.stdout
    assert (tmp_path / "aarch64-root" / "root" / "usr" / "bin" / "python3.11").is_file()

    # The device the set-up built really runs: arm64 Python (under qemu-user) imports TVM's runtime.
    probe = subprocess.run(
        ["bash", str(EMULATOR), "python", "-c", "import platform, tvm.runtime; print(platform.machine())"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split()[-1] == "aarch64"
