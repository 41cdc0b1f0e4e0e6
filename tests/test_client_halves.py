"""The registry names each client half by import path: every one loads, is a client half, and lives in the torch half;
the registry itself (what the coordinator imports) loads neither torch nor that half."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from fedmeki_core.algorithms import ALGORITHMS, get_algorithm
from fedmeki_core.training import ClientHalf, client_half


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_s_client_half_loads_from_its_import_path(name: str) -> None:
    entry = get_algorithm(name)
    client = client_half(entry, entry.resolve_options({}))
    assert isinstance(client, ClientHalf)
    assert type(client).__module__.startswith("fedmeki_core.training.")


def test_a_client_half_outside_the_torch_half_is_refused() -> None:
    entry = dataclasses.replace(get_algorithm("fedavg"), client="os:system")
    with pytest.raises(ValueError, match=r"not in fedmeki_core\.training"):
        client_half(entry, entry.resolve_options({}))


def test_the_registry_loads_no_torch_and_no_client_half() -> None:
    code = "import json, sys, fedmeki_core.algorithms; print(json.dumps(sorted(sys.modules)))"
    loaded = set(
        json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    )
    assert "fedmeki_core.algorithms" in loaded
    assert not {name for name in loaded if name == "torch" or name.startswith("fedmeki_core.training")}
