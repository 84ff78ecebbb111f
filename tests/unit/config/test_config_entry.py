from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fleetmesh.config.domain import (
    DEFAULT_NAMESPACE,
    CannotRollbackToDeletion,
    ChangeKind,
    ConfigChanged,
    ConfigEntry,
    ConfigNotFound,
    ConfigRef,
    ConfigSchemaChanged,
    ConfigVersion,
    InvalidChange,
    InvalidConfigRef,
    InvalidSchema,
    InvalidValue,
    SchemaViolation,
    UnknownVersion,
    VersionConflict,
    describe_errors,
    schema_problems,
)
from fleetmesh.core.errors import FieldError

pytestmark = pytest.mark.unit

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)

RETRY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "retry": {
            "type": "object",
            "properties": {
                "max_attempts": {"type": "integer", "minimum": 1},
                "backoff": {"type": "number", "exclusiveMinimum": 0},
            },
            "required": ["max_attempts"],
        },
        "endpoint": {"type": "string"},
    },
    "additionalProperties": False,
}


def minutes(n: int) -> datetime:
    return T0 + timedelta(minutes=n)


def entry() -> ConfigEntry:
    return ConfigEntry.create(service="telemetry", key="ingest.retry")


def entry_with_values(*values: Any) -> ConfigEntry:
    created = entry()
    for step, value in enumerate(values):
        created.set(value, author="ana", now=minutes(step), comment=f"change {step + 1}")
    return created


# -- identity ---------------------------------------------------------------


def test_the_namespace_defaults_to_default() -> None:
    ref = ConfigRef(service="telemetry", key="retry")

    assert ref.namespace == DEFAULT_NAMESPACE == "default"
    assert str(ref) == "default/telemetry/retry"


def test_a_bad_reference_reports_every_failing_field() -> None:
    with pytest.raises(InvalidConfigRef) as raised:
        ConfigRef(namespace="Prod", service="", key="has space")

    assert [error.field for error in raised.value.errors] == ["namespace", "service", "key"]


# -- versions and history ------------------------------------------------------


def test_a_new_entry_has_no_version_and_no_value() -> None:
    created = entry()

    assert created.current_version == 0
    assert not created.exists
    assert created.history() == ()
    with pytest.raises(ConfigNotFound):
        _ = created.value


def test_every_set_creates_the_next_version_with_author_time_and_comment() -> None:
    created = entry()

    first = created.set({"retry": {"max_attempts": 3}}, author="ana", now=minutes(1))
    second = created.set(
        {"retry": {"max_attempts": 5}}, author="bo", now=minutes(2), comment="more retries"
    )

    assert (first.version, second.version) == (1, 2)
    assert (second.author, second.at, second.comment, second.kind) == (
        "bo",
        minutes(2),
        "more retries",
        ChangeKind.SET,
    )
    assert created.current_version == 2
    assert created.value == {"retry": {"max_attempts": 5}}


def test_the_history_is_complete_and_never_capped() -> None:
    created = entry_with_values(*range(500))

    history = created.history()

    assert [version.version for version in history] == list(range(1, 501))
    assert [version.value for version in history] == list(range(500))
    assert created.get_version(1).comment == "change 1"


def test_setting_the_same_value_again_is_still_a_new_version() -> None:
    created = entry_with_values({"a": 1}, {"a": 1})

    assert created.current_version == 2


def test_stored_values_do_not_change_when_the_caller_mutates_its_copy() -> None:
    value: dict[str, Any] = {"retry": {"max_attempts": 3}}
    created = entry()
    created.set(value, author="ana", now=T0)

    value["retry"]["max_attempts"] = 99
    read = created.value
    assert isinstance(read, dict)
    read["retry"] = "changed"

    assert created.value == {"retry": {"max_attempts": 3}}
    assert created.get_version(1).value == {"retry": {"max_attempts": 3}}


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), {1: "x"}, {"a": {1, 2}}, [b"bytes"], {"when": T0}],
)
def test_values_must_be_json(value: Any) -> None:
    with pytest.raises(InvalidValue):
        entry().set(value, author="ana", now=T0)


def test_a_non_json_value_names_where_it_goes_wrong() -> None:
    with pytest.raises(InvalidValue) as raised:
        entry().set({"limits": [1, float("nan")]}, author="ana", now=T0)

    expected = FieldError("/limits/1", "nan is not a finite number", "not_json")
    assert raised.value.errors == [expected]


@pytest.mark.parametrize("value", [None, True, 0, 1.5, "text", [], {}, [1, {"a": [None]}]])
def test_any_json_value_is_accepted(value: Any) -> None:
    created = entry()
    created.set(value, author="ana", now=T0)

    assert created.value == value


def test_tuples_are_stored_as_json_arrays() -> None:
    created = entry()
    created.set({"hosts": ("a", "b")}, author="ana", now=T0)

    assert created.value == {"hosts": ["a", "b"]}


def test_a_change_needs_an_author() -> None:
    with pytest.raises(InvalidChange):
        entry().set(1, author="  ", now=T0)


def test_unknown_versions_are_reported() -> None:
    created = entry_with_values(1, 2)

    for missing in (0, 3, -1):
        with pytest.raises(UnknownVersion):
            created.get_version(missing)


# -- schema ----------------------------------------------------------------------


def test_values_are_validated_against_the_schema_with_json_paths() -> None:
    created = entry()
    created.set_schema(RETRY_SCHEMA, author="ana", now=T0)

    with pytest.raises(SchemaViolation) as raised:
        created.set({"retry": {"max_attempts": 0}}, author="ana", now=T0)

    assert describe_errors(raised.value.errors) == (
        "/retry/max_attempts: 0 is less than the minimum of 1"
    )
    assert raised.value.status == 422
    assert created.current_version == 0


def test_every_schema_failure_is_reported_sorted_by_path() -> None:
    created = entry()
    created.set_schema(RETRY_SCHEMA, author="ana", now=T0)

    with pytest.raises(SchemaViolation) as raised:
        created.set({"retry": {"backoff": -1}, "endpoint": 8, "extra": True}, author="ana", now=T0)

    assert [(error.field, error.message) for error in raised.value.errors] == [
        ("", "Additional properties are not allowed ('extra' was unexpected)"),
        ("/endpoint", "8 is not of type 'string'"),
        ("/retry", "'max_attempts' is a required property"),
        ("/retry/backoff", "-1 is less than or equal to the minimum of 0"),
    ]
    assert {error.code for error in raised.value.errors} == {"schema"}
    assert "violates its schema: /: Additional properties" in str(raised.value)


def test_json_pointer_paths_escape_slashes_and_tildes_and_index_arrays() -> None:
    created = entry()
    created.set_schema(
        {
            "type": "object",
            "properties": {
                "a/b~c": {"type": "array", "items": {"type": "integer"}},
            },
        },
        author="ana",
        now=T0,
    )

    with pytest.raises(SchemaViolation) as raised:
        created.set({"a/b~c": [1, "two"]}, author="ana", now=T0)

    assert [error.field for error in raised.value.errors] == ["/a~1b~0c/1"]


def test_a_valid_value_passes_the_schema() -> None:
    created = entry()
    created.set_schema(RETRY_SCHEMA, author="ana", now=T0)

    created.set({"retry": {"max_attempts": 3, "backoff": 0.5}}, author="ana", now=T0)

    assert created.current_version == 1
    assert created.validate({"retry": {"max_attempts": 2}}) == []


def test_an_invalid_schema_is_refused_with_its_paths() -> None:
    created = entry()

    with pytest.raises(InvalidSchema) as raised:
        created.set_schema(
            {"type": "nope", "properties": {"n": {"minimum": "one"}}}, author="ana", now=T0
        )

    assert [error.field for error in raised.value.errors] == ["/properties/n/minimum", "/type"]
    assert created.schema is None


def test_schemas_of_other_drafts_are_refused() -> None:
    problems = schema_problems({"$schema": "http://json-schema.org/draft-07/schema#"})

    assert problems == [
        FieldError("/$schema", "only Draft 2020-12 schemas are supported", "schema")
    ]
    assert schema_problems({"$schema": "https://json-schema.org/draft/2020-12/schema"}) == []


def test_references_must_resolve_inside_the_schema_and_are_never_fetched() -> None:
    schema: dict[str, Any] = {
        "$defs": {"attempts": {"type": "integer", "minimum": 1}},
        "properties": {
            "ok": {"$ref": "#/$defs/attempts"},
            "dangling": {"$ref": "#/$defs/missing"},
            "remote": {"$ref": "https://example.com/schemas/retry.json"},
        },
        "default": {"$ref": "not a schema, just a default value"},
    }

    assert [problem.field for problem in schema_problems(schema)] == [
        "/properties/dangling/$ref",
        "/properties/remote/$ref",
    ]


def test_local_references_are_followed_when_validating() -> None:
    created = entry()
    created.set_schema(
        {
            "$defs": {"attempts": {"type": "integer", "minimum": 1}},
            "properties": {"max_attempts": {"$ref": "#/$defs/attempts"}},
        },
        author="ana",
        now=T0,
    )

    assert describe_errors(created.validate({"max_attempts": 0})) == (
        "/max_attempts: 0 is less than the minimum of 1"
    )


def test_a_schema_the_current_value_breaks_is_refused() -> None:
    created = entry_with_values({"retry": {"max_attempts": 0}})

    with pytest.raises(SchemaViolation):
        created.set_schema(RETRY_SCHEMA, author="ana", now=T0)

    assert created.schema is None


def test_setting_and_removing_a_schema_records_events() -> None:
    created = entry()
    created.set_schema(RETRY_SCHEMA, author="ana", now=minutes(1))
    created.set_schema(None, author="bo", now=minutes(2))

    assert created.schema is None
    assert created.events == [
        ConfigSchemaChanged(
            namespace="default",
            service="telemetry",
            key="ingest.retry",
            schema=RETRY_SCHEMA,
            author="ana",
            at=minutes(1),
        ),
        ConfigSchemaChanged(
            namespace="default",
            service="telemetry",
            key="ingest.retry",
            schema=None,
            author="bo",
            at=minutes(2),
        ),
    ]


def test_boolean_schemas_are_allowed() -> None:
    created = entry()
    created.set_schema(False, author="ana", now=T0)

    with pytest.raises(SchemaViolation):
        created.set(1, author="ana", now=T0)


# -- rollback ----------------------------------------------------------------------


def test_rollback_creates_a_new_version_with_the_old_value() -> None:
    created = entry_with_values({"v": 1}, {"v": 2}, {"v": 3})

    rolled_back = created.rollback(1, author="bo", now=minutes(10))

    assert rolled_back.version == 4
    assert rolled_back.kind is ChangeKind.ROLLBACK
    assert rolled_back.comment == "rollback to v1"
    assert rolled_back.value == created.get_version(1).value == created.value == {"v": 1}
    assert len(created.history()) == 4


def test_a_rollback_reason_is_added_to_the_comment() -> None:
    created = entry_with_values(1, 2)

    assert created.rollback(1, author="bo", now=T0, reason="v2 broke ingest").comment == (
        "rollback to v1: v2 broke ingest"
    )


def test_rollback_to_an_unknown_version_fails() -> None:
    with pytest.raises(UnknownVersion):
        entry_with_values(1).rollback(7, author="bo", now=T0)


def test_rollback_is_validated_against_the_current_schema() -> None:
    created = entry_with_values({"retry": {"max_attempts": 0}}, {"retry": {"max_attempts": 2}})
    created.set_schema(RETRY_SCHEMA, author="ana", now=T0)

    with pytest.raises(SchemaViolation):
        created.rollback(1, author="bo", now=T0)

    assert created.current_version == 2


def test_rollback_to_a_deletion_is_refused() -> None:
    created = entry_with_values(1)
    created.delete(author="bo", now=T0)
    created.set(2, author="bo", now=T0)

    with pytest.raises(CannotRollbackToDeletion):
        created.rollback(2, author="bo", now=T0)


# -- optimistic concurrency -----------------------------------------------------------


def test_a_stale_expected_version_is_a_conflict_and_changes_nothing() -> None:
    created = entry_with_values("a", "b")

    with pytest.raises(VersionConflict) as raised:
        created.set("c", author="bo", now=T0, expected_version=1)

    assert (raised.value.current, raised.value.expected) == (2, 1)
    assert raised.value.status == 409
    assert created.current_version == 2
    assert created.value == "b"


def test_the_matching_expected_version_is_accepted() -> None:
    created = entry_with_values("a")

    assert created.set("b", author="bo", now=T0, expected_version=1).version == 2


def test_expected_version_zero_means_create_only() -> None:
    created = entry()
    created.set("first", author="ana", now=T0, expected_version=0)

    with pytest.raises(VersionConflict):
        created.set("second", author="bo", now=T0, expected_version=0)


def test_rollback_and_delete_also_check_the_expected_version() -> None:
    created = entry_with_values("a", "b")

    with pytest.raises(VersionConflict):
        created.rollback(1, author="bo", now=T0, expected_version=1)
    with pytest.raises(VersionConflict):
        created.delete(author="bo", now=T0, expected_version=3)

    assert created.current_version == 2


# -- deletion ------------------------------------------------------------------------------


def test_deleting_appends_a_tombstone_version() -> None:
    created = entry_with_values({"v": 1})

    tombstone = created.delete(author="bo", now=minutes(5), comment="retired")

    assert (tombstone.version, tombstone.kind, tombstone.deleted) == (2, ChangeKind.DELETE, True)
    assert tombstone.value is None
    assert not created.exists
    with pytest.raises(ConfigNotFound):
        _ = created.value


def test_setting_after_a_deletion_revives_the_entry() -> None:
    created = entry_with_values(1)
    created.delete(author="bo", now=T0)

    created.set(2, author="bo", now=T0)

    assert (created.current_version, created.value) == (3, 2)


def test_nothing_to_delete_is_an_error() -> None:
    created = entry()
    with pytest.raises(ConfigNotFound):
        created.delete(author="bo", now=T0)

    created.set(1, author="bo", now=T0)
    created.delete(author="bo", now=T0)
    with pytest.raises(ConfigNotFound):
        created.delete(author="bo", now=T0)


# -- events and restoring ------------------------------------------------------------------


def test_each_version_records_a_config_changed_event() -> None:
    created = entry_with_values({"v": 1}, {"v": 2})
    created.rollback(1, author="bo", now=minutes(9))
    created.delete(author="cy", now=minutes(10))

    changes = [event for event in created.events if isinstance(event, ConfigChanged)]
    assert changes == created.events
    assert [(e.version, e.kind, e.value, e.deleted) for e in changes] == [
        (1, ChangeKind.SET, {"v": 1}, False),
        (2, ChangeKind.SET, {"v": 2}, False),
        (3, ChangeKind.ROLLBACK, {"v": 1}, False),
        (4, ChangeKind.DELETE, None, True),
    ]
    assert created.events[2] == ConfigChanged(
        namespace="default",
        service="telemetry",
        key="ingest.retry",
        version=3,
        kind=ChangeKind.ROLLBACK,
        value={"v": 1},
        deleted=False,
        author="bo",
        at=minutes(9),
        comment="rollback to v1",
    )


def test_failed_changes_record_no_event() -> None:
    created = entry_with_values(1)
    with pytest.raises(VersionConflict):
        created.set(2, author="bo", now=T0, expected_version=0)

    assert len(created.events) == 1


def test_an_entry_is_restored_from_its_history_without_events() -> None:
    original = entry_with_values({"v": 1}, {"v": 2})
    original.set_schema({"type": "object"}, author="ana", now=T0)

    restored = ConfigEntry.from_history(original.ref, original.history(), original.schema)

    assert restored.events == []
    assert restored.history() == original.history()
    assert restored.schema == {"type": "object"}
    assert restored.set({"v": 3}, author="bo", now=T0, expected_version=2).version == 3


def test_restoring_needs_contiguous_versions() -> None:
    version = ConfigVersion(version=2, kind=ChangeKind.SET, value_json="1", author="a", at=T0)

    with pytest.raises(ValueError):
        ConfigEntry.from_history(entry().ref, [version])


def test_a_version_has_no_value_exactly_when_it_is_a_deletion() -> None:
    with pytest.raises(ValueError):
        ConfigVersion(version=1, kind=ChangeKind.DELETE, value_json="1", author="a", at=T0)
    with pytest.raises(ValueError):
        ConfigVersion(version=1, kind=ChangeKind.SET, value_json=None, author="a", at=T0)
