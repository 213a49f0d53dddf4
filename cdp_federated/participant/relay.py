"""The relay channel over the coordinator's HTTP API: :class:`HttpRelayLink` adapts a
:class:`~.http_client.CoordinatorClient` to :class:`~cdp_federated.federation.relay.RelayLink`.

>>> channel = http_relay_channel(client, job_id, keys)   # publishes keys, returns the channel
>>> channel.send("beta", message, session="job-7/secagg/round-1")
>>> reply = channel.receive("beta", session="job-7/secagg/round-1", timeout=30)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import AuthError
from ..federation.envelope import RelayKeyPair
from ..federation.relay import Delivery, RelayChannel, RelayLink
from .http_client import CoordinatorClient

__all__ = ["HttpRelayLink", "http_relay_channel"]


class HttpRelayLink(RelayLink):
    """One participant's relay in ``job_id`` through ``client`` (enrolled, with a token).
    Network errors surface as :class:`~cdp_federated.errors.TransportError`, which the channel
    retries; a long-poll waits at most ``max_wait`` seconds per request."""

    def __init__(self, client: CoordinatorClient, job_id: str, *, max_wait: float = 20.0) -> None:
        if client.token is None:
            raise AuthError("the relay needs an enrolled client", code="missing_token")
        self.client = client
        self.job_id = job_id
        self.participant = client.token.participant_id
        self.max_wait = max_wait

    def post(self, recipient: str, frame: bytes) -> None:
        self.client.relay_send(self.job_id, recipient, frame)

    def fetch(
        self, *, sender: str | None, session: str | None, after: int, wait: float
    ) -> list[Delivery]:
        return self.client.relay_inbox(
            self.job_id,
            sender=sender,
            session=session,
            after=after,
            wait=min(wait, self.max_wait),
        )

    def ack(self, ids: Sequence[int]) -> None:
        self.client.relay_ack(self.job_id, ids)

    def public_keys(self) -> dict[str, bytes]:
        return self.client.relay_keys(self.job_id)


def http_relay_channel(
    client: CoordinatorClient, job_id: str, keys: RelayKeyPair, **options: Any
) -> RelayChannel:
    """Publish ``keys`` (a no-op when already published) and return the participant's channel in
    ``job_id``; ``options`` go to :class:`RelayChannel`."""
    link = HttpRelayLink(client, job_id)
    client.publish_relay_key(link.participant, keys.public_bytes())
    return RelayChannel(link, keys, **options)
