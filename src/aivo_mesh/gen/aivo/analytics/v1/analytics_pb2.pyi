from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunReportRequest(_message.Message):
    __slots__ = ("report", "learner_id")
    REPORT_FIELD_NUMBER: _ClassVar[int]
    LEARNER_ID_FIELD_NUMBER: _ClassVar[int]
    report: str
    learner_id: str
    def __init__(self, report: _Optional[str] = ..., learner_id: _Optional[str] = ...) -> None: ...

class Row(_message.Message):
    __slots__ = ("key", "count")
    KEY_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    key: str
    count: int
    def __init__(self, key: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class Report(_message.Message):
    __slots__ = ("report", "rows", "total", "generated_at")
    REPORT_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    GENERATED_AT_FIELD_NUMBER: _ClassVar[int]
    report: str
    rows: _containers.RepeatedCompositeFieldContainer[Row]
    total: int
    generated_at: int
    def __init__(self, report: _Optional[str] = ..., rows: _Optional[_Iterable[_Union[Row, _Mapping]]] = ..., total: _Optional[int] = ..., generated_at: _Optional[int] = ...) -> None: ...
