"""The wheel tooling that brings missing packages to an offline GPU machine: the closure that ``fetch``
follows, and ``install`` with real wheel files and a real ``pip install --no-index``."""
from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from benchmarks import gpu_check, wheels


def make_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = (),
               tag: str = "py3-none-any") -> Path:
    """A minimal valid wheel: one module ``<name>_mod`` whose VERSION is ``version``."""
    dist = f"{name.replace('-', '_')}-{version}"
    module = name.replace("-", "_") + "_mod"
    files = {
        f"{module}/__init__.py": f"VERSION = {version!r}\n",
        f"{dist}.dist-info/METADATA": "Metadata-Version: 2.1\n" f"Name: {name}\n" f"Version: {version}\n"
        + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist}.dist-info/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist}.dist-info/RECORD"] = "\n".join(record + [f"{dist}.dist-info/RECORD,,"]) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{dist}-{tag}.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


@pytest.fixture
def isolated_path(monkeypatch):
    """``install`` puts its target first on sys.path and PYTHONPATH: undo both after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")


def pool_downloader(pool: Path, log: list):
    """A stand-in for ``pip download``: copies the newest matching wheel of ``pool``."""
    def download(requirement: str, dest: Path) -> None:
        log.append(requirement)
        wanted = Requirement(requirement)
        matches = [w for w in pool.glob("*.whl")
                   if w.name.split("-")[0] == wanted.name.replace("-", "_")
                   and wanted.specifier.contains(w.name.split("-")[1], prereleases=True)]
        if not matches:
            raise wheels.WheelError(f"no wheel of {requirement}")
        shutil.copy(max(matches), dest)
    return download


def test_fetch_follows_requirements_markers_and_skips(tmp_path):
    pool = tmp_path / "pool"
    make_wheel(pool, "mm-a", "1.0", ("mm-b>=2", 'mm-old; python_version < "3.8"', "mm-doc; extra == 'docs'",
                                     "torch>=2", "nvidia-cublas"))
    make_wheel(pool, "mm-b", "1.0")
    make_wheel(pool, "mm-b", "2.0", ("mm-c",))
    make_wheel(pool, "mm-c", "3.0")
    make_wheel(pool, "mm-skip", "1.0")
    for name in ("mm-old", "mm-doc"):
        make_wheel(pool, name, "1.0")
    log: list = []
    got = wheels.fetch(tmp_path / "dest", "3.12", skip=["MM_Skip"], requirements=[Requirement("mm-a"), Requirement("mm-skip")],
                       download=pool_downloader(pool, log))
    assert [w.name.split("-")[:2] for w in got] == [["mm_a", "1.0"], ["mm_b", "2.0"], ["mm_c", "3.0"]]
    assert log == ["mm-a", "mm-b>=2", "mm-c"]  # no torch/nvidia, no marker- or extra-only, no skipped one
    # a second fetch into the same folder downloads nothing
    again: list = []
    wheels.fetch(tmp_path / "dest", "3.12", requirements=[Requirement("mm-a")], download=pool_downloader(pool, again))
    assert again == []


def test_fetch_reports_conflicting_versions(tmp_path):
    pool = tmp_path / "pool"
    make_wheel(pool, "mm-a", "1.0", ("mm-c>=3",))
    make_wheel(pool, "mm-b", "1.0", ("mm-c<3",))
    make_wheel(pool, "mm-c", "3.0")
    with pytest.raises(wheels.WheelError, match=r"mm-c 3.0 does not satisfy mm-c<3,>=3"):
        wheels.fetch(tmp_path / "dest", "3.12", requirements=[Requirement("mm-a"), Requirement("mm-b")],
                     download=pool_downloader(pool, []))


def test_fetch_rejects_a_bad_python_version(tmp_path):
    with pytest.raises(wheels.WheelError, match="--python-version"):
        wheels.fetch(tmp_path, "312", requirements=[])


def test_install_puts_missing_wheels_first_on_the_path(tmp_path, isolated_path):
    folder = tmp_path / "whl"
    make_wheel(folder, "mm-fake-a", "1.0", ("mm-fake-b>=2",))
    make_wheel(folder, "mm-fake-b", "2.0")
    make_wheel(folder, "pyyaml", "0.0.1")  # installed here at a version the project accepts: left alone
    target = tmp_path / "site"
    result = wheels.install(folder, target, [Requirement("mm-fake-a"), Requirement("pyyaml>=5")])
    assert sorted(result["installed"]) == ["mm_fake_a-1.0-py3-none-any.whl", "mm_fake_b-2.0-py3-none-any.whl"]
    assert [p.split("==")[0] for p in result["already_present"]] == ["pyyaml"]
    assert sys.path[0] == str(target)
    assert str(wheels.installed_version("mm-fake-b")) == "2.0"
    import mm_fake_a_mod
    assert mm_fake_a_mod.VERSION == "1.0"
    # child processes see them too (PYTHONPATH)
    out = subprocess.run([sys.executable, "-c", "import mm_fake_b_mod; print(mm_fake_b_mod.VERSION)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2.0"
    # run again: everything is there now, nothing installed
    assert wheels.install(folder, target, [Requirement("mm-fake-a")])["installed"] == []


def test_install_replaces_a_version_the_project_does_not_accept(tmp_path, isolated_path):
    wheels.install(make_wheel(tmp_path / "one", "mm-fake-c", "1.0").parent, tmp_path / "site1",
                   [Requirement("mm-fake-c")])
    assert str(wheels.installed_version("mm-fake-c")) == "1.0"
    result = wheels.install(make_wheel(tmp_path / "two", "mm-fake-c", "2.0").parent, tmp_path / "site2",
                            [Requirement("mm-fake-c>=2")])
    assert result["installed"] == ["mm_fake_c-2.0-py3-none-any.whl"]
    assert str(wheels.installed_version("mm-fake-c")) == "2.0"


def test_install_names_what_stays_unmet(tmp_path, isolated_path):
    folder = tmp_path / "whl"
    make_wheel(folder, "mm-fake-d", "1.0")
    with pytest.raises(wheels.WheelError) as error:
        wheels.install(folder, tmp_path / "site", [Requirement("mm-fake-d>=2"), Requirement("tqdm>=999")])
    text = str(error.value)
    assert "mm-fake-d: 1.0 installed, needs mm-fake-d>=2" in text and "tqdm: " in text and "tqdm>=999" in text
    assert "benchmarks.wheels fetch" in text


def test_install_refuses_a_wheel_for_another_python(tmp_path, isolated_path):
    folder = tmp_path / "whl"
    make_wheel(folder, "mm-fake-e", "1.0", tag="cp27-cp27mu-manylinux1_x86_64")
    with pytest.raises(wheels.WheelError, match=r"cannot install; fetch with --python-version"):
        wheels.install(folder, tmp_path / "site", [Requirement("mm-fake-e")])
    with pytest.raises(wheels.WheelError, match="wheel folder not found"):
        wheels.install(tmp_path / "missing", tmp_path / "site", [])


def test_project_requirements_are_the_pyproject_dependencies():
    names = {r.name for r in wheels.project_requirements()}
    assert {"torch", "timm", "open_clip_torch", "omegaconf", "pycocotools"} <= names


def test_gpu_check_installs_wheels_before_anything_else(tmp_path, monkeypatch, isolated_path):
    """``--wheels`` with a wheel the project does not accept: a clear stop (exit 2) before the CUDA check."""
    folder = tmp_path / "whl"
    make_wheel(folder, "mm-fake-f", "1.0")
    monkeypatch.setattr(wheels, "project_requirements", lambda: [Requirement("mm-fake-f>=2")])
    monkeypatch.setattr(wheels, "DEFAULT_TARGET", tmp_path / "site")
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--out", str(out), "--wheels", str(folder)]) == 2
    report = json.loads(out.read_text())
    assert "mm-fake-f: 1.0 installed, needs mm-fake-f>=2" in report["error"]
    assert report["checks"] == {}
