"""Starting this site's Flower SuperNode against a coordinator: TLS to the SuperLink's gRPC Fleet
API (``grpc-rere``), requests signed with the site's key, and the node config the fedtune
ClientApp reads (partition or data directory, device, layer budget, privacy settings)."""

from __future__ import annotations

import os
import pathlib
import socket
import sys
from collections.abc import Mapping
from typing import Any

from fedclient.keys import check_private_key
from fedclient.runconfig import QUIET_ENVIRONMENT
from fedclient.supernode_launcher import HEARTBEAT_RANGE_S


def node_config_text(config: Mapping[str, Any]) -> str:
    """``--node-config`` text: strings quoted, numbers bare."""
    return " ".join(f"{k}={v}" if isinstance(v, (int, float)) and not isinstance(v, bool) else f'{k}="{v}"'
                    for k, v in config.items())


def check_reachable(superlink: str, timeout: float = 5.0) -> None:
    """Raise ValueError naming the problem unless HOST:PORT accepts a TCP connection."""
    host, sep, port = superlink.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--superlink must be HOST:PORT (the coordinator's Fleet API), got '{superlink}'")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except OSError as err:
        raise ValueError(f"cannot reach the coordinator at {superlink} ({err}); check the address, the port "
                         "(the Fleet API, 9092 by default) and any firewall") from err


def check_tls(superlink: str, ca: pathlib.Path, timeout: float = 5.0) -> str:
    """Complete a TLS handshake with the coordinator's Fleet API, verifying its certificate against
    ``ca`` and the host name; return the certificate's subject. ValueError naming the problem."""
    import ssl

    host, _, port = superlink.rpartition(":")
    if not ca.is_file():
        raise ValueError(f"no CA certificate at {ca}; the coordinator's operator gives you its ca.crt")
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls:
            subject = dict(item[0] for item in tls.getpeercert()["subject"])
            return str(subject.get("commonName", "?"))
    except ssl.SSLCertVerificationError as err:
        raise ValueError(f"the coordinator's certificate does not verify with {ca} ({err.verify_message}): "
                         "wrong CA file, or the coordinator's certificate does not name this host") from err
    except (OSError, ssl.SSLError) as err:
        raise ValueError(f"TLS handshake with {superlink} failed ({err})") from err


def supernode_command(
    *, superlink: str, ca: pathlib.Path, key: pathlib.Path, node_config: Mapping[str, Any], runtime_port: int,
    trusted_publisher: pathlib.Path, max_retries: int | None = None, poll_interval: float | str | None = None,
    heartbeat_interval: float | None = None, isolation: str = "subprocess",
) -> list[str]:
    """The command line of this site's SuperNode (validates the CA, the key and the publisher key
    first): ``flower-supernode`` run through :mod:`fedclient.supernode_launcher`, which refuses every
    app not signed by ``trusted_publisher`` and shortens Flower's fixed waits (``poll_interval``: None
    adaptive, seconds fixed, ``"flower"`` Flower's own; :mod:`fedclient.supernode_launcher`)
    (``heartbeat_interval``: its heartbeat period). ``isolation`` is Flower's: ``subprocess`` (a
    ClientApp process per message) or ``process`` (the site runtime claims the tasks itself)."""
    if isolation not in ("subprocess", "process"):
        raise ValueError(f"isolation must be 'subprocess' or 'process', got '{isolation}'")
    if not ca.is_file():
        raise ValueError(f"no CA certificate at {ca}; the coordinator's operator gives you its ca.crt")
    check_private_key(key)
    from fedclient.app_trust import load_publisher

    load_publisher(trusted_publisher)
    if poll_interval == "flower":
        waits = ["--flower-waits"]
    elif poll_interval is None:
        waits = []
    elif isinstance(poll_interval, (int, float)) and not isinstance(poll_interval, bool) and 0.01 <= poll_interval <= 3.0:
        waits = ["--poll-interval", str(poll_interval)]
    else:
        raise ValueError(f"--poll-interval must be in 0.01..3 s or 'flower', got {poll_interval}")
    if heartbeat_interval is not None and not HEARTBEAT_RANGE_S[0] <= heartbeat_interval <= HEARTBEAT_RANGE_S[1]:
        raise ValueError(f"--heartbeat-interval must be in {HEARTBEAT_RANGE_S[0]:g}..{HEARTBEAT_RANGE_S[1]:g} s "
                         f"(what the SuperLink accepts), got {heartbeat_interval}")
    command = [
        sys.executable, "-m", "fedclient.supernode_launcher", "--trusted-publisher", str(trusted_publisher.resolve()),
        *waits,
        *(["--heartbeat-interval", str(heartbeat_interval)] if heartbeat_interval is not None else []), "--",
        "--grpc-rere", "--superlink", superlink, "--root-certificates", str(ca.resolve()),
        "--auth-supernode-private-key", str(key.resolve()), "--port", str(runtime_port), "--isolation", isolation,
        "--node-config", node_config_text(node_config),
    ]
    if max_retries is not None:
        command += ["--max-retries", str(max_retries)]
    return command


def supernode_environment(flwr_home: pathlib.Path) -> dict[str, str]:
    env = {**os.environ, **QUIET_ENVIRONMENT, "FLWR_HOME": str(flwr_home),
           "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": os.environ.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")}
    env["PATH"] = os.pathsep.join([str(pathlib.Path(sys.executable).parent), env.get("PATH", "")])
    return env
