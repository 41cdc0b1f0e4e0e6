"""The supply chain, checked offline: every lock (scripts/lock) pins every package to one version with its sha256
and holds what it must (pyproject.toml's dependencies, the build tools, torch as constraints/ say, the coordinator
image's own list); the images and scripts/setup install them with --require-hashes; and the audit's verdict
(scripts/lib/audit_report.py) on pip-audit's reports: a vulnerability fails, an audit that could not be done says so.
"""

from __future__ import annotations

import importlib.util
import json
import re
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
CI_LOCKS = {"cpu": ROOT / "constraints" / "ci-cpu.txt", "cuda": ROOT / "constraints" / "ci-cuda.txt"}
IMAGE_LOCKS = {
    "coordinator": ROOT / "deploy" / "docker" / "coordinator-requirements.txt",
    "silo": ROOT / "deploy" / "docker" / "silo-requirements.txt",
}
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)( \\)?$")
_HASH = re.compile(r"^    --hash=sha256:[0-9a-f]{64}( \\)?$")


def _locked(lock: Path) -> dict[str, Version]:
    """A lock's pins, checked line by line: `name==version \\`, then one or more `--hash=sha256:...` lines."""
    pins: dict[str, Version] = {}
    lines = [line for line in lock.read_text().splitlines() if line and not line.startswith("#")]
    name = None
    for number, line in enumerate(lines, 1):
        pin = _PIN.match(line)
        if pin:
            assert name is None, f"{lock.name}:{number}: {line!r} follows a pin with no hash"
            assert pin.group(3), f"{lock.name}:{number}: {line!r} has no hash"
            name = canonicalize_name(pin.group(1))
            assert name not in pins, f"{lock.name}: {name} pinned twice"
            pins[name] = Version(pin.group(2))
            continue
        assert _HASH.match(line) and (name or pins), f"{lock.name}:{number}: neither a pin nor a hash: {line!r}"
        if not line.endswith("\\"):
            name = None
    assert name is None, f"{lock.name}: its last pin has no hash"
    return pins


def _requirements(path: Path) -> list[Requirement]:
    return [Requirement(line.split("#")[0]) for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def _project(extra: str | None) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"][extra] if extra else []
    return [Requirement(r) for r in project["dependencies"] + extras]


def _holds(pins: dict[str, Version], requirements: list[Requirement], lock: str) -> None:
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{lock} does not lock {name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{lock}: {name}=={pins[name]}"


@pytest.mark.parametrize("flavor", CI_LOCKS)
def test_the_ci_locks_hold_the_project_with_its_dev_tools_and_the_torch_of_their_flavor(flavor: str) -> None:
    pins = _locked(CI_LOCKS[flavor])
    _holds(pins, _project("dev") + _requirements(ROOT / "constraints" / "build.in"), CI_LOCKS[flavor].name)
    _holds(pins, _requirements(ROOT / "constraints" / f"{flavor}.txt"), CI_LOCKS[flavor].name)
    assert "fedmeki" not in pins  # installed from the working tree, after the lock


def test_the_image_locks_hold_what_each_image_installs() -> None:
    build = _requirements(ROOT / "constraints" / "build.in")
    coordinator = _locked(IMAGE_LOCKS["coordinator"])
    listed = _requirements(ROOT / "deploy" / "docker" / "coordinator-requirements.in")
    _holds(coordinator, listed + build, "coordinator")
    assert not {"torch", "transformers", "peft"} & coordinator.keys()
    silo = _locked(IMAGE_LOCKS["silo"])
    _holds(silo, [r for r in _project(None) if r.name != "torch"] + build, "silo")
    assert "torch" not in silo, "the silo image keeps its base's CUDA torch"
    (base_torch,) = _requirements(ROOT / "deploy" / "docker" / "silo-requirements.in")
    dockerfile = (ROOT / "deploy" / "docker" / "silo.Dockerfile").read_text()
    base = f"pytorch/pytorch:{next(iter(base_torch.specifier)).version}-"
    assert base in dockerfile, "the lock's torch is the base image's"


def test_every_install_of_a_lock_checks_its_hashes() -> None:
    for name in ("coordinator", "silo"):
        text = (ROOT / "deploy" / "docker" / f"{name}.Dockerfile").read_text()
        (install,) = [line for line in text.splitlines() if f"{name}-requirements.txt" in line and "pip" in line]
        assert "--require-hashes" in install and "--no-deps" in install, install
        assert re.search(r"pip install [^\n]*--no-build-isolation /src", text), "fedmeki built with the locked tools"
    setup = (ROOT / "scripts" / "setup").read_text()
    assert 'install --require-hashes --no-deps -r "constraints/ci-$flavor.txt"' in setup
    assert "install --no-deps --no-build-isolation -e ." in setup


def _audit_report() -> ModuleType:
    spec = importlib.util.spec_from_file_location("audit_report", ROOT / "scripts" / "lib" / "audit_report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(tmp_path: Path, name: str, dependencies: list[dict[str, object]]) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"dependencies": dependencies, "fixes": []}))
    return path


def test_the_audit_fails_on_a_vulnerability_and_says_when_it_could_not_audit(tmp_path: Path) -> None:
    verdict = _audit_report().verdict
    clean = _report(tmp_path, "clean", [{"name": "numpy", "version": "2.4.6", "vulns": []}])
    vulnerable = _report(
        tmp_path,
        "vulnerable",
        [{"name": "requests", "version": "2.19.0", "vulns": [{"id": "PYSEC-2018-28", "fix_versions": ["2.20.0"]}]}],
    )
    # What pip-audit writes when the service answers nothing for a package (PyPI without its per-release pages).
    skipped = _report(
        tmp_path,
        "skipped",
        [
            {"name": "numpy", "version": "2.4.6", "vulns": []},
            {"name": "yarl", "skip_reason": "Dependency not found on PyPI and could not be audited: yarl (1.25.1)"},
        ],
    )
    assert verdict({"a.txt": clean}) == (0, [])
    status, lines = verdict({"a.txt": clean, "b.txt": vulnerable, "c.txt": skipped})
    assert status == 1 and lines == ["b.txt: requests 2.19.0: PYSEC-2018-28 (fixed in: 2.20.0)"]
    status, lines = verdict({"a.txt": clean, "c.txt": skipped, "d.txt": None})
    assert status == 3
    assert lines == [
        "c.txt: 1 of 2 packages not audited, e.g. Dependency not found on PyPI and could not be audited: yarl (1.25.1)",
        "d.txt: the vulnerability service could not be asked",
    ]
