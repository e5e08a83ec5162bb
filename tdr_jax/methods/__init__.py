"""The method registry: `--method` name -> `Method` (label, settings, run function).

Each family module defines `METHODS`; adding a method is one new module (or one entry in a
family's `METHODS`) plus one entry in FAMILIES below.
"""

from __future__ import annotations

from tdr_jax.errors import InputError
from tdr_jax.methods import brute_force, dr_family, reference, tree_family
from tdr_jax.methods.base import Context, Method, load_data, run_samples, warm_start_setup

FAMILIES = (tree_family, dr_family, brute_force, reference)
METHODS: dict[str, Method] = {name: m for family in FAMILIES
                              for name, m in family.METHODS.items()}

# `--method=all`: every method under test (the reference rows come with every table).
ALL_METHODS = ("tdm", "jtm", "otm", "plt", "tdr_u", "tdr_t", "tdr_t_rl", "dr", "din",
               "youtube_dnn", "itemcf")

__all__ = ["ALL_METHODS", "Context", "FAMILIES", "METHODS", "Method", "load_data",
           "parse_methods", "run_samples", "warm_start_setup"]


def parse_methods(spec: str) -> list[str]:
  """`--method`'s names (comma-separated, or `all`), checked against the registry."""
  names = [m.strip() for m in spec.split(",") if m.strip()]
  if names == ["all"]:
    names = list(ALL_METHODS)
  bad = [m for m in names if m not in METHODS]
  if bad or not names:
    raise InputError(f"--method={spec!r}: unknown {bad}; choose from {sorted(METHODS)} or "
                     f"'all'")
  return names
