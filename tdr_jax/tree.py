"""Complete B-ary index tree for tree-based deep retrieval (TDM / JTM / TDR).

Layout
------
The tree is complete: every leaf sits at level ``H = ceil(log_B N)`` (``H = 1``
when ``N == 1``), and nodes are numbered in an implicit heap layout:

* level ``j`` holds ``B**j`` nodes with global ids
  ``level_offsets[j] .. level_offsets[j + 1] - 1`` where
  ``level_offsets[j] = (B**j - 1) // (B - 1)``; the root is node 0;
* the children of global node ``g`` are ``g * B + 1 + b`` for ``b in 0..B-1``
  and the parent of ``g > 0`` is ``(g - 1) // B``;
* a leaf is also addressed by its *leaf index* (position inside level ``H``,
  ``0 .. B**H - 1``); ``global id = level_offsets[H] + leaf index``.

Item placement
--------------
Every builder produces a *leaf order* (a permutation of the items) and
:func:`from_leaf_order` places it: the root holds all ``N`` items; a node that
holds ``n`` consecutive items of the order hands the next
``n // B + (1 if b < n % B else 0)`` of them to child ``b``. Consequently sibling
subtrees differ by at most one item, and the per-node item counts depend only
on ``(N, B)``, not on the order.

All arrays are plain ``int32`` / ``bool`` numpy arrays. The query helpers
(:func:`node_level`, :func:`ancestor`, :func:`item_ancestor`,
:func:`children_of`, :func:`leaf_range`) accept numpy or JAX arrays and are safe
inside ``jax.jit``; they treat ``-1`` as an explicit "no node / no item"
sentinel and return ``-1`` for it (JAX would otherwise clamp the index).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Tree",
    "tree_height",
    "level_sizes",
    "level_offsets_for",
    "valid_counts",
    "node_level",
    "ancestor",
    "item_ancestor",
    "children_of",
    "leaf_range",
    "item_leaf_nodes",
    "leaf_order",
    "remap_node_rows",
    "free_leaves",
    "lca_level",
    "nearest_free_leaves",
    "insert_items",
    "grow_level",
    "grow_node_rows",
    "validate",
    "from_leaf_order",
    "from_item_to_leaf",
    "build_random",
    "build_from_categories",
    "build_kmeans",
]

_INT32_MAX = np.iinfo(np.int32).max


# --------------------------------------------------------------------------
# The Tree pytree
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Tree:
  """A complete B-ary tree with items on (some of) its leaves.

  Fields (``num_nodes = level_offsets[H + 1]``, ``N = num_items``):

  * ``parent: int32[num_nodes]`` -- parent global id, ``-1`` for the root.
  * ``children: int32[num_nodes, B]`` -- child global ids, ``-1`` rows for leaves.
  * ``level_offsets: int32[H + 2]`` -- first global id of each level, plus
    ``num_nodes`` as the final entry.
  * ``item_to_leaf: int32[N]`` -- leaf *index* (not global id) of each item.
  * ``leaf_to_item: int32[B**H]`` -- item on each leaf, ``-1`` when empty.
  * ``item_paths: int32[N, H + 1]`` -- global id of the item's ancestor at each
    level ``0..H``; column ``H`` is the item's leaf node.
  * ``node_valid: bool[num_nodes]`` -- the node's subtree holds >= 1 item.
  * ``branching``, ``height``, ``num_items`` -- static Python ints (pytree
    metadata, so they stay concrete under ``jax.jit``).
  """

  parent: Any
  children: Any
  level_offsets: Any
  item_to_leaf: Any
  leaf_to_item: Any
  item_paths: Any
  node_valid: Any
  branching: int
  height: int
  num_items: int

  @property
  def num_nodes(self) -> int:
    """Total node count ``(B**(H+1) - 1) // (B - 1)``."""
    return level_start(self.branching, self.height + 1)

  @property
  def num_leaves(self) -> int:
    """Leaf slots at level ``H`` (``B**H``), empty ones included."""
    return self.branching**self.height

  @property
  def first_leaf(self) -> int:
    """Global id of leaf index 0 (``level_offsets[H]``)."""
    return level_start(self.branching, self.height)


jax.tree_util.register_dataclass(
    Tree,
    data_fields=[
        "parent",
        "children",
        "level_offsets",
        "item_to_leaf",
        "leaf_to_item",
        "item_paths",
        "node_valid",
    ],
    meta_fields=["branching", "height", "num_items"],
)


# --------------------------------------------------------------------------
# Static helpers (pure Python / numpy)
# --------------------------------------------------------------------------


def _check_branching(branching: int) -> int:
  b = int(branching)
  if b != branching or b < 2:
    raise ValueError(f"branching must be an integer >= 2, got {branching!r}")
  return b


def tree_height(num_items: int, *, branching: int) -> int:
  """Leaf level ``H = ceil(log_B N)`` computed with exact integer arithmetic
  (``H = 1`` for ``N == 1``)."""
  b = _check_branching(branching)
  n = int(num_items)
  if n < 1:
    raise ValueError(f"num_items must be >= 1, got {num_items}")
  h, cap = 1, b
  while cap < n:
    h += 1
    cap *= b
  return h


def level_start(branching: int, level: int) -> int:
  """Global id of the first node of ``level`` in a complete ``branching``-ary tree:
  ``(B**level - 1) // (B - 1)`` (the root is level 0, node 0). A static Python int."""
  return (branching**level - 1) // (branching - 1)


def level_offsets_for(*, branching: int, height: int) -> np.ndarray:
  """``int32[height + 2]``: first global id of each level and ``num_nodes``."""
  b = _check_branching(branching)
  offs = [level_start(b, j) for j in range(height + 2)]
  if offs[-1] > _INT32_MAX:
    raise ValueError(
        f"tree with branching={b}, height={height} has {offs[-1]} nodes, "
        "which does not fit int32 node ids"
    )
  return np.asarray(offs, dtype=np.int32)


def level_sizes(*, branching: int, height: int) -> np.ndarray:
  """``int32[height + 1]``: number of nodes ``B**j`` at each level ``j``."""
  b = _check_branching(branching)
  if b**height > _INT32_MAX:
    raise ValueError(f"B**H = {b}**{height} does not fit int32")
  return np.asarray([b**j for j in range(height + 1)], dtype=np.int32)


def valid_counts(tree: Tree) -> np.ndarray:
  """``int32[H + 1]``: number of valid (non-empty) nodes at each level."""
  valid = np.asarray(tree.node_valid).astype(np.int64)
  offs = level_offsets_for(branching=tree.branching, height=tree.height).astype(np.int64)
  csum = np.concatenate([[0], np.cumsum(valid)])
  return (csum[offs[1:]] - csum[offs[:-1]]).astype(np.int32)


def _tables(branching: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-branching lookup tables covering every int32 node id.

  Returns ``(offsets, powers)``: ``offsets: int64[L + 1]`` are the level
  offsets up to the first one exceeding the int32 range (so that any
  non-negative int32 id has a level ``< L``), ``powers: int64[L + 1]`` are
  ``B**k``, clipped to the int32 range.
  """
  b = _check_branching(branching)
  offs, pows = [0], [1]
  while offs[-1] <= _INT32_MAX:
    offs.append(offs[-1] + pows[-1])
    pows.append(pows[-1] * b)
  pows = [min(p, _INT32_MAX) for p in pows]
  return np.asarray(offs, dtype=np.int64), np.asarray(pows, dtype=np.int64)


_TABLE_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _cached_tables(branching: int) -> tuple[np.ndarray, np.ndarray]:
  b = int(branching)
  if b not in _TABLE_CACHE:
    _TABLE_CACHE[b] = _tables(b)
  return _TABLE_CACHE[b]


def _is_jax(*xs: Any) -> bool:
  """True when any argument is a JAX array or tracer (-> use jnp)."""
  return any(isinstance(x, jax.Array) for x in xs)


# --------------------------------------------------------------------------
# Jit-safe queries
# --------------------------------------------------------------------------


def node_level(node, *, branching: int):
  """Level of each global node id (same shape as ``node``; ``-1`` for ids < 0).

  Exact integer computation: the level is the number of level offsets
  (beyond the root's) that are ``<= node``. Works on numpy and JAX arrays,
  including traced values inside ``jax.jit``.
  """
  offs, _ = _cached_tables(branching)
  if _is_jax(node):
    node = jnp.asarray(node).astype(jnp.int32)
    table = jnp.asarray(offs[1:-1], dtype=jnp.int32)  # all fit int32
    lvl = jnp.searchsorted(table, node, side="right", method="compare_all")
    return jnp.where(node < 0, -1, lvl).astype(jnp.int32)
  node = np.asarray(node).astype(np.int64)
  lvl = np.searchsorted(offs[1:], node, side="right")
  return np.where(node < 0, -1, lvl).astype(np.int32)


def ancestor(node, level, *, branching: int):
  """Global id of the ancestor of ``node`` at ``level`` (broadcasting).

  ``node`` must be at a level ``>= level``; ``node == -1``, ``level < 0`` or a
  ``level`` deeper than the node's own give ``-1``. ``ancestor(g,
  node_level(g))`` is ``g`` itself. Jit-safe.
  """
  offs, pows = _cached_tables(branching)
  nlev = len(offs) - 1
  if _is_jax(node, level):
    node = jnp.asarray(node).astype(jnp.int32)
    level = jnp.asarray(level).astype(jnp.int32)
    lv = node_level(node, branching=branching)
    d = lv - level
    ok = (node >= 0) & (level >= 0) & (d >= 0)
    offs_j = jnp.asarray(np.minimum(offs, _INT32_MAX), dtype=jnp.int32)
    pows_j = jnp.asarray(pows, dtype=jnp.int32)
    lv_c = jnp.clip(lv, 0, nlev - 1)
    pos = node - offs_j[lv_c]
    anc = offs_j[jnp.clip(level, 0, nlev - 1)] + pos // pows_j[jnp.clip(d, 0, nlev - 1)]
    return jnp.where(ok, anc, -1).astype(jnp.int32)
  node = np.asarray(node).astype(np.int64)
  level = np.asarray(level).astype(np.int64)
  lv = node_level(node, branching=branching).astype(np.int64)
  d = lv - level
  ok = (node >= 0) & (level >= 0) & (d >= 0)
  lv_c = np.clip(lv, 0, nlev - 1)
  pos = node - offs[lv_c]
  anc = offs[np.clip(level, 0, nlev - 1)] + pos // pows[np.clip(d, 0, nlev - 1)]
  return np.where(ok, anc, -1).astype(np.int32)


def item_ancestor(tree: Tree, item, level):
  """Global id of item's ancestor at ``level`` via ``tree.item_paths``.

  ``item`` and ``level`` broadcast; ``item`` outside ``[0, N)`` (e.g. ``-1``
  padding) or ``level`` outside ``[0, H]`` give ``-1``. Jit-safe; inside
  ``jax.jit`` pass the tree as an argument rather than closing over it, or
  its numpy ``item_paths`` is baked into the program as a constant.
  """
  n, h = tree.num_items, tree.height
  if _is_jax(item, level, tree.item_paths):
    item = jnp.asarray(item).astype(jnp.int32)
    level = jnp.asarray(level).astype(jnp.int32)
    ok = (item >= 0) & (item < n) & (level >= 0) & (level <= h)
    paths = jnp.asarray(tree.item_paths)
    val = paths[jnp.clip(item, 0, n - 1), jnp.clip(level, 0, h)]
    return jnp.where(ok, val, -1).astype(jnp.int32)
  item = np.asarray(item).astype(np.int64)
  level = np.asarray(level).astype(np.int64)
  ok = (item >= 0) & (item < n) & (level >= 0) & (level <= h)
  val = np.asarray(tree.item_paths)[np.clip(item, 0, n - 1), np.clip(level, 0, h)]
  return np.where(ok, val, -1).astype(np.int32)


def children_of(tree: Tree, nodes):
  """``int32[..., B]`` children of each node in ``nodes`` (any shape).

  Computed from the heap layout (``g * B + 1 + b``), so it costs no gather.
  Leaves, ``-1`` and ids outside the tree give a row of ``-1``. Jit-safe.
  """
  b = tree.branching
  first_leaf = tree.first_leaf
  if _is_jax(nodes):
    nodes = jnp.asarray(nodes).astype(jnp.int32)
    internal = (nodes >= 0) & (nodes < first_leaf)
    # nodes[..., None]: add a trailing axis so the B child slots broadcast.
    kids = nodes[..., None] * b + 1 + jnp.arange(b, dtype=jnp.int32)
    return jnp.where(internal[..., None], kids, -1).astype(jnp.int32)
  nodes = np.asarray(nodes).astype(np.int64)
  internal = (nodes >= 0) & (nodes < first_leaf)
  # nodes[..., None]: add a trailing axis so the B child slots broadcast.
  kids = nodes[..., None] * b + 1 + np.arange(b)
  return np.where(internal[..., None], kids, -1).astype(np.int32)


def leaf_range(node, *, branching: int, height: int):
  """``(first, end)`` leaf indices (end exclusive) under each node.

  Covers all ``B**(H - level)`` leaf slots of the node's subtree, empty ones
  included. ``-1`` (or a node deeper than ``height``) gives ``(-1, -1)``.
  Jit-safe; both outputs have ``node``'s shape.
  """
  offs, pows = _cached_tables(branching)
  nlev = len(offs) - 1
  if _is_jax(node):
    node = jnp.asarray(node).astype(jnp.int32)
    lv = node_level(node, branching=branching)
    ok = (node >= 0) & (lv <= height)
    offs_j = jnp.asarray(np.minimum(offs, _INT32_MAX), dtype=jnp.int32)
    pows_j = jnp.asarray(pows, dtype=jnp.int32)
    lv_c = jnp.clip(lv, 0, nlev - 1)
    span = pows_j[jnp.clip(height - lv, 0, nlev - 1)]
    first = (node - offs_j[lv_c]) * span
    return (
        jnp.where(ok, first, -1).astype(jnp.int32),
        jnp.where(ok, first + span, -1).astype(jnp.int32),
    )
  node = np.asarray(node).astype(np.int64)
  lv = node_level(node, branching=branching).astype(np.int64)
  ok = (node >= 0) & (lv <= height)
  lv_c = np.clip(lv, 0, nlev - 1)
  span = pows[np.clip(height - lv, 0, nlev - 1)]
  first = (node - offs[lv_c]) * span
  return (
      np.where(ok, first, -1).astype(np.int32),
      np.where(ok, first + span, -1).astype(np.int32),
  )


def item_leaf_nodes(tree: Tree):
  """``int32[N]``: global node id of every item's leaf (``item_paths[:, H]``)."""
  return tree.item_paths[:, tree.height]


def leaf_order(tree: Tree) -> np.ndarray:
  """``int32[N]``: items sorted by leaf index (inverse of :func:`from_leaf_order`)."""
  l2i = np.asarray(tree.leaf_to_item)
  return l2i[l2i >= 0].astype(np.int32)


def remap_node_rows(rows, old: Tree, new: Tree) -> np.ndarray:
  """Per-node rows (an embedding table) moved from tree ``old`` to tree ``new``.

  Both trees hold the same items with the same branching and height. A leaf's
  row follows its item; the row of a node of ``new`` at level ``j`` is the mean
  of the old level-``j`` ancestor rows of its items (its members' old
  ancestors, one per member). Nodes of ``new`` without items keep their row.

  Args:
    rows: ``float[num_nodes, ...]`` rows indexed by global node id of ``old``.
    old, new: the trees before and after the update.
  Returns:
    ``float[num_nodes, ...]`` rows indexed by global node id of ``new``.
  """
  rows = np.asarray(rows)
  if (old.branching, old.height, old.num_items) != (new.branching, new.height, new.num_items):
    raise ValueError(
        f"trees differ in shape: B={old.branching}/{new.branching}, "
        f"H={old.height}/{new.height}, N={old.num_items}/{new.num_items}"
    )
  if rows.shape[0] != old.num_nodes:
    raise ValueError(f"rows has {rows.shape[0]} entries, the tree {old.num_nodes} nodes")
  old_paths = np.asarray(old.item_paths)
  new_paths = np.asarray(new.item_paths)
  out = rows.copy()
  flat = rows.reshape(rows.shape[0], -1).astype(np.float64)
  for j in range(new.height + 1):
    sums = np.zeros((rows.shape[0], flat.shape[1]))
    np.add.at(sums, new_paths[:, j], flat[old_paths[:, j]])
    counts = np.bincount(new_paths[:, j], minlength=rows.shape[0])
    hit = counts > 0
    out.reshape(rows.shape[0], -1)[hit] = (sums[hit] / counts[hit, None]).astype(rows.dtype)
  return out


# --------------------------------------------------------------------------
# Adding items after training (serving's add_items)
# --------------------------------------------------------------------------


def free_leaves(tree: Tree) -> np.ndarray:
  """``int32[F]``: the leaf indices that hold no item, ascending."""
  return np.flatnonzero(np.asarray(tree.leaf_to_item) < 0).astype(np.int32)


def lca_level(leaf_a, leaf_b, *, branching: int, height: int) -> np.ndarray:
  """Level of the lowest common ancestor of leaf indices ``leaf_a`` and
  ``leaf_b`` (broadcasting): ``height`` when they are the same leaf, ``0``
  when only the root is shared."""
  b = _check_branching(branching)
  a = np.asarray(leaf_a, dtype=np.int64)
  c = np.asarray(leaf_b, dtype=np.int64)
  a, c = np.broadcast_arrays(a, c)
  level = np.full(a.shape, height, dtype=np.int32)
  a, c = a.copy(), c.copy()
  for _ in range(height):
    differ = a != c
    if not differ.any():
      break
    level -= differ
    a //= b
    c //= b
  return level


def nearest_free_leaves(tree: Tree, near_leaves) -> tuple[np.ndarray, np.ndarray]:
  """Free leaves for new items, each as close as possible to a given leaf.

  New item ``i`` (in order) takes the free leaf whose lowest common ancestor
  with leaf index ``near_leaves[i]`` (its nearest existing item's leaf) is
  deepest; ties go to the leaf nearest by leaf index, then to the smaller
  index. A leaf taken by an earlier new item is no longer free. (The free
  leaves of the deepest shared subtree are contiguous around the given leaf,
  so the best one is its predecessor or successor among the free leaves.)

  Returns:
    ``(leaves int32[n], lca int32[n])``: the chosen leaf indices and the level
    of their lowest common ancestor with ``near_leaves``.
  Raises:
    ValueError: fewer free leaves than new items (grow the tree first).
  """
  import bisect

  near = np.asarray(near_leaves, dtype=np.int64).reshape(-1)
  b, h = tree.branching, tree.height
  free = free_leaves(tree).tolist()
  if len(free) < near.shape[0]:
    raise ValueError(f"{near.shape[0]} new items but only {len(free)} free leaves "
                     "(grow the tree first: grow_level)")
  if near.size and (near.min() < 0 or near.max() >= tree.num_leaves):
    raise ValueError(f"near_leaves must lie in [0, {tree.num_leaves})")
  out = np.empty(near.shape[0], dtype=np.int32)
  lca = np.empty(near.shape[0], dtype=np.int32)
  for i, leaf in enumerate(near.tolist()):
    pos = bisect.bisect_left(free, leaf)
    cands = [p for p in (pos - 1, pos) if 0 <= p < len(free)]
    keys = [(int(lca_level(free[p], leaf, branching=b, height=h)), -abs(free[p] - leaf),
             -free[p]) for p in cands]
    k = max(range(len(cands)), key=lambda t: keys[t])
    out[i], lca[i] = free[cands[k]], keys[k][0]
    free.pop(cands[k])
  return out, lca


def insert_items(tree: Tree, leaves) -> Tree:
  """The tree with new items ``N .. N + n - 1`` on the free leaf indices
  ``leaves: int[n]`` (distinct). Existing items keep their leaves, the height
  is unchanged; the result is not balanced in general (check it with
  ``validate(tree, balanced=False)``)."""
  leaves = np.asarray(leaves).reshape(-1)
  if not np.issubdtype(leaves.dtype, np.integer) and leaves.size:
    raise ValueError(f"leaves must be integer, got dtype {leaves.dtype}")
  leaves = leaves.astype(np.int64)
  if leaves.size and (leaves.min() < 0 or leaves.max() >= tree.num_leaves):
    raise ValueError(f"leaves must lie in [0, {tree.num_leaves})")
  if np.unique(leaves).shape[0] != leaves.shape[0]:
    raise ValueError("two new items on one leaf")
  taken = np.asarray(tree.leaf_to_item)[leaves] >= 0
  if taken.any():
    leaf = int(leaves[np.argmax(taken)])
    raise ValueError(f"leaf {leaf} already holds item {int(np.asarray(tree.leaf_to_item)[leaf])}")
  i2l = np.concatenate([np.asarray(tree.item_to_leaf, dtype=np.int64), leaves])
  return _assemble(i2l.astype(np.int32), tree.branching, tree.height)


def grow_level(tree: Tree) -> tuple[Tree, np.ndarray]:
  """The tree one level taller, every item under the same ancestors.

  Every leaf node becomes an internal node with ``B`` new leaves below it; the
  item of old leaf index ``l`` moves to new leaf index ``l * B`` (the first
  child of its old leaf node), so ``B - 1`` free leaves open next to every
  item. In the heap layout the level offsets do not depend on the height, so
  every old node keeps its global id (levels ``0..H``) and its place; the new
  level's nodes are appended after them.

  Returns:
    ``(grown tree, node_map int32[old num_nodes])``: the grown tree's global id
    of every old node (the identity, by the layout) for moving per-node rows
    (see :func:`grow_node_rows`). The grown tree passes
    ``validate(tree, balanced=False)``.
  """
  b, h = tree.branching, tree.height
  level_offsets_for(branching=b, height=h + 1)  # raises when the ids overflow int32
  i2l = np.asarray(tree.item_to_leaf).astype(np.int64) * b
  grown = _assemble(i2l.astype(np.int32), b, h + 1)
  return grown, np.arange(tree.num_nodes, dtype=np.int32)


def grow_node_rows(rows, old: Tree, new: Tree) -> np.ndarray:
  """Per-node rows (an embedding table) of ``old`` moved to ``new`` (``old``
  grown by :func:`grow_level`, any number of times): old nodes keep their rows,
  and every node of a new level gets the row of its ancestor on ``old``'s leaf
  level (an item's new leaf starts with its old leaf's row).

  ``rows: float[old.num_nodes, ...]`` -> ``float[new.num_nodes, ...]``.
  """
  rows = np.asarray(rows)
  if (old.branching != new.branching or new.height < old.height
      or rows.shape[0] != old.num_nodes):
    raise ValueError(f"rows [{rows.shape[0]}] of a tree B={old.branching}, H={old.height} "
                     f"cannot move to B={new.branching}, H={new.height}")
  b = old.branching
  out = np.empty((new.num_nodes,) + rows.shape[1:], dtype=rows.dtype)
  out[: old.num_nodes] = rows
  top = np.arange(old.first_leaf, old.num_nodes, dtype=np.int64)  # old leaf nodes
  for j in range(old.height + 1, new.height + 1):
    lo = level_start(b, j)
    span = b ** (j - old.height)
    # Level j's nodes in heap order: each old leaf's subtree holds `span` consecutive ones.
    out[lo : lo + (old.num_nodes - old.first_leaf) * span] = np.repeat(rows[top], span, axis=0)
  return out


# --------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------


def _level_counts(num_items: int, branching: int, height: int) -> list[np.ndarray]:
  """Items per node under the balanced rule: list of ``int64[B**j]``, j=0..H."""
  b = branching
  counts = [np.asarray([num_items], dtype=np.int64)]
  slot = np.arange(b)
  for _ in range(height):
    c = counts[-1]
    # c[:, None]: one row per parent, B columns for its children.
    kids = c[:, None] // b + (slot[None, :] < (c[:, None] % b))
    # reshape(-1): flatten rows -> next level in heap order (parent-major).
    counts.append(kids.reshape(-1))
  return counts


def _assemble(item_to_leaf: np.ndarray, branching: int, height: int) -> Tree:
  """Build every derived array from ``item_to_leaf`` (no validation)."""
  b, h = branching, height
  i2l = np.asarray(item_to_leaf).astype(np.int32)
  n = int(i2l.shape[0])
  offs = level_offsets_for(branching=b, height=h)
  num_nodes = int(offs[-1])
  first_leaf = int(offs[h])
  num_leaves = b**h

  gid = np.arange(num_nodes, dtype=np.int64)
  parent = np.where(gid == 0, -1, (gid - 1) // b).astype(np.int32)
  # gid[:, None]: one row per node, B child slots as columns.
  children = gid[:, None] * b + 1 + np.arange(b)
  children[first_leaf:] = -1
  children = children.astype(np.int32)

  leaf_to_item = np.full(num_leaves, -1, dtype=np.int32)
  leaf_to_item[i2l] = np.arange(n, dtype=np.int32)

  item_paths = np.empty((n, h + 1), dtype=np.int32)
  for j in range(h + 1):
    item_paths[:, j] = offs[j] + i2l // (b ** (h - j))

  node_valid = np.zeros(num_nodes, dtype=bool)
  occ = np.zeros(num_leaves, dtype=bool)
  occ[i2l] = True
  node_valid[first_leaf:] = occ
  for j in range(h - 1, -1, -1):
    # reshape(-1, B): group level-(j+1) flags by parent (B consecutive nodes).
    occ = occ.reshape(-1, b).any(axis=1)
    node_valid[offs[j] : offs[j + 1]] = occ

  return Tree(
      parent=parent,
      children=children,
      level_offsets=offs,
      item_to_leaf=i2l,
      leaf_to_item=leaf_to_item,
      item_paths=item_paths,
      node_valid=node_valid,
      branching=b,
      height=h,
      num_items=n,
  )


def _balanced_leaves(num_items: int, branching: int, height: int) -> np.ndarray:
  """``int64[N]``: occupied leaf indices (ascending) under the balanced rule."""
  leaf_counts = _level_counts(num_items, branching, height)[-1]
  return np.flatnonzero(leaf_counts)


def from_leaf_order(order, *, branching: int = 2) -> Tree:
  """Place items ``order[0], order[1], ...`` by the balanced recursive split.

  ``order: int[N]`` must be a permutation of ``range(N)``. Because the number
  of items per node only depends on ``(N, B)``, the k-th item of ``order``
  lands on the k-th occupied leaf (left to right). Cost ``O(num_nodes)``.
  """
  b = _check_branching(branching)
  order = np.asarray(order)
  if order.ndim != 1 or order.shape[0] < 1:
    raise ValueError(f"order must be a non-empty 1-D array, got shape {order.shape}")
  if not np.issubdtype(order.dtype, np.integer):
    raise ValueError(f"order must be integer, got dtype {order.dtype}")
  n = int(order.shape[0])
  seen = np.zeros(n, dtype=bool)
  in_range = (order >= 0) & (order < n)
  if not in_range.all():
    raise ValueError("order is not a permutation of range(N): value out of range")
  seen[order] = True
  if not seen.all():
    raise ValueError("order is not a permutation of range(N): duplicate item")
  h = tree_height(n, branching=b)
  leaves = _balanced_leaves(n, b, h)
  i2l = np.empty(n, dtype=np.int32)
  i2l[order] = leaves
  return _assemble(i2l, b, h)


def from_item_to_leaf(
    item_to_leaf, *, branching: int, num_items: int, check: bool = True
) -> Tree:
  """Rebuild a :class:`Tree` from a saved ``item_to_leaf: int[num_items]``.

  The mapping may be any balanced placement (siblings differ by <= 1 item),
  not only the one :func:`from_leaf_order` produces. With ``check=True`` (the
  default) the result is passed through :func:`validate`; bad shapes, ranges
  and duplicate leaves are always rejected.
  """
  b = _check_branching(branching)
  h = tree_height(num_items, branching=b)
  i2l = np.asarray(item_to_leaf)
  if i2l.shape != (num_items,):
    raise ValueError(f"item_to_leaf: expected shape ({num_items},), got {i2l.shape}")
  if not np.issubdtype(i2l.dtype, np.integer):
    raise ValueError(f"item_to_leaf: expected an integer dtype, got {i2l.dtype}")
  if i2l.min() < 0 or i2l.max() >= b**h:
    raise ValueError(
        f"item_to_leaf out of range: leaf indices must lie in [0, {b**h}) "
        f"(got min {i2l.min()}, max {i2l.max()})"
    )
  if np.unique(i2l).shape[0] != num_items:
    raise ValueError("item_to_leaf is not a bijection: duplicate leaf (two items on one leaf)")
  tree = _assemble(i2l, b, h)
  if check:
    validate(tree)
  return tree


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _expect(name: str, arr: np.ndarray, shape: tuple, kind: str) -> None:
  if arr.shape != shape:
    raise ValueError(f"{name}: wrong shape, expected {shape}, got {arr.shape}")
  if kind == "int32" and arr.dtype != np.int32:
    raise ValueError(f"{name}: wrong dtype, expected int32, got {arr.dtype}")
  if kind == "bool" and arr.dtype != np.bool_:
    raise ValueError(f"{name}: wrong dtype, expected bool, got {arr.dtype}")


def validate(tree: Tree, *, balanced: bool = True) -> None:
  """Check every structural invariant; raise ``ValueError`` naming the first
  one broken.

  Checked, in order: branching/height/num_items (``H == ceil(log_B N)``),
  array shapes and dtypes, ``level_offsets`` / ``parent`` / ``children``
  against the heap layout, ``item_to_leaf`` a bijection onto leaf indices,
  ``leaf_to_item`` its inverse with ``-1`` elsewhere, ``item_paths`` equal to
  the ancestors of each leaf, ``node_valid`` equal to "subtree holds >= 1
  item", and balance (sibling subtrees differ by at most one item).

  ``balanced=False`` checks a tree changed after training by
  :func:`insert_items` / :func:`grow_level` (serving's ``add_items``): items
  sit next to their neighbours, not by the balanced rule, and a grown tree may
  be taller than ``ceil(log_B N)``; the height rule and the balance check are
  skipped, every other invariant is checked.
  """
  b, h, n = tree.branching, tree.height, tree.num_items
  if not isinstance(b, (int, np.integer)) or b < 2:
    raise ValueError(f"branching must be an integer >= 2, got {b!r}")
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"num_items must be a positive integer, got {n!r}")
  want_h = tree_height(n, branching=b)
  if not balanced:
    if not isinstance(h, (int, np.integer)) or h < want_h:
      raise ValueError(f"height {h!r} < ceil(log_{b} {n}) = {want_h} (too few leaves)")
    want_h = h
  if h != want_h:
    raise ValueError(
        f"height {h} != ceil(log_{b} {n}) = {want_h} (wrong tree height for {n} items)"
    )
  offs = level_offsets_for(branching=b, height=h)
  num_nodes = int(offs[-1])
  first_leaf = int(offs[h])
  num_leaves = b**h

  parent = np.asarray(tree.parent)
  children = np.asarray(tree.children)
  level_offsets = np.asarray(tree.level_offsets)
  i2l = np.asarray(tree.item_to_leaf)
  l2i = np.asarray(tree.leaf_to_item)
  paths = np.asarray(tree.item_paths)
  valid = np.asarray(tree.node_valid)
  _expect("parent", parent, (num_nodes,), "int32")
  _expect("children", children, (num_nodes, b), "int32")
  _expect("level_offsets", level_offsets, (h + 2,), "int32")
  _expect("item_to_leaf", i2l, (n,), "int32")
  _expect("leaf_to_item", l2i, (num_leaves,), "int32")
  _expect("item_paths", paths, (n, h + 1), "int32")
  _expect("node_valid", valid, (num_nodes,), "bool")

  if not np.array_equal(level_offsets, offs):
    raise ValueError(f"level_offsets inconsistent with the heap layout: {level_offsets} != {offs}")
  gid = np.arange(num_nodes, dtype=np.int64)
  want_parent = np.where(gid == 0, -1, (gid - 1) // b)
  bad = np.flatnonzero(parent != want_parent)
  if bad.size:
    g = int(bad[0])
    raise ValueError(
        f"parent inconsistent with the heap layout: parent[{g}] = {parent[g]}, "
        f"expected {want_parent[g]}"
    )
  # gid[:, None]: one row per node, B child slots as columns.
  want_children = gid[:, None] * b + 1 + np.arange(b)
  want_children[first_leaf:] = -1
  bad = np.flatnonzero((children != want_children).any(axis=1))
  if bad.size:
    g = int(bad[0])
    raise ValueError(
        f"children inconsistent with the heap layout: children[{g}] = "
        f"{children[g].tolist()}, expected {want_children[g].tolist()}"
    )

  # item_to_leaf: a bijection onto non-empty leaves.
  if i2l.min() < 0 or i2l.max() >= num_leaves:
    raise ValueError(
        f"item_to_leaf out of range: leaf indices must lie in [0, {num_leaves}), "
        f"got min {i2l.min()}, max {i2l.max()}"
    )
  hits = np.bincount(i2l, minlength=num_leaves)
  if hits.max() > 1:
    leaf = int(np.argmax(hits > 1))
    items = np.flatnonzero(i2l == leaf)[:2].tolist()
    raise ValueError(
        f"item_to_leaf is not a bijection: duplicate leaf {leaf} holds items {items}"
    )
  # leaf_to_item: inverse of item_to_leaf, -1 on empty leaves.
  if l2i.min() < -1 or l2i.max() >= n:
    raise ValueError(
        f"leaf_to_item holds an unknown item (values must be -1 or in [0, {n}))"
    )
  back = l2i[i2l]
  bad = np.flatnonzero(back != np.arange(n))
  if bad.size:
    i = int(bad[0])
    leaf = int(i2l[i])
    if back[i] < 0:
      what = f"item {i} is on leaf {leaf}, which leaf_to_item marks empty"
    else:
      what = f"item {i} is on leaf {leaf}, but leaf_to_item names item {back[i]}"
    raise ValueError(f"leaf_to_item inconsistent with item_to_leaf: {what}")
  occupied = np.zeros(num_leaves, dtype=bool)
  occupied[i2l] = True
  bad = np.flatnonzero((l2i >= 0) & ~occupied)
  if bad.size:
    leaf = int(bad[0])
    raise ValueError(
        f"leaf_to_item inconsistent with item_to_leaf: empty leaf {leaf} claims "
        f"item {l2i[leaf]}, which item_to_leaf puts on leaf {i2l[l2i[leaf]]}"
    )

  # item_paths: ancestors of each item's leaf.
  for j in range(h + 1):
    want = offs[j] + i2l.astype(np.int64) // (b ** (h - j))
    bad = np.flatnonzero(paths[:, j] != want)
    if bad.size:
      i = int(bad[0])
      raise ValueError(
          f"item_paths do not match the ancestors of item_to_leaf: item {i} "
          f"level {j} has {paths[i, j]}, expected {want[i]}"
      )

  # node_valid and balance from per-node item counts.
  cnt = hits.astype(np.int64)
  level_counts = [cnt]
  for _ in range(h):
    # reshape(-1, B): group B sibling counts under their parent.
    level_counts.append(level_counts[-1].reshape(-1, b).sum(axis=1))
  level_counts.reverse()  # index by level 0..H
  want_valid = np.concatenate(level_counts) > 0
  bad = np.flatnonzero(valid != want_valid)
  if bad.size:
    g = int(bad[0])
    raise ValueError(
        f"node_valid wrong: node {g} has node_valid={bool(valid[g])} but its "
        f"subtree holds {'some' if want_valid[g] else 'no'} items"
    )
  for j in range(h if balanced else 0):
    # reshape(-1, B): rows are sibling groups (children of one level-j node).
    sib = level_counts[j + 1].reshape(-1, b)
    spread = sib.max(axis=1) - sib.min(axis=1)
    bad = np.flatnonzero(spread > 1)
    if bad.size:
      p = int(offs[j] + bad[0])
      raise ValueError(
          f"unbalanced placement: children of node {p} hold "
          f"{sib[bad[0]].tolist()} items (sibling subtrees differ by more than one item)"
      )


# --------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------


def build_random(rng: np.random.Generator, num_items: int, *, branching: int = 2) -> Tree:
  """Balanced tree over a uniformly random leaf order."""
  b = _check_branching(branching)
  return from_leaf_order(rng.permutation(int(num_items)), branching=b)


def build_from_categories(
    rng: np.random.Generator, categories, *, branching: int = 2
) -> Tree:
  """Initial tree of TDR sec. 6 from one category id per item.

  ``categories: int[N]``. The distinct categories are put in a random order,
  items are grouped by category following that order (random order inside a
  category), and the resulting leaf order is split recursively into
  near-equal parts. All negative ids form one "unknown" group.
  """
  b = _check_branching(branching)
  cats = np.asarray(categories)
  if cats.ndim != 1 or cats.shape[0] < 1:
    raise ValueError(f"categories must be a non-empty 1-D array, got shape {cats.shape}")
  if not np.issubdtype(cats.dtype, np.integer):
    raise ValueError(f"categories must be integer, got dtype {cats.dtype}")
  cats = np.where(cats < 0, -1, cats)
  uniq, inv = np.unique(cats, return_inverse=True)
  cat_rank = rng.permutation(uniq.shape[0])  # shuffled position of each category
  tie = rng.random(cats.shape[0])  # random order within a category
  # reshape(-1): the inverse index as a flat [N] vector (one entry per item).
  order = np.lexsort((tie, cat_rank[inv.reshape(-1)]))
  return from_leaf_order(order, branching=b)


def _floyd_sample(rng: np.random.Generator, sizes: np.ndarray, k: int) -> np.ndarray:
  """``int64[S, k]``: k distinct offsets in ``[0, sizes[s])`` per segment
  (Floyd's method, vectorized over segments; repeats only where size < k)."""
  s = sizes.shape[0]
  picks = np.empty((s, k), dtype=np.int64)
  for t in range(k):
    top = sizes - k + t  # draw from [0, top]
    top_c = np.maximum(top, 0)
    r = np.floor(rng.random(s) * (top_c + 1)).astype(np.int64)
    r = np.minimum(r, top_c)
    if t:
      clash = (picks[:, :t] == r[:, None]).any(axis=1)
      r = np.where(clash, top_c, r)
    picks[:, t] = np.minimum(r, np.maximum(sizes - 1, 0))
  return picks


def _child_costs(xo: np.ndarray, seg: np.ndarray, cent: np.ndarray, chunk: int) -> np.ndarray:
  """``float32[N, B]``: ``|c|^2 - 2 x.c`` of each row to its own segment's B
  centroids (the ``|x|^2`` term is common to all children and dropped)."""
  n, d = xo.shape
  s, b, _ = cent.shape
  csq = np.einsum("sbd,sbd->sb", cent, cent)
  out = np.empty((n, b), dtype=np.float32)
  # reshape(S*B, D): stack every centroid as a row for one BLAS product.
  flat = cent.reshape(s * b, d)
  small = s * b <= 64
  for lo in range(0, n, chunk):
    hi = min(n, lo + chunk)
    x = xo[lo:hi]
    sg = seg[lo:hi]
    if small:
      # reshape(m, S, B): split the product's columns per (segment, child).
      dots = (x @ flat.T).reshape(hi - lo, s, b)
      dots = dots[np.arange(hi - lo), sg]
    else:
      dots = np.einsum("md,mbd->mb", x, cent[sg])
    out[lo:hi] = csq[sg] - 2.0 * dots
  return out


def _binary_keys(xo: np.ndarray, seg: np.ndarray, cent: np.ndarray, chunk: int) -> np.ndarray:
  """``float32[N]``: cost(child 0) - cost(child 1); small keys prefer child 0."""
  n = xo.shape[0]
  w = 2.0 * (cent[:, 1] - cent[:, 0])  # [S, D]
  bias = (np.einsum("sd,sd->s", cent[:, 0], cent[:, 0])
          - np.einsum("sd,sd->s", cent[:, 1], cent[:, 1]))
  out = np.empty(n, dtype=np.float32)
  for lo in range(0, n, chunk):
    hi = min(n, lo + chunk)
    sg = seg[lo:hi]
    out[lo:hi] = bias[sg] + np.einsum("md,md->m", xo[lo:hi], w[sg])
  return out


def _split_two(
    key: np.ndarray, seg: np.ndarray, start: np.ndarray, width: int, cap0: np.ndarray
) -> np.ndarray:
  """Permutation putting, inside every segment, the ``cap0[s]`` rows with the
  smallest ``key`` first (partition, not a full sort).

  ``seg: int[N]`` is non-decreasing, segments begin at ``start: int[S]`` and
  hold at most ``width`` rows. Keys are padded with +inf into a
  ``[S, width]`` matrix and partitioned row by row at every distinct
  ``cap0`` value and short-row size (few values: sizes differ by <= 1).
  """
  n = key.shape[0]
  s = start.shape[0]
  padded = np.full(s * width, np.inf)
  padded[seg * width + (np.arange(n) - start[seg])] = key
  sizes = np.diff(np.append(start, n))
  # Also partition at each short row's size, so its +inf pads land last.
  kth = np.unique(np.concatenate([cap0, sizes[sizes < width]]))
  # reshape(S, width): one padded row per segment.
  cols = np.argpartition(padded.reshape(s, width), kth, axis=1)
  keep = np.arange(width)[None, :] < sizes[:, None]
  return (start[:, None] + cols)[keep]


def _group_sums(xo: np.ndarray, gstart: np.ndarray, block: int = 4096) -> np.ndarray:
  """``float64[G, D]`` sums of rows ``gstart[g]:gstart[g+1]`` (last to end).

  Groups of at most ``block`` rows are summed by one float32 ``reduceat``.
  Larger groups are cut into pieces of at most ``block`` rows, summed in
  float32 and combined in float64 (accurate, and much faster than a float64
  ``reduceat`` over float32 rows).
  """
  n = xo.shape[0]
  widest = int(np.diff(np.append(gstart, n)).max())
  if widest <= block:
    return np.add.reduceat(xo, gstart, axis=0).astype(np.float64)
  cuts = np.union1d(gstart, np.arange(0, n, block))
  part = np.add.reduceat(xo, cuts, axis=0).astype(np.float64)
  return np.add.reduceat(part, np.searchsorted(cuts, gstart), axis=0)


def _greedy_assign(cost: np.ndarray, seg: np.ndarray, caps: np.ndarray) -> np.ndarray:
  """Capacity-constrained assignment, greedy by margin, vectorized.

  ``cost: float[N, B]`` per row, ``seg: int[N]`` its segment, ``caps:
  int[S, B]`` with ``caps[s].sum() == #rows of s``. Each round every
  unassigned row proposes its cheapest child that still has room; each
  (segment, child) keeps the proposers with the largest margin (cost of the
  runner-up minus own cost) up to its remaining capacity. A child that
  rejects anyone is full afterwards, so at most B rounds run.
  Returns ``int64[N]`` child slots.
  """
  n, b = cost.shape
  slot = np.arange(b)
  # reshape(-1): remaining capacity per flat (segment, child) group id.
  remaining = caps.reshape(-1).astype(np.int64)
  child = np.full(n, -1, dtype=np.int64)
  todo = np.arange(n)
  for _ in range(b):
    m = todo.size
    if m == 0:
      break
    base = seg[todo] * b  # [m] flat group id of child 0
    # base[:, None]: one row per proposer, B candidate groups as columns.
    closed = remaining[base[:, None] + slot] <= 0
    c = np.where(closed, np.inf, cost[todo] if m < n else cost)
    rows = np.arange(m)
    best = np.argmin(c, axis=1)
    best_cost = c[rows, best]
    c[rows, best] = np.inf
    margin = c.min(axis=1) - best_cost  # inf when only one child is open
    group = base + best
    # Sort by (group, margin descending): rank margins, then one argsort of
    # the combined integer key.
    by_margin = np.argsort(-margin)
    rank = np.empty(m, dtype=np.int64)
    rank[by_margin] = rows
    srt = np.argsort(group * m + rank)
    g = group[srt]
    new_run = np.empty(m, dtype=bool)
    new_run[0] = True
    np.not_equal(g[1:], g[:-1], out=new_run[1:])
    run_start = np.maximum.accumulate(np.where(new_run, rows, 0))
    accept = (rows - run_start) < remaining[g]
    acc = srt[accept]
    child[todo[acc]] = best[acc]
    remaining -= np.bincount(group[acc], minlength=remaining.size)
    todo = todo[np.sort(srt[~accept])]
  if (child < 0).any():  # cannot happen when capacities sum to segment sizes
    raise RuntimeError("capacity-constrained assignment left rows unassigned")
  return child


def build_kmeans(
    rng: np.random.Generator,
    vectors,
    *,
    branching: int = 2,
    iters: int = 8,
    tol: float = 1e-3,
    chunk: int = 1 << 16,
) -> Tree:
  """TDM-style tree by recursive balanced B-means on item vectors.

  ``vectors: float[N, D]``. Level by level, each node's items (a contiguous
  segment of the current leaf order) are split into B groups whose sizes are
  exactly the balanced child capacities ``n // B (+1)`` by up to ``iters``
  Lloyd iterations: centroids start at B distinct random members; rows are
  assigned under the capacities -- for B = 2 by partitioning each segment on
  the difference of squared distances to its two centroids (the ``cap_0``
  smallest go left, :func:`_split_two`), for B > 2 greedily by margin
  (:func:`_greedy_assign`) -- and centroids are recomputed as group means
  (from scratch after big moves, else by moving only the rows that changed
  child). A level stops early once at most ``tol * N`` rows change child.
  All nodes of a level are processed together (padded per-segment
  partitions, ``reduceat`` over the fixed group boundaries), never a Python
  loop per node; rows are reordered once per level. Rows are processed as
  float32 in chunks of ``chunk`` rows. The result is ``from_leaf_order`` of the
  final order, so it is balanced by construction.
  """
  b = _check_branching(branching)
  x = np.asarray(vectors)
  if x.ndim != 2 or x.shape[0] < 1:
    raise ValueError(f"vectors must have shape [N, D] with N >= 1, got {x.shape}")
  if not np.isfinite(x).all():
    raise ValueError("vectors contain NaN or inf")
  if iters < 1:
    raise ValueError(f"iters must be >= 1, got {iters}")
  n, d = x.shape
  h = tree_height(n, branching=b)
  counts = _level_counts(n, b, h)
  order = rng.permutation(n)
  xo = np.ascontiguousarray(x[order], dtype=np.float32)  # rows in current leaf order
  slot = np.arange(b)
  max_changed = int(tol * n)

  for j in range(h):
    cnt = counts[j]  # [S] items per node at level j (all nodes, heap order)
    width = int(cnt.max())
    if width <= b:  # every child gets <= 1 item: any split is equivalent
      break
    s = cnt.shape[0]
    start = np.concatenate([[0], np.cumsum(cnt)[:-1]])
    seg = np.repeat(np.arange(s), cnt)  # [N] segment (level-j node) of each row
    # cnt[:, None]: one row per node, B capacity columns.
    caps = cnt[:, None] // b + (slot[None, :] < (cnt[:, None] % b))  # [S, B]
    # reshape(-1): flat (segment, child) group capacities, in row order.
    gcap = caps.reshape(-1)
    gstart = np.concatenate([[0], np.cumsum(gcap)[:-1]])
    nonempty = gcap > 0
    if b == 2:
      # Child slot of the row at each position once a segment is sorted:
      # the first caps[s, 0] positions go left.
      pos_child = ((np.arange(n) - start[seg]) >= caps[seg, 0]).astype(np.int8)

    picks = _floyd_sample(rng, cnt, b)  # [S, B] distinct members per node
    # reshape(S*B, D): centroids as flat (segment, child) rows.
    cent = xo[(start[:, None] + picks).reshape(-1)].astype(np.float64)
    label = None  # int8[N] current child slot of every row
    sums = np.zeros((s * b, d), dtype=np.float64)  # per-group row sums
    perm = None  # row permutation grouping rows by (segment, child)
    for it in range(iters):
      # reshape(S, B, D): per-segment centroid blocks for the cost kernels.
      cent32 = cent.astype(np.float32).reshape(s, b, d)
      if b == 2:
        key = _binary_keys(xo, seg, cent32, chunk)
        perm = _split_two(key, seg, start, width, caps[:, 0])
        new = np.empty(n, dtype=np.int8)
        new[perm] = pos_child
      else:
        cost = _child_costs(xo, seg, cent32, chunk)
        new = _greedy_assign(cost, seg, caps).astype(np.int8)
        perm = None
      if label is None:
        moved = None
      else:
        moved = np.flatnonzero(new != label)
        if moved.size <= max_changed:
          label = new
          break
      if it == iters - 1:
        label = new
        break
      # Recompute group sums: from scratch when many rows moved, else
      # move just the rows that changed child.
      if moved is None or moved.size > n // 8:
        if perm is None:
          perm = np.argsort(seg * b + new, kind="stable")
        sums[:] = 0.0
        sums[nonempty] = _group_sums(xo[perm], gstart[nonempty])
      else:
        xm = xo[moved].astype(np.float64)
        np.subtract.at(sums, seg[moved] * b + label[moved], xm)
        np.add.at(sums, seg[moved] * b + new[moved], xm)
      label = new
      cent[nonempty] = sums[nonempty] / gcap[nonempty, None]
    if perm is None:
      perm = np.argsort(seg * b + label, kind="stable")
    # Reorder once per level: rows grouped by (segment, child) = level j+1 nodes.
    order = order[perm]
    xo = xo[perm]
  return from_leaf_order(order, branching=b)
