"""Property-based fuzz of the swergio frame reader: any byte stream, any chunking.

The reader must hand over exactly the well-formed frames that precede the first bad one,
refuse oversized bodies without holding them, and fail only with the errors the transport's
reconnect loop expects (FrameError, IncompleteReadError), never anything else.
"""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processor.config import from_mapping
from transports.swergio import FrameError, SwergioTransport, frame, parse_header

LIMIT = 64
HL = 10


def transport() -> tuple[SwergioTransport, list[str]]:
    cfg = from_mapping({"transport": {"kind": "swergio"},
                        "limits": {"max_message_bytes": LIMIT}})
    rejected: list[str] = []
    return SwergioTransport(cfg, lambda reason, detail: rejected.append(reason)), rejected


def read_all(data: bytes, cuts: list[int]) -> tuple[list[bytes], list[str], str]:
    """Feed `data` in chunks at `cuts` into the reader; the frames, rejections and outcome."""
    async def go() -> tuple[list[bytes], list[str], str]:
        t, rejected = transport()
        reader = asyncio.StreamReader()
        pos = 0
        for c in sorted(set(cuts)) + [len(data)]:
            reader.feed_data(data[pos:c])
            pos = c
        reader.feed_eof()
        try:
            await asyncio.wait_for(t._read(reader), 5)
            outcome = "eof"
        except FrameError:
            outcome = "bad_frame"
        except asyncio.IncompleteReadError:
            outcome = "cut"
        return [e[1] for e in t._inbox], rejected, outcome
    return asyncio.run(go())


def split(data: bytes) -> tuple[list[bytes], int, str]:
    """An independent model of the format: (frames, oversized count, outcome)."""
    frames, big, pos = [], 0, 0
    while True:
        if pos == len(data):
            return frames, big, "eof"
        header = data[pos:pos + HL]
        if len(header) < HL:
            return frames, big, "cut"
        text = header.strip(b" \t\n\r\x0b\x0c")
        if not text or not all(48 <= ch <= 57 for ch in text):
            return frames, big, "bad_frame"
        n = int(text)
        body = data[pos + HL:pos + HL + n]
        if len(body) < n:
            return frames, big, "cut"
        if n > LIMIT:
            big += 1
        else:
            frames.append(body)
        pos += HL + n


bodies = st.binary(max_size=2 * LIMIT)
streams = st.lists(st.one_of(bodies.map(lambda b: frame(b, HL)),   # good frames
                             st.binary(max_size=24)),               # anything at all
                   max_size=8).map(b"".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams, st.lists(st.integers(0, 400), max_size=6))
def test_reader_matches_the_format_model(data, cuts):
    frames, rejected, outcome = read_all(data, cuts)
    want_frames, big, want_outcome = split(data)
    assert frames == want_frames
    assert rejected == ["too_large"] * big
    assert outcome == want_outcome


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=HL))
def test_parse_header_only_reads_plain_decimal_lengths(header):
    try:
        n = parse_header(header)
    except FrameError:
        return
    assert n >= 0 and header.strip().decode("ascii").isdigit()
