"""RFC 3339 rendering: milliseconds, `Z`, whatever the zone it is given in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from fleetmesh.core.clock import from_rfc3339, to_rfc3339

ZONES = st.sampled_from(
    [UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-9, minutes=-30))]
)


@given(st.datetimes(min_value=datetime(1970, 1, 2), timezones=ZONES))
def test_rendering_matches_isoformat_in_utc_with_milliseconds(moment: datetime) -> None:
    expected = moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    assert to_rfc3339(moment) == expected


@given(st.datetimes(min_value=datetime(1970, 1, 2), timezones=ZONES))
def test_a_rendered_time_reads_back_to_the_millisecond(moment: datetime) -> None:
    back = from_rfc3339(to_rfc3339(moment))

    assert back == moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def test_whole_seconds_still_show_milliseconds() -> None:
    assert to_rfc3339(datetime(2026, 12, 5, 20, 1, 2, tzinfo=UTC)) == "2026-12-05T20:01:02.000Z"
