"""ClientApps used by the simulation tests (importable by Ray workers, hence a module)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp

from fedclient.app import build_client_app


def corrupting_client_app(config: dict) -> ClientApp:
    """fedtune's ClientApp, except that some partitions corrupt their train reply:

    round 1: partition 0 sends an array of the wrong shape;
    round 2: partition 1 sends NaN, partition 2 adds an unknown key.
    """
    honest = build_client_app(config)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = honest(msg, context)
        rnd = int(msg.content["config"]["server-round"])
        partition = int(context.node_config["partition-id"])
        arrays = reply.content["arrays"]
        key = sorted(arrays.keys())[-1]
        if (rnd, partition) == (1, 0):
            arrays[key] = Array(np.zeros(3, dtype=np.float32))
        elif (rnd, partition) == (2, 1):
            value = arrays[key].numpy().copy()
            value.flat[0] = np.nan
            arrays[key] = Array(value)
        elif (rnd, partition) == (2, 2):
            arrays["classifier.extra.weight"] = Array(np.ones(4, dtype=np.float32))
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return honest(msg, context)

    @app.query("identify")
    def identify(msg: Message, context: Context) -> Message:
        return honest(msg, context)

    return app
