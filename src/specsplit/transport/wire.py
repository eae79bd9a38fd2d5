"""Engine types <-> protocol messages, with every check a message from the network needs.

A sampled draft token travels with the exact distribution it was sampled from, quantized
(integer counts summing to 2**16 over the tokens it could have been; see
``sampling.quantize``); the draws of a tree under one parent share one row. A q that is not exactly representable is refused on the sending
side: rounding it would break losslessness.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import numpy as np

from specsplit.engine.metrics import GenerationStats
from specsplit.engine.verifier import Outcome
from specsplit.errors import ConfigError
from specsplit.proposers.base import Draft
from specsplit.sampling import QUANT_BITS, SamplingParams, SparseRows
from specsplit.transport.pb import specsplit_pb2 as pb

PROTOCOL_VERSION = 2
Q_TOTAL = 1 << QUANT_BITS
MICROS = 1e6
GRPC_FRAME = 5  # bytes of gRPC framing per message (flag + length), for the byte counters
FULL = "server full:"  # how a RESOURCE_EXHAUSTED reason begins when another server may serve
MOVED = "session moved:"  # how an UNAVAILABLE reason begins when the server is going away
APPLICATION = "specsplit"  # the Ray Serve application a client asks for (metadata "application")
DEFAULT_MAX_NEW = 128  # Generate's max_new_tokens when the request leaves it unset


class ProtocolError(ConfigError):
    """A message that breaks the protocol (refused with INVALID_ARGUMENT)."""


# ---- sampling settings ----


def sampling_to_pb(p: SamplingParams) -> pb.Sampling:
    return pb.Sampling(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p)


def sampling_from_pb(m: pb.Sampling) -> SamplingParams:
    """Validated settings, exactly the sender's values (doubles); top_p 0 means off, as an
    unset proto3 field reads 0 (only 0: a negative or NaN top_p is refused, not read as off)."""
    return SamplingParams(
        temperature=float(m.temperature),
        top_k=int(m.top_k),
        top_p=float(m.top_p) if m.top_p != 0 else 1.0,
        min_p=float(m.min_p),
    )


# ---- statistics (Generate's last chunk) ----


def stats_to_json(st: GenerationStats) -> str:
    return json.dumps(dataclasses.asdict(st))


def stats_from_json(text: str) -> GenerationStats:
    """The stats a server sent (fields this side does not know are ignored)."""
    raw = json.loads(text) if text else {}
    known = {f.name for f in dataclasses.fields(GenerationStats)}
    return GenerationStats(**{k: v for k, v in raw.items() if k in known})


# ---- drafts ----


def q_row_to_pb(row: np.ndarray) -> pb.QRow:
    """One q row [V] that is exactly counts / 2**16 -> its sparse message."""
    ids = np.flatnonzero(row)
    counts = row[ids] * Q_TOTAL
    exact = np.rint(counts)
    if np.abs(counts - exact).max(initial=0.0) > 1e-9 or int(exact.sum()) != Q_TOTAL:
        raise ConfigError(
            "a sampled draft must come from a quantized q to cross the network exactly "
            "(use a drafter with quantize=True)"
        )
    return pb.QRow(ids=ids.tolist(), counts=exact.astype(np.int64).tolist())


def drafts_to_pb(drafts: Sequence[Draft]) -> list[pb.Chain]:
    chains = []
    for d in drafts:
        if not d.tokens:
            continue
        rows = _q_rows(d)
        q = [] if d.q is None else [q_row_to_pb(d.q[i]) for i in rows]
        parents = [] if d.parents is None else [int(p) + 1 for p in d.parents]
        chains.append(pb.Chain(tokens=[int(t) for t in d.tokens], q=q, parents=parents))
    return chains


def _q_rows(d: Draft) -> list[int]:
    """The draws whose q rows go on the wire: every draw of a chain; for a tree, the first
    draw under each parent (siblings are drawn from one q, so one row serves them all)."""
    if d.parents is None:
        return list(range(len(d.tokens)))
    first: dict[int, int] = {}
    for i, p in enumerate(d.parents):
        first.setdefault(p, i)
        if d.q is not None and not np.array_equal(d.q[i], d.q[first[p]]):
            raise ConfigError("a tree's siblings must be drawn from one q (i.i.d. children)")
    return list(first.values())


def _row_from_pb(row: pb.QRow, x: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """A checked q row: its ids and probabilities (counts / 2**16); x must be among the ids."""
    ids = np.asarray(row.ids, dtype=np.int64)
    counts = np.asarray(row.counts, dtype=np.int64)
    if len(ids) != len(counts) or len(ids) == 0:
        raise ProtocolError("a q row needs as many counts as ids, at least one")
    if ids.max() >= vocab or len(np.unique(ids)) != len(ids):
        raise ProtocolError("q row ids must be distinct and inside the vocabulary")
    if counts.min() < 1 or int(counts.sum()) != Q_TOTAL:
        raise ProtocolError(f"q row counts must be >= 1 and sum to {Q_TOTAL}")
    if x not in set(ids.tolist()):
        raise ProtocolError("a draft token has probability 0 under its own q")
    return ids, counts / float(Q_TOTAL)


def _tree_parents(c: pb.Chain, tree_paths: int) -> list[int] | None:
    """A tree chain's parents (-1: the committed text), checked; None for a chain."""
    if not c.parents:
        return None
    if len(c.parents) != len(c.tokens):
        raise ProtocolError(f"{len(c.tokens)} tree tokens but {len(c.parents)} parents")
    parents = [int(p) - 1 for p in c.parents]
    if any(not -1 <= p < i for i, p in enumerate(parents)):
        raise ProtocolError("a tree token's parent must be an earlier token (or 0: the text)")
    inner = set(parents)
    leaves = sum(1 for i in range(len(parents)) if i not in inner)
    if leaves > tree_paths:
        raise ProtocolError(f"a tree with {leaves} paths; this server takes {tree_paths}")
    return parents


def drafts_from_pb(
    chains: Sequence[pb.Chain], vocab: int, max_tokens: int, greedy: bool, tree_paths: int = 0
) -> list[Draft]:
    """Validated drafts; q rows sparse (``SparseRows``, exactly counts / 2**16). A tree
    (``Chain.parents``) comes alone, with at most ``tree_paths`` root-to-leaf paths."""
    total = sum(len(c.tokens) for c in chains)
    if total > max_tokens:
        raise ProtocolError(f"{total} draft tokens in one round; the limit is {max_tokens}")
    if len(chains) > 1 and any(c.parents for c in chains):
        raise ProtocolError("a tree comes alone in its round")
    out = []
    for c in chains:
        toks = list(c.tokens)
        if not toks:
            raise ProtocolError("an empty draft chain")
        if max(toks) >= vocab:
            raise ProtocolError(f"draft token id {max(toks)} outside the vocabulary [0, {vocab})")
        parents = _tree_parents(c, tree_paths)
        if greedy or not c.q:
            if c.q:
                raise ProtocolError("a greedy round carries token ids only")
            out.append(Draft(toks, None, parents))
            continue
        # row of each draw: its own (a chain), its parent's (a tree: one per parent, in the
        # order the parents first appear)
        order = list(range(len(toks))) if parents is None else list(dict.fromkeys(parents))
        row_of = list(range(len(toks))) if parents is None else [order.index(p) for p in parents]
        if len(c.q) != len(order):
            raise ProtocolError(
                f"{len(toks)} draft tokens need {len(order)} q rows, got {len(c.q)}"
            )
        rows = tuple(_row_from_pb(c.q[row_of[i]], x, vocab) for i, x in enumerate(toks))
        out.append(Draft(toks, SparseRows(rows, vocab), parents))  # dense when planned
    return out


# ---- verdicts ----


def verdict_to_pb(o: Outcome, with_ids: bool) -> pb.Verdict:
    return pb.Verdict(
        version=o.version,
        dropped=o.dropped,
        n_accepted=o.n_accepted,
        next_token=max(o.next_token, 0),
        chain=o.chain,
        accepted_ids=list(o.accepted or ()) if with_ids else [],
        verify_micros=int(o.t_verify * MICROS),
        queue_micros=int(o.t_queue * MICROS),
        batch_size=o.batch_size,
        load_micros=int(o.load * MICROS),
    )


def verdict_from_pb(m: pb.Verdict, chains: Sequence[Sequence[int]], pipelined: bool) -> Outcome:
    """The outcome; accepted ids from the message, else from the chain the client sent."""
    if m.accepted_ids or m.dropped or not m.n_accepted:
        accepted = tuple(m.accepted_ids)
    elif chains:
        if m.chain >= len(chains):
            raise ProtocolError("the verdict names a chain that was not sent")
        accepted = tuple(chains[m.chain][int(pipelined) :][: m.n_accepted])
    else:
        accepted = ()
    return Outcome(
        version=m.version,
        dropped=m.dropped,
        n_accepted=m.n_accepted,
        next_token=m.next_token if not m.dropped else -1,
        chain=m.chain,
        accepted=accepted,
        t_verify=m.verify_micros / MICROS,
        t_queue=m.queue_micros / MICROS,
        batch_size=m.batch_size,
        load=m.load_micros / MICROS,
    )
