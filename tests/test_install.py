"""What a board installs: the wheel with no extras runs and checks artifacts; every other stage names its extra.

The board is a fresh virtual environment holding bndeploy's wheel, built here from this checkout, and
what pip installs for it from the package index (numpy, apache-tvm, apache-tvm-ffi and theirs): nothing
comes from this test run's own environment. The artifact it runs is a CPU artifact built in this test.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bndeploy.extras import EXTRAS, IMPORT_NAMES

REPO = Path(__file__).resolve().parents[1]
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".hypothesis", "bndeploy-out", "out")


def requirement_name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", requirement).group().lower().replace("_", "-")


def test_extras_table_matches_pyproject():
    """bndeploy.extras (import names, for the error messages) and pyproject.toml (what pip installs) agree."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = project["optional-dependencies"]

    def names(extra: str) -> set[str]:
        found = set()
        for requirement in declared[extra]:
            if requirement.startswith("bndeploy["):
                for inner in requirement[len("bndeploy["):requirement.index("]")].split(","):
                    found |= names(inner)
            else:
                name = requirement_name(requirement)
                found.add(IMPORT_NAMES.get(name, name))
        return found

    for extra, modules in EXTRAS.items():
        assert names(extra) == set(modules), extra
    core = {requirement_name(r) for r in project["dependencies"]}
    assert core == {"numpy", "apache-tvm", "apache-tvm-ffi"}


@pytest.fixture(scope="module")
def board(tmp_path_factory) -> Path:
    """A fresh venv with bndeploy's wheel and no extras; returns its bin/ folder."""
    root = tmp_path_factory.mktemp("board")
    source = Path(shutil.copytree(REPO, root / "source", ignore=NOT_SOURCE))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    # This environment's setuptools builds the wheel when it has one (Python 3.12+ venvs come without).
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    run(pip + ["wheel", "--no-deps", *isolation, "--quiet", "-w", str(root / "dist"), str(source)])
    (wheel,) = (root / "dist").glob("bndeploy-*.whl")
    run([sys.executable, "-m", "venv", str(root / "venv")])
    bin_dir = root / "venv" / "bin"
    run([str(bin_dir / "python"), "-m", "pip", "install", "--disable-pip-version-check", "--quiet",
         "--only-binary=:all:", str(wheel)])
    return bin_dir


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=600, **kwargs)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def clean_env() -> dict[str, str]:
    """This process's environment without anything that would let the board see the test's own packages."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def board_cli(board: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(board / "bndeploy"), *args], capture_output=True, text=True, env=clean_env(),
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def cpu_artifact(exported, tmp_path_factory) -> Path:
    from bndeploy.compile import compile_model

    out = tmp_path_factory.mktemp("board_artifact") / "conv-bn-train"
    (artifact,) = compile_model(exported("conv-bn")["train"] / "model.onnx", ["cpu"], out)
    return artifact


@pytest.mark.slow
def test_board_has_only_the_runtime(board, tmp_path):
    probe = ("import importlib.util as u, numpy, tvm, bndeploy; "
             "print([m for m in ('torch', 'onnx', 'onnxruntime', 'onnxscript', 'rich') if u.find_spec(m)]); "
             "print(numpy.__file__); print(tvm.__file__); print(bndeploy.__file__)")
    done = run([str(board / "python"), "-c", probe], cwd=tmp_path)
    importable, *files = done.stdout.split("\n")[:4]
    assert importable == "[]"
    venv = str(board.parent)
    assert all(path.startswith(venv) for path in files), files  # numpy, tvm and bndeploy came from pip, here
    for module in ("torch", "onnx"):
        failed = subprocess.run([str(board / "python"), "-c", f"import {module}"], capture_output=True, text=True,
                                env=clean_env(), cwd=tmp_path)
        assert failed.returncode != 0 and "ModuleNotFoundError" in failed.stderr


@pytest.mark.slow
def test_board_runs_and_checks_against_the_recorded_torch_references(board, cpu_artifact, tmp_path):
    done = board_cli(board, "run", str(cpu_artifact), "--out", str(tmp_path / "outputs.npz"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with np.load(tmp_path / "outputs.npz") as outputs:
        assert sorted(outputs.files) == ["bn.running_mean_updated", "bn.running_var_updated", "output"]
        assert outputs["output"].shape == (2, 8, 8, 8)

    done = board_cli(board, "check", str(cpu_artifact), "--against", "torch", "--junit", str(tmp_path / "j.xml"),
                     cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "result: PASS" in done.stdout and "vs onnxruntime" not in done.stdout
    assert re.search(r"^bn\.running_var_updated\s+torch\s.*PASS$", done.stdout, re.M), done.stdout


@pytest.mark.slow
def test_board_checks_against_a_golden_saved_on_the_workstation(board, cpu_artifact, tmp_path):
    from bndeploy.runtime import check

    golden = tmp_path / "golden"
    assert check(cpu_artifact, save_golden=golden).passed  # here: the torch and onnxruntime references
    done = board_cli(board, "check", str(cpu_artifact), "--against", f"golden:{golden}", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "result: PASS" in done.stdout
    for reference in ("golden/torch", "golden/onnxruntime"):
        assert re.search(rf"^bn\.running_var_updated\s+{reference}\s.*PASS$", done.stdout, re.M), done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args, extra", [
    (["export", "conv-bn", "--out", "exp"], "export"),
    (["compile", "model.onnx", "--target", "cpu", "--out", "art"], "compile"),
    (["pipeline"], "full"),
    (["bench", "--suite", "quick"], "full"),
])
def test_board_names_the_extra_a_stage_needs(board, args, extra, tmp_path):
    done = board_cli(board, *args, cwd=tmp_path)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"bndeploy {args[0]}: error: this command needs ") and f"pip install 'bndeploy[{extra}]'" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_board_check_against_onnxruntime_names_the_extra(board, cpu_artifact, tmp_path):
    done = board_cli(board, "check", str(cpu_artifact), cwd=tmp_path)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "pip install 'bndeploy[check]'" in line and "--against torch" in line


@pytest.mark.slow
def test_board_help_lists_every_command_and_the_python_api_names_the_extra(board, tmp_path):
    done = board_cli(board, "--help", cwd=tmp_path)
    assert done.returncode == 0
    assert "(not installed here: pip install 'bndeploy[export]')" in done.stdout
    for command in ("run", "check", "device"):
        assert re.search(rf"^\s+{command}\s+\w", done.stdout, re.M), done.stdout
    api = subprocess.run([str(board / "python"), "-c", "import bndeploy.export"], capture_output=True, text=True,
                         env=clean_env(), cwd=tmp_path)
    assert api.returncode != 0
    assert "MissingDependencyError: bndeploy.export needs torch" in api.stderr
    assert "pip install 'bndeploy[export]'" in api.stderr
