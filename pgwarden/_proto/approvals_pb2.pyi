import policy_pb2 as _policy_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_APPROVED: _ClassVar[Outcome]
    OUTCOME_DENIED: _ClassVar[Outcome]
    OUTCOME_EXPIRED: _ClassVar[Outcome]
    OUTCOME_CANCELLED: _ClassVar[Outcome]
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_APPROVED: Outcome
OUTCOME_DENIED: Outcome
OUTCOME_EXPIRED: Outcome
OUTCOME_CANCELLED: Outcome

class HoldRequest(_message.Message):
    __slots__ = ("identity", "session", "sql", "params_digest", "fingerprint", "reason", "approver_groups", "hold_seconds", "decision_id", "approval_id", "statement_seq")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SQL_FIELD_NUMBER: _ClassVar[int]
    PARAMS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    APPROVER_GROUPS_FIELD_NUMBER: _ClassVar[int]
    HOLD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    STATEMENT_SEQ_FIELD_NUMBER: _ClassVar[int]
    identity: _policy_pb2.Identity
    session: _policy_pb2.Session
    sql: str
    params_digest: str
    fingerprint: str
    reason: str
    approver_groups: _containers.RepeatedScalarFieldContainer[str]
    hold_seconds: float
    decision_id: str
    approval_id: str
    statement_seq: int
    def __init__(self, identity: _Optional[_Union[_policy_pb2.Identity, _Mapping]] = ..., session: _Optional[_Union[_policy_pb2.Session, _Mapping]] = ..., sql: _Optional[str] = ..., params_digest: _Optional[str] = ..., fingerprint: _Optional[str] = ..., reason: _Optional[str] = ..., approver_groups: _Optional[_Iterable[str]] = ..., hold_seconds: _Optional[float] = ..., decision_id: _Optional[str] = ..., approval_id: _Optional[str] = ..., statement_seq: _Optional[int] = ...) -> None: ...

class ApprovalInfo(_message.Message):
    __slots__ = ("approval_id", "status", "subject", "actor", "groups", "database", "session_id", "statement", "fingerprint", "params_digest", "reason", "approver_groups", "created_at", "expires_at", "late_grant_until", "approver", "approver_reason", "decided_at", "late_grant", "statement_digest", "decision_id")
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    DATABASE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATEMENT_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    APPROVER_GROUPS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    LATE_GRANT_UNTIL_FIELD_NUMBER: _ClassVar[int]
    APPROVER_FIELD_NUMBER: _ClassVar[int]
    APPROVER_REASON_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    LATE_GRANT_FIELD_NUMBER: _ClassVar[int]
    STATEMENT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    approval_id: str
    status: str
    subject: str
    actor: str
    groups: _containers.RepeatedScalarFieldContainer[str]
    database: str
    session_id: str
    statement: str
    fingerprint: str
    params_digest: str
    reason: str
    approver_groups: _containers.RepeatedScalarFieldContainer[str]
    created_at: float
    expires_at: float
    late_grant_until: float
    approver: str
    approver_reason: str
    decided_at: float
    late_grant: bool
    statement_digest: str
    decision_id: str
    def __init__(self, approval_id: _Optional[str] = ..., status: _Optional[str] = ..., subject: _Optional[str] = ..., actor: _Optional[str] = ..., groups: _Optional[_Iterable[str]] = ..., database: _Optional[str] = ..., session_id: _Optional[str] = ..., statement: _Optional[str] = ..., fingerprint: _Optional[str] = ..., params_digest: _Optional[str] = ..., reason: _Optional[str] = ..., approver_groups: _Optional[_Iterable[str]] = ..., created_at: _Optional[float] = ..., expires_at: _Optional[float] = ..., late_grant_until: _Optional[float] = ..., approver: _Optional[str] = ..., approver_reason: _Optional[str] = ..., decided_at: _Optional[float] = ..., late_grant: _Optional[bool] = ..., statement_digest: _Optional[str] = ..., decision_id: _Optional[str] = ...) -> None: ...

class HoldResult(_message.Message):
    __slots__ = ("outcome", "approval", "from_late_grant")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    FROM_LATE_GRANT_FIELD_NUMBER: _ClassVar[int]
    outcome: Outcome
    approval: ApprovalInfo
    from_late_grant: bool
    def __init__(self, outcome: _Optional[_Union[Outcome, str]] = ..., approval: _Optional[_Union[ApprovalInfo, _Mapping]] = ..., from_late_grant: _Optional[bool] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("approval_id",)
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    approval_id: str
    def __init__(self, approval_id: _Optional[str] = ...) -> None: ...

class DecideRequest(_message.Message):
    __slots__ = ("approval_id", "token", "approve", "reason")
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    APPROVE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    approval_id: str
    token: str
    approve: bool
    reason: str
    def __init__(self, approval_id: _Optional[str] = ..., token: _Optional[str] = ..., approve: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("token", "status", "limit")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    token: str
    status: str
    limit: int
    def __init__(self, token: _Optional[str] = ..., status: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("approvals",)
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    approvals: _containers.RepeatedCompositeFieldContainer[ApprovalInfo]
    def __init__(self, approvals: _Optional[_Iterable[_Union[ApprovalInfo, _Mapping]]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("token", "approval_id")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    token: str
    approval_id: str
    def __init__(self, token: _Optional[str] = ..., approval_id: _Optional[str] = ...) -> None: ...
