from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ColumnRule(_message.Message):
    __slots__ = ("column", "style")
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    STYLE_FIELD_NUMBER: _ClassVar[int]
    column: str
    style: str
    def __init__(self, column: _Optional[str] = ..., style: _Optional[str] = ...) -> None: ...

class MaskPlan(_message.Message):
    __slots__ = ("rules", "derived_columns", "scan_content", "unmasked")
    RULES_FIELD_NUMBER: _ClassVar[int]
    DERIVED_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    SCAN_CONTENT_FIELD_NUMBER: _ClassVar[int]
    UNMASKED_FIELD_NUMBER: _ClassVar[int]
    rules: _containers.RepeatedCompositeFieldContainer[ColumnRule]
    derived_columns: _containers.RepeatedScalarFieldContainer[int]
    scan_content: bool
    unmasked: bool
    def __init__(self, rules: _Optional[_Iterable[_Union[ColumnRule, _Mapping]]] = ..., derived_columns: _Optional[_Iterable[int]] = ..., scan_content: _Optional[bool] = ..., unmasked: _Optional[bool] = ...) -> None: ...

class Column(_message.Message):
    __slots__ = ("name", "table_column", "type_oid", "format", "style", "derived")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TABLE_COLUMN_FIELD_NUMBER: _ClassVar[int]
    TYPE_OID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    STYLE_FIELD_NUMBER: _ClassVar[int]
    DERIVED_FIELD_NUMBER: _ClassVar[int]
    name: str
    table_column: str
    type_oid: int
    format: int
    style: str
    derived: bool
    def __init__(self, name: _Optional[str] = ..., table_column: _Optional[str] = ..., type_oid: _Optional[int] = ..., format: _Optional[int] = ..., style: _Optional[str] = ..., derived: _Optional[bool] = ...) -> None: ...

class Row(_message.Message):
    __slots__ = ("values", "nulls")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    NULLS_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[bytes]
    nulls: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, values: _Optional[_Iterable[bytes]] = ..., nulls: _Optional[_Iterable[bool]] = ...) -> None: ...

class MaskBatchRequest(_message.Message):
    __slots__ = ("statement_id", "plan", "columns", "rows", "datarows")
    STATEMENT_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DATAROWS_FIELD_NUMBER: _ClassVar[int]
    statement_id: str
    plan: MaskPlan
    columns: _containers.RepeatedCompositeFieldContainer[Column]
    rows: _containers.RepeatedCompositeFieldContainer[Row]
    datarows: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, statement_id: _Optional[str] = ..., plan: _Optional[_Union[MaskPlan, _Mapping]] = ..., columns: _Optional[_Iterable[_Union[Column, _Mapping]]] = ..., rows: _Optional[_Iterable[_Union[Row, _Mapping]]] = ..., datarows: _Optional[_Iterable[bytes]] = ...) -> None: ...

class MaskStats(_message.Message):
    __slots__ = ("rows", "values", "by_column", "by_rule")
    class ByColumnEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class ByRuleEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ROWS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    BY_COLUMN_FIELD_NUMBER: _ClassVar[int]
    BY_RULE_FIELD_NUMBER: _ClassVar[int]
    rows: int
    values: int
    by_column: _containers.ScalarMap[str, int]
    by_rule: _containers.ScalarMap[str, int]
    def __init__(self, rows: _Optional[int] = ..., values: _Optional[int] = ..., by_column: _Optional[_Mapping[str, int]] = ..., by_rule: _Optional[_Mapping[str, int]] = ...) -> None: ...

class MaskBatchResponse(_message.Message):
    __slots__ = ("rows", "datarows", "stats")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DATAROWS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[Row]
    datarows: _containers.RepeatedScalarFieldContainer[bytes]
    stats: MaskStats
    def __init__(self, rows: _Optional[_Iterable[_Union[Row, _Mapping]]] = ..., datarows: _Optional[_Iterable[bytes]] = ..., stats: _Optional[_Union[MaskStats, _Mapping]] = ...) -> None: ...
