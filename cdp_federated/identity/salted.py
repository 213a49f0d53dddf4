"""Salted-hash alignment between two parties: HMAC tokens under a shared per-job key.

For regional data centres of ONE organisation only (the policy decides): whoever holds the key
can hash a dictionary of candidate emails and recognise them in the other side's tokens
(``docs/identity.md``). The sender shuffles its tokens before they leave, so positions say
nothing about its rows; the receiver matches them, and, when the result is revealed to both,
returns the matched positions so the sender can map them to its own rows. Both sides order the
intersection by token, a common order neither has to disclose.

Messages go through the federation codec in batches that stay under its frame limits.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl

from ..errors import ConfigError, ProtocolError
from ..federation.messages import INTEGER, Failure, Message, register
from ..federation.transport import InProcessTransport, Transport
from .keyed_hash import DerivedKey, KeyedTokens, intersect_tokens, keyed_tokens
from .psi import PsiResult
from .psi_crypto import secure_permutation

__all__ = ["SaltedTokensIns", "SaltedTokens", "SaltedMatch", "SaltedParty", "run_salted_hash"]

TOKENS_PER_FRAME = 200_000  # 6.4 MB of tokens: well under the codec's element and byte limits


@register("salted_tokens_ins", version=1)
@dataclasses.dataclass(frozen=True, eq=False)
class SaltedTokensIns(Message):
    """Driver -> sender: send batch ``index`` of your shuffled tokens for ``session``."""

    session: str
    index: int


@register("salted_tokens", version=1, arrays={"tokens": INTEGER})
@dataclasses.dataclass(frozen=True, eq=False)
class SaltedTokens(Message):
    """Batch ``index`` of ``total`` of the sender's shuffled tokens (``(k, 32)`` uint8)."""

    session: str
    key_id: str
    index: int
    total: int
    count: int  # all tokens the sender will send
    tokens: np.ndarray


@register("salted_match", version=1, arrays={"positions": INTEGER})
@dataclasses.dataclass(frozen=True, eq=False)
class SaltedMatch(Message):
    """Receiver -> sender (only when revealed to both): ``positions`` into the sender's shuffled
    tokens, in the common order; ``size`` is the intersection size."""

    session: str
    size: int
    positions: np.ndarray


def _first_rows(ids: pl.Series) -> tuple[pl.Series, np.ndarray]:
    frame = (
        ids.cast(pl.String)
        .rename("id")
        .to_frame()
        .with_row_index("row")
        .filter(pl.col("id").is_not_null() & (pl.col("id") != ""))
        .unique(subset="id", keep="first", maintain_order=True)
    )
    return frame["id"], frame["row"].to_numpy().astype(np.int64)


class SaltedParty:
    """One side of a salted-hash alignment; ``handle`` is its transport handler."""

    def __init__(
        self,
        ids: Sequence[str] | pl.Series,
        key: DerivedKey,
        *,
        session: str,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        series = ids if isinstance(ids, pl.Series) else pl.Series("id", list(ids), dtype=pl.String)
        distinct, self._first_rows = _first_rows(series)
        self.session = session
        self.tokens = keyed_tokens(distinct, key)
        self._order = secure_permutation(len(distinct), rng)  # shuffled position -> distinct index
        self._peer: list[np.ndarray] = []
        self._peer_total: int | None = None
        self.rows: np.ndarray | None = None  # this party's matched rows, in the common order
        self.size: int | None = None

    @property
    def count(self) -> int:
        return len(self._first_rows)

    def handle(self, message: Message) -> Message:
        if getattr(message, "session", None) != self.session:
            raise ProtocolError(
                "message for another session",
                field="session",
                value=getattr(message, "session", None),
                fix="deliver only this session's messages",
            )
        if isinstance(message, SaltedTokensIns):
            return self._send(message.index)
        if isinstance(message, SaltedTokens):
            return self._receive(message)
        if isinstance(message, SaltedMatch):
            return self._accept_match(message)
        raise ProtocolError("unexpected message", field="type", value=message.TYPE)

    # sender side
    def _send(self, index: int) -> SaltedTokens:
        total = max(1, -(-self.count // TOKENS_PER_FRAME))
        if not 0 <= index < total:
            raise ProtocolError("batch index out of range", field="index", value=index)
        chosen = self._order[index * TOKENS_PER_FRAME : (index + 1) * TOKENS_PER_FRAME]
        return SaltedTokens(
            session=self.session,
            key_id=self.tokens.key_id,
            index=index,
            total=total,
            count=self.count,
            tokens=self.tokens.tokens[chosen],
        )

    def _accept_match(self, message: SaltedMatch) -> SaltedMatch:
        positions = np.asarray(message.positions, dtype=np.int64)
        if len(positions) != message.size or (positions.size and positions.max() >= self.count):
            raise ProtocolError(
                "match positions inconsistent", field="positions", value=message.size
            )
        self.rows = self._first_rows[self._order[positions]]
        self.size = message.size
        return message

    # receiver side
    def _receive(self, message: SaltedTokens) -> Message:
        if message.key_id != self.tokens.key_id:
            raise ProtocolError(
                "tokens were made with another key",
                field="key_id",
                value=message.key_id,
                fix="both parties must derive the key from the same federation secret and job",
            )
        if message.index != len(self._peer) or (
            self._peer_total is not None and message.total != self._peer_total
        ):
            raise ProtocolError("token batch out of order", field="index", value=message.index)
        self._peer_total = message.total
        self._peer.append(np.asarray(message.tokens))
        if len(self._peer) < message.total:
            return SaltedMatch(self.session, -1, np.zeros(0, dtype=np.int64))  # ack
        theirs = np.concatenate(self._peer) if self._peer else np.zeros((0, 32), np.uint8)
        if len(theirs) != message.count:
            raise ProtocolError("token count mismatch", field="count", value=message.count)
        mine_i, theirs_j = intersect_tokens(
            self.tokens, KeyedTokens(message.key_id, theirs.reshape(-1, 32))
        )
        common = np.lexsort(self.tokens.tokens[mine_i].T[::-1])  # order by token bytes
        self.rows = self._first_rows[mine_i[common]]
        self.size = len(common)
        return SaltedMatch(self.session, self.size, theirs_j[common].astype(np.int64))


def run_salted_hash(
    left_ids: Sequence[str] | pl.Series,
    right_ids: Sequence[str] | pl.Series,
    key: DerivedKey,
    *,
    reveal_to: Sequence[str] = ("left",),
    transport_factory: Callable[[Mapping[str, Any], Callable], Transport] | None = None,
) -> PsiResult:
    """Align two parties' normalised ids with keyed tokens; the left party matches. Returns the
    same result type as :func:`~cdp_federated.identity.psi.run_psi`."""
    reveal = tuple(reveal_to)
    if reveal not in (("left",), ("left", "right")):
        raise ConfigError(
            "salted-hash alignment reveals to the left party, or to both",
            field="reveal_to",
            value=reveal,
            fix="use ('left',) or ('left', 'right')",
        )
    started = time.perf_counter()
    session = secrets.token_hex(16)
    left = SaltedParty(left_ids, key, session=session)
    right = SaltedParty(right_ids, key, session=session)
    meter = {"bytes": 0, "frames": 0}

    def record(direction: str, _participant: str, frame: bytes) -> None:
        if direction == "reply":  # each protocol message once, as its producer framed it
            meter["bytes"] += len(frame)
            meter["frames"] += 1

    def ask(target: str, message: Message) -> Message:
        reply = transport.request(target, message)
        if isinstance(reply, Failure):
            raise ProtocolError(
                f"{target} refused the salted-hash alignment: {reply.error_type}: {reply.message}",
                field="participant",
                value=target,
                fix="both parties need the same federation secret, job and release",
            )
        return reply

    handlers = {"left": left.handle, "right": right.handle}
    transport = (transport_factory or (lambda h, r: InProcessTransport(h, recorder=r)))(
        handlers, record
    )
    index, reply = 0, None
    while True:
        batch = ask("right", SaltedTokensIns(session, index))
        reply = ask("left", batch)
        index += 1
        if index >= batch.total:
            break
    if "right" in reveal:
        ask("right", reply)
    return PsiResult(
        intersection_size=int(left.size or 0),
        left_rows=left.rows,
        right_rows=right.rows if "right" in reveal else None,
        bytes_exchanged=meter["bytes"],
        seconds=time.perf_counter() - started,
        frames=meter["frames"],
        mode="intersection",
        reveal_to=reveal,
    )
