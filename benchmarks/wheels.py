"""Bring the project's missing Python packages, as wheels, to a machine that has no package index.

A GPU machine often comes with a CUDA build of torch, torchvision and timm but not with omegaconf,
open_clip or pycocotools, and may reach no index. Fetch the wheels on a machine that reaches PyPI, carry
the folder, and install what is missing there:

    python -m benchmarks.wheels fetch .whl --python-version 3.12 [--skip NAME ...]   # reaches PyPI
    python -m benchmarks.wheels install .whl                                          # offline machine

``fetch`` downloads binary wheels (no source builds) of the project's runtime requirements and of what they
need, for Linux x86-64 and the given CPython, following each wheel's ``Requires-Dist`` (extras left out,
markers evaluated for the target). torch, torchvision, triton and the NVIDIA/CUDA libraries are never
fetched: they belong to the machine's own CUDA build, and they weigh gigabytes. ``--skip`` leaves out what the
target already has (the smaller the folder, the faster it travels).

``install`` (also run by ``benchmarks/gpu_check.py --wheels DIR``) installs, with ``--no-index --no-deps``
into a separate folder put first on ``sys.path``, each wheel whose distribution is missing or installed at a
version that the project or another wheel does not accept; it then checks every runtime requirement of the
project and stops with the list of the unmet ones. The environment itself is not modified.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Optional

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
# Never fetched: the target's CUDA build provides them, and each is hundreds of MB to GB.
NEVER_FETCHED = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*)$")
DEFAULT_TARGET = Path(tempfile.gettempdir()) / "mmcst-wheels-site"


class WheelError(RuntimeError):
    """A wheel could not be fetched or installed, or a requirement stays unmet; the message says which."""


def project_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[Requirement]:
    """The runtime requirements of the project (``[project] dependencies`` of ``pyproject.toml``)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the installed project's metadata says the same
        try:
            return [Requirement(r) for r in metadata.requires("mmcst") or [] if "extra ==" not in r]
        except metadata.PackageNotFoundError as exc:
            raise WheelError(f"{pyproject}: needs Python >= 3.11 (tomllib) or an installed mmcst") from exc
    with open(pyproject, "rb") as handle:
        return [Requirement(r) for r in tomllib.load(handle)["project"]["dependencies"]]


def target_environment(python_version: str) -> dict[str, str]:
    """Marker values of CPython ``python_version`` on Linux x86-64 (for ``Requirement.marker.evaluate``)."""
    if not re.fullmatch(r"3\.\d+", python_version):
        raise WheelError(f"--python-version: expected MAJOR.MINOR such as 3.12, got {python_version!r}")
    return {"python_version": python_version, "python_full_version": python_version + ".0", "os_name": "posix",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def applies(requirement: Requirement, environment: Optional[dict[str, str]] = None) -> bool:
    """Whether the requirement's marker holds in ``environment`` (default: this interpreter); extras never do."""
    return requirement.marker is None or requirement.marker.evaluate({**(environment or {}), "extra": ""})


def wheel_requirements(wheel: Path, environment: Optional[dict[str, str]] = None) -> list[Requirement]:
    """The ``Requires-Dist`` of a wheel that apply in ``environment`` (default: this interpreter), extras
    left out."""
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
        if len(names) != 1:
            raise WheelError(f"{wheel}: expected one *.dist-info/METADATA, found {len(names)}")
        text = archive.read(names[0]).decode("utf-8")
    from email.parser import HeaderParser

    requirements = []
    for line in HeaderParser().parsestr(text).get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        if applies(requirement, environment):
            requirements.append(requirement)
    return requirements


def pip_download(requirement: str, dest: Path, python_version: str, manylinux: str) -> None:
    """``pip download`` one binary wheel, no dependencies, for CPython ``python_version`` on Linux x86-64."""
    major, minor = (int(x) for x in manylinux.split("."))
    platforms = [f"manylinux_{major}_{m}_x86_64" for m in range(17, minor + 1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--python-version", python_version, "--implementation", "cp", "-d", str(dest), requirement]
    for platform in platforms:
        command[-1:-1] = ["--platform", platform]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise WheelError(f"pip could not download a binary wheel of {requirement!r} for CPython {python_version} "
                         f"on manylinux <= {manylinux} x86-64:\n{done.stderr.strip()[-2000:]}")


def find_wheel(folder: Path, name: str) -> Optional[Path]:
    """The newest wheel of distribution ``name`` in ``folder``, or None."""
    found = [(parse_wheel_filename(p.name)[1], p) for p in folder.glob("*.whl")
             if parse_wheel_filename(p.name)[0] == canonicalize_name(name)]
    return max(found)[1] if found else None


def fetch(dest: Path, python_version: str = "3.12", skip: Iterable[str] = (), manylinux: str = "2.28",
          requirements: Optional[list[Requirement]] = None,
          download: Optional[Callable[[str, Path], None]] = None) -> list[Path]:
    """Download the wheels of ``requirements`` (default: the project's) and of what they need into ``dest``.

    Returns the wheels of the closure, in the order they were reached. ``download(requirement, dest)`` is
    ``pip download`` for the target unless given (tests pass a local one).
    """
    environment = target_environment(python_version)
    download = download or (lambda requirement, folder: pip_download(requirement, folder, python_version, manylinux))
    skipped = {canonicalize_name(s) for s in skip}
    dest.mkdir(parents=True, exist_ok=True)
    queue = list(requirements if requirements is not None else project_requirements())
    chosen: dict[str, tuple[Version, Path]] = {}
    wanted: dict[str, SpecifierSet] = {}
    order: list[Path] = []
    while queue:
        requirement = queue.pop(0)
        name = canonicalize_name(requirement.name)
        if not applies(requirement, environment) or name in skipped or NEVER_FETCHED.match(name):
            continue
        wanted[name] = wanted.get(name, SpecifierSet()) & requirement.specifier
        if name in chosen:
            version, wheel = chosen[name]
            if not wanted[name].contains(version, prereleases=True):
                raise WheelError(f"{wheel.name}: {name} {version} does not satisfy {name}{wanted[name]} "
                                 f"(asked for by another package); fetch a version that fits both")
            continue
        existing = find_wheel(dest, name)
        if existing is None or not wanted[name].contains(parse_wheel_filename(existing.name)[1], prereleases=True):
            print(f"fetching {name}{wanted[name]}", flush=True)
            download(f"{name}{wanted[name]}", dest)
            existing = find_wheel(dest, name)
            if existing is None:
                raise WheelError(f"{dest}: no wheel of {name} after downloading {name}{wanted[name]}")
        chosen[name] = (parse_wheel_filename(existing.name)[1], existing)
        order.append(existing)
        queue.extend(wheel_requirements(existing, environment))
    return order


def installed_version(name: str) -> Optional[Version]:
    """The version of distribution ``name`` that ``importlib.metadata`` finds first on ``sys.path``."""
    try:
        return Version(metadata.version(name))
    except metadata.PackageNotFoundError:
        return None


def unmet(requirements: Iterable[Requirement]) -> list[str]:
    """The requirements (markers evaluated here) that the current ``sys.path`` does not satisfy, as text."""
    problems = []
    for requirement in requirements:
        if not applies(requirement):
            continue
        version = installed_version(requirement.name)
        if version is None:
            problems.append(f"{requirement.name}: not installed (needs {requirement})")
        elif not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement.name}: {version} installed, needs {requirement}")
    return problems


def activate(target: Path) -> None:
    """Put ``target`` first on ``sys.path`` and ``PYTHONPATH`` (for child processes)."""
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(target) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(target), *paths])
    importlib.invalidate_caches()


def install(folder: Path, target: Optional[Path] = None, requirements: Optional[list[Requirement]] = None) -> dict:
    """Install the wheels of ``folder`` that are needed (see the module text) into ``target`` (default
    ``DEFAULT_TARGET``); then check the requirements. Returns what was installed and what was already there;
    raises ``WheelError`` otherwise."""
    target = Path(target) if target is not None else DEFAULT_TARGET
    requirements = list(requirements if requirements is not None else project_requirements())
    if not Path(folder).is_dir():
        raise WheelError(f"{folder}: wheel folder not found")
    wheels = sorted(Path(folder).glob("*.whl"))
    supported = {str(tag) for tag in sys_tags()}
    wanted: dict[str, SpecifierSet] = {}
    for requirement in requirements + [r for w in wheels for r in wheel_requirements(w)]:
        if applies(requirement):
            name = canonicalize_name(requirement.name)
            wanted[name] = wanted.get(name, SpecifierSet()) & requirement.specifier
    if target.is_dir():  # a previous install: use what it holds when deciding
        activate(target)
    chosen, present = [], []
    for wheel in wheels:
        name, version, _, tags = parse_wheel_filename(wheel.name)
        have = installed_version(name)
        spec = wanted.get(name, SpecifierSet())
        if have is not None and (have == version or spec.contains(have, prereleases=True)):
            present.append(f"{name}=={have}")
            continue
        if not any(str(tag) in supported for tag in tags):
            raise WheelError(f"{wheel}: built for {sorted(str(t) for t in tags)[0]}, which this Python "
                             f"({sys.version.split()[0]}, {sys.platform}) cannot install; fetch with "
                             f"--python-version {sys.version_info.major}.{sys.version_info.minor}")
        chosen.append(wheel)
    if chosen:
        command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile",
                   "--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target", str(target),
                   *map(str, chosen)]
        print("installing:", ", ".join(w.name for w in chosen), f"into {target}", flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise WheelError(f"pip install of {len(chosen)} wheels into {target} failed:\n{done.stderr.strip()[-2000:]}")
        activate(target)
    problems = unmet(requirements)
    if problems:
        raise WheelError("unmet requirements after installing the wheels of " + str(folder) + ":\n  "
                         + "\n  ".join(problems) + "\nfetch them with: python -m benchmarks.wheels fetch "
                         + f"{folder} --python-version {sys.version_info.major}.{sys.version_info.minor}")
    return {"installed": [w.name for w in chosen], "already_present": present, "target": str(target) if chosen else None}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("fetch", help="download the wheels (needs PyPI)")
    get.add_argument("dest", type=Path)
    get.add_argument("--python-version", default="3.12", help="the target's CPython, MAJOR.MINOR")
    get.add_argument("--manylinux", default="2.28", help="the target's glibc, at least 2.17")
    get.add_argument("--skip", nargs="*", default=[], help="distributions the target already has")
    put = commands.add_parser("install", help="install the missing ones from a wheel folder (no index)")
    put.add_argument("folder", type=Path)
    put.add_argument("--target", type=Path, default=DEFAULT_TARGET, help="where they go (first on sys.path)")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            wheels = fetch(args.dest, args.python_version, args.skip, args.manylinux)
            size = sum(w.stat().st_size for w in wheels) / 2**20
            print(f"{len(wheels)} wheels, {size:.1f} MiB in {args.dest}:", *(w.name for w in wheels), sep="\n  ")
        else:
            result = install(args.folder, args.target)
            print(f"installed {len(result['installed'])}, already present {len(result['already_present'])}"
                  + (f"; add {result['target']} to PYTHONPATH to use them" if result["target"] else ""))
    except WheelError as exc:
        print(f"wheels: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
