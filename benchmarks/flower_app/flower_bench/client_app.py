"""The SuperNode side: training replaced by "the global weights plus a constant", as in benchmarks/bench_silo.py."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    server_round = int(msg.content["config"]["server-round"])
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    for array in arrays:
        array += 0.001 * server_round  # in place: no second copy of the model
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": 100})})
    return Message(content=content, reply_to=msg)
