"""Is this site's clock good enough for Flower's node authentication?

Every Fleet API call of an authenticated SuperNode carries a timestamp signed with the site key;
the SuperLink (flwr 1.39) accepts it only if the site's clock is at most
:data:`AHEAD_TOLERANCE_S` ahead of, and :data:`BEHIND_TOLERANCE_S` behind, the coordinator's. A site
whose clock runs ahead by more than five seconds is refused with an authentication error that does not
mention time, so ``fedclient doctor`` checks the clock three ways:

- whether the kernel considers the clock synchronised (NTP/chrony discipline, ``adjtimex(2)``);
- the offset against a time server (``--time-server``, SNTP via ``ntplib``), when one is given;
- that the coordinator's certificate is already valid by this clock (a clock far behind fails TLS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as dt
import pathlib

AHEAD_TOLERANCE_S = 5.0  # flwr.common.constant: timestamps from −5 s ...
BEHIND_TOLERANCE_S = 300.0  # ... to +TIMESTAMP_TOLERANCE (300 s) relative to the SuperLink's clock
_TIME_ERROR = 5  # adjtimex(2): clock not synchronised


class _Timex(ctypes.Structure):  # struct timex (linux/timex.h), read-only use: modes = 0
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
                ("time_sec", ctypes.c_long), ("time_usec", ctypes.c_long), ("tick", ctypes.c_long),
                ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long), ("shift", ctypes.c_int),
                ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
                ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
                ("padding", ctypes.c_int * 11)]


def kernel_clock_synchronised() -> bool | None:
    """True if the kernel reports a disciplined clock, False if not, None where it cannot say."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        adjtimex = ctypes.CDLL(name, use_errno=True).adjtimex
    except (OSError, AttributeError):
        return None
    timex = _Timex()
    state = adjtimex(ctypes.byref(timex))
    if state < 0:
        return None
    return state != _TIME_ERROR


def time_server_offset(server: str, timeout: float = 3.0) -> float:
    """Seconds this clock is *behind* ``server`` (positive: the site is slow), by SNTP.

    ``server`` is ``HOST`` or ``HOST:PORT`` (default port 123). Raises ``ValueError`` naming the
    server when it does not answer.
    """
    import ntplib

    host, _, port = server.rpartition(":") if server.count(":") == 1 else (server, "", "")
    host = host or server
    try:
        response = ntplib.NTPClient().request(host, version=3, port=int(port) if port else 123, timeout=timeout)
    except (ntplib.NTPException, OSError, ValueError) as err:
        raise ValueError(f"time server {server} did not answer ({err})") from err
    return float(response.offset)


def judge_offset(offset: float) -> str | None:
    """A problem statement if an offset (server − site, seconds) would break node authentication."""
    if -offset > AHEAD_TOLERANCE_S:
        return (f"this clock is {-offset:.1f} s ahead; Flower refuses authenticated SuperNodes more than "
                f"{AHEAD_TOLERANCE_S:.0f} s ahead of the coordinator: synchronise it (NTP/chrony)")
    if offset > BEHIND_TOLERANCE_S:
        return (f"this clock is {offset:.1f} s behind; Flower refuses authenticated SuperNodes more than "
                f"{BEHIND_TOLERANCE_S:.0f} s behind the coordinator: synchronise it (NTP/chrony)")
    return None


def certificate_window_problem(ca_or_cert: pathlib.Path, now: dt.datetime | None = None) -> str | None:
    """A problem statement if ``now`` lies outside the certificate's validity window."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(ca_or_cert.read_bytes())
    now = now or dt.datetime.now(dt.UTC)
    if now < cert.not_valid_before_utc:
        return (f"this clock ({now:%Y-%m-%d %H:%M} UTC) is before {ca_or_cert.name} was issued "
                f"({cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC): the clock is wrong")
    if now > cert.not_valid_after_utc:
        return f"{ca_or_cert.name} expired on {cert.not_valid_after_utc:%Y-%m-%d} (or this clock is wrong)"
    return None
