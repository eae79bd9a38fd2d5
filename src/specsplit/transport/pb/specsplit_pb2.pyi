from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Hello(_message.Message):
    __slots__ = ("protocol_version", "tokenizer_fingerprint", "target_identity")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TARGET_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    tokenizer_fingerprint: str
    target_identity: str
    def __init__(self, protocol_version: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ..., target_identity: _Optional[str] = ...) -> None: ...

class CostPoint(_message.Message):
    __slots__ = ("n", "micros")
    N_FIELD_NUMBER: _ClassVar[int]
    MICROS_FIELD_NUMBER: _ClassVar[int]
    n: int
    micros: int
    def __init__(self, n: _Optional[int] = ..., micros: _Optional[int] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("protocol_version", "target_identity", "tokenizer_fingerprint", "target_name", "vocab_size", "n_ctx", "max_draft", "verify_cost", "session_address", "tree_paths")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TARGET_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TARGET_NAME_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    N_CTX_FIELD_NUMBER: _ClassVar[int]
    MAX_DRAFT_FIELD_NUMBER: _ClassVar[int]
    VERIFY_COST_FIELD_NUMBER: _ClassVar[int]
    SESSION_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TREE_PATHS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    target_identity: str
    tokenizer_fingerprint: str
    target_name: str
    vocab_size: int
    n_ctx: int
    max_draft: int
    verify_cost: _containers.RepeatedCompositeFieldContainer[CostPoint]
    session_address: str
    tree_paths: int
    def __init__(self, protocol_version: _Optional[int] = ..., target_identity: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., target_name: _Optional[str] = ..., vocab_size: _Optional[int] = ..., n_ctx: _Optional[int] = ..., max_draft: _Optional[int] = ..., verify_cost: _Optional[_Iterable[_Union[CostPoint, _Mapping]]] = ..., session_address: _Optional[str] = ..., tree_paths: _Optional[int] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "min_p")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., min_p: _Optional[float] = ...) -> None: ...

class Open(_message.Message):
    __slots__ = ("prompt_ids", "sampling", "seed", "tokenizer_fingerprint", "join_session_id", "join_token", "first_token")
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    JOIN_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    JOIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: Sampling
    seed: int
    tokenizer_fingerprint: str
    join_session_id: str
    join_token: str
    first_token: bool
    def __init__(self, prompt_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., seed: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ..., join_session_id: _Optional[str] = ..., join_token: _Optional[str] = ..., first_token: _Optional[bool] = ...) -> None: ...

class QRow(_message.Message):
    __slots__ = ("ids", "counts")
    IDS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., counts: _Optional[_Iterable[int]] = ...) -> None: ...

class Chain(_message.Message):
    __slots__ = ("tokens", "q", "parents")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    q: _containers.RepeatedCompositeFieldContainer[QRow]
    parents: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., q: _Optional[_Iterable[_Union[QRow, _Mapping]]] = ..., parents: _Optional[_Iterable[int]] = ...) -> None: ...

class Draft(_message.Message):
    __slots__ = ("version", "chains", "pipelined")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHAINS_FIELD_NUMBER: _ClassVar[int]
    PIPELINED_FIELD_NUMBER: _ClassVar[int]
    version: int
    chains: _containers.RepeatedCompositeFieldContainer[Chain]
    pipelined: bool
    def __init__(self, version: _Optional[int] = ..., chains: _Optional[_Iterable[_Union[Chain, _Mapping]]] = ..., pipelined: _Optional[bool] = ...) -> None: ...

class Close(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClientMsg(_message.Message):
    __slots__ = ("open", "draft", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: Open
    draft: Draft
    close: Close
    def __init__(self, open: _Optional[_Union[Open, _Mapping]] = ..., draft: _Optional[_Union[Draft, _Mapping]] = ..., close: _Optional[_Union[Close, _Mapping]] = ...) -> None: ...

class Opened(_message.Message):
    __slots__ = ("session_id", "join_token", "version", "committed_ids", "load_micros", "first_token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    JOIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_IDS_FIELD_NUMBER: _ClassVar[int]
    LOAD_MICROS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    join_token: str
    version: int
    committed_ids: _containers.RepeatedScalarFieldContainer[int]
    load_micros: int
    first_token: int
    def __init__(self, session_id: _Optional[str] = ..., join_token: _Optional[str] = ..., version: _Optional[int] = ..., committed_ids: _Optional[_Iterable[int]] = ..., load_micros: _Optional[int] = ..., first_token: _Optional[int] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("version", "dropped", "n_accepted", "next_token", "chain", "accepted_ids", "verify_micros", "queue_micros", "batch_size", "load_micros")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    N_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_IDS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_MICROS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MICROS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOAD_MICROS_FIELD_NUMBER: _ClassVar[int]
    version: int
    dropped: bool
    n_accepted: int
    next_token: int
    chain: int
    accepted_ids: _containers.RepeatedScalarFieldContainer[int]
    verify_micros: int
    queue_micros: int
    batch_size: int
    load_micros: int
    def __init__(self, version: _Optional[int] = ..., dropped: _Optional[bool] = ..., n_accepted: _Optional[int] = ..., next_token: _Optional[int] = ..., chain: _Optional[int] = ..., accepted_ids: _Optional[_Iterable[int]] = ..., verify_micros: _Optional[int] = ..., queue_micros: _Optional[int] = ..., batch_size: _Optional[int] = ..., load_micros: _Optional[int] = ...) -> None: ...

class ServerMsg(_message.Message):
    __slots__ = ("opened", "verdict")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    opened: Opened
    verdict: Verdict
    def __init__(self, opened: _Optional[_Union[Opened, _Mapping]] = ..., verdict: _Optional[_Union[Verdict, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt_ids", "prompt", "sampling", "seed", "max_new_tokens", "stop", "server_draft", "resume_ids")
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SERVER_DRAFT_FIELD_NUMBER: _ClassVar[int]
    RESUME_IDS_FIELD_NUMBER: _ClassVar[int]
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    prompt: str
    sampling: Sampling
    seed: int
    max_new_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    server_draft: bool
    resume_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, prompt_ids: _Optional[_Iterable[int]] = ..., prompt: _Optional[str] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., seed: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., server_draft: _Optional[bool] = ..., resume_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "stats_json", "prompt_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STATS_JSON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    stats_json: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., stats_json: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class VocabularyRequest(_message.Message):
    __slots__ = ("tokenizer_fingerprint",)
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    tokenizer_fingerprint: str
    def __init__(self, tokenizer_fingerprint: _Optional[str] = ...) -> None: ...

class VocabularyChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...
