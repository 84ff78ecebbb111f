"""Subscription filters, type patterns and their NATS subject filters."""

from __future__ import annotations

from typing import Any

import pytest

from fleetmesh.events.cloudevents import CloudEvent
from fleetmesh.events.domain import InvalidFilter
from fleetmesh.events.filters import (
    TypePattern,
    parse_filter,
    parse_filters,
    parse_subscription,
    subject_filter,
)

pytestmark = pytest.mark.unit

READING = CloudEvent(
    id="evt-1",
    source="/devices/thermo-7",
    type="fleetmesh.telemetry.reading_taken.v1",
    subject="site-3/room-12/thermo-7.json",
    data={"temp": 31.5, "unit": "C", "tags": ["hvac"]},
    extensions={"urgent": True, "tenant": "acme"},
)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"exact": {"type": "fleetmesh.telemetry.reading_taken.v1"}}, True),
        ({"exact": {"type": "fleetmesh.telemetry"}}, False),
        ({"exact": {"tenant": "acme", "source": "/devices/thermo-7"}}, True),
        ({"exact": {"tenant": "acme", "source": "/devices/other"}}, False),
        ({"exact": {"urgent": "true"}}, True),
        ({"exact": {"missing": ""}}, False),
        ({"prefix": {"subject": "site-3/"}}, True),
        ({"prefix": {"subject": "site-4/"}}, False),
        ({"prefix": {"dataschema": ""}}, False),
        ({"prefix": {"subject": ""}}, True),
        ({"suffix": {"subject": ".json"}}, True),
        ({"suffix": {"subject": ".xml"}}, False),
        ({"all": [{"prefix": {"subject": "site-3/"}}, {"exact": {"tenant": "acme"}}]}, True),
        ({"all": [{"prefix": {"subject": "site-3/"}}, {"exact": {"tenant": "other"}}]}, False),
        ({"any": [{"exact": {"tenant": "other"}}, {"suffix": {"subject": ".json"}}]}, True),
        ({"any": [{"exact": {"tenant": "other"}}, {"suffix": {"subject": ".xml"}}]}, False),
        ({"not": {"exact": {"tenant": "other"}}}, True),
        ({"not": {"not": {"exact": {"tenant": "other"}}}}, False),
        (
            {"all": [{"any": [{"not": {"exact": {"id": "x"}}}]}, {"prefix": {"type": "fleet"}}]},
            True,
        ),
        ({"jmespath": "data.temp > `30`"}, True),
        ({"jmespath": "data.temp > `40`"}, False),
        ({"jmespath": "contains(data.tags, 'hvac') && tenant == 'acme'"}, True),
        ({"jmespath": "data.missing"}, False),
        ({"jmespath": "data.tags[?@ == 'none']"}, False),
        ({"jmespath": "`0`"}, True),
        ({"jmespath": "abs(data.unit)"}, False),
    ],
)
def test_each_dialect_matches(spec: dict[str, Any], expected: bool) -> None:
    assert parse_filter(spec).matches(READING) is expected


def test_a_filter_list_means_all_of_them() -> None:
    assert parse_filters([]).matches(READING)
    assert parse_filters([{"exact": {"tenant": "acme"}}, {"jmespath": "data.temp > `30`"}]).matches(
        READING
    )
    assert not parse_filters(
        [{"exact": {"tenant": "acme"}}, {"jmespath": "data.temp < `0`"}]
    ).matches(READING)


def test_jmespath_sees_binary_data_as_base64() -> None:
    event = CloudEvent(id="1", source="/s", type="t", data=b"\x00")

    assert parse_filter({"jmespath": "data_base64 == 'AA=='"}).matches(event)
    assert not parse_filter({"jmespath": "data"}).matches(event)


def errors_of(specs: Any) -> dict[str, str]:
    with pytest.raises(InvalidFilter) as caught:
        parse_filters(specs)
    return {error.field: error.message for error in caught.value.errors}


@pytest.mark.parametrize(
    ("specs", "path"),
    [
        ("exact", ""),
        ([{"regex": {"type": "x"}}], "/0/regex"),
        ([{"sql": "type = 'x'"}], "/0/sql"),
        ([{}], "/0"),
        ([{"exact": {"type": "a"}, "prefix": {"type": "b"}}], "/0"),
        ([{"exact": {}}], "/0/exact"),
        ([{"exact": {"Type": "a"}}], "/0/exact/Type"),
        ([{"exact": {"data": "a"}}], "/0/exact/data"),
        ([{"prefix": {"type": 7}}], "/0/prefix/type"),
        ([{"all": []}], "/0/all"),
        ([{"any": {"exact": {"type": "a"}}}], "/0/any"),
        ([{"all": [{"exact": {"type": "a"}}, {"not": {"bogus": {}}}]}], "/0/all/1/not/bogus"),
        ([{"jmespath": "data.temp >"}], "/0/jmespath"),
        ([{"jmespath": ""}], "/0/jmespath"),
        ([{"jmespath": 3}], "/0/jmespath"),
    ],
)
def test_bad_filters_are_reported_with_their_path(specs: Any, path: str) -> None:
    assert path in errors_of(specs)


def test_every_bad_filter_is_reported_at_once() -> None:
    errors = errors_of(
        [
            {"exact": {"Type": "a", "source": 1}},
            {"any": [{"jmespath": "(("}, {"nope": 1}]},
        ]
    )

    assert set(errors) == {"/0/exact/Type", "/0/exact/source", "/1/any/0/jmespath", "/1/any/1/nope"}


@pytest.mark.parametrize(
    ("pattern", "event_type", "expected"),
    [
        ("fleetmesh.devices.registered.v1", "fleetmesh.devices.registered.v1", True),
        ("fleetmesh.devices.registered.v1", "fleetmesh.devices.registered.v2", False),
        ("fleetmesh.devices.*", "fleetmesh.devices.registered.v1", True),
        ("fleetmesh.devices.*", "fleetmesh.devicesx.registered.v1", False),
        ("fleetmesh.devices.>", "fleetmesh.devices.registered.v1", True),
        ("fleetmesh.devices.>", "fleetmesh.devices", False),
        ("fleetmesh.*.registered.*", "fleetmesh.devices.registered.v3", True),
        ("fleetmesh.*.registered.*", "fleetmesh.devices.removed.v3", False),
        ("fleetmesh.*.registered.v1", "fleetmesh.devices.registered.v1", True),
        ("fleetmesh.>", "fleetmesh.status.changed.v1", True),
        ("fleetmesh.>", "com.acme.door.opened", False),
        (">", "com.acme.door.opened", True),
        ("com.acme.*", "com.acme.door.opened", True),
        ("com.*.door.opened", "com.acme.door.opened", True),
        ("com.*.door", "com.acme.door.opened", False),
        ("com.acme+", "com.acme+", True),
        ("com.acme+", "com.acmee", False),
    ],
)
def test_type_patterns(pattern: str, event_type: str, expected: bool) -> None:
    assert TypePattern.parse(pattern).matches(event_type) is expected


@pytest.mark.parametrize(
    "pattern", ["", "a..b", ".a", "a.", "a.>.b", "a.b*", "dev>", "a b", "a.**"]
)
def test_malformed_type_patterns_are_rejected(pattern: str) -> None:
    with pytest.raises(InvalidFilter):
        TypePattern.parse(pattern)


@pytest.mark.parametrize(
    ("pattern", "subject"),
    [
        ("fleetmesh.devices.registered.v1", "events.devices.registered.v1"),
        ("fleetmesh.devices.*", "events.devices.>"),
        ("fleetmesh.devices.>", "events.devices.>"),
        ("fleetmesh.*.registered.*", "events.*.registered.>"),
        ("fleetmesh.>", "events.>"),
        ("fleetmesh.*", "events.>"),
        (">", "events.>"),
        ("*.devices.>", "events.>"),
        ("com.acme.>", "events.com.acme.>"),
        ("com.ac me!.*", None),
        ("com.acme!.*", "events.com.acme_.>"),
    ],
)
def test_subject_filters(pattern: str, subject: str | None) -> None:
    if subject is None:
        with pytest.raises(InvalidFilter):
            subject_filter(pattern)
    else:
        assert subject_filter(pattern) == subject


def test_a_subject_filter_covers_the_subject_of_every_matching_type() -> None:
    from fleetmesh.core.envelope import subject_for_type

    def nats_matches(filter_: str, subject: str) -> bool:
        wanted, tokens = filter_.split("."), subject.split(".")
        for index, token in enumerate(wanted):
            if token == ">":
                return len(tokens) > index
            if index >= len(tokens) or token not in ("*", tokens[index]):
                return False
        return len(tokens) == len(wanted)

    types = [
        "fleetmesh.devices.registered.v1",
        "fleetmesh.status.changed.v2",
        "com.acme.door.opened",
        "com.acme!.x",
        "plain",
    ]
    patterns = ["fleetmesh.devices.*", "fleetmesh.*.*.v2", "*.acme.>", "com.acme!.*", "plain", ">"]
    for pattern in patterns:
        compiled = TypePattern.parse(pattern)
        for event_type in types:
            if compiled.matches(event_type):
                assert nats_matches(compiled.subject_filter, subject_for_type(event_type))


def test_a_subscription_combines_type_patterns_and_filters() -> None:
    subscription = parse_subscription(
        ["fleetmesh.telemetry.*", "fleetmesh.devices.>"], [{"exact": {"tenant": "acme"}}]
    )

    assert subscription.matches(READING)
    assert subscription.subject_filters == ("events.telemetry.>", "events.devices.>")
    other_type = CloudEvent(id="1", source="/s", type="fleetmesh.status.changed.v1")
    assert not subscription.matches(other_type)


def test_a_subscription_without_patterns_receives_every_type() -> None:
    subscription = parse_subscription([], [])

    assert subscription.matches(READING)
    assert subscription.subject_filters == ("events.>",)


def test_subscription_errors_point_at_types_and_filters() -> None:
    with pytest.raises(InvalidFilter) as caught:
        parse_subscription(["ok.*", "bad..x"], [{"exact": {"Type": "x"}}])

    assert {error.field for error in caught.value.errors} == {"/types/1", "/filters/0/exact/Type"}
