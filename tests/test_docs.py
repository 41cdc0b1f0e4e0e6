"""The README's examples stay true: its job.yaml and silo.yaml load as the code reads them."""

from __future__ import annotations

import re
from pathlib import Path

from fedmeki_core.jobspec import load_job_spec
from silo_agent.settings import SiloSettings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_yaml_examples_load(tmp_path: Path) -> None:
    silo_yaml, job_yaml, fedmeki_yaml = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)
    (tmp_path / "job.yaml").write_text(job_yaml)
    (tmp_path / "silo.yaml").write_text(silo_yaml)
    job = load_job_spec(tmp_path / "job.yaml")
    assert job.privacy.dp is None and job.rounds == 3
    # the DP paragraph's block, inline in backticks across a line break, added to the same job
    privacy = re.search(r"`(privacy: \{dp: .*?\}\})`", README.read_text(), re.S)
    assert privacy is not None
    (tmp_path / "dp.yaml").write_text(job_yaml + privacy.group(1).replace("\n", " ") + "\n")
    dp = load_job_spec(tmp_path / "dp.yaml").privacy.dp
    assert dp is not None and dp.mode == "central" and dp.noise_multiplier == 0.8
    (tmp_path / "fedmeki.yaml").write_text(fedmeki_yaml)
    fedmeki = load_job_spec(tmp_path / "fedmeki.yaml")
    assert fedmeki.task == "fedmeki" and fedmeki.injection is not None and fedmeki.injection.adapter == "moe-lora"
    silo = SiloSettings.from_yaml(tmp_path / "silo.yaml")
    assert "synthetic-vitals" in silo.data and silo.device == "auto"
