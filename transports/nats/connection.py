"""Connecting to NATS: servers, credentials and TLS from the config, and what a refusal says.

No secret is ever part of a message built here: a refused password names the key to fix.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

import nats
from nats.aio.client import Client

from processor.config import Config, NatsConfig
from processor.errors import ConfigError

log = logging.getLogger("swarm_aggregator.nats")


def connect_options(n: NatsConfig, name: str) -> dict[str, Any]:
    """nats.connect() keyword arguments from the config (servers, credentials, TLS)."""
    options: dict[str, Any] = {
        "servers": n.servers, "name": name, "allow_reconnect": True,
        "max_reconnect_attempts": -1, "reconnect_time_wait": n.reconnect_wait_s,
        "connect_timeout": 2}
    if n.user:
        options.update(user=n.user, password=n.password)
    if n.token:
        options["token"] = n.token
    if n.tls_ca or n.tls_cert:
        options["tls"] = tls_context(n)
    return options


def refusal(e: BaseException) -> str:
    """The server's words when an error is its refusal of the credentials, else ""."""
    text = str(e).removeprefix("nats: ").strip().strip("'")
    low = text.lower()
    return text if ("authorization" in low or "authentication" in low) else ""


def refused_error(n: NatsConfig, answer: str) -> ConfigError:
    """The start error for refused credentials: names the key to fix, never its value."""
    if n.token:
        key, given = "transport.nats.token", "the token"
    elif n.user:
        key, given = "transport.nats.password", f"user {n.user!r} and its password"
    else:
        key, given = "transport.nats.user", "no credentials (the server requires them)"
    return ConfigError(key, f"the NATS server at {', '.join(n.servers)} refused {given}: "
                            f"{answer}")


def tls_context(n: NatsConfig) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=n.tls_ca or None)
        if n.tls_cert:
            ctx.load_cert_chain(n.tls_cert, n.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError("transport.nats.tls_ca", f"cannot load TLS files: {e}") from None
    return ctx


async def quiet(e: Exception) -> None:
    log.debug("nats: %s", e)


async def connect_admin(cfg: Config) -> Client:
    n = cfg.transport.nats
    options = connect_options(n, "swarm-aggregator admin")
    options.update(max_reconnect_attempts=3, error_cb=quiet)
    return await asyncio.wait_for(nats.connect(**options), max(n.connect_wait_s, 2.0))
