"""Reading a Redis store URL into redis-py keyword arguments.

URL forms (options in the query string, or as keywords to ``open_store``, which win)::

    redis://[[user]:password@]host[:port][/db]          one server (db 0..15)
    rediss://...                                        the same over TLS
    redis+cluster://[[user]:password@]host:port[,host:port...]   Redis Cluster: any
    rediss+cluster://...                                subset of the nodes to start
                                                        from; the client finds the rest

Options:

=====================  =====================================================  =========
``timeout``            seconds a read or write on a socket may stall          0.5
``connect_timeout``    seconds to establish a connection                      0.5
``ttl``                expire values after this many seconds (0: never)      0
``max_connections``    connection pool size per server                        32
``username``,          Redis AUTH (ACL user / password); prefer keywords to
``password``           a URL that may end up in a log
``ssl_ca_certs``,      TLS: CA bundle, client certificate and key files,
``ssl_certfile``,      ``required`` / ``optional`` / ``none`` verification,
``ssl_keyfile``,       hostname check (``rediss`` only)
``ssl_cert_reqs``,
``ssl_check_hostname``
``read_window``        bytes one MGET should return, about (one server)       4194304
``node_cooldown``      cluster: seconds a node that failed is left alone      2.0
=====================  =====================================================  =========
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from kvcore.errors import StoreConfigError
from kvcore.stores import StoreOptions, redact_url

__all__ = ["RedisTarget", "parse_redis_url"]

DEFAULT_PORT = 6379
_CERT_REQS = ("required", "optional", "none")


@dataclass
class RedisTarget:
    """A parsed Redis store URL."""

    scheme: str
    nodes: list[tuple[str, int]]
    db: int
    tls: bool
    cluster: bool
    ttl: int
    node_cooldown: float
    read_window: int
    #: Keyword arguments for redis.Redis / redis.cluster.RedisCluster.
    client_kwargs: dict[str, Any] = field(default_factory=dict)
    redacted: str = ""


def _split_hosts(netloc: str, url: str) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    userinfo, _, hosts = netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, sep, pw = userinfo.partition(":")
        username = urllib.parse.unquote(user) or None
        password = urllib.parse.unquote(pw) if sep else None
    nodes = []
    for item in hosts.split(","):
        item = item.strip()
        if not item:
            raise StoreConfigError(f"store URL {redact_url(url)!r} has an empty host")
        if item.startswith("["):  # [ipv6]:port
            host, _, rest = item[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
        try:
            port = int(port_text) if port_text else DEFAULT_PORT
        except ValueError:
            raise StoreConfigError(f"store URL {redact_url(url)!r}: port {port_text!r} is not "
                                   "a number") from None
        if not host or not 0 < port < 65536:
            raise StoreConfigError(f"store URL {redact_url(url)!r}: bad host:port {item!r}")
        nodes.append((host, port))
    return username, password, nodes


def parse_redis_url(url: str, options: dict[str, Any]) -> RedisTarget:
    """Parse a ``redis://``, ``rediss://``, ``redis+cluster://`` or
    ``rediss+cluster://`` URL and its options."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
        raise StoreConfigError(f"not a Redis store URL: {redact_url(url)!r}")
    cluster = scheme.endswith("+cluster")
    tls = scheme.startswith("rediss")
    username, password, nodes = _split_hosts(parts.netloc, url)
    if not cluster and len(nodes) != 1:
        raise StoreConfigError(f"store URL {redact_url(url)!r} lists {len(nodes)} hosts; "
                               "use redis+cluster:// for a Redis Cluster")
    path = parts.path.strip("/")
    try:
        db = int(path) if path else 0
    except ValueError:
        raise StoreConfigError(f"store URL {redact_url(url)!r}: database {path!r} is not a "
                               "number") from None
    if cluster and db != 0:
        raise StoreConfigError(f"store URL {redact_url(url)!r}: Redis Cluster has only "
                               "database 0")
    if not 0 <= db <= 1 << 16:
        raise StoreConfigError(f"store URL {redact_url(url)!r}: database {db} out of range")
    opts = StoreOptions(url, parts.query, options)
    timeout = opts.number("timeout", 0.5, low=0.001, high=3600)
    connect_timeout = opts.number("connect_timeout", 0.5, low=0.001, high=3600)
    ttl = opts.number("ttl", 0, integer=True, high=10 ** 9)
    max_connections = opts.number("max_connections", 32, low=1, high=100000, integer=True)
    node_cooldown = opts.number("node_cooldown", 2.0, high=3600)
    read_window = opts.number("read_window", 4 << 20, low=1, high=1 << 40, integer=True)
    username = opts.text("username", username)
    password = opts.text("password", password)
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": connect_timeout,
        "max_connections": max_connections,
        "username": username,
        "password": password,
    }
    ssl_names = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs",
                 "ssl_check_hostname")
    given_ssl = [n for n in ssl_names if opts.has(n)]
    if given_ssl and not tls:
        raise StoreConfigError(f"store URL {redact_url(url)!r}: {', '.join(given_ssl)} need "
                               f"TLS; use {'rediss+cluster' if cluster else 'rediss'}://")
    if tls:
        kwargs["ssl"] = True
        for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
            value = opts.text(name)
            if value is not None:
                kwargs[name] = value
        reqs = opts.text("ssl_cert_reqs", "required")
        if reqs not in _CERT_REQS:
            raise StoreConfigError(f"option ssl_cert_reqs={reqs!r} must be one of "
                                   f"{', '.join(_CERT_REQS)}")
        kwargs["ssl_cert_reqs"] = reqs
        kwargs["ssl_check_hostname"] = opts.flag("ssl_check_hostname", reqs == "required")
    opts.finish()
    if not cluster:
        kwargs["db"] = db
    return RedisTarget(scheme=scheme, nodes=nodes, db=db, tls=tls, cluster=cluster, ttl=ttl,
                       node_cooldown=node_cooldown, read_window=read_window,
                       client_kwargs=kwargs,
                       redacted=redact_url(url))
