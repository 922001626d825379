"""`fedclient doctor`'s clock checks: SNTP offset against a time server on 127.0.0.1 whose clock
is deliberately wrong, Flower's authentication window, and a certificate issued "in the future"."""

from __future__ import annotations

import datetime as dt
import pathlib
import socket
import threading
import time

import ntplib
import pytest

from fedclient.clock import certificate_window_problem, judge_offset, time_server_offset
from fedserver.pki import create_tls


def _serve_sntp(sock: socket.socket, skew: float, stop: threading.Event) -> None:
    """Answer SNTP requests with this machine's time shifted by ``skew`` seconds."""
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            data, peer = sock.recvfrom(1024)
        except TimeoutError:
            continue
        request = ntplib.NTPPacket()
        request.from_data(data)
        reply = ntplib.NTPPacket(version=3, mode=4)
        reply.stratum, reply.ref_timestamp = 2, ntplib.system_to_ntp_time(time.time() + skew)
        reply.orig_timestamp = request.tx_timestamp
        reply.recv_timestamp = ntplib.system_to_ntp_time(time.time() + skew)
        reply.tx_timestamp = ntplib.system_to_ntp_time(time.time() + skew)
        sock.sendto(reply.to_data(), peer)


@pytest.mark.parametrize("skew", [-42.0, 0.0, 17.5])
def test_offset_against_a_time_server_is_measured(skew: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    stop = threading.Event()
    server = threading.Thread(target=_serve_sntp, args=(sock, skew, stop), daemon=True)
    server.start()
    try:
        offset = time_server_offset(f"127.0.0.1:{sock.getsockname()[1]}")
    finally:
        stop.set()
        server.join()
        sock.close()
    assert offset == pytest.approx(skew, abs=0.05)


def test_a_silent_time_server_is_named() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never answers
        with pytest.raises(ValueError, match=r"time server 127.0.0.1:\d+ did not answer"):
            time_server_offset(f"127.0.0.1:{sock.getsockname()[1]}", timeout=0.5)


def test_flowers_authentication_window_is_applied() -> None:
    assert judge_offset(0.0) is None
    assert judge_offset(-4.9) is None and judge_offset(299.0) is None
    assert "6.0 s ahead" in judge_offset(-6.0)
    assert "400.0 s behind" in judge_offset(400.0)


def test_a_clock_before_the_certificate_was_issued_is_caught(tmp_path: pathlib.Path) -> None:
    create_tls(tmp_path, ["127.0.0.1"])
    ca = tmp_path / "ca.crt"
    assert certificate_window_problem(ca) is None
    yesterday = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    assert "before ca.crt was issued" in certificate_window_problem(ca, now=yesterday)
    assert "expired" in certificate_window_problem(ca, now=yesterday + dt.timedelta(days=40000))
