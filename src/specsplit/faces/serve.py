"""`specsplit serve`: the target on a server, verifying drafts from many users over gRPC;
with ``--ray``, the same server as Ray Serve replicas (``specsplit.cluster``)."""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

from specsplit.errors import ConfigError
from specsplit.faces.settings import _f, add_arguments, dtype_field, from_namespace

SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'512MiB', '2GB', '1.5G', '4096' -> bytes (KiB/MiB/GiB binary, KB/MB/GB decimal)."""
    m = SIZE.match(text)
    if not m:
        raise ConfigError(f"--kv-budget must be a size like 512MiB or 2GB, got {text!r}")
    unit = (m.group(2) or "").lower().rstrip("b")
    mult = (1024 if unit.endswith("i") else 1000) ** ("kmgt".index(unit[0]) + 1) if unit else 1
    return int(float(m.group(1)) * mult)


@dataclass
class ServeSettings:
    """Everything `specsplit serve` accepts."""

    target: str = _f("qwen2.5-coder-1.5b", "target model: a registry name, .gguf path or folder")
    target_backend: str = _f("torch", "backend of the target", choices=("torch", "llama.cpp"))
    device: str = _f("cpu", "device of the target: cpu, cuda, cuda:N")
    dtype: str | None = dtype_field()
    threads: int | None = _f(None, "CPU threads for the target (default: all cores)", type=int)
    n_ctx: int = _f(4096, "context length per session", type=int)
    host: str = _f("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = _f(50051, "gRPC port (0: any free port, printed at start)", type=int)
    http_port: int | None = _f(
        None,
        "port of the OpenAI-style HTTP face with /health, /metrics and the page (off if unset)",
        type=int,
    )
    http_body_timeout: float = _f(
        10.0, "seconds an HTTP request body may take to arrive whole (else 408)", type=float
    )
    auth_token_file: str | None = _f(None, "file with the bearer token clients must send")
    keys_file: str | None = _f(
        None,
        "JSON file of API keys, each with a name and optionally a rate and a token quota "
        "(instead of --auth-token-file; see the README)",
    )
    tls_cert: str | None = _f(None, "PEM certificate chain (with --tls-key: gRPC over TLS)")
    tls_key: str | None = _f(None, "PEM private key")
    max_sessions: int = _f(64, "most open sessions", type=int)
    max_streams: int | None = _f(
        None,
        "most session streams (joined drafters too) and cloud-only calls at once; beyond it "
        "clients hear 'server full' (default: 2 x --max-sessions)",
        type=int,
    )
    max_batch: int = _f(8, "most sessions verified in one target pass (1: no batching)", type=int)
    max_draft: int = _f(16, "most draft tokens per round", type=int)
    kv_budget: str | None = _f(None, "KV cache budget for all sessions, e.g. 2GiB (none if unset)")
    idle_timeout: float = _f(300.0, "seconds before an idle session is closed", type=float)
    rate: float = _f(
        200.0,
        "calls (draft rounds, requests) per second per key, or per client address without "
        "keys (0: no limit)",
        type=float,
    )
    draft: str = _f(
        "ngram", "the server's own drafter for the HTTP face and Generate: ngram, none or a model"
    )
    draft_backend: str = _f("llama.cpp", "backend of the server's draft model")
    ray: bool = _f(
        False,
        "deploy as a Ray Serve application: replicas, each with its own target, sessions and "
        "batch scheduler (--port and --http-port are then Serve's proxy ports)",
        action="store_true",
    )
    replicas: int | None = _f(None, "with --ray: this many replicas (default 1)", type=int)
    autoscale: str | None = _f(
        None,
        "with --ray: MIN:MAX replicas, added when open sessions per replica pass "
        "--target-sessions and removed when they fall",
    )
    target_sessions: int | None = _f(
        None,
        "with --autoscale: open sessions per replica the autoscaler aims at "
        "(default: half of --max-sessions)",
        type=int,
    )
    ray_address: str | None = _f(
        None,
        "with --ray: join this Ray cluster (HOST:PORT or ray://HOST:PORT) and leave it running; "
        "unset: start a local Ray instance, stopped with this command",
    )
    drain_timeout: float = _f(
        30.0,
        "with --ray: seconds a replica removed on purpose waits for its sessions to move",
        type=float,
    )


def _read_secret(path: str | None) -> str | None:
    if path is None:
        return None
    token = Path(path).read_text().strip()
    if not token:
        raise ConfigError(f"the auth token file {path} is empty")
    return token


def cmd_serve(ns: argparse.Namespace) -> int:
    s: ServeSettings = from_namespace(ns, ServeSettings)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    if s.ray:
        return _serve_on_ray(s)
    if s.replicas is not None or s.autoscale or s.ray_address:
        raise ConfigError("--replicas, --autoscale and --ray-address need --ray")
    server = build_server(s)
    server.start()
    print(f"specsplit serving {s.target} on {s.host}:{server.port}", file=sys.stderr, flush=True)
    _wait_for_signal()
    print("shutting down (rounds in flight finish first)", file=sys.stderr, flush=True)
    server.stop(grace=5.0)
    return 0


def _wait_for_signal() -> None:
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()


def build_server(
    s: ServeSettings,
    *,
    port: int | None = None,
    session_prefix: str = "",
    http: bool = True,
    secrets: dict | None = None,
):  # noqa: ANN201 - a SpecsplitServer (its module needs the server extra)
    """The server `specsplit serve` runs, not yet started: the target loaded, the limits, the
    server's own drafter. A Ray replica builds its own with ``port=0`` (any free port),
    ``http=False`` (Serve serves the HTTP face), its name as ``session_prefix`` and the auth
    token or keys file's text in ``secrets`` (read where the command ran)."""
    from specsplit.backends.load import load_backend
    from specsplit.faces.api import make_proposer
    from specsplit.proposers.ngram import NGramProposer

    try:
        from specsplit.transport.keys import Keys
        from specsplit.transport.server import ServerConfig, SpecsplitServer
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"specsplit serve needs {e.name}, which is not installed: "
            "pip install 'specsplit[server]'"
        ) from None

    _tune_malloc()
    rate = s.rate or None
    if secrets is None:  # the files given (plain serve), else their text sent to a replica
        token = _read_secret(s.auth_token_file)
        keys = Keys.load(s.keys_file, rate) if s.keys_file else None
    else:
        token = secrets.get("auth_token")
        keys = Keys.parse(secrets["keys"], rate) if secrets.get("keys") else None
    config = ServerConfig(
        host=s.host,
        port=s.port if port is None else port,
        http_port=s.http_port if http else None,
        http_body_timeout=s.http_body_timeout,
        auth_token=token,
        keys=keys,
        tls_cert=Path(s.tls_cert).read_bytes() if s.tls_cert else None,
        tls_key=Path(s.tls_key).read_bytes() if s.tls_key else None,
        max_sessions=s.max_sessions,
        max_streams=s.max_streams,
        max_batch=s.max_batch,
        max_draft=s.max_draft,
        kv_budget=parse_size(s.kv_budget) if s.kv_budget else None,
        idle_timeout=s.idle_timeout,
        rate=rate,
        session_prefix=session_prefix,
    )
    if s.target_backend == "llama.cpp":
        from specsplit.backends.llamacpp_backend import LlamaCppBackend

        target = LlamaCppBackend.load(
            s.target,
            n_ctx=s.n_ctx,
            threads=s.threads,
            n_seq_max=min(s.max_sessions, 200),
            gpu_layers=-1 if s.device.startswith("cuda") else 0,
        )
    else:
        target = load_backend(
            "torch", s.target, device=s.device, threads=s.threads, n_ctx=s.n_ctx, dtype=s.dtype
        )
    if s.draft == "none":
        make = list
    elif s.draft == "ngram":
        make = lambda: [NGramProposer()]  # noqa: E731
    else:
        shared = make_proposer(s.draft, target, s.draft_backend, s.device, s.threads)
        lock = threading.Lock()
        make = lambda: [_Locked(shared, lock)]  # noqa: E731
    return SpecsplitServer(target, s.target, config, make)


def replica_server(settings: dict, secrets: dict, session_prefix: str):  # noqa: ANN201
    """A Ray replica's SpecsplitServer from the settings the deployment carries
    (``cluster.app``)."""
    return build_server(
        ServeSettings(**settings),
        port=0,
        session_prefix=session_prefix,
        http=False,
        secrets=secrets,
    )


def _serve_on_ray(s: ServeSettings) -> int:
    """`specsplit serve --ray`: the settings as a Ray Serve deployment (``cluster.launch``)."""
    if s.tls_cert or s.tls_key:
        raise ConfigError(
            "--tls-cert with --ray: Ray Serve 2.60's gRPC proxy has no TLS; put a TLS-terminating "
            "proxy in front of it, or run plain `specsplit serve` with TLS"
        )
    try:
        from specsplit.cluster.launch import ClusterSpec, run
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"specsplit serve --ray needs {e.name}, which is not installed: "
            "pip install 'specsplit[ray]'"
        ) from None
    from specsplit.transport.keys import Keys

    secrets = {"auth_token": _read_secret(s.auth_token_file), "keys": None}
    if s.keys_file:  # (read here, sent to every replica: the files need not be on every node)
        Keys.load(s.keys_file, s.rate or None)  # a one-line error for a bad one, at once
        secrets["keys"] = Path(s.keys_file).read_text()
    spec = ClusterSpec.from_flags(
        settings={f.name: getattr(s, f.name) for f in fields(ServeSettings) if f.name in _REPLICA},
        secrets=secrets,
        host=s.host,
        grpc_port=s.port,
        http_port=s.http_port,
        replicas=s.replicas,
        autoscale=s.autoscale,
        target_sessions=s.target_sessions,
        max_sessions=s.max_sessions,
        threads=s.threads,
        ray_address=s.ray_address,
        drain_timeout=s.drain_timeout,
        server_factory="specsplit.faces.serve:replica_server",
    )
    return run(spec)


# what each replica builds its server from (everything but the Ray flags and the ports)
_REPLICA = {
    "target",
    "target_backend",
    "device",
    "threads",
    "n_ctx",
    "host",
    "http_body_timeout",
    "max_sessions",
    "max_streams",
    "max_batch",
    "max_draft",
    "kv_budget",
    "idle_timeout",
    "rate",
    "draft",
    "draft_backend",
}


M_ARENA_MAX = -8  # glibc's mallopt parameter
TRIM_EVERY = 1.0  # seconds between malloc_trim calls
_trimmer: threading.Thread | None = None


def _tune_malloc(arenas: int = 2, trim_every: float = TRIM_EVERY) -> None:
    """Cap glibc's malloc arenas: gRPC threads would each grow their own. Measured with 100
    idle sessions: 3.9 MB per session by default, 2.2 MB with this call at start, 1.0 MB with
    MALLOC_ARENA_MAX=2 in the server's environment (set before Python starts).

    And give freed heap pages back every ``trim_every`` seconds (``malloc_trim``, on a
    daemon thread): KV caches grow round by round, so the blocks they leave are rarely reused
    whole and would stay resident (the first soak peaked 0.50 GB over its bound). An earlier
    fix mmapped every block over 128 KiB instead, which returns each one as it is freed but
    makes every pass fault its activations in afresh: with it, bfloat16 prefills of the 1.5B
    target took 1.21-1.26x as long and its one-token passes 1.13-1.19x (``python
    scripts/malloc_passes.py``). The price: between trims a pass's freed working memory stays
    resident (the 10-minute soak peaked 33 MB over a bound that does not count it, README)."""
    global _trimmer
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(name)
    libc.mallopt(M_ARENA_MAX, arenas)
    if _trimmer is None and trim_every > 0:
        _trimmer = threading.Thread(
            target=_trim_forever, args=(libc, trim_every), name="malloc-trim", daemon=True
        )
        _trimmer.start()


def _trim_forever(libc, every: float) -> None:  # noqa: ANN001 - a ctypes CDLL
    while True:
        time.sleep(every)
        libc.malloc_trim(0)  # (a few ms; the arenas are locked meanwhile)


class _Locked:
    """A shared drafter used by one request at a time (its cache follows whichever request
    drafts, so it does not prefill a prompt ahead: ``prepares`` is False)."""

    prepares = False

    def __init__(self, proposer, lock: threading.Lock) -> None:  # noqa: ANN001
        self.p, self.lock = proposer, lock
        self.name = proposer.name

    @property
    def cost_per_token(self) -> float:
        return self.p.cost_per_token

    def propose(self, context, k, params, u):  # noqa: ANN001, ANN201
        with self.lock:
            return self.p.propose(context, k, params, u)

    def warm_up(self, context) -> None:  # noqa: ANN001
        with self.lock:
            self.p.warm_up(context)

    def reset(self) -> None:
        return None


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the target: verify drafts from edge clients over gRPC")
    add_arguments(p, ServeSettings)
    p.set_defaults(func=cmd_serve)
