from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChecksumScheme(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHECKSUM_NONE: _ClassVar[ChecksumScheme]
    CHECKSUM_CRC32: _ClassVar[ChecksumScheme]
    CHECKSUM_ADLER32: _ClassVar[ChecksumScheme]
    CHECKSUM_XXH3_64: _ClassVar[ChecksumScheme]

class KVReplyKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_REPLY_UNSPECIFIED: _ClassVar[KVReplyKind]
    KV_REPLY_ACK: _ClassVar[KVReplyKind]
    KV_REPLY_COMMITTED: _ClassVar[KVReplyKind]
    KV_REPLY_ABORTED: _ClassVar[KVReplyKind]
    KV_REPLY_ERROR: _ClassVar[KVReplyKind]
CHECKSUM_NONE: ChecksumScheme
CHECKSUM_CRC32: ChecksumScheme
CHECKSUM_ADLER32: ChecksumScheme
CHECKSUM_XXH3_64: ChecksumScheme
KV_REPLY_UNSPECIFIED: KVReplyKind
KV_REPLY_ACK: KVReplyKind
KV_REPLY_COMMITTED: KVReplyKind
KV_REPLY_ABORTED: KVReplyKind
KV_REPLY_ERROR: KVReplyKind

class KVLayoutMsg(_message.Message):
    __slots__ = ("n_layers", "n_kv_heads", "head_dim", "dtype")
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    N_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    n_layers: int
    n_kv_heads: int
    head_dim: int
    dtype: str
    def __init__(self, n_layers: _Optional[int] = ..., n_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ...) -> None: ...

class KVOpen(_message.Message):
    __slots__ = ("request_id", "layout", "n_tokens", "checksum", "window", "timeout_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    N_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    layout: KVLayoutMsg
    n_tokens: int
    checksum: ChecksumScheme
    window: int
    timeout_ms: float
    def __init__(self, request_id: _Optional[str] = ..., layout: _Optional[_Union[KVLayoutMsg, _Mapping]] = ..., n_tokens: _Optional[int] = ..., checksum: _Optional[_Union[ChecksumScheme, str]] = ..., window: _Optional[int] = ..., timeout_ms: _Optional[float] = ...) -> None: ...

class KVChunkHeader(_message.Message):
    __slots__ = ("seq", "layer", "token_start", "n_tokens", "checksum", "payload_bytes")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    N_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    seq: int
    layer: int
    token_start: int
    n_tokens: int
    checksum: int
    payload_bytes: int
    def __init__(self, seq: _Optional[int] = ..., layer: _Optional[int] = ..., token_start: _Optional[int] = ..., n_tokens: _Optional[int] = ..., checksum: _Optional[int] = ..., payload_bytes: _Optional[int] = ...) -> None: ...

class KVCommit(_message.Message):
    __slots__ = ("seq", "n_chunks", "total_bytes")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    N_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    seq: int
    n_chunks: int
    total_bytes: int
    def __init__(self, seq: _Optional[int] = ..., n_chunks: _Optional[int] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class KVAbort(_message.Message):
    __slots__ = ("seq", "reason")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    seq: int
    reason: str
    def __init__(self, seq: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class KVFrameHeader(_message.Message):
    __slots__ = ("open", "chunk", "commit", "abort")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    open: KVOpen
    chunk: KVChunkHeader
    commit: KVCommit
    abort: KVAbort
    def __init__(self, open: _Optional[_Union[KVOpen, _Mapping]] = ..., chunk: _Optional[_Union[KVChunkHeader, _Mapping]] = ..., commit: _Optional[_Union[KVCommit, _Mapping]] = ..., abort: _Optional[_Union[KVAbort, _Mapping]] = ...) -> None: ...

class KVReply(_message.Message):
    __slots__ = ("kind", "acked_seq", "code", "message")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ACKED_SEQ_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    kind: KVReplyKind
    acked_seq: int
    code: str
    message: str
    def __init__(self, kind: _Optional[_Union[KVReplyKind, str]] = ..., acked_seq: _Optional[int] = ..., code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...
