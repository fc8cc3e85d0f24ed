"""Training curves in TensorBoard's format, without TensorBoard: an event file is a sequence
of records (TFRecord framing: length, its masked CRC-32C, the bytes, their masked CRC-32C),
each a serialized `Event` protocol buffer. Scalars need only five fields of it, written here
by hand, so logging costs no dependency; `tensorboard --logdir DIR` reads the files.

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3;
              Summary summary = 5; }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; }
"""
from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

from rnndsl.language.errors import UserError, printable


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The record checksum: rotated and offset, so that a CRC of data holding CRCs is safe."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# -- the protocol buffer wire format, for the fields above ---------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # negative int64s as two's complement, as protobuf writes them
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _bytes_field(field: int, data: bytes) -> bytes:
    return _key(field, 2) + _varint(len(data)) + data


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: dict[str, float] | None = None) -> bytes:
    out = _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(step)
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _key(2, 5) + struct.pack("<f", v))
            for tag, v in scalars.items())
        out += _bytes_field(5, values)
    return out


def _record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", masked_crc32c(length)) + data +
            struct.pack("<I", masked_crc32c(data)))


class EventWriter:
    """Scalars of one run, appended to a new event file in `logdir` (made if missing) and
    flushed at every call, so that a dashboard follows the run as it goes."""

    def __init__(self, logdir: str | Path):
        logdir = Path(logdir)
        try:
            logdir.mkdir(parents=True, exist_ok=True)
            name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}." \
                   f"{os.getpid()}.rnndsl"
            self.path = logdir / name
            self._file = open(self.path, "ab")
        except OSError as exc:
            raise UserError(f"cannot write TensorBoard logs to {printable(logdir)}: "
                            f"{exc.strerror or exc}") from None
        self._write(_event(time.time(), 0, file_version="brain.Event:2"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._write(_event(time.time(), step, scalars={k: float(v) for k, v in values.items()}))

    def _write(self, event: bytes) -> None:
        self._file.write(_record(event))
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
