"""Decoding, validation and encoding of the wire messages (JSON objects, upper-case fields).

Every transport hands its raw bytes here, so one set of rules (and one fuzz suite) covers
them all. Each rejection raises `DecodeError` with a reason from `errors.REASONS`.
"""

from __future__ import annotations

import math
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from .errors import DecodeError

# The evolution commands the worker answers: GET (report and reset: the seed's), PEEK
# (report), RESET (reset, no reply), SET_MODEL_WEIGHTS (per-model weights of the rule).
COMMANDS: tuple[str, ...] = ("GET", "PEEK", "RESET", "SET_MODEL_WEIGHTS")

# Fields of the message that completes a window that swergio components copy into replies.
PROPAGATED = ("ROOT_ID", "MODEL_STATUS")


# What a transport hands over: JSON bytes, or a packed binary body (`decode_packed`); (JSON
# bytes, float32 values) for binary logits in three frames, topic first (ZeroMQ); or an
# object already decoded, where the transport had to read the body to route it (swergio's
# TO_ROOM).
Payload = bytes | tuple[bytes, bytes] | dict[str, Any]


@dataclass(slots=True)
class Logits:
    """One model's logits for one step (or one batch of environments)."""

    model: str
    logits: np.ndarray            # float32, shape (B, A); B = 1 for an unbatched message
    deterministic: bool | None    # None: the config default decides
    key: tuple[Any, ...]          # the step key's values, () in lockstep mode
    extra: dict[str, Any] | None  # ROOT_ID / MODEL_STATUS, when present
    token: Any = None             # the transport's delivery token (acknowledging transports)


F32_MAX = float(np.finfo(np.float32).max)
_loads = orjson.loads
_LE_F32 = np.dtype("<f4")
SMALL_ROW = 256  # up to this length a row's pack is kept, and true/false looked for in Python
_PACKERS: dict[int, Any] = {}  # n -> the pack of n little-endian float32s (n <= SMALL_ROW)
_ZERO_F32, _ONE_F32 = struct.pack("<f", 0.0), struct.pack("<f", 1.0)  # false, true packed


def _bool_among(raw: list[Any], arr: np.ndarray) -> bool:
    """Whether JSON's true or false is among LOGITS `raw`, converted to `arr` (B, A) (numpy
    takes them as 1 and 0; they are no logits). Only a value that became 0 or 1 can have
    been one, so only those few are looked at, not every value."""
    candidates = np.flatnonzero((arr == 0) | (arr == 1))
    if not candidates.size:
        return False
    a = arr.shape[1]
    nested = raw[0].__class__ is list
    return any((raw[k // a][k % a] if nested else raw[k]).__class__ is bool
               for k in candidates.tolist())


def _convert_rows(raw: list[Any], sender: str, max_actions: int, max_batch: int) -> np.ndarray:
    """LOGITS as float32 (B, A): the general path (batches, long rows)."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # past float32: inf, saturated below
            arr = np.array(raw, dtype=np.float32)
    except (ValueError, TypeError, OverflowError):
        raise DecodeError("bad_logits", "LOGITS must hold numbers (rows of equal length)",
                          sender) from None
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    elif arr.ndim != 2:
        raise DecodeError("bad_logits", f"LOGITS has {arr.ndim} levels; 1 or 2 allowed", sender)
    if arr.shape[1] == 0:
        raise DecodeError("bad_logits", "empty rows", sender)
    if _bool_among(raw, arr):
        raise DecodeError("bad_logits", "LOGITS must hold numbers, not true or false", sender)
    return _checked(arr, sender, max_actions, max_batch, from_json=True)


def _all_finite(arr: np.ndarray) -> bool:
    """No NaN and no infinity in a float32 array.

    numpy's isfinite, then a search of its result's bytes for a 0 (false): half the cost of
    `.all()` on the result, whose reduction's set-up outweighs the search.
    """
    flags: bytes = np.isfinite(arr).tobytes()
    return flags.find(b"\x00") < 0


def _checked(arr: np.ndarray, sender: str, max_actions: int, max_batch: int,
             from_json: bool) -> np.ndarray:
    """The limits and finiteness of a float32 (B, A) array of logits."""
    b, a = arr.shape
    if a > max_actions or b > max_batch:
        raise DecodeError("bad_logits", f"shape {b}x{a} over limits {max_batch}x{max_actions}",
                          sender)
    if not _all_finite(arr):
        if not from_json:
            raise DecodeError("non_finite", "NaN or infinity among the float32 values", sender)
        if np.isnan(arr).any():  # orjson yields no NaN: it was a null
            raise DecodeError("bad_logits", "null among LOGITS", sender)
        # JSON has no infinity: these were finite numbers past float32's range (a float64
        # model's mask, -1e308). They saturate, so a masked action gets probability 0.
        np.clip(arr, -F32_MAX, F32_MAX, out=arr)
    return arr


def decode_object(payload: bytes, max_bytes: int) -> dict[str, Any]:
    """Parse one JSON object, refusing it unparsed when it is over `max_bytes`."""
    if len(payload) > max_bytes:
        raise DecodeError("too_large", f"{len(payload)} bytes > limit {max_bytes}")
    try:
        obj = _loads(payload)
    except orjson.JSONDecodeError as e:
        raise DecodeError("not_json", str(e)[:120]) from None
    if obj.__class__ is not dict:
        raise DecodeError("not_object", f"JSON {type(obj).__name__}, not an object")
    return obj


PACKED = b"\x00"  # the first byte of a packed binary body (no JSON text begins with it)
_PACKED_HEAD = 5  # PACKED, then the JSON header's length in bytes (uint32, little-endian)
_header_length = struct.Struct("<xI").unpack_from


def decode_packed(body: bytes, max_bytes: int) -> dict[str, Any]:
    """A binary logits message in one body: PACKED, the JSON header's length (4 bytes,
    little-endian), the JSON header (the message without LOGITS, as in `decode_binary`),
    then the values as little-endian float32, read in place."""
    if len(body) > max_bytes:
        raise DecodeError("too_large", f"{len(body)} bytes > limit {max_bytes}")
    header, end = split_packed(body)
    return _with_values(decode_object(header, max_bytes), body, end)


def split_packed(body: bytes) -> tuple[bytes, int]:
    """A packed body's JSON header, and where its values begin; DecodeError when the
    header's length points past the body's end."""
    try:
        end = _PACKED_HEAD + _header_length(body)[0]
    except struct.error:
        end = -1
    if not _PACKED_HEAD <= end <= len(body):
        raise DecodeError("bad_logits", f"a packed body of {len(body)} bytes without a whole "
                          "JSON header")
    return body[_PACKED_HEAD:end], end


def encode_packed(obj: dict[str, Any], logits: Any) -> bytes:
    """A binary logits message as one body (`decode_packed`), for models in Python."""
    return pack(*encode_binary(obj, logits))


def pack(meta: bytes, values: bytes) -> bytes:
    """The packed body of a JSON header and its float32 values; the header is padded with
    spaces so that the values begin on a multiple of 4 bytes."""
    meta += b" " * (-(_PACKED_HEAD + len(meta)) % 4)
    return b"".join((PACKED, len(meta).to_bytes(4, "little"), meta, values))


def decode_binary(meta: bytes, values: bytes, max_bytes: int) -> dict[str, Any]:
    """A logits message in two parts: JSON without LOGITS, and float32 little-endian values.

    `SHAPE` ([B, A]) in the JSON makes it a batch; without it the values are one row.
    """
    return _with_values(decode_object(meta, max_bytes), values, 0)


def _with_values(obj: dict[str, Any], buffer: bytes, start: int) -> dict[str, Any]:
    """obj's LOGITS: the float32 values from `start` to the end of `buffer`, in place."""
    size = len(buffer) - start
    if size & 3 or not size:
        raise DecodeError("bad_logits", f"{size} bytes of values: not float32s",
                          component_id(obj))
    n = size >> 2
    if "SHAPE" not in obj:
        shape: Any = (1, n)
    else:
        shape = obj.pop("SHAPE")
        if not (isinstance(shape, list) and len(shape) == 2
                and all(v.__class__ is int and v > 0 for v in shape)
                and shape[0] * shape[1] == n):
            raise DecodeError("bad_logits", f"SHAPE {shape!r} does not fit {n} values",
                              component_id(obj))
    obj["LOGITS"] = np.ndarray(shape, _LE_F32, buffer, start)  # a view, read-only
    return obj


def encode_binary(obj: dict[str, Any], logits: Any) -> list[bytes]:
    """The two frames after the topic of a binary logits message (for models in Python)."""
    arr = np.asarray(logits, dtype="<f4")
    meta = {k: v for k, v in obj.items() if k != "LOGITS"}
    if arr.ndim == 2:
        meta["SHAPE"] = list(arr.shape)
    return [orjson.dumps(meta), arr.tobytes()]


def component_id(obj: dict[str, Any]) -> str | None:
    """The sender's COMPONENT_ID as a string, for log lines; None when absent or unusable."""
    cid = obj.get("COMPONENT_ID")
    if isinstance(cid, str):
        return cid[:64]
    if isinstance(cid, (int, float)) and not isinstance(cid, bool):
        return str(cid)
    return None


def _model_of(cid: Any) -> str:
    if cid.__class__ is str and cid:
        return str(cid)
    if isinstance(cid, str):
        raise DecodeError("bad_component_id", "empty COMPONENT_ID")
    if isinstance(cid, (int, float)) and not isinstance(cid, bool):
        return str(cid)
    raise DecodeError("bad_component_id", f"COMPONENT_ID of type {type(cid).__name__}")


def _row(raw: list[Any], sender: str, max_actions: int) -> np.ndarray:
    """The common case, one row of numbers, as float32 (1, n).

    One `struct` pack of the row's values as little-endian float32, read in place: it
    accepts ints, floats and (as 1 and 0) true and false, and refuses the rest. JSON has
    no NaN or infinity, and a finite value past float32's range makes the pack refuse (it
    does not round to an infinity): whatever the pack refuses takes the general path
    (`_row_by_array` for a short row, numpy's for a long one), which says why or
    saturates. true and false, packed as 1.0 and 0.0, are looked for by type only where
    such values occur. (A third of numpy's conversion of a list, which looks at every
    value twice to find the array's shape and type.)
    """
    n = len(raw)
    if n > max_actions:
        raise DecodeError("bad_logits", f"{n} actions over limit {max_actions}", sender)
    short = n <= SMALL_ROW
    try:
        # (a long row's format is cached by struct itself, the last 100 of them)
        packed = (_PACKERS.get(n) or _packer(n))(*raw) if short else \
            struct.pack(f"<{n}f", *raw)
    except (struct.error, OverflowError):
        return (_row_by_array(raw, sender, n) if short
                else _convert_rows(raw, sender, max_actions, 1))
    arr = np.ndarray((1, n), _LE_F32, packed)  # a view of the bytes, read-only
    # (find, not `in`: bytes' `in` first tries its operand as an int, and formats an error)
    if (((packed.find(_ZERO_F32) >= 0 or packed.find(_ONE_F32) >= 0)
         and bool in map(type, raw)) if short else _bool_among(raw, arr)):
        raise DecodeError("bad_logits", "LOGITS must hold numbers, not true or false", sender)
    return arr


def _packer(n: int) -> Any:
    """The pack of n little-endian float32s, kept for the next row of n (n <= SMALL_ROW)."""
    pack = _PACKERS[n] = struct.Struct(f"<{n}f").pack
    return pack


def _row_by_array(raw: list[Any], sender: str, n: int) -> np.ndarray:
    """A short row that the pack refused: values that are no numbers, or past float32.

    `array("f", raw)` refuses every value that is not a number (strings, null, lists:
    TypeError) and turns a finite value past float32's range into an infinity: those
    saturate. (It takes true and false, so they are looked for by type.)
    """
    try:
        values = array("f", raw)
    except (TypeError, OverflowError):
        raise DecodeError("bad_logits", "LOGITS must hold numbers", sender) from None
    if bool in map(type, raw):  # (by type: 1.0 == True)
        raise DecodeError("bad_logits", "LOGITS must hold numbers, not true or false", sender)
    arr = np.ndarray((1, n), np.float32, values)  # over the array's buffer: no copy
    if not math.isfinite(sum(values, 0.0)):  # finite, past float32: saturate
        np.clip(arr, -F32_MAX, F32_MAX, out=arr)
    return arr


def _bad_key(key_fields: Sequence[str], key: tuple[Any, ...], sender: str) -> None:
    for f, v in zip(key_fields, key):
        # exact classes: bool (a subclass of int) and floats are no step key
        if v.__class__ is not int and v.__class__ is not str:
            raise DecodeError("bad_key", f"step-key field {f} is {v!r}", sender)


def parse_logits(obj: dict[str, Any], key_fields: Sequence[str],
                 max_actions: int, max_batch: int) -> Logits:
    """Validate a decoded logits message; raises DecodeError with the reason."""
    try:
        raw = obj["LOGITS"]
        cid = obj["COMPONENT_ID"]
    except KeyError as e:
        raise DecodeError("missing_field", f"no {e.args[0]}") from None
    model = cid if cid.__class__ is str and cid else _model_of(cid)
    sender = model[:64]
    if raw.__class__ is list and raw and raw[0].__class__ is not list:
        arr = _row(raw, sender, max_actions)  # the common case, one row
    elif raw.__class__ is np.ndarray:  # binary logits: float32 already (_with_values)
        arr = _checked(raw, sender, max_actions, max_batch, from_json=False)
    elif raw.__class__ is not list or not raw:
        raise DecodeError("bad_logits", "LOGITS must be a non-empty list", sender)
    else:
        arr = _convert_rows(raw, sender, max_actions, max_batch)  # a batch: rows of rows
    det = obj.get("DETERMINISTIC")
    if det is not None and det.__class__ is not bool:
        raise DecodeError("bad_deterministic", f"DETERMINISTIC of type {type(det).__name__}",
                          sender)
    key: tuple[Any, ...] = ()
    if key_fields:
        key = tuple(map(obj.get, key_fields))
        for v in key:
            if v.__class__ is not int and v.__class__ is not str:
                _bad_key(key_fields, key, sender)
    extra = None
    if "ROOT_ID" in obj or "MODEL_STATUS" in obj:
        extra = {f: obj[f] for f in PROPAGATED if f in obj}
    return Logits(model, arr, det, key, extra)


def decode_logits(payload: Payload, key_fields: Sequence[str], max_bytes: int,
                  max_actions: int, max_batch: int) -> Logits:
    """One logits message from whatever form its transport gave; raises DecodeError."""
    if isinstance(payload, bytes):
        obj = (decode_object(payload, max_bytes) if payload[:1] != PACKED
               else decode_packed(payload, max_bytes))
    elif isinstance(payload, tuple):
        obj = decode_binary(payload[0], payload[1], max_bytes)
    else:
        obj = payload
    try:
        return parse_logits(obj, key_fields, max_actions, max_batch)
    except DecodeError as e:
        if e.sender is None:
            e.sender = component_id(obj)
        raise


def decode_command(payload: Payload, max_bytes: int) -> dict[str, Any] | None:
    """An evolution message that has a "CMD" field, decoded; None for everything else.

    Evolution traffic also carries large WEIGHTS messages; those without a "CMD" field are
    recognised from their bytes and never parsed.
    """
    if isinstance(payload, dict):
        return payload if "CMD" in payload else None
    if isinstance(payload, tuple) or b'"CMD"' not in payload:
        return None
    return decode_object(payload, max_bytes)


def encode(obj: dict[str, Any]) -> bytes:
    """JSON bytes of an outgoing message (numpy integers and floats included)."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
