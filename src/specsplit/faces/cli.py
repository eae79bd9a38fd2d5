"""The command line: `specsplit generate | models | bench`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from specsplit.errors import ConfigError, Interrupted, SpecsplitError
from specsplit.faces.settings import GenerateSettings, add_arguments, from_namespace, parse_k
from specsplit.sampling import SamplingParams


def _summary(stats) -> str:
    ks = stats.draft_lengths
    hist = {k: ks.count(k) for k in sorted(set(ks))}
    return (
        f"{stats.new_tokens} tokens in {stats.t_total:.2f} s = {stats.tokens_per_s:.2f} tok/s "
        f"(decode {stats.decode_tokens_per_s:.2f} tok/s, first token {stats.t_first_token:.2f} s) | "
        f"acceptance {stats.acceptance_rate:.2f} | tau {stats.mean_accepted_length:.2f} | "
        f"target passes {stats.target_passes} | K histogram {hist} | seed {stats.seed}"
    ) + (
        f" | {stats.round_trips} round trips, {stats.bytes_sent} B sent, "
        f"{stats.bytes_received} B received, time: draft {stats.t_draft:.2f} s, network "
        f"{stats.t_network:.2f} s, verify {stats.t_verify:.2f} s, queue {stats.t_queue:.2f} s"
        if stats.bytes_sent
        else ""
    )


def cmd_generate(ns: argparse.Namespace) -> int:
    from specsplit.faces.api import (
        DEFAULT_DRAFT,
        DEFAULT_TARGET,
        SpeculativeDecoder,
        draft_tree_policy,
    )

    s: GenerateSettings = from_namespace(ns)
    k = parse_k(s.k)
    draft_tree_policy(s.draft_tree, k)  # (checks the flags before any model loads)
    SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p)
    if s.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {s.max_new_tokens}")
    if s.n_ctx < 16:
        raise ConfigError(f"--n-ctx must be >= 16, got {s.n_ctx}")
    if s.server:
        return _generate_remote(ns, s, k)
    decoder = SpeculativeDecoder(
        s.target or DEFAULT_TARGET,
        s.draft or [DEFAULT_DRAFT],
        target_backend=s.target_backend,
        draft_backend=s.draft_backend,
        device=s.device,
        dtype=s.dtype,
        draft_device=s.draft_device,
        target_threads=s.target_threads,
        draft_threads=s.draft_threads,
        k=k,
        n_ctx=s.n_ctx,
        chat=not s.no_chat,
        tree=s.draft_tree,
    )
    _print_stream(decoder.engine.stream(_request(decoder, ns, s)), s.json)
    return 0


def _request(decoder, ns: argparse.Namespace, s: GenerateSettings):  # noqa: ANN001, ANN202
    """The engine request for the prompt and settings of `generate`."""
    return decoder.request(
        ns.prompt,
        max_new_tokens=s.max_new_tokens,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        min_p=s.min_p,
        seed=s.seed,
        stop=s.stop or (),
    )


def _print_stream(chunks, as_json: bool) -> None:  # noqa: ANN001
    """Stream text to stdout (stderr with --json); then the statistics."""
    text_out = sys.stderr if as_json else sys.stdout
    result = None
    try:
        for chunk in chunks:
            text_out.write(chunk.text)
            text_out.flush()
            result = chunk.result or result
    except Interrupted as e:
        text_out.write("\n")
        if as_json:
            sys.stdout.write(
                json.dumps({"text": e.text, "token_ids": e.token_ids, "error": str(e)})
            )
            sys.stdout.write("\n")
        raise
    text_out.write("\n")
    assert result is not None
    st = result.stats
    if as_json:
        record = {
            "text": result.text,
            "token_ids": result.token_ids,
            "finish_reason": result.finish_reason,
            **st.as_dict(),
        }
        sys.stdout.write(json.dumps(record) + "\n")
    else:
        print(_summary(st), file=sys.stderr)


def _generate_remote(ns: argparse.Namespace, s: GenerateSettings, k: int | None) -> int:
    """Edge mode (a local drafter, verification on the server) or cloud-only (--draft none)."""
    from specsplit.faces.api import DEFAULT_DRAFT, EdgeDecoder

    token = Path(s.auth_token_file).read_text().strip() if s.auth_token_file else None
    drafts = s.draft or [DEFAULT_DRAFT]
    if len(drafts) > 1:
        raise ConfigError("with --server, give one --draft (others may join the session)")
    if drafts[0] == "none":
        return _generate_cloud(ns, s, token)
    decoder = EdgeDecoder(
        s.server,
        drafts[0],
        draft_backend=s.draft_backend,
        draft_device=s.draft_device,
        draft_threads=s.draft_threads,
        k=k,
        n_ctx=s.n_ctx,
        chat=not s.no_chat,
        tree=s.draft_tree,
        auth_token=token,
        tls_ca_file=s.tls_ca,
    )
    try:
        if s.target and decoder.verifier.target_name != s.target:
            raise ConfigError(
                f"the server serves {decoder.verifier.target_name}, not {s.target} "
                "(drop --target to use it)"
            )
        _print_stream(decoder.engine.stream(_request(decoder, ns, s)), s.json)
    finally:
        decoder.close()
    return 0


def _generate_cloud(ns: argparse.Namespace, s: GenerateSettings, token: str | None) -> int:
    """The server generates alone and streams; the client needs no model. If a server fails
    mid-stream, the next --server goes on from the ids already received."""
    from specsplit.transport.client import generate_cloud

    params = SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p)
    chunks = generate_cloud(
        s.server,
        expect_target=s.target,
        prompt=ns.prompt,
        max_new_tokens=s.max_new_tokens,
        params=params,
        seed=s.seed,
        stop=s.stop or (),
        server_draft=s.server_draft,
        auth_token=token,
        tls_ca_file=s.tls_ca,
    )
    _print_stream(chunks, s.json)
    return 0


def cmd_models(ns: argparse.Namespace) -> int:
    from specsplit import registry

    if ns.action == "list":
        for m in registry.MODELS.values():
            state = "fetched" if registry.is_fetched(m.name) else "not fetched"
            print(f"{m.name:22s} {m.size / 1e6:7.0f} MB  {state:11s}  {m.description}")
        return 0
    for name in ns.names:
        print(registry.fetch(name))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="specsplit", description="Lossless speculative decoding.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for a prompt")
    g.add_argument("prompt", help="the prompt (the chat template is applied for instruct models)")
    add_arguments(g)
    g.set_defaults(func=cmd_generate)
    m = sub.add_parser("models", help="list or fetch the known models")
    m.add_argument("action", choices=["list", "fetch"])
    m.add_argument("names", nargs="*", help="model names to fetch")
    m.set_defaults(func=cmd_models)
    from specsplit.faces.serve import add_serve_parser

    add_serve_parser(sub)
    try:
        from specsplit.bench.harness import add_bench_parser

        add_bench_parser(sub)
    except ImportError:
        pass
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    ns = ap.parse_args(argv)
    if ns.command == "models" and ns.action == "fetch" and not ns.names:
        ap.error("models fetch needs at least one model name")
    try:
        return ns.func(ns)
    except SpecsplitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: file not found: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
