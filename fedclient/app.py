"""The fedtune ClientApp: a thin Flower adapter around an algorithm's client half.

``train`` decodes the :class:`~aggregators.base.Instruction`, runs ``Algorithm.local`` on this
site's data on the best device present, and replies with the encoded Payload. ``evaluate`` scores
the global model on the site's held-out local split, if the site's policy allows it.

``query.identify`` tells the coordinator this site's name. ``query.probe`` runs an algorithm's
probe (e.g. layer scores); ``query.search`` answers encrypted search (:mod:`fedclient.search`).

**What this site decides comes from the site alone**: its policy (:mod:`fedclient.policy`, the file
``fedclient start --policy`` names) and its node config (``partition-id``, ``num-partitions``,
``data-dir``, ``site-name``, ``device``, ``layer-budget``, ``state-dir``, the DP and search flags).
The run config and the instruction say what the coordinator *asks*; a request the policy forbids
is declined with a refusal naming the policy key, and refusals never quote the site's data (the
details go to the site's own log). The privacy ledger and the search ledger live in the site's
state directory (``state-dir``), so no new run and no resume starts with a fresh budget.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedclient.policy import SitePolicy, site_policy
from fedclient.runconfig import quiet_environment, resolve_run_config
from fedclient.wire import refusal_record
from privacy.refusal import PolicyRefusal

quiet_environment()


def site_name(node_config: Mapping[str, Any]) -> str:
    """How this site names itself to the coordinator: ``site-name``, else ``partition-<id>``."""
    if node_config.get("site-name"):
        return str(node_config["site-name"])
    if "partition-id" in node_config:
        return f"partition-{int(node_config['partition-id'])}"
    return ""


def build_client_app(overrides: Mapping[str, Any] | None = None, *,
                     site_config: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None) -> ClientApp:
    """A ClientApp. ``overrides`` stand in for the run config where Flower passes none (fedsim);
    ``site_config(node_config)`` adds a simulated site's own node config (what a real site passes
    to ``fedclient start``: its policy, state directory, search index...). The training stack
    (:mod:`fedclient.local`) is imported only by the messages that train or evaluate."""
    app = ClientApp()

    def node_config(context: Context) -> dict[str, Any]:
        node = dict(context.node_config)
        if site_config is not None:
            node.update(site_config(node))
        return node

    def policy_of(node: Mapping[str, Any]) -> SitePolicy:
        """The site's policy; PolicyRefusal (details in the site's log) if its file cannot be used."""
        try:
            return site_policy(node)
        except ValueError as err:
            print(f"fedtune site: {err}", file=sys.stderr, flush=True)
            raise PolicyRefusal("file", "the site's policy cannot be used (its log says why)") from None

    def run_local(msg: Message, context: Context, probe: bool) -> Message:
        node = node_config(context)
        config = resolve_run_config(context.run_config, overrides)
        try:
            policy = policy_of(node)
        except PolicyRefusal as err:
            return Message(refusal_record(str(err)), reply_to=msg)
        from fedclient.local import train_reply

        return train_reply(msg, context, node, config, policy, probe)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return run_local(msg, context, probe=False)

    @app.query("probe")
    def probe(msg: Message, context: Context) -> Message:
        return run_local(msg, context, probe=True)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Federated evaluation, if the site's policy allows it (:func:`fedclient.local.evaluate_reply`)."""
        node = node_config(context)
        config = resolve_run_config(context.run_config, overrides)
        try:
            policy = policy_of(node)
            policy.check_training(str(config["task"]), "")
            if policy.evaluation_mode == "refuse":
                raise PolicyRefusal("evaluation.mode", "this site does not evaluate the coordinator's weights on "
                                    "its data")
        except PolicyRefusal as err:
            return Message(refusal_record(str(err)), reply_to=msg)
        from fedclient.local import evaluate_reply

        return evaluate_reply(msg, context, node, config, policy)

    @app.query("search")
    def search(msg: Message, context: Context) -> Message:
        from fedclient.search import answer

        node = node_config(context)
        try:
            policy = policy_of(node)
        except PolicyRefusal as err:
            return Message(refusal_record(str(err)), reply_to=msg)
        return answer(msg, policy, node.get("state-dir") or None)

    @app.query("identify")
    def identify(msg: Message, context: Context) -> Message:
        from fedclient.local import describe_device

        node = node_config(context)
        return Message(RecordDict({"site": ConfigRecord({"name": site_name(node), "device": describe_device(node)})}),
                       reply_to=msg)

    return app


app = build_client_app()
