from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERDICT_UNSPECIFIED: _ClassVar[Verdict]
    VERDICT_ALLOW: _ClassVar[Verdict]
    VERDICT_DENY: _ClassVar[Verdict]
    VERDICT_HOLD: _ClassVar[Verdict]
VERDICT_UNSPECIFIED: Verdict
VERDICT_ALLOW: Verdict
VERDICT_DENY: Verdict
VERDICT_HOLD: Verdict

class Identity(_message.Message):
    __slots__ = ("subject", "groups", "issuer", "kind", "actor", "expires_at")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    subject: str
    groups: _containers.RepeatedScalarFieldContainer[str]
    issuer: str
    kind: str
    actor: str
    expires_at: float
    def __init__(self, subject: _Optional[str] = ..., groups: _Optional[_Iterable[str]] = ..., issuer: _Optional[str] = ..., kind: _Optional[str] = ..., actor: _Optional[str] = ..., expires_at: _Optional[float] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "database", "user", "upstream_role", "client_addr", "application_name", "tls", "search_path", "transaction_status")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DATABASE_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_ROLE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ADDR_FIELD_NUMBER: _ClassVar[int]
    APPLICATION_NAME_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_PATH_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_STATUS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    database: str
    user: str
    upstream_role: str
    client_addr: str
    application_name: str
    tls: bool
    search_path: str
    transaction_status: str
    def __init__(self, session_id: _Optional[str] = ..., database: _Optional[str] = ..., user: _Optional[str] = ..., upstream_role: _Optional[str] = ..., client_addr: _Optional[str] = ..., application_name: _Optional[str] = ..., tls: _Optional[bool] = ..., search_path: _Optional[str] = ..., transaction_status: _Optional[str] = ...) -> None: ...

class Param(_message.Message):
    __slots__ = ("is_null", "value")
    IS_NULL_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    is_null: bool
    value: str
    def __init__(self, is_null: _Optional[bool] = ..., value: _Optional[str] = ...) -> None: ...

class DecideRequest(_message.Message):
    __slots__ = ("identity", "session", "sql", "path", "statement_name", "params_known", "params")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SQL_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    STATEMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    PARAMS_KNOWN_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    identity: Identity
    session: Session
    sql: str
    path: str
    statement_name: str
    params_known: bool
    params: _containers.RepeatedCompositeFieldContainer[Param]
    def __init__(self, identity: _Optional[_Union[Identity, _Mapping]] = ..., session: _Optional[_Union[Session, _Mapping]] = ..., sql: _Optional[str] = ..., path: _Optional[str] = ..., statement_name: _Optional[str] = ..., params_known: _Optional[bool] = ..., params: _Optional[_Iterable[_Union[Param, _Mapping]]] = ...) -> None: ...

class ColumnRule(_message.Message):
    __slots__ = ("column", "style")
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    STYLE_FIELD_NUMBER: _ClassVar[int]
    column: str
    style: str
    def __init__(self, column: _Optional[str] = ..., style: _Optional[str] = ...) -> None: ...

class MaskPlan(_message.Message):
    __slots__ = ("rules", "derived_columns", "scan_content", "unmasked", "withhold_errors", "column_positions")
    RULES_FIELD_NUMBER: _ClassVar[int]
    DERIVED_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    SCAN_CONTENT_FIELD_NUMBER: _ClassVar[int]
    UNMASKED_FIELD_NUMBER: _ClassVar[int]
    WITHHOLD_ERRORS_FIELD_NUMBER: _ClassVar[int]
    COLUMN_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    rules: _containers.RepeatedCompositeFieldContainer[ColumnRule]
    derived_columns: _containers.RepeatedScalarFieldContainer[int]
    scan_content: bool
    unmasked: bool
    withhold_errors: bool
    column_positions: _containers.RepeatedCompositeFieldContainer[ColumnPosition]
    def __init__(self, rules: _Optional[_Iterable[_Union[ColumnRule, _Mapping]]] = ..., derived_columns: _Optional[_Iterable[int]] = ..., scan_content: _Optional[bool] = ..., unmasked: _Optional[bool] = ..., withhold_errors: _Optional[bool] = ..., column_positions: _Optional[_Iterable[_Union[ColumnPosition, _Mapping]]] = ...) -> None: ...

class ColumnPosition(_message.Message):
    __slots__ = ("position", "column")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    position: int
    column: str
    def __init__(self, position: _Optional[int] = ..., column: _Optional[str] = ...) -> None: ...

class Approval(_message.Message):
    __slots__ = ("required", "reason", "approver_groups", "hold_seconds")
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    APPROVER_GROUPS_FIELD_NUMBER: _ClassVar[int]
    HOLD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    required: bool
    reason: str
    approver_groups: _containers.RepeatedScalarFieldContainer[str]
    hold_seconds: float
    def __init__(self, required: _Optional[bool] = ..., reason: _Optional[str] = ..., approver_groups: _Optional[_Iterable[str]] = ..., hold_seconds: _Optional[float] = ...) -> None: ...

class DecideResponse(_message.Message):
    __slots__ = ("verdict", "reasons", "decision_id", "policy_revision", "sqlstate", "mask", "approval", "record_rows", "record_rows_cap", "analysis_json", "params_read", "cacheable", "max_result_bytes")
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_REVISION_FIELD_NUMBER: _ClassVar[int]
    SQLSTATE_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    RECORD_ROWS_FIELD_NUMBER: _ClassVar[int]
    RECORD_ROWS_CAP_FIELD_NUMBER: _ClassVar[int]
    ANALYSIS_JSON_FIELD_NUMBER: _ClassVar[int]
    PARAMS_READ_FIELD_NUMBER: _ClassVar[int]
    CACHEABLE_FIELD_NUMBER: _ClassVar[int]
    MAX_RESULT_BYTES_FIELD_NUMBER: _ClassVar[int]
    verdict: Verdict
    reasons: _containers.RepeatedScalarFieldContainer[str]
    decision_id: str
    policy_revision: str
    sqlstate: str
    mask: MaskPlan
    approval: Approval
    record_rows: str
    record_rows_cap: int
    analysis_json: str
    params_read: _containers.RepeatedScalarFieldContainer[int]
    cacheable: bool
    max_result_bytes: int
    def __init__(self, verdict: _Optional[_Union[Verdict, str]] = ..., reasons: _Optional[_Iterable[str]] = ..., decision_id: _Optional[str] = ..., policy_revision: _Optional[str] = ..., sqlstate: _Optional[str] = ..., mask: _Optional[_Union[MaskPlan, _Mapping]] = ..., approval: _Optional[_Union[Approval, _Mapping]] = ..., record_rows: _Optional[str] = ..., record_rows_cap: _Optional[int] = ..., analysis_json: _Optional[str] = ..., params_read: _Optional[_Iterable[int]] = ..., cacheable: _Optional[bool] = ..., max_result_bytes: _Optional[int] = ...) -> None: ...

class DecideConnectRequest(_message.Message):
    __slots__ = ("identity", "database", "session")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    DATABASE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    identity: Identity
    database: str
    session: Session
    def __init__(self, identity: _Optional[_Union[Identity, _Mapping]] = ..., database: _Optional[str] = ..., session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class DecideConnectResponse(_message.Message):
    __slots__ = ("allowed", "upstream_role", "reasons", "decision_id", "policy_revision")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_ROLE_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_REVISION_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    upstream_role: str
    reasons: _containers.RepeatedScalarFieldContainer[str]
    decision_id: str
    policy_revision: str
    def __init__(self, allowed: _Optional[bool] = ..., upstream_role: _Optional[str] = ..., reasons: _Optional[_Iterable[str]] = ..., decision_id: _Optional[str] = ..., policy_revision: _Optional[str] = ...) -> None: ...

class WatchRevisionRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RevisionUpdate(_message.Message):
    __slots__ = ("policy_revision", "opa_ready")
    POLICY_REVISION_FIELD_NUMBER: _ClassVar[int]
    OPA_READY_FIELD_NUMBER: _ClassVar[int]
    policy_revision: str
    opa_ready: bool
    def __init__(self, policy_revision: _Optional[str] = ..., opa_ready: _Optional[bool] = ...) -> None: ...
