"""Helpers for tests that build small (and hostile) Slack exports: folders, hand-written zips, zip bombs."""

from __future__ import annotations

import json
import struct
import zipfile
import zlib
from pathlib import Path

# A value a hostile export could hide a credential in: no warning or report may quote it.
MARKER = "xoxb-MARKER-must-never-be-quoted"


def write_export(root: Path, files: dict[str, object]) -> Path:
    """A small export from {relative path: JSON data (or raw bytes)}."""
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    return root


def msg(ts: str, text: str = "hello", user: str = "U1", **extra) -> dict:
    return {"type": "message", "user": user, "text": text, "ts": ts, **extra}


def raw_zip(path: Path, members: list[tuple[str, bytes, int, int, int, int]]) -> Path:
    """A zip written byte by byte: (name, data as stored, crc, uncompressed size, method, flag bits).

    zipfile cannot write encrypted members, lying sizes or precompressed data; this can.
    """
    out, central = bytearray(), bytearray()
    for name, data, crc, size, method, flags in members:
        raw = name.encode()
        header = struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, 20, flags, method, 0, 0x21, crc, len(data), size, len(raw), 0
        )
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, flags, method, 0, 0x21, crc, len(data), size, len(raw), 0, 0, 0, 0, 0, len(out)
        ) + raw  # fmt: skip
        out += header + raw + data
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(out), 0)
    path.write_bytes(bytes(out + central + end))
    return path


def stored(name: str, data: object) -> tuple[str, bytes, int, int, int, int]:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return (name, raw, zlib.crc32(raw), len(raw), zipfile.ZIP_STORED, 0)


def deflate_bomb(gib: int = 2) -> bytes:
    """A raw deflate stream of ~1 MB per GiB of zeros it expands to (deflate's ~1030:1 limit)."""
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = co.compress(bytes(64 << 20)) + co.flush(zlib.Z_FULL_FLUSH)  # full flush: every block is the same
    return block * (16 * gib) + co.flush()
