"""Which `Host` headers the server answers: the allow-list that keeps DNS-rebinding pages out.

A page on an attacker's domain whose name is made to resolve to 127.0.0.1 (DNS rebinding) is same-origin with
that name, so the browser lets it read the local server's answers and post to it; but its requests carry the
attacker's name in `Host`. Answering only the names the server is reached by refuses them: the check of
Django's ALLOWED_HOSTS, Jupyter's local-host check and Starlette's TrustedHostMiddleware. Loopback names
(localhost and loopback addresses) are always answered: a page can only send them from this machine's own
origins, never from a rebound name.

Standard library only: the CLI checks `--allowed-hosts` with it before anything heavy is imported.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import cast

from .errors import DigitrecError

ANY = "*"
# a DNS name as browsers send it: ASCII letters, digits, hyphens and underscores in dot-separated labels
# (international names arrive in their xn-- form)
_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*")
_PORT = re.compile(r"[0-9]{0,5}")
ALLOWED_HOSTS_HINT = "list host names such as digits.school.example, .school.example (it and its subdomains) or * (any), separated by commas"


def normal_host(host: str) -> str | None:
    """`host` (no port) as it is compared: lower case, without the trailing dot of a fully qualified name, an
    IPv4 address in dotted form and an IPv6 one compressed, in brackets ("[::1]"); None if it is neither a DNS
    name nor an IP address."""
    host = host.lower()
    if host.startswith("[") and host.endswith("]"):
        if "%" in host:  # a zone ("[fe80::1%eth0]"): no browser sends one, and it may hold any character
            return None
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        except ValueError:
            return None
    host = host.removesuffix(".")
    if len(host) > 253 or not _NAME.fullmatch(host):
        return None
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        return host


def host_of(header: str) -> str | None:
    """The host of a `Host` header ("name", "name:port", "[v6]:port"), normalised; None if the header is not
    one (an IPv6 address must be in brackets, as RFC 3986 writes it; a port is digits)."""
    if header.startswith("["):
        end = header.find("]")
        host, rest = header[: end + 1], header[end + 1 :]
        if end < 0 or (rest and not (rest.startswith(":") and _PORT.fullmatch(rest[1:]))):
            return None
    else:
        host, _, port = header.partition(":")
        if not _PORT.fullmatch(port):
            return None
    return normal_host(host)


def listen_host(address: str) -> str | None:
    """The normalised host of an address or name as --host takes it (an IPv6 address without brackets)."""
    return normal_host(_bracketed(address))


def is_loopback(host: str) -> bool:
    """True for a normalised host that names this machine's loopback interface: localhost, 127.0.0.0/8, [::1]."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class AllowedHosts:
    """The Host names a server answers: loopback names always, plus exact names ("digits.school.example",
    "192.168.1.10", "[fd00::1]"), domains with their subdomains (".school.example", or "*.school.example"), or
    everything ("*"). Built from a comma-separated string or a list of entries; a bad entry is a DigitrecError.
    """

    def __init__(self, entries: str | Iterable[str] = ()):
        if isinstance(entries, str):
            entries = entries.split(",")
        try:
            given: list[object] = list(entries)
        except TypeError:  # a single name, but not a string: AllowedHosts(3)
            given = [entries]
        for entry in given:
            if not isinstance(entry, str):
                raise DigitrecError(
                    f"allowed hosts are names given as strings, and {entry!r} is not one; {ALLOWED_HOSTS_HINT}."
                )
        entries = [cast(str, entry).strip() for entry in given]
        if "" in entries:
            raise DigitrecError(f"{','.join(entries)!r} has an empty entry; {ALLOWED_HOSTS_HINT}.")
        self.any = ANY in entries
        self.names: set[str] = set()
        self.domains: set[str] = set()  # ".school.example": it and every name that ends with it
        for entry in entries:
            if entry == ANY:
                continue
            if entry.startswith((".", "*.")):
                host = normal_host(entry.removeprefix("*").removeprefix("."))
                if host is None or host.startswith("[") or _is_ip(host):
                    raise DigitrecError(_bad_entry(entry) + ".")
                self.domains.add("." + host)
            else:
                host = listen_host(entry)
                if host is None:
                    raise DigitrecError(_bad_entry(entry) + ".")
                self.names.add(host)

    def allows(self, host: str) -> bool:
        """Whether a normalised host (host_of's answer) is one this server answers."""
        if self.any or host in self.names or is_loopback(host):
            return True
        return any(host == domain[1:] or host.endswith(domain) for domain in self.domains)

    def __repr__(self) -> str:
        entries = sorted(self.names) + sorted(self.domains) + ([ANY] if self.any else [])
        return f"AllowedHosts({','.join(entries)!r})"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _bracketed(entry: str) -> str:
    """An IPv6 address written without brackets ("fd00::1", as --host takes it) in brackets."""
    if ":" in entry and not entry.startswith("["):
        try:
            return f"[{ipaddress.IPv6Address(entry).compressed}]"
        except ValueError:
            return entry
    return entry


def _bad_entry(entry: str) -> str:
    """One sentence for an --allowed-hosts entry that is not a host name, saying what to write instead."""
    if "://" in entry:
        name = entry.partition("://")[2].split("/")[0]
        return (
            f"{entry!r} is a URL; list its host name alone ({host_of(name) or name}), as any port is allowed"
        )
    if "/" not in entry and host_of(entry) is not None:
        return f"{entry!r} names a port; list the host name alone ({host_of(entry)}), as any port is allowed"
    return f"{entry!r} is not a host name; {ALLOWED_HOSTS_HINT}"
