"""Who may use a server, and how much: API keys with a name, a rate and a token quota.

One ``Keys`` object serves the gRPC service and the HTTP face alike. A client sends its key
as ``authorization: Bearer <key>``; the key names a ``Principal`` whose calls are limited by
a token bucket (``rate`` calls per second: a draft round, a Generate call or an HTTP
generation each count one) and whose generated tokens are counted against ``token_quota``.
Usage per key is reported in the metrics. Without keys (``Keys.open``) every client is its
own principal, named by its address, with the server's rate and no quota.

The keys file is JSON::

    {"keys": [
      {"key": "sk-alice-...", "name": "alice", "rate": 50, "token_quota": 1000000},
      {"key": "sk-bob-...", "name": "bob"}
    ]}

``rate`` defaults to the server's ``--rate``; ``token_quota`` to none. The single-token file
of ``--auth-token-file`` is one key named "default".
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from specsplit.errors import ConfigError, Overloaded


class QuotaExceeded(Overloaded):
    """A key used up its token quota (refused with RESOURCE_EXHAUSTED or HTTP 429)."""


class RateLimited(Overloaded):
    """A key sends calls faster than its rate (refused with RESOURCE_EXHAUSTED or HTTP 429)."""


@dataclass
class Principal:
    """One key's limits and what it used (thread-safe)."""

    name: str
    rate: float | None = None  # calls per second; None: no limit
    token_quota: int | None = None  # generated tokens in all; None: no quota
    burst: float = 32.0
    calls: int = 0
    tokens: int = 0
    refused: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _level: float = -1.0  # the token bucket (-1: full, not yet used)
    _t: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def admit(self) -> None:
        """One call: within the rate and the quota, else RateLimited / QuotaExceeded."""
        with self._lock:
            if self.token_quota is not None and self.tokens >= self.token_quota:
                self.refused["quota"] += 1
                raise QuotaExceeded(
                    f"quota exceeded: key {self.name} used {self.tokens} of its "
                    f"{self.token_quota} tokens"
                )
            if self.rate:
                now = time.monotonic()
                level = self.burst if self._level < 0 else self._level
                level = min(self.burst, level + (now - self._t) * self.rate)
                self._t = now
                if level < 1.0:
                    self._level = level
                    self.refused["rate"] += 1
                    raise RateLimited(
                        f"rate limit: key {self.name} may send {self.rate:g} calls per second"
                    )
                self._level = level - 1.0
            self.calls += 1

    def used(self, tokens: int) -> None:
        """Count generated tokens against the quota."""
        with self._lock:
            self.tokens += tokens


class Keys:
    """The keys a server accepts (``None`` key: anyone, each address its own principal)."""

    def __init__(self, principals: dict[str, Principal] | None, rate: float | None) -> None:
        self._by_key = principals  # None: open, no keys
        self.rate = rate
        self._by_address: dict[str, Principal] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, rate: float | None) -> Keys:
        """No authentication: every client address is limited on its own."""
        return cls(None, rate)

    @classmethod
    def single(cls, token: str, rate: float | None) -> Keys:
        """One shared token (``--auth-token-file``), named "default"."""
        return cls({token: Principal("default", rate)}, rate)

    @classmethod
    def load(cls, path: str | Path, rate: float | None) -> Keys:
        """A keys file (see the module docstring); a one-line error for a bad one."""
        try:
            doc = json.loads(Path(path).read_text())
            entries = doc["keys"]
            if not isinstance(entries, list) or not entries:
                raise ValueError("'keys' must be a non-empty list")
            out: dict[str, Principal] = {}
            names: set[str] = set()
            for e in entries:
                key, name = str(e["key"]), str(e["name"])
                extra = set(e) - {"key", "name", "rate", "token_quota"}
                if extra:
                    raise ValueError(f"unknown field {sorted(extra)[0]!r} for key {name}")
                if len(key) < 8 or key in out or name in names:
                    raise ValueError(f"key {name}: keys must be unique and 8+ characters")
                r = e.get("rate", rate)
                q = e.get("token_quota")
                if (r is not None and not r > 0) or (q is not None and not int(q) >= 0):
                    raise ValueError(f"key {name}: rate must be > 0 and token_quota >= 0")
                out[key] = Principal(name, r, None if q is None else int(q))
                names.add(name)
        except FileNotFoundError:
            raise ConfigError(f"keys file not found: {path}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"bad keys file {path}: {e}") from None
        return cls(out, rate)

    @property
    def required(self) -> bool:
        """True if every call must carry a known key."""
        return self._by_key is not None

    def check(self, authorization: str) -> Principal | None:
        """The principal of an ``authorization`` header value ("Bearer <key>"), or None if
        keys are required and this is not one of them (compared in constant time)."""
        if self._by_key is None:
            return None
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        found = None
        for key, p in self._by_key.items():  # every key compared: no early exit
            if hmac.compare_digest(given.strip().encode(), key.encode()):
                found = p
        return found

    def principal(self, authorization: str, address: str) -> Principal:
        """Who a call is from: its key's principal, or (no keys) its address's own."""
        p = self.check(authorization)
        if p is not None:
            return p
        if self._by_key is not None:
            raise ConfigError("missing or unknown API key")  # (the interceptor refused it)
        with self._lock:
            p = self._by_address.get(address)
            if p is None:
                p = self._by_address[address] = Principal(address, self.rate)
            return p

    def usage(self) -> list[Principal]:
        """Every key's principal (none when the server is open)."""
        return list(self._by_key.values()) if self._by_key is not None else []
