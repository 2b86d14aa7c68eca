"""Output identity: what makes two runs' greedy outputs the same, as hashes a result can carry
and a collector can recompute (canaries, cross-checks, losslessness claims). Knows token ids,
not models or engines.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Sequence


def tokens_sha256(tokens: Sequence[int]) -> str:
    """sha256 of one sequence of token ids, each encoded as a little-endian int32."""
    return hashlib.sha256(struct.pack(f"<{len(tokens)}i", *tokens)).hexdigest()


def combine_sha256(digests: Sequence[str]) -> str:
    """output_sha256 from per-sequence tokens_sha256 digests already computed."""
    return hashlib.sha256(b"".join(bytes.fromhex(d) for d in digests)).hexdigest()


def output_sha256(sequences: Sequence[Sequence[int]]) -> str:
    """A result's greedy-output identity: sha256 over its sequences' tokens_sha256 digests (32 raw
    bytes each), in order. A plain decode is one sequence; a prompt set, one per prompt.

    Hashing digests rather than the concatenated ids keeps sequence boundaries, and lets the
    collector recompute a prompt set's hash from the per-prompt hashes a Speculation carries.
    """
    return combine_sha256([tokens_sha256(s) for s in sequences])


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first token where a and b differ; None when identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def is_sha256(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


