"""Decoding and validation: named bad inputs, and a property-based fuzz of the decoder."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processor.errors import REASONS, DecodeError
from processor.messages import (
    decode_binary,
    decode_command,
    decode_logits,
    decode_object,
    encode,
    encode_binary,
    encode_packed,
    pack,
    parse_logits,
)

LIMIT = 1 << 20


def parse(payload: bytes, key=(), max_actions=100_000, max_batch=4096):
    return parse_logits(decode_object(payload, LIMIT), key, max_actions, max_batch)


def reason_of(payload: bytes, key=()) -> str:
    with pytest.raises(DecodeError) as e:
        parse(payload, key)
    assert e.value.reason in REASONS
    return e.value.reason


def test_valid_single_and_batched():
    m = parse(b'{"LOGITS": [1, 2.5, -3], "COMPONENT_ID": "m1", "DETERMINISTIC": true}')
    assert m.model == "m1" and m.deterministic is True and m.key == ()
    assert m.logits.dtype == np.float32 and m.logits.shape == (1, 3)
    b = parse(b'{"LOGITS": [[1, 2], [3, 4], [5, 6]], "COMPONENT_ID": 7}')
    assert b.model == "7" and b.logits.shape == (3, 2) and b.deterministic is None


def test_step_key_and_propagated_fields():
    m = parse(b'{"LOGITS": [1, 2], "COMPONENT_ID": "a", "ENV_ID": "e3", "STEP": 12,'
              b' "ROOT_ID": "r", "MODEL_STATUS": 2}', key=("ENV_ID", "STEP"))
    assert m.key == ("e3", 12)
    assert m.extra == {"ROOT_ID": "r", "MODEL_STATUS": 2}


@pytest.mark.parametrize("payload,reason", [
    (b"not json at all", "not_json"),
    (b"\xff\xfe\x00garbage", "not_json"),
    (b'{"LOGITS": [1, 2], "COMPONENT_ID": "\xff"}', "not_json"),   # invalid UTF-8
    (b"[1, 2, 3]", "not_object"),
    (b'"LOGITS"', "not_object"),
    (b'{"COMPONENT_ID": "a"}', "missing_field"),
    (b'{"LOGITS": [1, 2]}', "missing_field"),
    (b'{"LOGITS": [1, 2], "COMPONENT_ID": null}', "bad_component_id"),
    (b'{"LOGITS": [1, 2], "COMPONENT_ID": ""}', "bad_component_id"),
    (b'{"LOGITS": [1, 2], "COMPONENT_ID": true}', "bad_component_id"),
    (b'{"LOGITS": [1, 2], "COMPONENT_ID": ["a"]}', "bad_component_id"),
    (b'{"LOGITS": [], "COMPONENT_ID": "a"}', "bad_logits"),
    (b'{"LOGITS": [[]], "COMPONENT_ID": "a"}', "bad_logits"),
    (b'{"LOGITS": "1,2", "COMPONENT_ID": "a"}', "bad_logits"),
    (b'{"LOGITS": ["a", "b"], "COMPONENT_ID": "a"}', "bad_logits"),
    (b'{"LOGITS": [[1, 2], [3]], "COMPONENT_ID": "a"}', "bad_logits"),
    (b'{"LOGITS": [[[1, 2]]], "COMPONENT_ID": "a"}', "bad_logits"),
    (b'{"LOGITS": [1, null], "COMPONENT_ID": "a"}', "bad_logits"),
    (b'{"LOGITS": [[1, 2], [null, 3]], "COMPONENT_ID": "a"}', "bad_logits"),
    (b'{"LOGITS": [[1, 2], [3.5e38, 3]], "COMPONENT_ID": "a"}', "ok"),   # saturates
    (b'{"LOGITS": [1, 2, 3], "COMPONENT_ID": "a", "X": [' + b"1," * 300 + b'1]}', "ok"),
    (b'{"LOGITS": [1, 2, 3, true], "COMPONENT_ID": "a"}', "bad_logits"),  # not a number
    (b'{"LOGITS": [false, 0.5], "COMPONENT_ID": "a"}', "bad_logits"),
    (b'{"LOGITS": [[0.5, 1.0], [0.5, true]], "COMPONENT_ID": "a"}', "bad_logits"),
    (b'{"LOGITS": [' + b"1.5, " * 300 + b'true], "COMPONENT_ID": "a"}', "bad_logits"),
    (b'{"LOGITS": [1.0, 0.0, 1, 0], "COMPONENT_ID": "a"}', "ok"),  # equal to true, not it
    (b'{"LOGITS": {"0": 1}, "COMPONENT_ID": "a"}', "bad_logits"),
    (b'{"LOGITS": [1, 1e39], "COMPONENT_ID": "a"}', "ok"),     # saturates to float32 max
    (b'{"LOGITS": [1, -1e300], "COMPONENT_ID": "a"}', "ok"),
    (b'{"LOGITS": [1, 1e400], "COMPONENT_ID": "a"}', "not_json"),  # infinite in float64
    (b'{"LOGITS": [1, 2], "COMPONENT_ID": "a", "DETERMINISTIC": "yes"}', "bad_deterministic"),
    (b'{"LOGITS": [1, 2], "COMPONENT_ID": "a", "DETERMINISTIC": 1}', "bad_deterministic"),
])
def test_named_bad_inputs(payload, reason):
    if reason == "ok":
        parse(payload)
        return
    assert reason_of(payload) == reason


@pytest.mark.parametrize("n", [3, 300])  # the short-row and the general path
def test_both_paths_agree(n):
    row = np.random.default_rng(n).normal(0, 1e30, n).tolist()
    short = parse(orjson.dumps({"LOGITS": row, "COMPONENT_ID": "a"}))
    batch = parse(orjson.dumps({"LOGITS": [row], "COMPONENT_ID": "a"}))
    assert short.logits.tobytes() == batch.logits.tobytes()
    for bad, reason in ((None, "bad_logits"), ("x", "bad_logits"), ([1.0], "bad_logits")):
        for payload in ({"LOGITS": row + [bad], "COMPONENT_ID": "a"},
                        {"LOGITS": [row + [bad]], "COMPONENT_ID": "a"}):
            assert reason_of(orjson.dumps(payload)) == reason


def test_nan_and_infinity_literals_are_not_json():
    # JSON has no NaN; some encoders (Python's json) write it anyway, orjson refuses it.
    assert reason_of(b'{"LOGITS": [NaN, 1], "COMPONENT_ID": "a"}') == "not_json"
    assert reason_of(b'{"LOGITS": [Infinity, 1], "COMPONENT_ID": "a"}') == "not_json"
    assert reason_of(b'{"LOGITS": [-Infinity, 1], "COMPONENT_ID": "a"}') == "not_json"


F32_MAX = float(np.finfo(np.float32).max)
F64_MIN = float(np.finfo(np.float64).min)


@pytest.mark.parametrize("n", [4, 300])  # the short-row and the general path
@pytest.mark.parametrize("batched", [False, True])
def test_finite_numbers_beyond_float32_saturate(n, batched):
    row = [0.5] * n
    row[1], row[2] = -1e308, F64_MIN       # a float64 model's masks
    row[-1] = 1e300
    got = parse(orjson.dumps({"LOGITS": [row] if batched else row, "COMPONENT_ID": "a"}))
    assert got.logits.dtype == np.float32 and np.isfinite(got.logits).all()
    assert got.logits[0, 1] == got.logits[0, 2] == -F32_MAX
    assert got.logits[0, -1] == F32_MAX
    assert got.logits[0, 0] == 0.5


@pytest.mark.parametrize("shape,at", [((2,), -1), ((1000,), 999), ((1000,), 0),
                                      ((3, 400), (2, 399)), ((3, 400), (1, 0))])
def test_binary_nan_and_infinity_are_non_finite(shape, at):
    values = np.ones(shape, np.float32)
    meta, body = encode_binary({"COMPONENT_ID": "a"}, values)
    assert parse_logits(decode_binary(meta, body, 10**6), (), 1000, 100).logits.size == \
        values.size
    for bad in (np.nan, np.inf, -np.inf):
        values[at] = bad
        meta, body = encode_binary({"COMPONENT_ID": "a"}, values)
        with pytest.raises(DecodeError) as e:
            parse_logits(decode_binary(meta, body, 10**6), (), 1000, 100)
        assert e.value.reason == "non_finite"


def test_step_key_must_be_present_and_scalar():
    base = {"LOGITS": [1, 2], "COMPONENT_ID": "a"}
    assert reason_of(orjson.dumps(base), key=("STEP",)) == "bad_key"
    for bad in (None, 1.5, True, [1], {"a": 1}):
        assert reason_of(orjson.dumps({**base, "STEP": bad}), key=("STEP",)) == "bad_key"


def test_size_limit_is_checked_before_parsing():
    with pytest.raises(DecodeError) as e:
        decode_object(b"x" * 101, 100)      # not JSON, but refused for its size first
    assert e.value.reason == "too_large"


def test_shape_limits():
    wide = orjson.dumps({"LOGITS": [0.0] * 11, "COMPONENT_ID": "a"})
    with pytest.raises(DecodeError) as e:
        parse(wide, max_actions=10)
    assert e.value.reason == "bad_logits"
    big = parse(orjson.dumps({"LOGITS": [0.5] * 100_000, "COMPONENT_ID": "a"}))
    assert big.logits.shape == (1, 100_000)


def test_deeply_nested_json_is_rejected_not_crashing():
    deep = b"[" * 100_000 + b"]" * 100_000
    assert reason_of(deep) == "not_json"
    deep_obj = b'{"LOGITS": ' + b"[" * 5000 + b"1" + b"]" * 5000 + b', "COMPONENT_ID": "a"}'
    assert reason_of(deep_obj) in ("not_json", "bad_logits")


def test_decode_command_reads_only_messages_with_a_cmd():
    assert decode_command(b'{"CMD": "GET"}', LIMIT) == {"CMD": "GET"}
    assert decode_command(b'{"WEIGHTS": "not even json', LIMIT) is None  # never parsed
    assert decode_command({"CMD": "PEEK", "TO_ROOM": "evolution"}, LIMIT) == \
        {"CMD": "PEEK", "TO_ROOM": "evolution"}        # decoded by its transport already
    assert decode_command({"WEIGHTS": [1]}, LIMIT) is None
    with pytest.raises(DecodeError):
        decode_command(b'{"CMD": "GET", oops}', LIMIT)


def test_decode_logits_takes_every_form_a_transport_gives():
    obj = {"LOGITS": [1.0, 2.0], "COMPONENT_ID": 7, "STEP": 3}
    forms = [orjson.dumps(obj), obj,
             tuple(encode_binary({"COMPONENT_ID": 7, "STEP": 3}, [1.0, 2.0])),
             encode_packed({"COMPONENT_ID": 7, "STEP": 3}, [1.0, 2.0])]
    for form in forms:
        msg = decode_logits(form, ("STEP",), LIMIT, 100, 100)
        assert msg.model == "7" and msg.key == (3,) and msg.logits.tolist() == [[1.0, 2.0]]
    with pytest.raises(DecodeError) as e:
        decode_logits({"LOGITS": [1, "x"], "COMPONENT_ID": "m9"}, (), LIMIT, 100, 100)
    assert e.value.reason == "bad_logits" and e.value.sender == "m9"


def test_encode_handles_numpy_values():
    out = orjson.loads(encode({"ACTION": np.array([1, 2]).tolist(), "X": np.float32(0.5)}))
    assert out == {"ACTION": [1, 2], "X": 0.5}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False)
    | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(), children,
                                                                       max_size=5),
    max_leaves=30)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes_never_escape_as_other_errors(payload):
    try:
        parse(payload, key=("STEP",))
    except DecodeError as e:
        assert e.reason in REASONS


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["LOGITS", "COMPONENT_ID", "DETERMINISTIC", "STEP",
                                        "ROOT_ID", "x"]), json_values, max_size=6))
def test_fuzz_json_objects_are_accepted_only_when_valid(obj):
    payload = orjson.dumps(obj)
    try:
        m = parse(payload, key=("STEP",))
    except DecodeError as e:
        assert e.reason in REASONS
        return
    # Accepted: then it really is valid.
    assert m.logits.ndim == 2 and m.logits.size > 0
    assert all(math.isfinite(v) for v in m.logits.ravel().tolist())
    assert m.logits.tolist() == np.array(obj["LOGITS"], dtype=np.float32).reshape(
        m.logits.shape).tolist()
    assert isinstance(obj["STEP"], (int, str)) and not isinstance(obj["STEP"], bool)
    assert obj.get("DETERMINISTIC") is None or isinstance(obj["DETERMINISTIC"], bool)


@pytest.mark.parametrize("logits", [[0.5, -1.0, 2.0], [[1, 2, 3], [4, 5, 6]],
                                    np.arange(1000, dtype=np.float32) - 500])
def test_a_packed_body_decodes_as_its_two_frames_do(logits):
    obj = {"COMPONENT_ID": "m1", "ENV_ID": "e", "STEP": 3, "DETERMINISTIC": True,
           "ROOT_ID": "r"}
    body = encode_packed(obj, logits)
    head = 5 + int.from_bytes(body[1:5], "little")
    assert body[:1] == b"\x00" and head % 4 == 0  # the values start aligned
    one = decode_logits(body, ("ENV_ID", "STEP"), LIMIT, 4096, 1024)
    two = decode_logits(tuple(encode_binary(obj, logits)), ("ENV_ID", "STEP"), LIMIT, 4096,
                        1024)
    assert one.logits.tobytes() == two.logits.tobytes()
    assert one.logits.shape == two.logits.shape == np.atleast_2d(logits).shape
    assert (one.model, one.key, one.deterministic, one.extra) == \
        (two.model, two.key, two.deterministic, two.extra)


HEADER = b'{"COMPONENT_ID": "m"}'


@pytest.mark.parametrize("body,reason", [
    (b"\x00", "bad_logits"),                                     # no header length
    (b"\x00\x02\x00", "bad_logits"),
    (b"\x00\xff\xff\xff\xff{}", "bad_logits"),                   # header past the end
    (pack(HEADER, b"\x00\x00\x80\x3f")[:12], "bad_logits"),       # cut inside the header
    (pack(HEADER, b""), "bad_logits"),                           # no values
    (pack(HEADER, b"\x00\x00\x80"), "bad_logits"),                # not float32s
    (pack(b'{"COMPONENT_ID": "m", "SHAPE": [2, 2]}', b"\x00" * 12), "bad_logits"),
    (pack(b"{oops}", b"\x00" * 4), "not_json"),
    (pack(b"[1, 2]", b"\x00" * 4), "not_object"),
    (pack(b'{"STEP": 1}', b"\x00" * 4), "missing_field"),
    (pack(HEADER, np.array([1, np.inf], "<f4").tobytes()), "non_finite"),
    (pack(HEADER, b"\x00" * (LIMIT + 4)), "too_large"),
])
def test_bad_packed_bodies_are_refused_with_their_reason(body, reason):
    with pytest.raises(DecodeError) as e:
        decode_logits(body, (), LIMIT, 4096, 1024)
    assert e.value.reason == reason


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.binary(max_size=64), st.integers(0, 80))
def test_fuzz_packed_bodies_never_escape_as_other_errors(header, values, cut):
    for body in (b"\x00" + header + values, pack(header, values),
                 pack(b'{"COMPONENT_ID": "m", "STEP": 1}', values)[:cut or None]):
        try:
            msg = decode_logits(body, ("STEP",), LIMIT, 4096, 1024)
        except DecodeError as e:
            assert e.reason in REASONS
        else:
            assert msg.logits.dtype == np.float32 and np.isfinite(msg.logits).all()
