from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Data(_message.Message):
    __slots__ = ("data", "end_of_stream")
    DATA_FIELD_NUMBER: _ClassVar[int]
    END_OF_STREAM_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    end_of_stream: bool
    def __init__(self, data: _Optional[bytes] = ..., end_of_stream: _Optional[bool] = ...) -> None: ...

class ProcessingRequest(_message.Message):
    __slots__ = ("read_data", "write_data")
    READ_DATA_FIELD_NUMBER: _ClassVar[int]
    WRITE_DATA_FIELD_NUMBER: _ClassVar[int]
    read_data: Data
    write_data: Data
    def __init__(self, read_data: _Optional[_Union[Data, _Mapping]] = ..., write_data: _Optional[_Union[Data, _Mapping]] = ...) -> None: ...

class ProcessingResponse(_message.Message):
    __slots__ = ("read_data", "write_data", "data_processing_status", "connection_status", "close_stream_to_ext_proc_server")
    class DataProcessedStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[ProcessingResponse.DataProcessedStatus]
        UNMODIFIED: _ClassVar[ProcessingResponse.DataProcessedStatus]
        MODIFIED: _ClassVar[ProcessingResponse.DataProcessedStatus]
    UNKNOWN: ProcessingResponse.DataProcessedStatus
    UNMODIFIED: ProcessingResponse.DataProcessedStatus
    MODIFIED: ProcessingResponse.DataProcessedStatus
    class ConnectionStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CONTINUE: _ClassVar[ProcessingResponse.ConnectionStatus]
        CLOSE: _ClassVar[ProcessingResponse.ConnectionStatus]
        CLOSE_RST: _ClassVar[ProcessingResponse.ConnectionStatus]
    CONTINUE: ProcessingResponse.ConnectionStatus
    CLOSE: ProcessingResponse.ConnectionStatus
    CLOSE_RST: ProcessingResponse.ConnectionStatus
    READ_DATA_FIELD_NUMBER: _ClassVar[int]
    WRITE_DATA_FIELD_NUMBER: _ClassVar[int]
    DATA_PROCESSING_STATUS_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_STATUS_FIELD_NUMBER: _ClassVar[int]
    CLOSE_STREAM_TO_EXT_PROC_SERVER_FIELD_NUMBER: _ClassVar[int]
    read_data: Data
    write_data: Data
    data_processing_status: ProcessingResponse.DataProcessedStatus
    connection_status: ProcessingResponse.ConnectionStatus
    close_stream_to_ext_proc_server: bool
    def __init__(self, read_data: _Optional[_Union[Data, _Mapping]] = ..., write_data: _Optional[_Union[Data, _Mapping]] = ..., data_processing_status: _Optional[_Union[ProcessingResponse.DataProcessedStatus, str]] = ..., connection_status: _Optional[_Union[ProcessingResponse.ConnectionStatus, str]] = ..., close_stream_to_ext_proc_server: _Optional[bool] = ...) -> None: ...
