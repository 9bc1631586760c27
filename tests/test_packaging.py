"""The package as users get it: ``python -m build`` makes a wheel and an sdist that pass
``twine check``; the wheel holds every module and data file of ``src/deformconv``; installed
into a fresh virtual environment, ``deformconv check`` passes from it.

The environment reuses this one's packages (``--system-site-packages``: installing torch again
would take minutes and gigabytes) and gets the wheel with ``--no-deps``. So that the test cannot
pass on the source tree instead of the wheel, it checks that ``deformconv`` imports from the
environment's own site-packages: an editable install of the tree (a ``.pth`` path or
setuptools' finder on ``sys.meta_path``) would otherwise be found too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import deformconv

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "deformconv"

pytestmark = pytest.mark.slow


def _run(*command: str | Path, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--outdir", out, ROOT, cwd=out)
    return out


def test_build_makes_a_wheel_and_an_sdist_that_pass_twine_check(dist) -> None:
    version = deformconv.__version__
    wheel = dist / f"deformconv-{version}-py3-none-any.whl"
    sdist = dist / f"deformconv-{version}.tar.gz"
    assert sorted(p.name for p in dist.iterdir()) == sorted([wheel.name, sdist.name])
    checked = _run(sys.executable, "-m", "twine", "check", "--strict", wheel, sdist, cwd=dist)
    assert checked.stdout.count("PASSED") == 2
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for needed in (
        "LICENSE",
        "CHANGELOG.md",
        "README.md",
        "conftest.py",
        "tests/test_packaging.py",
    ):
        assert needed in names


def test_the_wheel_holds_every_module_and_data_file(dist) -> None:
    wheel = dist / f"deformconv-{deformconv.__version__}-py3-none-any.whl"
    expected = {
        path.relative_to(PACKAGE.parent).as_posix()
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc",)
    }
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"deformconv-{deformconv.__version__}.dist-info/METADATA")
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"
    assert f"deformconv-{deformconv.__version__}.dist-info/licenses/LICENSE" in names
    text = metadata.decode()
    # The metadata says what pyproject.toml says, with the version read from the package.
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f"Version: {deformconv.__version__}\n" in text
    assert f"License-Expression: {project['license']}\n" in text
    for requirement in project["dependencies"]:
        assert f"Requires-Dist: {requirement}\n" in text


def test_deformconv_check_passes_from_the_installed_wheel(dist, tmp_path) -> None:
    wheel = dist / f"deformconv-{deformconv.__version__}-py3-none-any.whl"
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--system-site-packages", venv, cwd=tmp_path)
    python, script = venv / "bin" / "python", venv / "bin" / "deformconv"
    _run(
        python,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-index",
        "--force-reinstall",
        wheel,
        cwd=tmp_path,
    )
    where = _run(python, "-c", "import deformconv; print(deformconv.__file__)", cwd=tmp_path)
    imported = Path(where.stdout.strip()).resolve()
    site_packages = Path(
        _run(
            python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path
        ).stdout.strip()
    ).resolve()
    assert not imported.is_relative_to(ROOT / "src"), f"imported the source tree: {imported}"
    assert imported == site_packages / "deformconv" / "__init__.py"
    # The console script runs the environment's interpreter, so it imports the same copy.
    assert script.read_text().splitlines()[0] == f"#!{python}"
    checked = _run(script, "check", cwd=tmp_path)
    assert "comparisons passed" in checked.stdout
