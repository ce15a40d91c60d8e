import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SagaStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAGA_STATUS_UNSPECIFIED: _ClassVar[SagaStatus]
    SAGA_STATUS_RUNNING: _ClassVar[SagaStatus]
    SAGA_STATUS_COMPENSATING: _ClassVar[SagaStatus]
    SAGA_STATUS_COMPLETED: _ClassVar[SagaStatus]
    SAGA_STATUS_COMPENSATED: _ClassVar[SagaStatus]
    SAGA_STATUS_NEEDS_OPERATOR: _ClassVar[SagaStatus]
    SAGA_STATUS_RESOLVED: _ClassVar[SagaStatus]

class CommandKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMMAND_KIND_UNSPECIFIED: _ClassVar[CommandKind]
    COMMAND_KIND_ACTION: _ClassVar[CommandKind]
    COMMAND_KIND_COMPENSATION: _ClassVar[CommandKind]

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_SUCCESS: _ClassVar[Outcome]
    OUTCOME_FAILURE: _ClassVar[Outcome]

class CircuitState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CIRCUIT_STATE_UNSPECIFIED: _ClassVar[CircuitState]
    CIRCUIT_STATE_CLOSED: _ClassVar[CircuitState]
    CIRCUIT_STATE_OPEN: _ClassVar[CircuitState]
    CIRCUIT_STATE_HALF_OPEN: _ClassVar[CircuitState]
SAGA_STATUS_UNSPECIFIED: SagaStatus
SAGA_STATUS_RUNNING: SagaStatus
SAGA_STATUS_COMPENSATING: SagaStatus
SAGA_STATUS_COMPLETED: SagaStatus
SAGA_STATUS_COMPENSATED: SagaStatus
SAGA_STATUS_NEEDS_OPERATOR: SagaStatus
SAGA_STATUS_RESOLVED: SagaStatus
COMMAND_KIND_UNSPECIFIED: CommandKind
COMMAND_KIND_ACTION: CommandKind
COMMAND_KIND_COMPENSATION: CommandKind
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_SUCCESS: Outcome
OUTCOME_FAILURE: Outcome
CIRCUIT_STATE_UNSPECIFIED: CircuitState
CIRCUIT_STATE_CLOSED: CircuitState
CIRCUIT_STATE_OPEN: CircuitState
CIRCUIT_STATE_HALF_OPEN: CircuitState

class StartSagaRequest(_message.Message):
    __slots__ = ("definition", "input_json", "idempotency_key")
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    INPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    definition: str
    input_json: str
    idempotency_key: str
    def __init__(self, definition: _Optional[str] = ..., input_json: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class StartSagaResponse(_message.Message):
    __slots__ = ("saga_id", "created", "status")
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    created: bool
    status: SagaStatus
    def __init__(self, saga_id: _Optional[str] = ..., created: _Optional[bool] = ..., status: _Optional[_Union[SagaStatus, str]] = ...) -> None: ...

class GetSagaRequest(_message.Message):
    __slots__ = ("saga_id",)
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    def __init__(self, saga_id: _Optional[str] = ...) -> None: ...

class Saga(_message.Message):
    __slots__ = ("id", "definition", "definition_version", "status", "current_step", "input_json", "outputs_json", "idempotency_key", "created_at", "updated_at", "error", "attempts", "history", "current_steps", "steps")
    ID_FIELD_NUMBER: _ClassVar[int]
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    DEFINITION_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_STEP_FIELD_NUMBER: _ClassVar[int]
    INPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_JSON_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    CURRENT_STEPS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    id: str
    definition: str
    definition_version: int
    status: SagaStatus
    current_step: str
    input_json: str
    outputs_json: str
    idempotency_key: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    error: str
    attempts: _containers.RepeatedCompositeFieldContainer[StepAttempt]
    history: _containers.RepeatedCompositeFieldContainer[HistoryEvent]
    current_steps: _containers.RepeatedScalarFieldContainer[str]
    steps: _containers.RepeatedCompositeFieldContainer[StepState]
    def __init__(self, id: _Optional[str] = ..., definition: _Optional[str] = ..., definition_version: _Optional[int] = ..., status: _Optional[_Union[SagaStatus, str]] = ..., current_step: _Optional[str] = ..., input_json: _Optional[str] = ..., outputs_json: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error: _Optional[str] = ..., attempts: _Optional[_Iterable[_Union[StepAttempt, _Mapping]]] = ..., history: _Optional[_Iterable[_Union[HistoryEvent, _Mapping]]] = ..., current_steps: _Optional[_Iterable[str]] = ..., steps: _Optional[_Iterable[_Union[StepState, _Mapping]]] = ...) -> None: ...

class StepState(_message.Message):
    __slots__ = ("name", "participant", "state", "attempt", "command_id", "wake_at", "reason", "after", "pivot")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    WAKE_AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    PIVOT_FIELD_NUMBER: _ClassVar[int]
    name: str
    participant: str
    state: str
    attempt: int
    command_id: str
    wake_at: _timestamp_pb2.Timestamp
    reason: str
    after: _containers.RepeatedScalarFieldContainer[str]
    pivot: bool
    def __init__(self, name: _Optional[str] = ..., participant: _Optional[str] = ..., state: _Optional[str] = ..., attempt: _Optional[int] = ..., command_id: _Optional[str] = ..., wake_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ..., after: _Optional[_Iterable[str]] = ..., pivot: _Optional[bool] = ...) -> None: ...

class StepAttempt(_message.Message):
    __slots__ = ("command_id", "step", "participant", "kind", "attempt", "sent_at", "replied_at", "outcome", "output_json", "reason", "timed_out", "superseded")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    REPLIED_AT_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDED_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    step: str
    participant: str
    kind: CommandKind
    attempt: int
    sent_at: _timestamp_pb2.Timestamp
    replied_at: _timestamp_pb2.Timestamp
    outcome: Outcome
    output_json: str
    reason: str
    timed_out: bool
    superseded: bool
    def __init__(self, command_id: _Optional[str] = ..., step: _Optional[str] = ..., participant: _Optional[str] = ..., kind: _Optional[_Union[CommandKind, str]] = ..., attempt: _Optional[int] = ..., sent_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., replied_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., output_json: _Optional[str] = ..., reason: _Optional[str] = ..., timed_out: _Optional[bool] = ..., superseded: _Optional[bool] = ...) -> None: ...

class HistoryEvent(_message.Message):
    __slots__ = ("seq", "at", "kind", "step", "command_id", "detail_json")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    DETAIL_JSON_FIELD_NUMBER: _ClassVar[int]
    seq: int
    at: _timestamp_pb2.Timestamp
    kind: str
    step: str
    command_id: str
    detail_json: str
    def __init__(self, seq: _Optional[int] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., kind: _Optional[str] = ..., step: _Optional[str] = ..., command_id: _Optional[str] = ..., detail_json: _Optional[str] = ...) -> None: ...

class ListSagasRequest(_message.Message):
    __slots__ = ("statuses", "definition", "page_size", "page_token", "definition_version", "stuck_for", "participant", "step", "created_after", "created_before", "updated_after", "updated_before", "error_contains")
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DEFINITION_VERSION_FIELD_NUMBER: _ClassVar[int]
    STUCK_FOR_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CREATED_AFTER_FIELD_NUMBER: _ClassVar[int]
    CREATED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AFTER_FIELD_NUMBER: _ClassVar[int]
    UPDATED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CONTAINS_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedScalarFieldContainer[SagaStatus]
    definition: str
    page_size: int
    page_token: str
    definition_version: int
    stuck_for: _duration_pb2.Duration
    participant: str
    step: str
    created_after: _timestamp_pb2.Timestamp
    created_before: _timestamp_pb2.Timestamp
    updated_after: _timestamp_pb2.Timestamp
    updated_before: _timestamp_pb2.Timestamp
    error_contains: str
    def __init__(self, statuses: _Optional[_Iterable[_Union[SagaStatus, str]]] = ..., definition: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., definition_version: _Optional[int] = ..., stuck_for: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., participant: _Optional[str] = ..., step: _Optional[str] = ..., created_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error_contains: _Optional[str] = ...) -> None: ...

class SagaSummary(_message.Message):
    __slots__ = ("id", "definition", "definition_version", "status", "current_step", "created_at", "updated_at", "error", "current_steps")
    ID_FIELD_NUMBER: _ClassVar[int]
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    DEFINITION_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_STEP_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CURRENT_STEPS_FIELD_NUMBER: _ClassVar[int]
    id: str
    definition: str
    definition_version: int
    status: SagaStatus
    current_step: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    error: str
    current_steps: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., definition: _Optional[str] = ..., definition_version: _Optional[int] = ..., status: _Optional[_Union[SagaStatus, str]] = ..., current_step: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error: _Optional[str] = ..., current_steps: _Optional[_Iterable[str]] = ...) -> None: ...

class ListSagasResponse(_message.Message):
    __slots__ = ("sagas", "next_page_token")
    SAGAS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sagas: _containers.RepeatedCompositeFieldContainer[SagaSummary]
    next_page_token: str
    def __init__(self, sagas: _Optional[_Iterable[_Union[SagaSummary, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ReportStepResultRequest(_message.Message):
    __slots__ = ("command_id", "outcome", "output_json", "reason", "retryable")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    outcome: Outcome
    output_json: str
    reason: str
    retryable: bool
    def __init__(self, command_id: _Optional[str] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., output_json: _Optional[str] = ..., reason: _Optional[str] = ..., retryable: _Optional[bool] = ...) -> None: ...

class ReportStepResultResponse(_message.Message):
    __slots__ = ("applied",)
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    def __init__(self, applied: _Optional[bool] = ...) -> None: ...

class WatchSagaRequest(_message.Message):
    __slots__ = ("saga_id", "after_seq")
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    after_seq: int
    def __init__(self, saga_id: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class RepairRequest(_message.Message):
    __slots__ = ("saga_id", "reason", "step")
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    reason: str
    step: str
    def __init__(self, saga_id: _Optional[str] = ..., reason: _Optional[str] = ..., step: _Optional[str] = ...) -> None: ...

class SkipStepRequest(_message.Message):
    __slots__ = ("saga_id", "reason", "output_json", "step")
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    reason: str
    output_json: str
    step: str
    def __init__(self, saga_id: _Optional[str] = ..., reason: _Optional[str] = ..., output_json: _Optional[str] = ..., step: _Optional[str] = ...) -> None: ...

class RepairResponse(_message.Message):
    __slots__ = ("saga",)
    SAGA_FIELD_NUMBER: _ClassVar[int]
    saga: Saga
    def __init__(self, saga: _Optional[_Union[Saga, _Mapping]] = ...) -> None: ...

class RedriveRequest(_message.Message):
    __slots__ = ("filter", "reason", "dry_run", "batch_size", "limit")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    filter: ListSagasRequest
    reason: str
    dry_run: bool
    batch_size: int
    limit: int
    def __init__(self, filter: _Optional[_Union[ListSagasRequest, _Mapping]] = ..., reason: _Optional[str] = ..., dry_run: _Optional[bool] = ..., batch_size: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class RedriveProgress(_message.Message):
    __slots__ = ("matched", "retried", "skipped", "saga_ids", "done", "skipped_ids")
    MATCHED_FIELD_NUMBER: _ClassVar[int]
    RETRIED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    SAGA_IDS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_IDS_FIELD_NUMBER: _ClassVar[int]
    matched: int
    retried: int
    skipped: int
    saga_ids: _containers.RepeatedScalarFieldContainer[str]
    done: bool
    skipped_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, matched: _Optional[int] = ..., retried: _Optional[int] = ..., skipped: _Optional[int] = ..., saga_ids: _Optional[_Iterable[str]] = ..., done: _Optional[bool] = ..., skipped_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ParticipantRequest(_message.Message):
    __slots__ = ("participant", "reason")
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    participant: str
    reason: str
    def __init__(self, participant: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Participant(_message.Message):
    __slots__ = ("name", "paused", "paused_by", "paused_reason", "paused_at", "circuit", "consecutive_failures", "circuit_changed_at", "held_commands")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    PAUSED_BY_FIELD_NUMBER: _ClassVar[int]
    PAUSED_REASON_FIELD_NUMBER: _ClassVar[int]
    PAUSED_AT_FIELD_NUMBER: _ClassVar[int]
    CIRCUIT_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    CIRCUIT_CHANGED_AT_FIELD_NUMBER: _ClassVar[int]
    HELD_COMMANDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    paused: bool
    paused_by: str
    paused_reason: str
    paused_at: _timestamp_pb2.Timestamp
    circuit: CircuitState
    consecutive_failures: int
    circuit_changed_at: _timestamp_pb2.Timestamp
    held_commands: int
    def __init__(self, name: _Optional[str] = ..., paused: _Optional[bool] = ..., paused_by: _Optional[str] = ..., paused_reason: _Optional[str] = ..., paused_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., circuit: _Optional[_Union[CircuitState, str]] = ..., consecutive_failures: _Optional[int] = ..., circuit_changed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., held_commands: _Optional[int] = ...) -> None: ...

class ListParticipantsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListParticipantsResponse(_message.Message):
    __slots__ = ("participants",)
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    participants: _containers.RepeatedCompositeFieldContainer[Participant]
    def __init__(self, participants: _Optional[_Iterable[_Union[Participant, _Mapping]]] = ...) -> None: ...

class CountSagasRequest(_message.Message):
    __slots__ = ("definition",)
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    definition: str
    def __init__(self, definition: _Optional[str] = ...) -> None: ...

class StatusCount(_message.Message):
    __slots__ = ("status", "count")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    status: SagaStatus
    count: int
    def __init__(self, status: _Optional[_Union[SagaStatus, str]] = ..., count: _Optional[int] = ...) -> None: ...

class StepCount(_message.Message):
    __slots__ = ("definition", "step", "participant", "status", "count", "oldest_updated_at")
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    OLDEST_UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    definition: str
    step: str
    participant: str
    status: SagaStatus
    count: int
    oldest_updated_at: _timestamp_pb2.Timestamp
    def __init__(self, definition: _Optional[str] = ..., step: _Optional[str] = ..., participant: _Optional[str] = ..., status: _Optional[_Union[SagaStatus, str]] = ..., count: _Optional[int] = ..., oldest_updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CountSagasResponse(_message.Message):
    __slots__ = ("by_status", "by_step")
    BY_STATUS_FIELD_NUMBER: _ClassVar[int]
    BY_STEP_FIELD_NUMBER: _ClassVar[int]
    by_status: _containers.RepeatedCompositeFieldContainer[StatusCount]
    by_step: _containers.RepeatedCompositeFieldContainer[StepCount]
    def __init__(self, by_status: _Optional[_Iterable[_Union[StatusCount, _Mapping]]] = ..., by_step: _Optional[_Iterable[_Union[StepCount, _Mapping]]] = ...) -> None: ...

class ListDefinitionsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListDefinitionsResponse(_message.Message):
    __slots__ = ("definitions",)
    DEFINITIONS_FIELD_NUMBER: _ClassVar[int]
    definitions: _containers.RepeatedCompositeFieldContainer[Definition]
    def __init__(self, definitions: _Optional[_Iterable[_Union[Definition, _Mapping]]] = ...) -> None: ...

class GetDefinitionRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class Definition(_message.Message):
    __slots__ = ("name", "version", "description", "retired", "current", "steps", "pivot_step", "compensation_max_attempts", "active_sagas")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    RETIRED_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    PIVOT_STEP_FIELD_NUMBER: _ClassVar[int]
    COMPENSATION_MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SAGAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    description: str
    retired: bool
    current: bool
    steps: _containers.RepeatedCompositeFieldContainer[DefinitionStep]
    pivot_step: str
    compensation_max_attempts: int
    active_sagas: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., description: _Optional[str] = ..., retired: _Optional[bool] = ..., current: _Optional[bool] = ..., steps: _Optional[_Iterable[_Union[DefinitionStep, _Mapping]]] = ..., pivot_step: _Optional[str] = ..., compensation_max_attempts: _Optional[int] = ..., active_sagas: _Optional[int] = ...) -> None: ...

class DefinitionStep(_message.Message):
    __slots__ = ("name", "participant", "action", "compensation", "after", "when", "input_json", "compensation_input_json", "pivot", "timeout", "retry", "after_pivot")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    COMPENSATION_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    WHEN_FIELD_NUMBER: _ClassVar[int]
    INPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    COMPENSATION_INPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    PIVOT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    AFTER_PIVOT_FIELD_NUMBER: _ClassVar[int]
    name: str
    participant: str
    action: str
    compensation: str
    after: _containers.RepeatedScalarFieldContainer[str]
    when: str
    input_json: str
    compensation_input_json: str
    pivot: bool
    timeout: _duration_pb2.Duration
    retry: RetryPolicy
    after_pivot: bool
    def __init__(self, name: _Optional[str] = ..., participant: _Optional[str] = ..., action: _Optional[str] = ..., compensation: _Optional[str] = ..., after: _Optional[_Iterable[str]] = ..., when: _Optional[str] = ..., input_json: _Optional[str] = ..., compensation_input_json: _Optional[str] = ..., pivot: _Optional[bool] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., retry: _Optional[_Union[RetryPolicy, _Mapping]] = ..., after_pivot: _Optional[bool] = ...) -> None: ...

class RetryPolicy(_message.Message):
    __slots__ = ("max_attempts", "initial_backoff", "max_backoff", "multiplier")
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_BACKOFF_FIELD_NUMBER: _ClassVar[int]
    MAX_BACKOFF_FIELD_NUMBER: _ClassVar[int]
    MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    max_attempts: int
    initial_backoff: _duration_pb2.Duration
    max_backoff: _duration_pb2.Duration
    multiplier: float
    def __init__(self, max_attempts: _Optional[int] = ..., initial_backoff: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_backoff: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., multiplier: _Optional[float] = ...) -> None: ...
