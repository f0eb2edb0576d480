from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SpooledEvent(_message.Message):
    __slots__ = ("n", "event_json")
    N_FIELD_NUMBER: _ClassVar[int]
    EVENT_JSON_FIELD_NUMBER: _ClassVar[int]
    n: int
    event_json: bytes
    def __init__(self, n: _Optional[int] = ..., event_json: _Optional[bytes] = ...) -> None: ...

class AppendRequest(_message.Message):
    __slots__ = ("writer_id", "events")
    WRITER_ID_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    writer_id: str
    events: _containers.RepeatedCompositeFieldContainer[SpooledEvent]
    def __init__(self, writer_id: _Optional[str] = ..., events: _Optional[_Iterable[_Union[SpooledEvent, _Mapping]]] = ...) -> None: ...

class AppendReply(_message.Message):
    __slots__ = ("stored_n", "head_seq", "duplicates")
    STORED_N_FIELD_NUMBER: _ClassVar[int]
    HEAD_SEQ_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    stored_n: int
    head_seq: int
    duplicates: int
    def __init__(self, stored_n: _Optional[int] = ..., head_seq: _Optional[int] = ..., duplicates: _Optional[int] = ...) -> None: ...

class PositionRequest(_message.Message):
    __slots__ = ("writer_id",)
    WRITER_ID_FIELD_NUMBER: _ClassVar[int]
    writer_id: str
    def __init__(self, writer_id: _Optional[str] = ...) -> None: ...

class PositionReply(_message.Message):
    __slots__ = ("stored_n",)
    STORED_N_FIELD_NUMBER: _ClassVar[int]
    stored_n: int
    def __init__(self, stored_n: _Optional[int] = ...) -> None: ...
