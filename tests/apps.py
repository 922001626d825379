"""ClientApps used by the simulation tests (importable by Ray workers, hence a module)."""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedclient.app import build_client_app
from fedclient.wire import array_record, unpack_array_record


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
        arrays = unpack_array_record(reply.content["arrays"])
        key = sorted(arrays)[-1]
        if (rnd, partition) == (1, 0):
            arrays[key] = np.zeros(3, dtype=np.float32)
        elif (rnd, partition) == (2, 1):
            arrays[key].flat[0] = np.nan
        elif (rnd, partition) == (2, 2):
            arrays["classifier.extra.weight"] = np.ones(4, dtype=np.float32)
        reply.content["arrays"] = array_record(arrays)
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return honest(msg, context)

    @app.query("identify")
    def identify(msg: Message, context: Context) -> Message:
        return honest(msg, context)

    return app


def diverging_client_app(config: dict) -> ClientApp:
    """fedtune's ClientApp, except that partition 1 perturbs its copy of the global weights before
    round 3 (as a site with a different BLAS might): the weights-hash check must stop the run."""
    from aggregators.shared_randomness import HELD_VECTOR
    from fedclient.local import CLIENT_STATE_ARRAYS

    honest = build_client_app(config)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        rnd = int(msg.content["config"]["server-round"])
        if rnd == 3 and int(context.node_config["partition-id"]) == 1:
            held = unpack_array_record(context.state[CLIENT_STATE_ARRAYS])
            held[HELD_VECTOR][0] += 1e-3
            context.state[CLIENT_STATE_ARRAYS] = array_record(held)
        return honest(msg, context)

    @app.query("identify")
    def identify(msg: Message, context: Context) -> Message:
        return honest(msg, context)

    return app


def hostile_search_client_app(config: dict, site_config) -> ClientApp:
    """fedtune's ClientApp (with each simulated site's ``site_config``), except two hostile sites:
    partition 3 answers a query with bytes that are no ciphertext of the epoch, partition 4 answers
    its fetch with fewer document ids than the rows asked."""
    from fedclient.search import REPLY

    honest = build_client_app(config, site_config=site_config)
    app = ClientApp()

    @app.query("search")
    def search(msg: Message, context: Context) -> Message:
        reply = honest(msg, context)
        partition, kind = int(context.node_config["partition-id"]), str(msg.content["search"]["kind"])
        if REPLY in reply.content:
            if (partition, kind) == (3, "query"):
                reply.content[REPLY]["results"] = [b"\x00" * 64]
            elif (partition, kind) == (4, "fetch"):
                reply.content[REPLY]["ids"] = list(reply.content[REPLY]["ids"])[:1]
        return reply

    @app.query("identify")
    def identify(msg: Message, context: Context) -> Message:
        return honest(msg, context)

    return app
