"""RESP packing that sends a block's value from the arrays' own memory.

redis-py packs each command into one new buffer (with hiredis, value included): for
K/V that is a copy of every block into fresh memory, which costs more than the
loopback network itself.  This packer writes the protocol framing as small bytes and
hands every large argument, and every part of a :class:`kvcore.stores.ValueParts`
value, to the socket as its own buffer: redis-py's ``sendall`` loop then sends the
header and the arrays without copying them.

redis-py takes a packer through the ``command_packer`` connection option (redis-py
5.0 and later); :func:`supports_packer` says whether the installed one does.
"""

from __future__ import annotations

import inspect
from typing import Any

import redis.connection

from kvcore.stores import ValueParts

__all__ = ["PartsPacker", "supports_packer"]

_CUTOFF = 6000  # redis-py's own threshold for sending an argument separately


def supports_packer() -> bool:
    base = getattr(redis.connection, "AbstractConnection", None)
    if base is None:
        return False
    try:
        return "command_packer" in inspect.signature(base.__init__).parameters
    except (TypeError, ValueError):
        return False


def _encode(value: Any) -> bytes | memoryview:
    if isinstance(value, (bytes, memoryview)):
        return value
    if isinstance(value, bytearray):
        return memoryview(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bool):
        raise redis.exceptions.DataError(f"invalid argument {value!r}: a bool")
    if isinstance(value, (int, float)):
        return repr(value).encode()
    raise redis.exceptions.DataError(f"invalid argument of type {type(value).__name__}")


class PartsPacker:
    """A stateless, thread-safe RESP2/RESP3 command packer (commands are the same)."""

    def pack(self, *args: Any) -> list[bytes | memoryview]:
        if isinstance(args[0], str):  # "CONFIG GET" and friends are several words
            args = tuple(args[0].encode().split()) + args[1:]
        elif b" " in args[0]:
            args = tuple(args[0].split()) + args[1:]
        output: list[bytes | memoryview] = []
        buff = b"*%d\r\n" % len(args)
        for arg in args:
            if isinstance(arg, ValueParts):
                output.append(buff + b"$%d\r\n" % len(arg))
                output.extend(arg.parts)
                buff = b"\r\n"
                continue
            data = _encode(arg)
            if len(data) > _CUTOFF or isinstance(data, memoryview):
                output.append(buff + b"$%d\r\n" % len(data))
                output.append(data)
                buff = b"\r\n"
            else:
                buff += b"$%d\r\n%s\r\n" % (len(data), data)
        output.append(buff)
        return output
