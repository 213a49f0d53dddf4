"""Coordinator: drives jobs and rounds over a transport; sees parameters and aggregates only."""

from .runner import Evaluation, HorizontalParams, HorizontalResult, RoundRecord, run_horizontal

__all__ = ["Evaluation", "HorizontalParams", "HorizontalResult", "RoundRecord", "run_horizontal"]
