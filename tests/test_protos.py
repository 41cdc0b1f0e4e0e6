"""The committed gRPC stubs are exactly what scripts/gen-protos makes from proto/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "fedmeki_core" / "proto" / "v1"


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(ROOT / "scripts" / "gen-protos"), str(tmp_path)],
        capture_output=True,
        text=True,
        env={"PYTHON": sys.executable, "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"},
    )
    assert result.returncode == 0, f"scripts/gen-protos failed:\n{result.stderr}"
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "fedmeki_core" / "proto" / "v1").iterdir()}
    committed = {
        p.name: p.read_bytes()
        for p in GENERATED.iterdir()
        if p.name != "__init__.py" and p.is_file() and p.suffix in (".py", ".pyi")
    }
    assert sorted(fresh) == sorted(committed), "stubs without a .proto or missing: run scripts/gen-protos"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated files {stale}: run scripts/gen-protos and commit the result"
