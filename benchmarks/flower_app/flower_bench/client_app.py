"""The SuperNode side: training replaced by "the global weights plus a constant", as in benchmarks/bench_silo.py
(each node's own constant: its `index` in the node config)."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    server_round = int(msg.content["config"]["server-round"])
    # A constant of this node's own: two nodes' identical updates would be stored, so uploaded, once.
    step = np.float32(0.001 * server_round * (1 + int(context.node_config["index"])))
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    for array in arrays:
        array += step  # in place: no second copy of the model
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": 100})})
    return Message(content=content, reply_to=msg)
