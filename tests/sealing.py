"""Re-sealing a tampered safetensors file with a correct checksum, as someone crafting a hostile file would:
the fuzz and tampering tests use it to reach the checks behind the checksum."""

from __future__ import annotations

import hashlib
import json

from fnclass.run import checkpoint


def reseal(blob: bytes) -> bytes | None:
    """``blob`` with its recorded ``sha256`` recomputed; None when its header cannot be read to find it."""
    data = bytearray(blob)
    try:
        size = int.from_bytes(data[:8], "little")
        recorded = json.loads(bytes(data[8:8 + size]).decode("utf-8"))["__metadata__"][checkpoint.CHECKSUM]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None
    if not isinstance(recorded, str) or len(recorded) != 64:
        return None
    at = checkpoint._checksum_offset(data, recorded)
    if at is None:
        return None
    data[at:at + 64] = b"0" * 64
    data[at:at + 64] = hashlib.sha256(data).hexdigest().encode()
    return bytes(data)
