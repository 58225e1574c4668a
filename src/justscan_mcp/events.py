"""Event payloads: validation of each event's data, and the one serialisation that is signed.

The envelope ``{"event", "timestamp", "data"}`` is serialised once, compactly (UTF-8, no ASCII
escaping), when the event is recorded; those exact bytes are stored, signed and sent on every
attempt. Fields ending in ``_id`` are required integers, ``fields`` is an object, every other
field is an optional string; unknown fields are refused so that a typo does not vanish silently.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from justscan_mcp.errors import InvalidInput
from justscan_mcp.models import MAX_ID

# Ids are stored in BIGINT columns (first_scans.qr_code_id) and read as such by receivers: one
# outside 1..2^63-1 is refused by name, not left for the database to fail on.
Id = Annotated[StrictInt, Field(ge=1, le=MAX_ID)]

EmittableEvent = Literal["scan", "form_submit", "file_download"]
EMITTABLE: tuple[str, ...] = ("scan", "form_submit", "file_download")


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScanData(_Data):
    qr_code_id: Id
    scan_id: Id
    device: StrictStr | None = None
    country: StrictStr | None = None
    resolved_url: StrictStr | None = None
    referer: StrictStr | None = None
    utm_source: StrictStr | None = None
    utm_medium: StrictStr | None = None
    utm_campaign: StrictStr | None = None
    utm_term: StrictStr | None = None
    utm_content: StrictStr | None = None


class FormSubmitData(_Data):
    landing_page_id: Id
    title: StrictStr | None = None
    slug: StrictStr | None = None
    recipient_email: StrictStr | None = None
    fields: dict[str, Any]


class FileDownloadData(_Data):
    shared_file_id: Id
    qr_code_id: Id
    scan_id: Id
    slug: StrictStr | None = None
    title: StrictStr | None = None
    device: StrictStr | None = None
    country: StrictStr | None = None
    download_url: StrictStr | None = None


class TestData(_Data):
    test: StrictBool
    webhook_id: Id


DATA_MODELS: dict[str, type[_Data]] = {
    "scan": ScanData,
    "first_scan": ScanData,
    "form_submit": FormSubmitData,
    "file_download": FileDownloadData,
    "test": TestData,
}


def validate_emit(event: Any, data: Any) -> _Data:
    """Check an event emitted from outside (CLI, REST, service callers).

    Raises:
        InvalidInput: (field ``event``) for an unknown name or one that is derived or internal
            (first_scan, test); (field ``data`` or ``data.<name>``) for data that is not an object
            or has a missing, mistyped or unknown field.
    """
    if event in ("first_scan", "test"):
        raise InvalidInput(
            "event",
            f"{event!r} cannot be emitted by hand; it is produced by the service (choose from {', '.join(EMITTABLE)})",
        )
    if not isinstance(event, str) or event not in EMITTABLE:
        raise InvalidInput("event", f"{event!r} is not an event; choose from {', '.join(EMITTABLE)}")
    if not isinstance(data, dict):
        raise InvalidInput("data", f"must be a JSON object, got {type(data).__name__}")
    try:
        model = DATA_MODELS[event].model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        reason = {
            "missing": "is required",
            "extra_forbidden": "is not a field of this event",
            "int_type": "must be an integer",
            "string_type": "must be a string or null",
            "dict_type": "must be an object",
            "greater_than_equal": f"must be an integer id from 1 to {MAX_ID}",
            "less_than_equal": f"must be an integer id from 1 to {MAX_ID}",
        }.get(first["type"], first["msg"])
        raise InvalidInput(f"data.{where}", reason) from None
    _check_unicode(data, "data")
    return model


def _check_unicode(value: Any, where: str) -> None:
    """Raises: InvalidInput naming the first string (key or value) that is not valid Unicode, such
    as a lone surrogate from a JSON escape: it cannot be encoded as UTF-8, so neither stored nor
    signed."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInput(where, "is not valid Unicode text (it holds a lone surrogate)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key, f"{where} (a key)")
            _check_unicode(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_unicode(item, f"{where}.{i}")


def envelope(event: str, data: _Data, timestamp: datetime) -> bytes:
    """The exact bytes sent and signed: compact JSON, UTF-8, keys in a stable order."""
    if timestamp.tzinfo is None:
        raise ValueError("timestamp must be timezone-aware")
    # The same bytes as json.dumps(..., separators=(",", ":"), ensure_ascii=False) of the dict
    # {event, timestamp, data.model_dump(mode="json")} (tests/test_ingest.py compares them), at
    # 3.3 µs an event against 8: pydantic writes the data's JSON itself, and at 25,000 events a
    # second this was a fifth of the batch endpoint's time.
    head = _EVENT_JSON.get(event) or json.dumps(event, ensure_ascii=False)
    stamp = timestamp.isoformat(timespec="seconds")
    data_json = data.__pydantic_serializer__.to_json(data).decode("utf-8")
    return f'{{"event":{head},"timestamp":"{stamp}","data":{data_json}}}'.encode()


_EVENT_JSON = {name: json.dumps(name) for name in DATA_MODELS}

EXAMPLE_DATA: dict[str, dict[str, Any]] = {
    "scan": {"qr_code_id": 42, "scan_id": 9001, "device": "mobile", "country": "DE", "utm_source": "poster"},
    "first_scan": {"qr_code_id": 42, "scan_id": 9001, "device": "mobile", "country": "DE"},
    "form_submit": {
        "landing_page_id": 7,
        "title": "Stadium raffle",
        "slug": "raffle",
        "fields": {"email": "fan@example.com", "seat": "B12"},
    },
    "file_download": {"shared_file_id": 3, "qr_code_id": 42, "scan_id": 9002, "title": "Menu.pdf"},
    "test": {"test": True, "webhook_id": 1},
}


def event_schema(event: str) -> dict[str, Any]:
    """A JSON Schema of the body a receiver gets for `event`, from the model that validates its
    data (so the two cannot drift), with an example envelope.

    Raises:
        KeyError: for an unknown event.
    """
    data = DATA_MODELS[event]
    example_data = data.model_validate(EXAMPLE_DATA[event])
    example = json.loads(envelope(event, example_data, datetime(2026, 11, 29, 12, 0, tzinfo=UTC)))
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"Just Scan It `{event}` webhook body",
        "type": "object",
        "required": ["event", "timestamp", "data"],
        "additionalProperties": False,
        "properties": {
            "event": {"const": event},
            "timestamp": {"type": "string", "format": "date-time"},
            "data": data.model_json_schema(),
        },
        "examples": [example],
    }
