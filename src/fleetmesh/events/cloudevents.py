"""CloudEvents 1.0 envelopes: validation, JSON structured mode and the HTTP binary binding.

Choices (the spec leaves them open or they are ours):

* A JSON ``null`` attribute is treated as absent; a required attribute that is absent or
  ``null`` is reported as missing.
* ``source`` must be a non-empty URI-reference without whitespace; ``dataschema`` must be an
  absolute URI; ``datacontenttype`` must look like an RFC 2046 media type; ``time`` must be an
  RFC 3339 timestamp with an offset (kept as an aware ``datetime``, fractions beyond
  microseconds are truncated).
* Extension attributes must be named with lowercase ASCII letters and digits; their values
  must be strings, booleans or 32-bit integers. In the HTTP binary binding every extension
  arrives as a string and stays one.
* Types in the reserved ``fleetmesh.`` namespace must be built-in names (see
  :mod:`fleetmesh.events.domain`); other types are free-form.
* ``data`` holds decoded JSON for JSON content types, ``bytes`` for ``data_base64`` and for
  non-JSON binary bodies; ``None`` means "no data" (a JSON ``null`` payload cannot be told
  apart from no payload).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any, cast
from urllib.parse import quote, unquote

from fleetmesh.core.errors import FieldError
from fleetmesh.events.domain import InvalidCloudEvent, event_type_problem, parse_time

SPEC_VERSION = "1.0"
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
REQUIRED_ATTRIBUTES = ("id", "source", "specversion", "type")
OPTIONAL_ATTRIBUTES = ("datacontenttype", "dataschema", "subject", "time")
CONTEXT_ATTRIBUTES = frozenset(REQUIRED_ATTRIBUTES + OPTIONAL_ATTRIBUTES)
CORRELATION_ID = "correlationid"
CAUSATION_ID = "causationid"

ExtensionValue = str | bool | int

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_ATTRIBUTE_NAME = re.compile(r"[a-z0-9]+")
_MEDIA_TYPE = re.compile(r"[\w!#$&^.+-]+/[\w!#$&^.+-]+\s*(;.*)?", re.DOTALL)
_ABSOLUTE_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:\S+")
_WHITESPACE = re.compile(r"[\s\x00-\x1f\x7f]")
_HEADER_PREFIX = "ce-"
_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')


@dataclass(frozen=True)
class CloudEvent:
    """A valid CloudEvents 1.0 event; construction raises :class:`InvalidCloudEvent`."""

    id: str
    source: str
    type: str
    specversion: str = SPEC_VERSION
    time: datetime | None = None
    subject: str | None = None
    datacontenttype: str | None = None
    dataschema: str | None = None
    data: Any = None
    extensions: Mapping[str, ExtensionValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        errors = [
            *_string_attribute_errors(self._string_attributes()),
            *_time_errors(self.time),
            *_extension_errors(self.extensions),
        ]
        if errors:
            raise InvalidCloudEvent(errors)

    def _string_attributes(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in CONTEXT_ATTRIBUTES - {"time"}}

    @property
    def correlation_id(self) -> str | None:
        """The ``correlationid`` extension, as a string, when present."""
        return _optional_str(self.extensions.get(CORRELATION_ID))

    @property
    def causation_id(self) -> str | None:
        """The ``causationid`` extension, as a string, when present."""
        return _optional_str(self.extensions.get(CAUSATION_ID))

    @cached_property
    def attribute_strings(self) -> Mapping[str, str]:
        """Every present attribute in its canonical string form (used by filters)."""
        present = {name: getattr(self, name) for name in CONTEXT_ATTRIBUTES}
        present.update(self.extensions)
        return {
            name: attribute_string(value) for name, value in present.items() if value is not None
        }

    @cached_property
    def document(self) -> Mapping[str, Any]:
        """The structured JSON form, computed once (used by JMESPath filters)."""
        return to_structured(self)


def attribute_string(value: ExtensionValue | datetime) -> str:
    """The canonical string form of an attribute value (CloudEvents type system)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return format_time(value)
    return str(value)


def format_time(moment: datetime) -> str:
    """RFC 3339 text for an aware datetime, with ``Z`` for UTC."""
    text = moment.isoformat()
    return text[: -len("+00:00")] + "Z" if text.endswith("+00:00") else text


def _optional_str(value: ExtensionValue | None) -> str | None:
    return None if value is None else attribute_string(value)


# --------------------------------------------------------------------------- attribute checks


def _string_attribute_errors(values: Mapping[str, object]) -> Iterator[FieldError]:
    for name in sorted(values):
        value = values[name]
        if value is None:
            if name in REQUIRED_ATTRIBUTES:
                yield FieldError(name, "required attribute is missing", "missing")
            continue
        problem = _string_attribute_problem(name, value)
        if problem is not None:
            yield FieldError(name, problem)


def _string_attribute_problem(name: str, value: object) -> str | None:
    if not isinstance(value, str):
        return "must be a string"
    if not value:
        return "must not be empty"
    if name == "specversion" and value != SPEC_VERSION:
        return f"unsupported specversion {value!r}; expected {SPEC_VERSION!r}"
    if name == "type":
        return event_type_problem(value)
    if name == "source" and _WHITESPACE.search(value):
        return "must be a URI-reference (no whitespace or control characters)"
    if name == "dataschema" and not _ABSOLUTE_URI.fullmatch(value):
        return "must be an absolute URI"
    if name == "datacontenttype" and not _MEDIA_TYPE.fullmatch(value):
        return "must be a media type such as application/json"
    return None


def _time_errors(value: object) -> Iterator[FieldError]:
    if value is None:
        return
    if not isinstance(value, datetime):
        yield FieldError("time", "must be a datetime")
    elif value.utcoffset() is None:
        yield FieldError("time", "must carry a UTC offset")


def _extension_errors(extensions: Mapping[str, object]) -> Iterator[FieldError]:
    for name in sorted(extensions):
        value = extensions[name]
        if name in CONTEXT_ATTRIBUTES or name in ("data", "data_base64"):
            yield FieldError(name, "is not an extension attribute")
        elif not _ATTRIBUTE_NAME.fullmatch(name):
            yield FieldError(name, "attribute names must use only lowercase letters a-z and 0-9")
        elif not _is_extension_value(value):
            yield FieldError(name, "must be a string, a boolean or a 32-bit integer")


def _is_extension_value(value: object) -> bool:
    if isinstance(value, bool | str):
        return True
    return isinstance(value, int) and _INT32_MIN <= value <= _INT32_MAX


def _decode_time(value: object, errors: list[FieldError]) -> datetime | None:
    if value is None:
        return None
    moment = parse_time(value) if isinstance(value, str) else None
    if moment is None:
        errors.append(FieldError("time", "must be an RFC 3339 timestamp"))
    return moment


# --------------------------------------------------------------------------- structured mode


def parse_structured(obj: Mapping[str, Any]) -> CloudEvent:
    """Validate a JSON-format (structured) CloudEvent; raise listing every failing field."""
    if not isinstance(obj, Mapping):
        raise InvalidCloudEvent([FieldError("", "a CloudEvent must be a JSON object")])
    errors: list[FieldError] = []
    time = _decode_time(obj.get("time"), errors)
    data = _decode_structured_data(obj, errors)
    strings = {name: obj.get(name) for name in CONTEXT_ATTRIBUTES - {"time"}}
    extensions = {
        name: value
        for name, value in obj.items()
        if name not in CONTEXT_ATTRIBUTES and name not in ("data", "data_base64")
        if value is not None
    }
    errors.extend(_string_attribute_errors(strings))
    errors.extend(_extension_errors(extensions))
    if errors:
        raise InvalidCloudEvent(_by_field(errors))
    return _build_event(strings, time, data, extensions)


def _decode_structured_data(obj: Mapping[str, Any], errors: list[FieldError]) -> Any:
    encoded = obj.get("data_base64")
    if encoded is None:
        return obj.get("data")
    if obj.get("data") is not None:
        errors.append(FieldError("data_base64", "data and data_base64 are mutually exclusive"))
        return None
    if isinstance(encoded, str):
        try:
            return base64.b64decode(encoded, validate=True)
        except binascii.Error:
            pass
    errors.append(FieldError("data_base64", "must be a base64 string"))
    return None


def to_structured(event: CloudEvent) -> dict[str, Any]:
    """The JSON-format (structured mode) dict of an event."""
    document: dict[str, Any] = {
        "specversion": event.specversion,
        "id": event.id,
        "source": event.source,
        "type": event.type,
    }
    for name in ("subject", "datacontenttype", "dataschema"):
        if getattr(event, name) is not None:
            document[name] = getattr(event, name)
    if event.time is not None:
        document["time"] = format_time(event.time)
    document.update(event.extensions)
    if isinstance(event.data, bytes | bytearray):
        document["data_base64"] = base64.b64encode(event.data).decode("ascii")
    elif event.data is not None:
        document["data"] = event.data
    return document


# --------------------------------------------------------------------------- HTTP binding


def is_json_media_type(content_type: str | None) -> bool:
    """Whether the media type is JSON (``application/json`` or any ``+json`` type)."""
    if content_type is None:
        return False
    essence = content_type.split(";", 1)[0].strip().lower()
    return essence in ("application/json", "text/json") or essence.endswith("+json")


def parse_binary(
    headers: Mapping[str, str], body: bytes, content_type: str | None = None
) -> CloudEvent:
    """Validate an HTTP binary-mode event: ``ce-*`` headers plus the body as ``data``.

    ``content_type`` defaults to the ``Content-Type`` header; it becomes ``datacontenttype``.
    JSON bodies are decoded; other bodies stay ``bytes``. Header names are case-insensitive
    and values are percent-decoded.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    attributes = {
        name[len(_HEADER_PREFIX) :]: unquote(value)
        for name, value in lowered.items()
        if name.startswith(_HEADER_PREFIX)
    }
    fallback_content_type = attributes.pop("datacontenttype", None)
    if content_type is None:
        content_type = lowered.get("content-type", fallback_content_type)
    errors: list[FieldError] = []
    time = _decode_time(attributes.pop("time", None), errors)
    data = _decode_binary_body(body, content_type, errors)
    strings = {name: attributes.pop(name, None) for name in CONTEXT_ATTRIBUTES - {"time"}}
    strings["datacontenttype"] = content_type
    errors.extend(_string_attribute_errors(strings))
    errors.extend(_extension_errors(attributes))
    if errors:
        raise InvalidCloudEvent(_by_field(errors))
    return _build_event(strings, time, data, attributes)


def _by_field(errors: list[FieldError]) -> list[FieldError]:
    return sorted(errors, key=lambda error: error.field)


def _build_event(
    strings: Mapping[str, object],
    time: datetime | None,
    data: Any,
    extensions: Mapping[str, object],
) -> CloudEvent:
    """Assemble an event from attributes that already passed validation."""
    return CloudEvent(
        id=cast(str, strings["id"]),
        source=cast(str, strings["source"]),
        type=cast(str, strings["type"]),
        specversion=cast(str, strings["specversion"]),
        time=time,
        subject=cast(str | None, strings.get("subject")),
        datacontenttype=cast(str | None, strings.get("datacontenttype")),
        dataschema=cast(str | None, strings.get("dataschema")),
        data=data,
        extensions=cast(Mapping[str, ExtensionValue], dict(extensions)),
    )


def _decode_binary_body(body: bytes, content_type: str | None, errors: list[FieldError]) -> Any:
    if not body:
        return None
    if not is_json_media_type(content_type):
        return bytes(body)
    try:
        return json.loads(body)
    except ValueError as error:
        errors.append(FieldError("data", f"body is not valid JSON: {error}"))
        return None


def to_binary(event: CloudEvent) -> tuple[dict[str, str], bytes]:
    """HTTP binary-mode headers and body for an event (JSON data is JSON-encoded)."""
    headers = {
        _HEADER_PREFIX + name: quote(value, safe=_HEADER_SAFE)
        for name, value in event.attribute_strings.items()
        if name != "datacontenttype"
    }
    content_type = event.datacontenttype
    if isinstance(event.data, bytes | bytearray):
        body = bytes(event.data)
    elif event.data is None:
        body = b""
    elif isinstance(event.data, str) and not is_json_media_type(content_type or "application/json"):
        body = event.data.encode("utf-8")
    else:
        body = json.dumps(event.data, separators=(",", ":")).encode("utf-8")
        content_type = content_type or "application/json"
    if content_type is not None:
        headers["content-type"] = content_type
    return headers, body


def parse_http(headers: Mapping[str, str], body: bytes) -> CloudEvent:
    """Parse an HTTP request in either content mode, chosen by its ``Content-Type``."""
    content_type = next(
        (value for name, value in headers.items() if name.lower() == "content-type"), None
    )
    essence = (content_type or "").split(";", 1)[0].strip().lower()
    if essence != STRUCTURED_CONTENT_TYPE:
        return parse_binary(headers, body, content_type)
    try:
        document = json.loads(body)
    except ValueError as error:
        raise InvalidCloudEvent([FieldError("", f"body is not valid JSON: {error}")]) from error
    return parse_structured(document)
