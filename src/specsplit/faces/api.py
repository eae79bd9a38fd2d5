"""The Python API: ``SpeculativeDecoder(target, draft).generate(prompt, ...)``."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

from specsplit.backends.base import Backend
from specsplit.backends.load import load_backend
from specsplit.engine.speculative import (
    Chunk,
    GenerationRequest,
    GenerationResult,
    SpeculativeEngine,
)
from specsplit.engine.tree_policy import TreePolicy, tree_policy
from specsplit.errors import ConfigError, ModelError
from specsplit.proposers.base import Proposer
from specsplit.proposers.draft_model import DraftModelProposer
from specsplit.proposers.ngram import NGramProposer
from specsplit.sampling import SamplingParams

DEFAULT_TARGET = "qwen2.5-coder-1.5b"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-iq4_nl"
DEFAULT_TARGET_BACKEND = "torch"
DEFAULT_DRAFT_BACKEND = "llama.cpp"

DraftSpec = str | Backend | Proposer | None


def draft_tree_policy(tree: str, k: int | None) -> TreePolicy | None:
    """The policy of ``tree`` (off: None, the chain's K policy decides). A fixed K with a tree
    is refused: the tree's shape sets how far it drafts, so the K would be ignored."""
    policy = tree_policy(tree)
    if policy is not None and k is not None:
        raise ConfigError(
            f"--k {k} sets a chain's length; with --draft-tree {tree} the tree's shape sets it "
            "(drop --k, or give the depth as --draft-tree WIDTHxDEPTH)"
        )
    return policy


def make_proposer(
    draft: DraftSpec,
    target: Backend,
    backend: str = DEFAULT_DRAFT_BACKEND,
    device: str = "cpu",
    threads: int | None = None,
) -> Proposer | None:
    """A proposer from a name ("ngram", "none", a model name or path), a backend or itself."""
    if draft is None or draft == "none":
        return None
    if isinstance(draft, Proposer):
        return draft
    if draft == "ngram":
        return NGramProposer()
    if isinstance(draft, str):
        draft = load_backend(backend, draft, device=device, threads=threads, n_ctx=target.n_ctx)
    if draft.tokenizer.fingerprint() != target.tokenizer.fingerprint():
        raise ModelError(
            "the draft and target vocabularies do not match; pick a draft model with the "
            "target's tokenizer (or use --draft ngram)"
        )
    return DraftModelProposer(draft)


class SpeculativeDecoder:
    """Lossless speculative decoding of a target model with one or more drafters."""

    def __init__(
        self,
        target: str | Backend = DEFAULT_TARGET,
        draft: DraftSpec | Sequence[DraftSpec] = DEFAULT_DRAFT,
        *,
        target_backend: str = DEFAULT_TARGET_BACKEND,
        draft_backend: str = DEFAULT_DRAFT_BACKEND,
        device: str = "cpu",
        dtype: str | None = None,
        draft_device: str = "cpu",
        target_threads: int | None = None,
        draft_threads: int | None = None,
        k: int | None = None,
        n_ctx: int | None = 4096,
        chat: bool = True,
        warm_up: bool = True,
        tree: str = "off",
    ) -> None:
        """``tree``: one drafter's token tree per round: off, auto or WIDTHxDEPTH; ``dtype``:
        a torch target's number type (float32 by default)."""
        self.target = (
            target
            if isinstance(target, Backend)
            else load_backend(
                target_backend,
                target,
                device=device,
                threads=target_threads,
                n_ctx=n_ctx,
                dtype=dtype,
            )
        )
        drafts = draft if isinstance(draft, list | tuple) else [draft]
        proposers = [
            make_proposer(d, self.target, draft_backend, draft_device, draft_threads)
            for d in drafts
        ]
        self.engine = SpeculativeEngine(
            self.target,
            [p for p in proposers if p is not None],
            k=k,
            policy=draft_tree_policy(tree, k),
        )
        self.chat = chat
        if warm_up:
            self.engine.warm_up()

    def encode_prompt(self, prompt: str | list[dict[str, str]]) -> list[int]:
        """Prompt text (or chat messages) -> ids, with the chat template where the model has one."""
        tok = self.target.tokenizer
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        rendered = tok.apply_chat_template(messages) if self.chat else None
        if rendered is not None:
            return tok.encode(rendered, add_special=False)
        if not isinstance(prompt, str):
            raise ModelError("this model has no chat template: pass the prompt as text")
        return tok.encode(prompt, add_special=True)

    def request(
        self,
        prompt: str | list[dict[str, str]] | Sequence[int],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> GenerationRequest:
        """Build an engine request (prompt as text, chat messages or token ids)."""
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        ids = (
            list(prompt)
            if isinstance(prompt, list | tuple) and prompt and isinstance(prompt[0], int)
            else self.encode_prompt(prompt)  # type: ignore[arg-type]
        )
        return GenerationRequest(ids, max_new_tokens, params, seed, tuple(stop))

    def generate(
        self, prompt: str | list[dict[str, str]] | Sequence[int], **kw
    ) -> GenerationResult:
        """Generate to the end: text, token ids and statistics (see ``request`` for settings)."""
        return self.engine.generate(self.request(prompt, **kw))

    def stream(self, prompt: str | list[dict[str, str]] | Sequence[int], **kw) -> Iterator[Chunk]:
        """Generate, yielding chunks of text; the last chunk carries the result."""
        return self.engine.stream(self.request(prompt, **kw))


@functools.cache
def load_tokenizer(ref: str):  # noqa: ANN201
    """The tokenizer of a model name or .gguf path, without loading its weights (once per
    process)."""
    from specsplit.backends.gguf_tokenizer import GGUFTokenizer
    from specsplit.registry import resolve_gguf

    return GGUFTokenizer(resolve_gguf(ref))


class EdgeDecoder(SpeculativeDecoder):
    """The edge half: drafts here, verifies on a specsplit server (``servers``, in order of
    preference; the next one takes over if one fails). The client needs no target: it uses
    the server's, and its tokenizer (fetched once) where the drafter has none of its own; a
    draft model must share the target's vocabulary."""

    def __init__(
        self,
        servers: Sequence[str],
        draft: DraftSpec = DEFAULT_DRAFT,
        *,
        draft_backend: str = DEFAULT_DRAFT_BACKEND,
        draft_device: str = "cpu",
        draft_threads: int | None = None,
        k: int | None = None,
        n_ctx: int | None = 4096,
        chat: bool = True,
        auth_token: str | None = None,
        tls_ca_file: str | None = None,
        top_m: int = 64,
        warm_up: bool = True,
        tree: str = "off",
    ) -> None:
        from specsplit.engine.speculative import DecodeLoop, default_policy
        from specsplit.transport.client import RemoteVerifier

        is_model = isinstance(draft, Backend) or (
            isinstance(draft, str) and draft not in ("ngram", "none")
        )
        self.verifier = RemoteVerifier(
            servers,
            auth_token=auth_token,
            tls_ca_file=tls_ca_file,
            fetch_tokenizer=not is_model,
        )
        if isinstance(draft, str) and is_model:
            _check_draft_vocab(draft, self.verifier)  # before loading it: fail at once
            draft = load_backend(
                draft_backend, draft, device=draft_device, threads=draft_threads, n_ctx=n_ctx
            )
        proposer: Proposer | None
        if isinstance(draft, Backend):  # sampled drafts cross the wire quantized
            proposer = DraftModelProposer(draft, top_m=top_m, quantize=True)
            self.verifier.adopt(draft.tokenizer)
        elif draft == "ngram":
            proposer = NGramProposer()
        else:
            proposer = draft if isinstance(draft, Proposer) else None
        tokenizer = self.verifier.tokenizer
        self.proposers = [proposer] if proposer is not None else []
        self.policy = draft_tree_policy(tree, k) or default_policy(self.proposers, k, 16)
        self.engine = DecodeLoop(self.verifier, self.proposers, self.policy)  # type: ignore[assignment]
        self.target = _TokenizerOnly(tokenizer)  # type: ignore[assignment]
        self.chat = chat
        if warm_up:
            for p in self.proposers:
                p.warm_up([tokenizer.bos_token_id or 0] * 32)
            if hasattr(self.policy, "draft_per_token"):
                self.policy.draft_per_token = sum(p.cost_per_token for p in self.proposers)
            if hasattr(self.policy, "round_overhead"):
                self.policy.round_overhead = self.verifier.rtt

    def close(self) -> None:
        self.verifier.shutdown()


def _check_draft_vocab(draft: str, verifier) -> None:  # noqa: ANN001
    """A registry draft model whose vocabulary is not the server's target's: a one-line
    error naming the server's model and what to pass, before anything is fetched."""
    from specsplit import registry

    spec = registry.MODELS.get(draft)
    if spec is None or spec.vocab == verifier.fingerprint:
        return
    fits = [m.name for m in registry.MODELS.values() if m.vocab == verifier.fingerprint]
    hint = f"--draft {' or --draft '.join(fits)}, " if fits else ""
    raise ModelError(
        f"the draft {draft} does not share the vocabulary of the server's target "
        f"{verifier.target_name}: pass {hint}a draft model of that vocabulary, or --draft ngram"
    )


class _TokenizerOnly:
    """What ``SpeculativeDecoder.encode_prompt`` needs of a target: its tokenizer."""

    def __init__(self, tokenizer) -> None:  # noqa: ANN001
        self.tokenizer = tokenizer
