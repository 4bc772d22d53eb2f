"""Optimizers beyond torch's: zeroth-order MeZO (arXiv 2305.17333)."""

from leantune.optim.mezo import MeZO, direction_seed, zo_projected_gradient

__all__ = ["MeZO", "direction_seed", "zo_projected_gradient"]
