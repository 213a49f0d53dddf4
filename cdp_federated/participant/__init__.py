"""Participant: the local side of every job. Rows stay here; only aggregates leave."""

from .agent import DataProvider, ParticipantAgent

__all__ = ["DataProvider", "ParticipantAgent"]
