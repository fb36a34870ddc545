"""Whatever a client sends in a conditional or range header, or as a time, the
API's synchronous cores answer with a decision or a 400, never an exception."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.api.conditional import decide_range
from edge_agent.api.params import ApiError, parse_utc

ETAG = '"' + "ab" * 32 + '"'
digits = st.text("0123456789", min_size=1, max_size=6000)
range_text = st.one_of(
    st.builds(lambda a, b: f"bytes={a}-{b}", st.one_of(st.just(""), digits),
              st.one_of(st.just(""), digits)),
    st.text(max_size=60),
)
tag_text = st.one_of(st.just(ETAG), st.just("W/" + ETAG), st.just("*"), st.text(max_size=80))


@settings(max_examples=400, deadline=None, database=None)
@given(size=st.integers(0, 10**12), range_header=st.one_of(st.none(), range_text),
       if_range=st.one_of(st.none(), tag_text), if_none_match=st.one_of(st.none(), tag_text),
       tagged=st.booleans())
def test_any_range_and_conditional_headers_get_an_answer(
        size: int, range_header: str | None, if_range: str | None,
        if_none_match: str | None, tagged: bool) -> None:
    d = decide_range(ETAG if tagged else "", size, if_none_match=if_none_match,
                     range_header=range_header, if_range=if_range)
    assert d.status in (200, 206, 304, 416)
    if d.status in (200, 206):
        assert d.first >= 0 and d.first + d.length <= size
    if d.status == 206:
        assert d.content_range == f"bytes {d.first}-{d.first + d.length - 1}/{size}"


def test_a_position_of_thousands_of_digits_is_past_the_end() -> None:
    huge = "9" * 5000
    assert decide_range(ETAG, 1000, range_header=f"bytes={huge}-").status == 416
    whole = decide_range(ETAG, 1000, range_header=f"bytes=0-{huge}")
    assert (whole.status, whole.first, whole.length) == (206, 0, 1000)
    tail = decide_range(ETAG, 1000, range_header=f"bytes=-{huge}")
    assert (tail.status, tail.first, tail.length) == (206, 0, 1000)


def test_if_none_match_compares_weakly_and_if_range_strongly() -> None:
    assert decide_range(ETAG, 10, if_none_match="W/" + ETAG).status == 304
    assert decide_range(ETAG, 10, if_none_match='"other", W/' + ETAG).status == 304
    weak_if_range = decide_range(ETAG, 10, range_header="bytes=0-1", if_range="W/" + ETAG)
    assert weak_if_range.status == 200  # a weak tag never satisfies If-Range
    assert decide_range(ETAG, 10, range_header="bytes=0-1", if_range=ETAG).status == 206


def test_a_file_without_a_tag_matches_no_tag() -> None:
    assert decide_range("", 10, if_none_match=ETAG).status == 200
    assert decide_range("", 10, if_none_match="*").status == 304  # "any current file"
    assert decide_range("", 10, range_header="bytes=0-1", if_range='""').status == 200


@settings(max_examples=400, deadline=None, database=None)
@given(text=st.one_of(st.text(max_size=60), st.from_regex(
    r"[0-9]{4}-[01][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-5][0-9]([+-][0-2][0-9]:[0-5][0-9]|Z)",
    fullmatch=True)))
def test_any_time_text_is_a_time_in_range_or_a_400(text: str) -> None:
    try:
        utc = parse_utc("start", text)
    except ApiError as exc:
        assert exc.status == 400 and exc.parameter == "start"
    else:
        assert 0.0 <= utc < 253370764800.0


@pytest.mark.parametrize("text", ["0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59",
                                  "1969-12-31T23:59:59Z"])
def test_times_the_device_cannot_hold_are_a_400(text: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_utc("end", text)
    assert err.value.status == 400
    assert err.value.message.startswith("end: expected a time from 1970 to 9998")
