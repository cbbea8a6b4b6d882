"""Which image URLs the backend may fetch: the Label Studio host and an allow-list, nothing else.

Task data comes from whoever can import tasks into Label Studio, so an image URL is untrusted
input: without a rule, ``http://169.254.169.254/...`` or ``http://localhost:6379/`` would make
the backend a proxy into the network it runs in (SSRF). ALLOWED_IMAGE_HOSTS lists the extra
hosts (``images.example.org``, ``*.s3.amazonaws.com``, ``10.0.0.5:8000``); the entry ``*``
allows any host whose every address is public (never loopback, private, link-local, reserved).
Redirects are followed by hand, each hop checked by the same rule.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlparse

Resolver = Callable[[str, int], list[str]]


class UrlRefused(ValueError):
    """A URL the policy does not allow; the message names the host, never a query string."""


def resolve_host(host: str, port: int) -> list[str]:
    """All addresses ``host`` resolves to (the addresses a connection could use)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UrlRefused(f"image host {host!r} does not resolve ({exc})") from exc
    return sorted({str(info[4][0]) for info in infos})


def is_public_address(address: str) -> bool:
    """True for globally routable unicast addresses (IPv4-mapped IPv6 judged as IPv4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def parse_allow_list(value: str) -> tuple[str, ...]:
    return tuple(item.strip().lower() for item in value.split(",") if item.strip())


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


@dataclass(frozen=True)
class UrlPolicy:
    label_studio_url: str = ""
    allowed_hosts: tuple[str, ...] = ()
    resolver: Resolver = resolve_host

    @classmethod
    def from_settings(cls, label_studio_url: str, allowed: str | Iterable[str]) -> UrlPolicy:
        hosts = parse_allow_list(allowed) if isinstance(allowed, str) else tuple(allowed)
        return cls(label_studio_url, hosts)

    def is_label_studio(self, url: str) -> bool:
        base, target = urlparse(self.label_studio_url), urlparse(url)
        if not base.netloc:
            return False
        return (target.scheme, _netloc(target)) == (base.scheme, _netloc(base))

    def check(self, url: str) -> None:
        """Raise UrlRefused unless ``url`` may be fetched."""
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https"):
            raise UrlRefused(f"unsupported image URL scheme {parsed.scheme!r}")
        if parsed.username or parsed.password:
            raise UrlRefused("image URLs with credentials in them are refused")
        try:
            host, port = (parsed.hostname or "").lower(), parsed.port
        except ValueError as exc:
            raise UrlRefused(f"image URL has an invalid port ({exc})") from exc
        if not host:
            raise UrlRefused("image URL has no host")
        if self.is_label_studio(url):
            return
        port = port or _default_port(parsed.scheme)
        for entry in self.allowed_hosts:
            if entry != "*" and _entry_matches(entry, host, port):
                return
        if "*" in self.allowed_hosts:
            private = [a for a in self.resolver(host, port) if not is_public_address(a)]
            if not private:
                return
            raise UrlRefused(
                f"image host {host!r} resolves to a non-public address ({private[0]}); "
                "add it to ALLOWED_IMAGE_HOSTS to allow it"
            )
        raise UrlRefused(
            f"image host {host!r} is neither the Label Studio host nor in ALLOWED_IMAGE_HOSTS"
        )


def _netloc(parsed) -> str:
    """host:port with the default port made explicit, so http://h and http://h:80 compare equal."""
    try:
        port = parsed.port or _default_port(parsed.scheme)
    except ValueError:
        return parsed.netloc.lower()
    return f"{(parsed.hostname or '').lower()}:{port}"


def _entry_matches(entry: str, host: str, port: int) -> bool:
    """``host``, ``host:port``, ``*.domain`` (subdomains only) or an IP network ``10.0.0.0/8``."""
    pattern, _, want_port = entry.rpartition(":") if _has_port(entry) else (entry, "", "")
    if want_port and int(want_port) != port:
        return False
    if "/" in pattern:
        try:
            return ipaddress.ip_address(host) in ipaddress.ip_network(pattern, strict=False)
        except ValueError:
            return False
    if pattern.startswith("*."):
        return fnmatch.fnmatchcase(host, pattern) and host != pattern[2:]
    return host == pattern.strip("[]")


def _has_port(entry: str) -> bool:
    head, sep, tail = entry.rpartition(":")
    return bool(sep) and tail.isdigit() and "]" not in tail and head.count(":") == 0
