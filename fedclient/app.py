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

import functools
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedclient.policy import SitePolicy, evaluation_refused, in_flower_simulation, site_policy
from fedclient.runconfig import quiet_environment, resolve_run_config
from fedclient.runtime import NODE_CONFIG_KEY as RUNTIME_SOCKET
from fedclient.wire import refusal_record
from privacy.refusal import PolicyRefusal, site_log

quiet_environment()


def site_name(node_config: Mapping[str, Any]) -> str:
    """How this site names itself to the coordinator: ``site-name``, else ``partition-<id>``."""
    if node_config.get("site-name"):
        return str(node_config["site-name"])
    if "partition-id" in node_config:
        return f"partition-{int(node_config['partition-id'])}"
    return ""


Handler = Callable[[Message, Context], Message]


def keeps_errors_at_the_site(handler: Handler) -> Handler:
    """``handler`` whose unexpected exceptions stay at the site: Flower would send ``str(error)``
    to the coordinator, and an error's text can quote a path, a file or a figure of the site's. The
    traceback goes to the site's log; the reply is a failure naming only the exception's type
    (the round goes on without the site, which is asked again later). In Flower's simulation
    engine, whose virtual sites keep nothing from the researcher, the error propagates as before."""

    @functools.wraps(handler)
    def guarded(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as err:
            if in_flower_simulation():
                raise
            site_log(f"a {msg.metadata.message_type} message failed:\n{traceback.format_exc()}")
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                 f"the site could not process this message ({type(err).__name__}; the site's log "
                                 "has the details)"), reply_to=msg)

    return guarded


def answered_by_the_site_runtime(handler: Handler, overrides: Mapping[str, Any] | None = None,
                                 site_config: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
                                 ) -> Handler:
    """``handler`` that, at a site whose node config names a site runtime (``runtime-socket``, set
    by ``fedclient start``), has that long-lived process answer instead of this per-message one
    (:mod:`fedclient.runtime`), with this ClientApp's effective run config (``overrides`` applied;
    ``site_config`` adds a simulated site's node config, as in :func:`build_client_app`):
    the model, data and imports stay loaded across messages. Only the site's SuperNode sets its
    node config, so a coordinator cannot route a message anywhere."""

    @functools.wraps(handler)
    def routed(msg: Message, context: Context) -> Message:
        node = {**context.node_config, **(site_config(context.node_config) if site_config else {})}
        socket_path = node.get(RUNTIME_SOCKET)
        if not socket_path:
            return handler(msg, context)
        from fedclient.runtime import forward

        effective = Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                            state=context.state, run_config=resolve_run_config(context.run_config, overrides))
        reply = forward(str(socket_path), msg, effective)
        context.state = effective.state
        return reply

    return routed


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

    routed = functools.partial(answered_by_the_site_runtime, overrides=overrides, site_config=site_config)

    def policy_of(node: Mapping[str, Any]) -> SitePolicy:
        """The site's policy; PolicyRefusal (details in the site's log) if its file cannot be used."""
        try:
            return site_policy(node)
        except ValueError as err:
            site_log(str(err))
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
    @keeps_errors_at_the_site
    @routed
    def train(msg: Message, context: Context) -> Message:
        return run_local(msg, context, probe=False)

    @app.query("probe")
    @keeps_errors_at_the_site
    @routed
    def probe(msg: Message, context: Context) -> Message:
        return run_local(msg, context, probe=True)

    @app.evaluate()
    @keeps_errors_at_the_site
    @routed
    def evaluate(msg: Message, context: Context) -> Message:
        """Federated evaluation, if the site's policy allows it (:func:`fedclient.local.evaluate_reply`)."""
        node = node_config(context)
        config = resolve_run_config(context.run_config, overrides)
        try:
            policy = policy_of(node)
            policy.check_training(str(config["task"]), "")
            if policy.evaluation_mode == "refuse":
                raise evaluation_refused()
        except PolicyRefusal as err:
            return Message(refusal_record(str(err)), reply_to=msg)
        from fedclient.local import evaluate_reply

        return evaluate_reply(msg, context, node, config, policy)

    def with_site_policy(respond: Callable[[Message, Context, dict[str, Any], SitePolicy], Message]) -> Handler:
        """A handler that answers with the site's node config and policy, or with the refusal that
        the policy cannot be used."""

        @functools.wraps(respond)
        def handler(msg: Message, context: Context) -> Message:
            node = node_config(context)
            try:
                policy = policy_of(node)
            except PolicyRefusal as err:
                return Message(refusal_record(str(err)), reply_to=msg)
            return respond(msg, context, node, policy)

        return handler

    @app.query("secagg")
    @keeps_errors_at_the_site
    @routed
    @with_site_policy
    def secagg(msg: Message, context: Context, node: dict[str, Any], policy: SitePolicy) -> Message:
        """A secure-aggregation step (:mod:`fedclient.secure_aggregation`)."""
        from fedclient.secure_aggregation import step

        return step(msg, context, node, policy)

    @app.query("search")
    @keeps_errors_at_the_site
    @routed
    @with_site_policy
    def search(msg: Message, context: Context, node: dict[str, Any], policy: SitePolicy) -> Message:
        from fedclient.search import answer

        return answer(msg, policy, node.get("state-dir") or None)

    @app.query("identify")
    @keeps_errors_at_the_site
    @routed
    def identify(msg: Message, context: Context) -> Message:
        from fedclient.device import describe_device

        node = node_config(context)
        return Message(RecordDict({"site": ConfigRecord({"name": site_name(node), "device": describe_device(node)})}),
                       reply_to=msg)

    return app


app = build_client_app()
