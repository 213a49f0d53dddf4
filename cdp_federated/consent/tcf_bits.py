"""Bit-level reading of one base64url TC-string segment (private helper of :mod:`.tcf`).

A segment is decoded once into a Python ``int`` (``int.from_bytes`` of the base64url bytes) and
fields are cut out of it with shifts and masks, which is much faster than slicing a ``"0101..."``
string bit by bit. Every read checks the segment length first and raises a one-line
:class:`~cdp_federated.errors.TCFError` naming the field and the bit offset that ran past the end.
"""

from __future__ import annotations

import binascii
from itertools import accumulate

from ..errors import TCFError

__all__ = ["BitReader", "ids_from_bits"]

_TO_STANDARD_ALPHABET = str.maketrans("-_", "+/")
_PLUS_ONE = (1).__add__
_PREFIX_CHARS = 40


def _prefix(text: str) -> str:
    return text if len(text) <= _PREFIX_CHARS else text[:_PREFIX_CHARS] + "..."


def ids_from_bits(chunk: int, width: int) -> frozenset[int]:
    """Ids (1-based, left to right) of the set bits of a ``width``-bit big-endian field.

    The most significant bit is id 1 and the least significant bit is id ``width``. The field is
    rendered once as binary digits and split on the ones: the lengths of the zero runs between
    them, accumulated, are the ids, all computed in C (several times faster than a Python loop
    over the set bits for a 1,000-vendor bitfield).
    """
    runs = format(chunk, f"0{width}b").split("1")
    runs.pop()  # the zeros after the last set bit
    return frozenset(accumulate(map(_PLUS_ONE, map(len, runs))))


class BitReader:
    """Sequential reader over the bits of one base64url segment.

    ``text`` must already be validated as non-empty base64url (``A-Z a-z 0-9 - _``, no padding);
    :func:`cdp_federated.consent.tcf.decode_tc_string` does that once for the whole string.
    """

    __slots__ = ("_value", "nbits", "pos", "segment", "_text")

    def __init__(self, text: str, segment: str) -> None:
        pad = -len(text) % 4
        # Pad with "A" (six zero bits) rather than "=" so any length decodes, then drop those bits.
        raw = binascii.a2b_base64((text + "A" * pad).translate(_TO_STANDARD_ALPHABET))
        self._value = int.from_bytes(raw, "big") >> (6 * pad)
        self.nbits = 6 * len(text)
        self.pos = 0
        self.segment = segment
        self._text = text

    @property
    def remaining(self) -> int:
        return self.nbits - self.pos

    def truncated(self, field: str, what: str, width: int, index: int = 0) -> TCFError:
        if index:
            what = what.format(index)
        return TCFError(
            f"TC string {self.segment} segment is truncated: {what} needs {width} bits at bit "
            f"offset {self.pos} but the segment has only {self.nbits} bits",
            field=field,
            value=_prefix(self._text),
            fix="pass the complete TC string as sent by the CMP (it may have been cut off by a "
            "cookie or URL length limit)",
        )

    def read(self, width: int, field: str, what: str, index: int = 0) -> int:
        """Read ``width`` bits as an unsigned big-endian integer.

        ``what`` names the field in the spec's words for the error message; with ``index`` it is a
        template (``"RangeEntry {} IsARange"``) formatted only when the read fails.
        """
        end = self.pos + width
        if end > self.nbits:
            raise self.truncated(field, what, width, index)
        self.pos = end
        return (self._value >> (self.nbits - end)) & ((1 << width) - 1)

    def read_ids(self, width: int, field: str, what: str, index: int = 0) -> frozenset[int]:
        """Read a ``width``-bit bitfield and return the 1-based ids of its set bits."""
        if not width:
            return frozenset()
        return ids_from_bits(self.read(width, field, what, index), width)
