"""Preference models."""

from tdr_jax.models.din import DIN, init_din, make_score_fn, node_levels, window_matrix

__all__ = ["DIN", "init_din", "make_score_fn", "node_levels", "window_matrix"]
