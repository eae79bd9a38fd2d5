"""User-facing errors: one class, one line of explanation, never a traceback at the CLI."""


class SpecsplitError(Exception):
    """An error the user can act on; its message is one line that says what to do."""


class ConfigError(SpecsplitError, ValueError):
    """Invalid settings: sampling values, K, threads, device, prompt too long."""


class ModelError(SpecsplitError):
    """A model cannot be found, fetched, verified or paired with another."""


class StaleDraft(SpecsplitError):
    """A draft built on a session version that is not the session's current one."""


class Overloaded(SpecsplitError):
    """A limit was reached: sessions, KV memory, rate; retry later or elsewhere."""


class ServerFull(Overloaded):
    """A server holds as many sessions or streams as it may; another server may take the work."""


class SessionGone(SpecsplitError):
    """The session ended (closed, idle too long, evicted, or its verifier went away)."""


class SessionMoved(SessionGone):
    """The server holding the session is going away on purpose (a Ray replica removed by a
    scale-down or a redeploy): resume at once through the handshake address, which places the
    session elsewhere."""


class VerifierUnavailable(SpecsplitError):
    """No verification server could be reached (after retries)."""


class Interrupted(SpecsplitError):
    """Generation stopped before its end; carries what was generated so far."""

    def __init__(self, message: str, token_ids: list[int], text: str) -> None:
        super().__init__(message)
        self.token_ids = token_ids
        self.text = text
