"""Metrics: RankMe, k-NN classification, forgetting / backward transfer."""

from mimkit.metrics.rankme import rankme

__all__ = ["rankme"]
