"""Which URLs from untrusted metadata may be fetched (the download stage checks every URL and every redirect hop).

* Only ``http`` and ``https`` with a host name: anything else (``file:``, ``data:``, ``ftp:``, ``gopher:``, no
  host) is ``unsafe_url: <why>``.
* The host's addresses (``getaddrinfo``, so every IPv4/IPv6 spelling of an address is seen as the address it is,
  e.g. ``0x7f.1`` or ``[::ffff:127.0.0.1]``) must all be public: loopback, private, link-local (cloud metadata
  endpoints such as 169.254.169.254), multicast, reserved and unspecified addresses are ``private_address: <ip>``
  unless ``download.allow_private_addresses`` is true (the tests' 127.0.0.1 server). A name that does not resolve
  is ``dns_error``.

Limit: the check resolves the name before the HTTP client connects, and the client resolves it again; a DNS server
that answers differently within that window (DNS rebinding) is not caught. Run large downloads from a host whose
network cannot reach internal services if that matters.
"""
from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

ALLOWED_SCHEMES = ("http", "https")


def address_problem(address: str) -> str:
    """"" for a public address, else ``private_address: <ip>``."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
            or ip.is_unspecified or not ip.is_global):
        return f"private_address: {ip}"
    return ""


def url_problem(url: str, allow_private: bool = False) -> str:
    """Why ``url`` must not be fetched ("" = fetch it). Resolves the host (see module docstring)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as err:
        return f"unsafe_url: {err}"
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        return f"unsafe_url: scheme {parts.scheme or 'none'!r} (only http/https)"
    if not host:
        return "unsafe_url: no host"
    if allow_private:
        return ""
    try:
        infos = socket.getaddrinfo(host, port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        return f"dns_error: {err}"
    for info in infos:
        if problem := address_problem(info[4][0]):
            return problem
    return ""
