"""Fuzz cases made from the .proto, each with the status the protocol says it must get.

A case is one RPC of ``proto/specsplit.proto`` whose last message is the hostile one. It is
made from a valid message of the RPC by one mutation: a field anywhere in the message's tree,
found by walking ``specsplit_pb2``'s descriptors, set by its type to an edge value (ids past
the vocabulary, counts that do not sum, stale versions, NaN, huge repeated fields, long
strings), or the message's bytes changed (truncated, a field re-encoded with another wire
type, bits flipped, random bytes, unknown fields, past the 4 MiB limit). ``expect`` reads the
bytes as the server will and applies the protocol's rules (README "Refusals", the .proto's
comments) in the order the server checks them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from specsplit.transport import wire
from specsplit.transport.pb import specsplit_pb2 as pb

OK, IA, FP, RE, NF, PD = (
    "OK",
    "INVALID_ARGUMENT",
    "FAILED_PRECONDITION",
    "RESOURCE_EXHAUSTED",
    "NOT_FOUND",
    "PERMISSION_DENIED",
)
MAX_MESSAGE = 4 << 20  # bytes; gRPC refuses larger messages (RESOURCE_EXHAUSTED)


@dataclass(frozen=True)
class Limits:
    """What the fuzzed server told in its handshake and was started with."""

    vocab: int
    n_ctx: int
    max_draft: int
    kv_tokens: int  # the KV budget in tokens
    max_sessions: int
    max_streams: int
    fingerprint: str
    identity: str


@dataclass
class Case:
    """One RPC; its last message is the hostile one."""

    family: str  # how it was made
    rpc: str  # Handshake, Session or Generate
    msgs: list[bytes]  # serialized, in order
    expect: str = OK  # a grpc.StatusCode name
    full: bool = False  # RESOURCE_EXHAUSTED whose reason begins "server full:"
    greedy: bool = True  # a session's sampling (for checking its verdicts)
    notes: dict = field(default_factory=dict)


# ---- values by field type ----

U32_EDGES = [0, 1, 2, 3, 127, 128, 65535, 65536, 65537, 2**31 - 1, 2**31, 2**32 - 1]
U64_EDGES = [0, 1, 2, 3, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
DOUBLES = [0.0, -0.0, 5e-324, 1e-300, 0.5, 0.7, 1.0 - 1e-16, 1.0, 1.0 + 2e-16, 2.0]
DOUBLES += [99.99, 100.0, 100.0001, 1e300, math.inf, -math.inf, math.nan, -1.0, -5e-324]
SIZES = [0, 1, 2, 3, 8, 9, 17, 300, 1000, 2000, 4095, 4096, 5000, 200_000, 2_200_000]


def u32_values(lim: Limits) -> list[int]:
    v = lim.vocab
    return [*U32_EDGES, v - 2, v - 1, v, v + 1, lim.n_ctx, lim.max_draft, lim.max_draft + 1]


def strings(lim: Limits, rng: random.Random) -> list[str]:
    fp = lim.fingerprint
    uni = "".join(
        chr(rng.choice([rng.randrange(32, 127), rng.randrange(160, 55000)])) for _ in range(40)
    )
    return ["", "a", fp, fp[:-1] + "0", lim.identity, "\x00", "é" * 20, uni, "x" * 100_000]


def pick_u32(lim: Limits, rng: random.Random) -> int:
    return rng.choice(u32_values(lim)) if rng.random() < 0.6 else rng.randrange(lim.vocab)


def walk(desc: Descriptor, depth: int = 0) -> Iterator[tuple[FieldDescriptor, ...]]:
    """Every field path in a message type's tree (down to 3 levels)."""
    for f in desc.fields:
        yield (f,)
        if f.message_type is not None and depth < 3:
            for rest in walk(f.message_type, depth + 1):
                yield (f, *rest)


def mutate(msg: Message, lim: Limits, rng: random.Random) -> str:
    """Change one field of msg (anywhere in its tree) by its type; says what it did."""
    paths = list(walk(msg.DESCRIPTOR))
    path = rng.choice(paths)
    target = msg
    for f in path[:-1]:
        if f.is_repeated:
            items = getattr(target, f.name)
            if not len(items) or rng.random() < 0.2:
                items.add()
            target = items[rng.randrange(len(items))]
        else:
            target = getattr(target, f.name)
    f = path[-1]
    name = ".".join(p.name for p in path)
    return f"{msg.DESCRIPTOR.name}.{name}: {_set(target, f, lim, rng)}"


def _scalar(f: FieldDescriptor, lim: Limits, rng: random.Random) -> object:
    t = f.cpp_type
    if t == FieldDescriptor.CPPTYPE_UINT32:
        return pick_u32(lim, rng)
    if t == FieldDescriptor.CPPTYPE_UINT64:
        return rng.choice(U64_EDGES) if rng.random() < 0.7 else rng.randrange(2**64)
    if t == FieldDescriptor.CPPTYPE_DOUBLE:
        return rng.choice(DOUBLES) if rng.random() < 0.8 else rng.uniform(-2, 3)
    if t == FieldDescriptor.CPPTYPE_BOOL:
        return rng.random() < 0.5
    if t == FieldDescriptor.CPPTYPE_STRING:
        return rng.choice(strings(lim, rng))
    raise AssertionError(f"no values for {f.full_name}")


def _set(target: Message, f: FieldDescriptor, lim: Limits, rng: random.Random) -> str:
    if f.is_repeated:
        items = getattr(target, f.name)
        how = rng.randrange(4)
        if how == 0:
            target.ClearField(f.name)
            return "cleared"
        n = rng.choice(SIZES)
        if f.message_type is not None:
            if how == 1 or not len(items):
                items.add()
                return "an empty element added"
            one = items[rng.randrange(len(items))]
            n = min(n, 20_000)
            keep = [type(one)() for _ in range(n)]
            for k in keep:
                k.CopyFrom(one)
            target.ClearField(f.name)
            items.extend(keep)
            return f"{n} copies of an element"
        if how == 1:
            value = _scalar(f, lim, rng)
            items.append(value)
            return f"{value!r} appended"
        if f.cpp_type == FieldDescriptor.CPPTYPE_STRING:
            n = min(n, 100_000)
            values = [_scalar(f, lim, rng) for _ in range(min(n, 3))] * (n // 3 + 1)
        elif how == 2:  # valid ids, one edge value somewhere
            values = [rng.randrange(lim.vocab) for _ in range(min(n, 1000))] * (n // 1000 + 1)
            values = values[:n]
            if n:
                values[rng.randrange(n)] = _scalar(f, lim, rng)
        else:  # all valid ids
            values = ([rng.randrange(lim.vocab) for _ in range(min(n, 1000))] * (n // 1000 + 1))[:n]
        target.ClearField(f.name)
        items.extend(values[:n])
        return f"{n} values"
    if f.message_type is not None:
        if rng.random() < 0.5:
            target.ClearField(f.name)
            return "cleared"
        getattr(target, f.name).SetInParent()
        getattr(target, f.name).Clear()
        return "set empty"
    if f.has_presence and rng.random() < 0.2:
        target.ClearField(f.name)
        return "unset"
    value = _scalar(f, lim, rng)
    setattr(target, f.name, value)
    shown = (
        repr(value) if not isinstance(value, str) or len(value) < 40 else f"<{len(value)} chars>"
    )
    return f"= {shown}"


# ---- byte-level changes ----


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(data: bytes) -> list[tuple[int, int, bytes]] | None:
    """Top-level (field number, wire type, raw value) of well-formed bytes; None otherwise."""
    out, i = [], 0
    try:
        while i < len(data):
            key, i = _read_varint(data, i)
            num, wt = key >> 3, key & 7
            if wt == 0:
                _, j = _read_varint(data, i)
            elif wt == 1:
                j = i + 8
            elif wt == 2:
                n, i = _read_varint(data, i)
                j = i + n
            elif wt == 5:
                j = i + 4
            else:
                return None
            if j > len(data):
                return None
            out.append((num, wt, data[i:j]))
            i = j
    except IndexError:
        return None
    return out


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def _encode(num: int, wt: int, value: bytes) -> bytes:
    key = _varint(num << 3 | wt)
    return key + (_varint(len(value)) + value if wt == 2 else value)


def _random_value(wt: int, rng: random.Random) -> bytes:
    if wt == 0:
        return _varint(rng.choice([0, 1, 300, 2**32 - 1, 2**64 - 1, rng.randrange(2**40)]))
    if wt == 1:
        return rng.randbytes(8)
    if wt == 5:
        return rng.randbytes(4)
    return rng.randbytes(rng.randrange(0, 12))


def corrupt(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """data changed at the byte level; says how."""
    how = rng.randrange(8)
    fields = _fields(data)
    if how == 0 and data:
        n = rng.randrange(len(data))
        return data[:n], f"truncated to {n} of {len(data)} bytes"
    if how == 1 and fields:  # a field re-encoded with another wire type
        k = rng.randrange(len(fields))
        num, wt, _ = fields[k]
        new = rng.choice([w for w in (0, 1, 2, 5) if w != wt])
        fields[k] = (num, new, _random_value(new, rng))
        return b"".join(_encode(*f) for f in fields), f"field {num} as wire type {new}"
    if how == 2 and fields:  # a field nested one level down, re-encoded
        k = rng.randrange(len(fields))
        num, wt, value = fields[k]
        inner = _fields(value) if wt == 2 else None
        if inner:
            j = rng.randrange(len(inner))
            n2, w2, _ = inner[j]
            new = rng.choice([w for w in (0, 1, 2, 5) if w != w2])
            inner[j] = (n2, new, _random_value(new, rng))
            fields[k] = (num, wt, b"".join(_encode(*f) for f in inner))
            return b"".join(_encode(*f) for f in fields), f"field {num}.{n2} as wire type {new}"
    if how == 3 and data:
        b = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b), "bits flipped"
    if how == 4:
        num = rng.choice([15, 99, 1000, 2**29 - 1])
        wt = rng.choice([0, 1, 2, 5])
        return data + _encode(num, wt, _random_value(wt, rng)), f"unknown field {num}"
    if how == 5:
        wt = rng.choice([3, 4, 6, 7])  # groups (start without end) and wire types that do not exist
        return data + _varint(1 << 3 | wt) + b"\x00", f"wire type {wt}"
    if how == 6:
        n = rng.choice([1, 2, 5, 17, 64, 1000])
        return rng.randbytes(n), f"{n} random bytes"
    n = MAX_MESSAGE + rng.choice([1, 1000, 1 << 20])
    return data + _encode(1000, 2, b"\x00" * n), f"over 4 MiB ({n} bytes of an unknown field)"


# ---- the protocol's rules, as the server applies them ----


def parse(cls: type, data: bytes) -> Message | None:
    try:
        return cls.FromString(data)
    except DecodeError:
        return None


def _sampling_ok(s: pb.Sampling) -> bool:
    top_p = s.top_p if s.top_p != 0 else 1.0
    return (
        math.isfinite(s.temperature)
        and 0 <= s.temperature <= 100
        and math.isfinite(top_p)
        and 0 < top_p <= 1
        and math.isfinite(s.min_p)
        and 0 <= s.min_p < 1
    )


def expect_handshake(data: bytes, lim: Limits) -> tuple[str, bool]:
    if len(data) > MAX_MESSAGE:
        return RE, False
    m = parse(pb.Hello, data)
    if m is None:
        return IA, False
    if m.protocol_version != wire.PROTOCOL_VERSION:
        return FP, False
    if m.tokenizer_fingerprint not in ("", lim.fingerprint):  # empty: it takes the server's
        return FP, False
    if m.target_identity and m.target_identity != lim.identity:
        return FP, False
    return OK, False


def expect_vocabulary(data: bytes, lim: Limits) -> tuple[str, bool]:
    if len(data) > MAX_MESSAGE:
        return RE, False
    m = parse(pb.VocabularyRequest, data)
    if m is None:
        return IA, False
    if m.tokenizer_fingerprint not in ("", lim.fingerprint):
        return FP, False
    return OK, False


def _open_status(o: pb.Open, lim: Limits) -> str:
    if o.join_session_id:
        return NF  # (fuzzed ids name no session; joins of live sessions are their own family)
    if o.tokenizer_fingerprint != lim.fingerprint:
        return FP
    if not _sampling_ok(o.sampling):
        return IA
    ids = o.prompt_ids
    if not ids or max(ids) >= lim.vocab or len(ids) >= lim.n_ctx:
        return IA
    if len(ids) > lim.kv_tokens:
        return RE  # the prompt's KV cache alone exceeds the budget (not "server full")
    return OK


def _draft_status(d: pb.Draft, greedy: bool, version: int, lim: Limits) -> tuple[str, bool]:
    """(status, whether the round changes the version) of a Draft at a session's version."""
    if sum(len(c.tokens) for c in d.chains) > lim.max_draft + d.pipelined:
        return IA, False
    tree = any(c.parents for c in d.chains)
    if tree and len(d.chains) > 1:
        return IA, False  # a one-drafter tree comes alone in its round
    for c in d.chains:
        toks = list(c.tokens)
        if not toks or max(toks) >= lim.vocab:
            return IA, False
        rows = list(range(len(toks)))  # the q row of each token: its own (a chain)
        if c.parents:
            parents = [int(p) - 1 for p in c.parents]  # wire 0: the committed text
            if len(parents) != len(toks) or any(not -1 <= p < i for i, p in enumerate(parents)):
                return IA, False
            order = list(dict.fromkeys(parents))  # a tree: one row per parent, shared
            rows = [order.index(p) for p in parents]
        if greedy or not c.q:
            if c.q:
                return IA, False
            continue
        if len(c.q) != max(rows) + 1:
            return IA, False
        for row, x in zip((c.q[r] for r in rows), toks):
            ids, counts = list(row.ids), list(row.counts)
            if len(ids) != len(counts) or not ids:
                return IA, False
            if max(ids) >= lim.vocab or len(set(ids)) != len(ids):
                return IA, False
            if min(counts) < 1 or sum(counts) != wire.Q_TOTAL or x not in ids:
                return IA, False
    if d.pipelined:
        if d.version != version:
            return OK, False  # dropped
        if len(d.chains) != 1 or tree:
            return IA, False  # (a tree cannot be drafted ahead: its bonus has no one guess)
        return OK, False  # verified or dropped: the last message, so either is fine
    if d.version != version:
        return FP, False
    return OK, True


def expect_session(msgs: list[bytes], lim: Limits) -> tuple[str, bool]:
    if not msgs:
        return IA, False
    version, greedy = 0, True
    for i, data in enumerate(msgs):
        if len(data) > MAX_MESSAGE:
            return RE, False
        m = parse(pb.ClientMsg, data)
        if m is None:
            return IA, False
        kind = m.WhichOneof("msg")
        if i == 0:
            if kind != "open":
                return IA, False
            status = _open_status(m.open, lim)
            if status != OK:
                return status, False
            greedy = m.open.sampling.temperature == 0
            version = int(m.open.first_token)  # the prefill's first token is version 1
            continue
        if kind == "close":
            return OK, False
        if kind != "draft":
            return IA, False
        status, step = _draft_status(m.draft, greedy, version, lim)
        if status != OK:
            return status, False
        version += step
    return OK, False


def expect_generate(data: bytes, lim: Limits, n_prompt: int | None) -> tuple[str, bool]:
    """n_prompt: the tokens of a text prompt as the server renders it (None: ids given)."""
    if len(data) > MAX_MESSAGE:
        return RE, False
    m = parse(pb.GenerateRequest, data)
    if m is None:
        return IA, False
    if bool(m.prompt_ids) == bool(m.prompt) or not _sampling_ok(m.sampling):
        return IA, False
    max_new = m.max_new_tokens if m.HasField("max_new_tokens") else wire.DEFAULT_MAX_NEW
    prompt = len(m.prompt_ids) if n_prompt is None else n_prompt
    ids = [*m.prompt_ids, *m.resume_ids]
    if max_new < 1 or len(m.resume_ids) >= max_new or prompt + len(m.resume_ids) >= lim.n_ctx:
        return IA, False
    if ids and max(ids) >= lim.vocab:
        return IA, False
    if prompt + len(m.resume_ids) > lim.kv_tokens:
        return RE, False
    return OK, False


# ---- the cases ----


def q_row(token: int, lim: Limits, rng: random.Random) -> pb.QRow:
    """A valid quantized q row with the token inside."""
    ids = list(dict.fromkeys([token, *(rng.randrange(lim.vocab) for _ in range(rng.randrange(4)))]))
    cuts = sorted(rng.sample(range(1, wire.Q_TOTAL), len(ids) - 1))
    bounds = [0, *cuts, wire.Q_TOTAL]
    return pb.QRow(ids=ids, counts=[b - a for a, b in zip(bounds, bounds[1:])])


class Maker:
    """Makes the cases of a fuzz run from one seed."""

    def __init__(
        self,
        lim: Limits,
        prompts: list[list[int]],
        prompt_tokens,
        seed: int,  # noqa: ANN001
    ) -> None:
        self.lim, self.prompts, self.rng = lim, prompts, random.Random(seed)
        self.prompt_tokens = prompt_tokens  # text -> the ids the server renders it to (count)

    # valid messages

    def open_msg(self, sampled: bool) -> pb.Open:
        rng = self.rng
        sampling = pb.Sampling(temperature=rng.choice([0.5, 0.8, 1.0]) if sampled else 0.0)
        if sampled and rng.random() < 0.3:
            sampling.top_k, sampling.top_p = rng.choice([0, 5, 50]), rng.choice([0.0, 0.9])
        return pb.Open(
            prompt_ids=rng.choice(self.prompts),
            sampling=sampling,
            seed=rng.randrange(2**63),
            tokenizer_fingerprint=self.lim.fingerprint,
        )

    def draft_msg(self, version: int, sampled: bool) -> pb.Draft:
        rng = self.rng
        tokens = [
            rng.randrange(self.lim.vocab) for _ in range(rng.randrange(1, self.lim.max_draft + 1))
        ]
        chain = pb.Chain(tokens=tokens)
        if sampled and rng.random() < 0.8:
            chain.q.extend(q_row(t, self.lim, rng) for t in tokens)
        return pb.Draft(version=version, chains=[chain])

    def generate_msg(self) -> pb.GenerateRequest:
        rng = self.rng
        sampled = rng.random() < 0.5
        return pb.GenerateRequest(
            prompt_ids=rng.choice(self.prompts),
            sampling=pb.Sampling(temperature=0.8 if sampled else 0.0),
            seed=rng.randrange(2**63),
            max_new_tokens=rng.randrange(1, 4),
            server_draft=rng.random() < 0.5,
        )

    def session_prefix(self, sampled: bool) -> list[bytes]:
        """A valid Open and 0 to 2 plain rounds (no draft tokens)."""
        msgs = [pb.ClientMsg(open=self.open_msg(sampled)).SerializeToString()]
        for v in range(self.rng.randrange(3)):
            msgs.append(pb.ClientMsg(draft=pb.Draft(version=v)).SerializeToString())
        return msgs

    # families

    def hello(self) -> Case:
        m = pb.Hello(
            protocol_version=wire.PROTOCOL_VERSION, tokenizer_fingerprint=self.lim.fingerprint
        )
        if self.rng.random() < 0.3:
            m.target_identity = self.lim.identity
        what = mutate(m, self.lim, self.rng)
        data = m.SerializeToString()
        return Case(what, "Handshake", [data], *expect_handshake(data, self.lim))

    def vocabulary(self) -> Case:
        m = pb.VocabularyRequest(tokenizer_fingerprint=self.rng.choice(["", self.lim.fingerprint]))
        what = mutate(m, self.lim, self.rng)
        data = m.SerializeToString()
        return Case(what, "Vocabulary", [data], *expect_vocabulary(data, self.lim))

    def open(self) -> Case:
        sampled = self.rng.random() < 0.5
        m = self.open_msg(sampled)
        what = mutate(m, self.lim, self.rng)
        msgs = [pb.ClientMsg(open=m).SerializeToString()]
        return Case(what, "Session", msgs, *expect_session(msgs, self.lim), greedy=not sampled)

    def draft(self) -> Case:
        sampled = self.rng.random() < 0.5
        msgs = self.session_prefix(sampled)
        m = self.draft_msg(len(msgs) - 1, sampled)
        what = mutate(m, self.lim, self.rng)
        msgs.append(pb.ClientMsg(draft=m).SerializeToString())
        return Case(what, "Session", msgs, *expect_session(msgs, self.lim), greedy=not sampled)

    def stray(self) -> Case:
        rng = self.rng
        prefix = self.session_prefix(False)
        choices = {
            "Draft first": [pb.ClientMsg(draft=self.draft_msg(0, False))],
            "Close first": [pb.ClientMsg(close=pb.Close())],
            "no message set, first": [pb.ClientMsg()],
            "no message at all": [],
            "Open again": [pb.ClientMsg(open=self.open_msg(False))],
            "no message set, later": [pb.ClientMsg()],
            "Close, then a stale Draft": [
                pb.ClientMsg(close=pb.Close()),
                pb.ClientMsg(draft=pb.Draft(version=2**64 - 1)),
            ],
        }
        what = rng.choice(list(choices))
        tail = [m.SerializeToString() for m in choices[what]]
        msgs = tail if "first" in what or not tail else [*prefix, *tail]
        return Case(f"ClientMsg: {what}", "Session", msgs, *expect_session(msgs, self.lim))

    def generate(self) -> Case:
        m = self.generate_msg()
        what = mutate(m, self.lim, self.rng)
        data = m.SerializeToString()
        return Case(what, "Generate", [data], *self.expect_generate(data))

    def expect_generate(self, data: bytes) -> tuple[str, bool]:
        m = parse(pb.GenerateRequest, data) if len(data) <= MAX_MESSAGE else None
        n = self.prompt_tokens(m.prompt) if m is not None and m.prompt else None
        return expect_generate(data, self.lim, n)

    def raw(self) -> Case:
        """A valid case's last message changed byte by byte."""
        base = self.rng.choice([self.hello, self.vocabulary, self.open, self.draft, self.generate])
        for _ in range(20):  # a base whose last message is valid
            case = base()
            if case.expect == OK:
                break
        data, what = corrupt(case.msgs[-1], self.rng)
        msgs = [*case.msgs[:-1], data]
        if case.rpc == "Handshake":
            exp = expect_handshake(data, self.lim)
        elif case.rpc == "Vocabulary":
            exp = expect_vocabulary(data, self.lim)
        elif case.rpc == "Generate":
            exp = self.expect_generate(data)
        else:
            exp = expect_session(msgs, self.lim)
        return Case(f"bytes of {case.family.split(':')[0]}: {what}", case.rpc, msgs, *exp)

    def special(self, kind: str) -> Case:
        """A case the runner plays itself: joins of a live session, floods."""
        if kind == "join":
            how = self.rng.choice(["wrong join token", "wrong tokenizer", "right token"])
            exp = {"wrong join token": PD, "wrong tokenizer": FP, "right token": OK}[how]
            return Case(f"join a live session: {how}", "join", [], exp)
        if kind == "flood-open":
            n = self.lim.max_sessions + 4
            return Case(f"{n} Opens without rounds", "flood-open", [], f"{OK} or {RE}", full=True)
        n = self.lim.max_streams + 4
        return Case(
            f"{n} streams that send nothing", "flood-silent", [], f"{IA} or {RE}", full=True
        )

    def next(self) -> Case:
        r = self.rng.random()
        for weight, family in (
            (0.07, self.hello),
            (0.03, self.vocabulary),
            (0.19, self.open),
            (0.27, self.draft),
            (0.05, self.stray),
            (0.14, self.generate),
            (0.22, self.raw),
            (0.026, lambda: self.special("join")),
            (0.002, lambda: self.special("flood-open")),
        ):  # (floods count one message per stream: ~20-36 each)
            if r < weight:
                return family()
            r -= weight
        return self.special("flood-silent")
