"""The ServerApp: Flower's own FedAvg over the benchmark model; records when each round's aggregate is ready."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


def model(params: int, tensors: int) -> list[np.ndarray]:
    """The same shapes as benchmarks/round.py's model: `tensors` float32 vectors summing to `params`. Random
    values, not a constant: Flower sends each distinct 5 MiB chunk of an array once (chunks are addressed by their
    sha256), so a constant model would cross the wire as a couple of chunks."""
    tensors = max(1, min(tensors, params))
    rng = np.random.default_rng(0)
    return [rng.random(params // tensors + (1 if i < params % tensors else 0), np.float32) for i in range(tensors)]


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    nodes = int(config["min-nodes"])
    ready: list[float] = []  # evaluate_fn runs once before round 1 and after each round's aggregation

    def record(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        ready.append(time.time())
        return None

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=nodes, min_available_nodes=nodes)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model(int(config["params"]), int(config["tensors"]))),
        num_rounds=int(config["num-server-rounds"]),
        evaluate_fn=record,
    )
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(str(config["timings-file"])).write_text(json.dumps({"ready": ready, "serverapp_peak_rss_kib": peak_kib}))
