"""Choose a transport by URL: ``nats://``/``tls://`` (NATS JetStream) or ``amqp://``/``amqps://`` (RabbitMQ)."""

from __future__ import annotations

import ssl
from urllib.parse import unquote, urlsplit

from services.core.bus.abc import Transport

SCHEMES = {"nats": "nats", "tls": "nats", "amqp": "rabbitmq", "amqps": "rabbitmq"}


class UnsupportedBusUrl(ValueError):
    pass


def broker_of(url: str) -> str:
    scheme = urlsplit(url).scheme
    try:
        return SCHEMES[scheme]
    except KeyError:
        raise UnsupportedBusUrl(
            f"unsupported bus URL scheme {scheme or '(none)'!r}: use nats://, tls://, amqp:// or amqps://"
        ) from None


def transport_from_url(url: str, *, ssl_context: ssl.SSLContext | None = None) -> Transport:
    """A new, unconnected transport for ``url``; credentials may be in the URL, TLS in ``ssl_context``."""
    if broker_of(url) == "rabbitmq":
        from services.core.bus.rabbitmq import RabbitTransport

        return RabbitTransport(url, ssl_context=ssl_context)
    from services.core.brokerauth import nats_inbox_prefix
    from services.core.bus.nats import NatsTransport

    # A NATS user may only receive replies under its own inbox prefix (services.core.brokerauth).
    user = urlsplit(url).username
    if user:
        return NatsTransport(url, tls=ssl_context, inbox_prefix=nats_inbox_prefix(unquote(user)))
    return NatsTransport(url, tls=ssl_context)
