"""One gloo rank that shards a saved base with silo_agent.sharding and prints, as JSON, the parameter bytes it
holds before and after (`python -m tests.shard_rank FOLDER BASE RANK WORLD`; tests/test_distributed_training.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.models.build import build_job_model
from silo_agent.sharding import local_parameter_bytes, shard


def main(folder: Path, base: Path, rank: int, world: int) -> None:
    spec = parse_job_spec(
        {
            "name": "shards",
            "task": "instructions",
            "rounds": 1,
            "model": {
                "architecture": "causal-lm",
                "pretrained": "llama",
                "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            },
        }
    )
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{folder / 'rendezvous'}", rank=rank, world_size=world
    )
    try:
        model = build_job_model(spec, base, torch.device("cpu"))
        whole = local_parameter_bytes(model)
        shard(model, torch.device("cpu"))
        print(json.dumps({"whole": whole, "local": local_parameter_bytes(model)}))
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
