"""Using a trained run: `Retriever.load(workdir)` restores a finished workdir's model and
retrieves the top-K items of users given by the raw item ids of the input data.

    r = Retriever.load("runs/synthetic-tdr-...")            # --method=a,b: method="a"
    items, scores = r.retrieve([["i12", "i7", "i33"], ["i5"]], k=50)
    r.last_stats                                             # unknown ids dropped, ...

What it restores (the final state of the run, as its own evaluation retrieved with):
* tree methods (tdr*, tdm, jtm, otm, plt): the last round's tree (workdir/trees/round_<r>.npy)
  and DIN parameters (workdir/round_<r>/checkpoints); `use_forest=True`: every round's (tree,
  model), candidates united and reranked by the last model, as the run's forest row.
* dr: the structure network, the final item paths and the reranker (workdir/checkpoints).
* din, youtube_dnn: the trained networks (workdir/<name>/checkpoints), exact top-K.
* itemcf: no state is saved; the similarity matrix is rebuilt from the corpus (the dataset is
  loaded through the config and must have the run's corpus fingerprint; a sparse product,
  seconds at the preset sizes).

The run's settings come from workdir/config.json; the item vocabulary (internal id -> raw id)
from workdir/item_vocab.json (written by `experiment.train_and_evaluate`), or, for runs made
before that file existed, from the dataset loaded through the config. Every checkpoint is
checked against the config (and the corpus fingerprint): a mismatch is an `InputError` naming
the workdir and the setting that differs.

Retrieval is jitted once per (batch bucket, k, beam, forest): a call's users go in chunks of
at most `max_batch`, each padded to the next power of two, so later calls with other batch
sizes in the same bucket reuse the compiled search (`compiles` counts the traces).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from tdr_jax import beam_search as bs
from tdr_jax import deep_retrieval, label_tree, scorer, train, training
from tdr_jax import forest as forest_lib
from tdr_jax import tree as tree_lib
from tdr_jax.baselines import itemcf, youtube_dnn
from tdr_jax.config import SECTIONS, Config, leaves, validate
from tdr_jax.data import batches as batches_lib
from tdr_jax.data.preprocess import corpus_fingerprint
from tdr_jax.errors import InputError
from tdr_jax.exact_topk import topk_rows
from tdr_jax.methods import METHODS, dr_family, load_data, parse_methods, tree_family
from tdr_jax.models import din as din_lib
from tdr_jax.models import structure_net

__all__ = ["VOCAB_FILE", "Retriever", "config_from_json", "write_vocabulary"]

VOCAB_FILE = "item_vocab.json"
SERVABLE = tuple(tree_family.METHODS) + ("dr", "din", "youtube_dnn", "itemcf")


# ---- the workdir's config and vocabulary -----------------------------------------------------

def write_vocabulary(workdir: str, ds) -> str:
  """Writes workdir/item_vocab.json: the raw item id of every internal item id (in order) and
  the corpus fingerprint the checkpoints record. Returns its path."""
  path = os.path.join(workdir, VOCAB_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"corpus_fingerprint": corpus_fingerprint(ds), "num_items": int(ds.num_items),
               "item_raw_ids": [str(x) for x in ds.item_raw_ids]}, f)
  os.replace(tmp, path)
  return path


def _as_field_type(value, hint):
  """A config.json value (lists for tuples) converted back to the field's type."""
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  base = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
  if value is not None and typing.get_origin(base) is tuple:
    inner = typing.get_args(base)
    nested = inner and typing.get_origin(inner[0]) is tuple
    return tuple(tuple(v) if nested else v for v in value)
  return value


def config_from_json(d: dict) -> Config:
  """The Config of a config.json (nested dict); fields the file lacks (added later) keep their
  defaults; fields the code no longer has are an InputError."""
  flat = {}
  for cls, sub in [(Config, {k: v for k, v in d.items() if k not in SECTIONS})] + [
      (SECTIONS[s], d.get(s, {})) for s in SECTIONS]:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k, v in sub.items():
      if k not in names:
        raise InputError(f"config.json: unknown setting {k!r} (written by another version)")
      flat[k] = _as_field_type(v, hints[k])
  preset = flat.pop("preset", "default")
  cfg = Config(preset=preset).replace(**flat)
  validate(cfg)
  return cfg


def _jsonable(x):
  return json.loads(json.dumps(x, default=lambda v: np.asarray(v).tolist()))


def _first_difference(got: dict, want: dict, prefix: str = "", exact: bool = False
                      ) -> str | None:
  """`name recorded != expected` for the first key of `want` whose value differs (`exact`:
  also keys only `got` has; a key one side lacks shows as `<unset>`)."""
  got, want = _jsonable(got), _jsonable(want)
  unset = "<unset>"
  for key in sorted(set(want) | (set(got) if exact else set())):
    g, w = got.get(key, unset), want.get(key, unset)
    if g != w:
      if isinstance(g, dict) and isinstance(w, dict):
        inner = _first_difference(g, w, f"{prefix}{key}.", exact)
        if inner:
          return inner
        continue
      return f"{prefix}{key} {g if g is unset else repr(g)} != {w if w is unset else repr(w)}"
  return None


# ---- restoring checkpoints -------------------------------------------------------------------

class _Checkpoint:
  """The latest checkpoint of a training.fit directory: its recorded identity and state."""

  def __init__(self, workdir: str, directory: str):
    self.workdir, self.dir = workdir, os.path.abspath(directory)
    if not os.path.isdir(self.dir):
      raise InputError(f"{workdir}: no checkpoint folder {self.dir} (was the run finished, and "
                       f"with this method?)")
    self.manager = ocp.CheckpointManager(self.dir)
    self.step = self.manager.latest_step()
    if self.step is None:
      raise InputError(f"{workdir}: no checkpoint in {self.dir}")
    self.meta = self.manager.restore(
        self.step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def refuse(self, what: str):
    raise InputError(f"{self.workdir}: the checkpoint {self.dir} does not match the workdir's "
                     f"config.json: {what}")

  def expect(self, key: str, want, what: str) -> None:
    if want is not None and self.meta.get(key) != want:
      self.refuse(f"{what} ({key} {self.meta.get(key)} != {want})")

  def restore(self, state, carry=None):
    """(params, carry) of the checkpoint, shaped like `state` / `carry`."""
    like = {"state": state, "carry": {"carry": carry, "phases": np.zeros((), np.int32)}}
    args = {k: ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, v))
            for k, v in like.items()}
    got = self.manager.restore(self.step, args=ocp.args.Composite(**args))
    self.manager.close()
    return got["state"].params, got["carry"]["carry"]


def _padded_history(internal: Sequence[Sequence[int]], length: int) -> np.ndarray:
  """int32[U, L]: each history's last `length` items, left-padded with -1 (most recent last)."""
  out = np.full((len(internal), length), -1, np.int32)
  for i, h in enumerate(internal):
    h = list(h)[-length:] if length else []
    if h:
      out[i, length - len(h):] = h
  return out


def _next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


@dataclasses.dataclass
class _Model:
  """A restored model: `search(args, history int32[B, L], k, beam) -> (items, scores)`,
  jittable with k and beam static (`jittable=False`: host code); `args` (its parameters and
  index arrays, on the device) are passed to the jitted search, not baked into it."""
  search: Callable
  args: Any = None
  jittable: bool = True
  default_beam: int | None = None
  info: dict = dataclasses.field(default_factory=dict)


class Retriever:
  """A finished run's model, retrieving top-K raw item ids for raw-id histories."""

  def __init__(self, *, workdir: str, method: str, cfg: Config, vocab: np.ndarray,
               model: _Model, use_forest: bool, max_batch: int = 256):
    self.workdir, self.method, self.cfg = workdir, method, cfg
    self.vocab = vocab  # str[N]: internal item id -> raw id
    self.index = {str(x): i for i, x in enumerate(vocab)}
    self.history_len = cfg.data.history_len
    self.use_forest = use_forest
    if int(max_batch) < 1:
      raise InputError(f"--max_batch={max_batch} must be at least 1")
    self.max_batch = int(max_batch)
    self._model = model
    self._compiled: dict = {}
    self.compiles = 0  # traces of the search (one per batch bucket, k, beam)
    self.last_stats: dict = {}
    self.last_added: dict = {}  # the placements of the last add_items call
    self.total_unknown = 0

  # -- loading --

  @classmethod
  def load(cls, workdir: str, *, method: str | None = None, use_forest: bool = False,
           max_batch: int = 256) -> "Retriever":
    """Restores the finished run in `workdir` (see the module docstring). `method`: which one
    of a multi-method workdir (`--method=a,b`); `use_forest`: a tree method's forest."""
    if int(max_batch) < 1:
      raise InputError(f"--max_batch={max_batch} must be at least 1")
    if not os.path.isdir(workdir):
      raise InputError(f"--workdir={workdir}: no such folder")
    for name in ("config.json", "results.json"):
      if not os.path.exists(os.path.join(workdir, name)):
        raise InputError(f"{workdir}: no {name}; not a finished run of experiments/run.py")
    cfg = config_from_json(_read_json(os.path.join(workdir, "config.json")))
    names = parse_methods(cfg.method)
    servable = [n for n in names if n in SERVABLE]
    if method is None:
      if len(servable) != 1:
        raise InputError(f"{workdir} holds the methods {names}; choose one with --method "
                         f"(servable: {', '.join(servable) or 'none'})")
      method = servable[0]
    if method not in names:
      raise InputError(f"--method={method}: {workdir} holds {', '.join(names)}")
    if method not in SERVABLE:
      raise InputError(f"--method={method} has no model to serve; choose from "
                       f"{', '.join(servable) or 'none'}")
    sub = workdir if len(names) == 1 else os.path.join(workdir, method)
    mcfg = cfg.replace(**METHODS[method].settings)
    vocab, corpus_fp, ds = _vocabulary(workdir, cfg)
    if use_forest and method not in tree_family.METHODS:
      raise InputError(f"--use_forest: {method} is not a tree method")
    if method in tree_family.METHODS:
      model = _load_tree(workdir, sub, mcfg, len(vocab), corpus_fp, use_forest)
    elif method == "dr":
      model = _load_dr(workdir, sub, mcfg, len(vocab), corpus_fp)
    elif method == "din":
      model = _load_din(workdir, sub, mcfg, len(vocab), corpus_fp)
    elif method == "youtube_dnn":
      model = _load_youtube_dnn(workdir, sub, mcfg, len(vocab), corpus_fp)
    else:
      if ds is None:
        ds, _ = load_data(cfg)
      if corpus_fingerprint(ds) != corpus_fp:
        raise InputError(f"{workdir}: the corpus loaded through config.json (fingerprint "
                         f"{corpus_fingerprint(ds)}) is not the run's ({corpus_fp}, "
                         f"{VOCAB_FILE}); itemcf is rebuilt from it")
      model = _load_itemcf(mcfg, ds)
    return cls(workdir=workdir, method=method, cfg=mcfg, vocab=vocab, model=model,
               use_forest=use_forest, max_batch=max_batch)

  # -- retrieval --

  def to_internal(self, histories: Sequence[Sequence[Any]]) -> tuple[np.ndarray, dict]:
    """int32[U, history_len] internal histories of raw-id histories (oldest first), and stats:
    unknown ids are dropped (never mapped to another item) and counted; longer histories keep
    their most recent items."""
    internal, unknown_per_user, truncated = [], [], 0
    for h in histories:
      if isinstance(h, (str, bytes)):
        raise InputError("a history must be a list of item ids, not one string")
      ids = [self.index.get(str(x)) for x in h]
      unknown_per_user.append(sum(i is None for i in ids))
      ids = [i for i in ids if i is not None]
      truncated += len(ids) > self.history_len
      internal.append(ids)
    hist = _padded_history(internal, self.history_len)
    stats = {"users": len(internal), "unknown_ids": int(sum(unknown_per_user)),
             "users_with_unknown_ids": int(sum(n > 0 for n in unknown_per_user)),
             "unknown_per_user": unknown_per_user, "truncated_histories": int(truncated),
             "empty_histories": int(sum(len(i) == 0 for i in internal))}
    return hist, stats

  def retrieve(self, histories: Sequence[Sequence[Any]], k: int, beam_size: int | None = None
               ) -> tuple[list[list[str]], list[list[float]]]:
    """Top-`k` raw item ids (best first) and their scores for each history (raw item ids of
    the input data, strings or ints, oldest first). A user may get fewer than k items (DR:
    fewer candidates on its paths). `last_stats` tells the unknown ids dropped."""
    hist, stats = self.to_internal(histories)
    self.last_stats = stats
    self.total_unknown += stats["unknown_ids"]
    if stats["unknown_ids"]:
      logging.warning("retrieve: dropped %d unknown item ids (%d users)", stats["unknown_ids"],
                      stats["users_with_unknown_ids"])
    items, scores = self.retrieve_internal(hist, k, beam_size)
    out_items, out_scores = [], []
    for row, sc in zip(items, scores):
      ok = row >= 0
      out_items.append([str(x) for x in self.vocab[row[ok]]])
      out_scores.append([float(s) for s in sc[ok]])
    return out_items, out_scores

  def retrieve_internal(self, history: np.ndarray, k: int, beam_size: int | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k internal item ids int32[U, k] (-1 padded) and scores float32[U, k] of internal
    histories int32[U, history_len] (left-padded with -1)."""
    history = np.asarray(history, np.int32)
    if history.ndim != 2 or history.shape[1] != self.history_len:
      raise ValueError(f"history must be int32[U, {self.history_len}], got {history.shape}")
    k = int(k)
    if k < 1 or k > len(self.vocab):
      raise InputError(f"--k={k}: must lie in [1, {len(self.vocab)}] (the number of items)")
    beam = self._model.default_beam if beam_size is None else int(beam_size)
    if beam is not None and self.method in tree_family.METHODS and k > beam:
      raise InputError(f"--k={k} exceeds the beam size {beam}; pass --beam_size >= k")
    if beam is not None and self.method == "dr":
      n_paths = self._model.info["num_structure_paths"]
      if not 1 <= beam <= n_paths:
        raise InputError(f"--beam_size={beam}: DR's beam must lie in [1, {n_paths}]")
    items = np.full((len(history), k), -1, np.int32)
    scores = np.full((len(history), k), -np.inf, np.float32)
    for lo in range(0, len(history), self.max_batch):
      part = history[lo:lo + self.max_batch]
      if not self._model.jittable:
        it, sc = self._model.search(self._model.args, part, k, beam)
      else:
        bucket = _next_pow2(len(part))
        padded = np.concatenate([part, np.full((bucket - len(part), part.shape[1]), -1,
                                               np.int32)])
        it, sc = jax.device_get(self._search_fn(k, beam)(self._model.args, jnp.asarray(padded)))
      items[lo:lo + len(part)] = np.asarray(it)[:len(part)]
      scores[lo:lo + len(part)] = np.asarray(sc, np.float32)[:len(part)]
    return items, scores

  def _search_fn(self, k: int, beam: int | None):
    key = (k, beam)
    if key not in self._compiled:
      search = self._model.search

      def fn(args, history):
        self.compiles += 1  # runs once per trace: a new batch bucket (or k, beam)
        return search(args, history, k, beam)

      self._compiled[key] = jax.jit(fn)
    return self._compiled[key]

  # -- new items without a rebuild --

  @property
  def tree(self) -> tree_lib.Tree:
    """The (last round's) tree a tree method retrieves with; items added by `add_items`
    included."""
    if self.method not in tree_family.METHODS:
      raise InputError(f"{self.method} has no tree index")
    return self._model.info["trees"][-1]

  def item_vectors(self, raw_ids: Sequence[Any] | None = None) -> np.ndarray:
    """float32[n, D]: the leaf rows of the final scorer's node-embedding table of `raw_ids`
    (default: every item, in vocabulary order) -- the space of `add_items(vectors=...)`."""
    tree = self.tree
    table = _node_table(self._model.info["params"][-1])
    internal = self._known(raw_ids) if raw_ids is not None else np.arange(len(self.vocab))
    return table[np.asarray(tree.item_paths)[internal, tree.height]].astype(np.float32)

  def _known(self, raw_ids: Sequence[Any]) -> np.ndarray:
    missing = [str(x) for x in raw_ids if str(x) not in self.index]
    if missing:
      raise InputError(f"unknown item ids {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return np.asarray([self.index[str(x)] for x in raw_ids], np.int64)

  def add_items(self, raw_ids: Sequence[Any], *, vectors=None,
                histories: Sequence[Sequence[Any]] | None = None) -> dict:
    """Places items unseen at training time into free leaves of the tree, without a rebuild
    or retraining; they are retrievable by the next `retrieve` (tree methods only).

    Each new item gets a vector in the space of the final scorer's leaf embeddings: its row of
    `vectors` (float[n, D], D = the scorer's embed_dim; `item_vectors()` gives the existing
    items'), or (exactly one of the two) the mean leaf row of the known items it co-occurs
    with in `histories` (raw-id lists; every occurrence counts). Its nearest existing item is
    the one whose leaf row is nearest (Euclidean), and it takes the free leaf whose lowest
    common ancestor with that item's leaf is deepest (`tree.nearest_free_leaves`); when there
    are fewer free leaves than new items the tree first grows by levels (`tree.grow_level`:
    every item moves to the first child of its leaf, old node ids and rows are kept). Its
    leaf row is its vector when `vectors` are given, else (`histories`) a copy of its nearest
    item's leaf row; the rows of the ancestors it makes non-empty are copied from its nearest
    item's ancestors on the same levels (so its path scores like that item's); other rows are
    unchanged. With the forest, every round's tree and table are updated the same way: with
    `histories` each round's own mean row and nearest item; with `vectors` (the final model's
    space) the nearest item of the final round, whose leaf row of each earlier round the new
    item copies there.

    Growth keeps what old items score only where a score is the leaf's own node score: a
    method ranking by path scores (plt: the sum of log-sigmoids of the nodes on the path) would
    give every item an extra term from its new leaf, so there growth is refused (inserting
    into free leaves is fine).

    Refused (InputError, nothing changed): ids already in the vocabulary or repeated; both or
    neither of `vectors` and `histories`, or items with no known co-occurring item; growth
    under path scores (plt); non-tree methods.

    The first call pads the served item arrays to the tree's leaf capacity (one more
    compilation); later calls reuse the compiled search until the tree grows.

    Returns:
      {"items": [{"id", "leaf", "nearest", "lca_level"} per new item (last round's tree)],
       "grown_levels": levels added, "height": the tree height}.
    """
    if self.method not in tree_family.METHODS:
      raise InputError(f"add_items: {self.method} has no tree index (tree methods only)")
    ids = [str(x) for x in raw_ids]
    if isinstance(raw_ids, (str, bytes)) or not ids:
      raise InputError("add_items: give a non-empty list of item ids")
    known = [x for x in ids if x in self.index]
    if known:
      raise InputError(f"add_items: {len(known)} ids already in the vocabulary: "
                       f"{known[:5]}{' ...' if len(known) > 5 else ''}")
    if len(set(ids)) != len(ids):
      dup = sorted({x for x in ids if ids.count(x) > 1})
      raise InputError(f"add_items: ids repeated in the call: {dup[:5]}")
    if vectors is not None and histories is not None:
      raise InputError("add_items: give vectors or histories, not both")
    n = len(ids)
    info = self._model.info
    trees, params = list(info["trees"]), list(info["params"])
    if info.get("path_scores") and trees[-1].num_items + n > trees[-1].num_leaves:
      raise InputError(
          f"add_items: {n} new items need {trees[-1].num_items + n - trees[-1].num_leaves} "
          f"more leaves than the tree's {trees[-1].num_leaves}, and growing it would change "
          f"every item's path score ({self.method} ranks by path scores); retrain instead")
    tables = [_node_table(p) for p in params]
    width = tables[-1].shape[1]
    co = None
    if vectors is not None:
      vec = np.asarray(vectors, np.float64)
      if vec.shape != (n, width):
        raise InputError(f"add_items: vectors must be float[{n}, {width}] (the scorer's leaf "
                         f"embedding space, see item_vectors()), got {vec.shape}")
      if not np.isfinite(vec).all():
        raise InputError("add_items: vectors contain NaN or inf")
    else:
      co = _co_occurring(ids, histories or [], self.index)
      lonely = [x for x, c in zip(ids, co) if not c]
      if lonely:
        raise InputError(f"add_items: {len(lonely)} items have neither a vector nor a known "
                         f"co-occurring item in the histories: "
                         f"{lonely[:5]}{' ...' if len(lonely) > 5 else ''}")
    placed, grown = [], 0
    if co is None:  # the vectors live in the final scorer's space: its nearest items
      last = trees[-1]
      nearest_final = _nearest_rows(
          vec, tables[-1][np.asarray(last.item_paths)[:, last.height]].astype(np.float64))
    for r, (tree, table) in enumerate(zip(trees, tables)):
      leaf_rows = table[np.asarray(tree.item_paths)[:, tree.height]].astype(np.float64)
      if co is None:
        nearest = nearest_final
        # The final round takes the vectors; an earlier round its own row of the nearest item.
        vec_r = vec if r == len(trees) - 1 else leaf_rows[nearest]
      else:
        vec_r = np.stack([leaf_rows[c].mean(axis=0) for c in co])
        nearest = _nearest_rows(vec_r, leaf_rows)
      old, grown = tree, 0
      while tree.num_items + n > tree.num_leaves:
        tree, _ = tree_lib.grow_level(tree)
        grown += 1
      if grown:
        table = tree_lib.grow_node_rows(table, old, tree)
      near_paths = np.asarray(tree.item_paths)[nearest]  # [n, H+1], after growth
      leaves, lca = tree_lib.nearest_free_leaves(tree, np.asarray(tree.item_to_leaf)[nearest])
      new = tree_lib.insert_items(tree, leaves)
      tree_lib.validate(new, balanced=False)
      table = table.copy()
      was_valid = np.asarray(tree.node_valid).copy()
      new_paths = np.asarray(new.item_paths)[tree.num_items:]
      for i in range(n):
        for j in range(new.height + 1):
          g = new_paths[i, j]
          if not was_valid[g]:  # a node this call made non-empty (first item wins)
            own = j == new.height and co is None and r == len(trees) - 1
            table[g] = vec_r[i] if own else table[near_paths[i, j]]
            was_valid[g] = True
      trees[r], tables[r] = new, table
      placed = [{"id": x, "leaf": int(leaf), "nearest": str(self.vocab[m]), "lca_level": int(a)}
                for x, leaf, m, a in zip(ids, leaves, nearest, lca)]
    new_params = [tree_family._map_node_table(p, lambda x, t=t: t.astype(x.dtype))
                  for p, t in zip(params, tables)]
    # Commit (nothing above changed the Retriever).
    info["trees"], info["params"] = trees, new_params
    self._model.args = jax.device_put(([_served_tree(t) for t in trees], new_params))
    self.vocab = np.concatenate([self.vocab, np.asarray(ids, dtype=str)])
    base = len(self.index)
    self.index.update({x: base + i for i, x in enumerate(ids)})
    self.last_added = {"items": placed, "grown_levels": grown, "height": trees[-1].height}
    return self.last_added


# ---- adding items (Retriever.add_items) ------------------------------------------------------

def _node_table(params) -> np.ndarray:
  """The scorer's node-embedding table float[num_nodes, D] (numpy) of `params`."""
  found = []
  tree_family._map_node_table(params, lambda x: found.append(x) or x)
  if len(found) != 1:
    raise ValueError(f"expected one node-embedding table, found {len(found)}")
  return found[0]


def _served_tree(tree: tree_lib.Tree) -> tree_lib.Tree:
  """`tree` with its per-item arrays padded to the leaf capacity B**H (num_items = B**H; the
  padding rows are -1 and never read: no history or leaf names those items), so adding items
  changes array values, not shapes, until the tree grows. Only for the jitted search."""
  cap, n = tree.num_leaves, tree.num_items
  pad = lambda a: np.concatenate(  # noqa: E731
      [np.asarray(a), np.full((cap - n,) + np.shape(a)[1:], -1, np.int32)])
  return dataclasses.replace(tree, item_to_leaf=pad(tree.item_to_leaf),
                             item_paths=pad(tree.item_paths), num_items=cap)


def _co_occurring(ids: list[str], histories, index: dict) -> list[list[int]]:
  """For each new raw id, the internal ids of the known items in the histories containing it
  (one entry per occurrence; the item itself and other unknown ids excluded)."""
  if isinstance(histories, (str, bytes)):
    raise InputError("add_items: histories must be a list of raw-id lists")
  want = {x: i for i, x in enumerate(ids)}
  out: list[list[int]] = [[] for _ in ids]
  for h in histories:
    if isinstance(h, (str, bytes)):
      raise InputError("add_items: a history must be a list of item ids, not one string")
    h = [str(x) for x in h]
    known = [index[x] for x in h if x in index]
    for x in set(h):
      if x in want:
        out[want[x]].extend(known)
  return out


def _nearest_rows(queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """int64[n]: the row of `rows` [N, D] nearest (Euclidean) to each query [n, D]; ties go to
  the smaller index. Chunked over queries (at most ~2^24 distances at once)."""
  sq = np.einsum("nd,nd->n", rows, rows)
  out = np.empty(len(queries), np.int64)
  step = max(1, (1 << 24) // max(len(rows), 1))
  for lo in range(0, len(queries), step):
    q = queries[lo:lo + step]
    out[lo:lo + step] = np.argmin(sq[None, :] - 2.0 * q @ rows.T, axis=1)
  return out


def _read_json(path: str):
  """The JSON of `path`; a file that is not (UTF-8) JSON is an InputError naming it."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise InputError(f"{path}: not a valid JSON file ({e})") from None


def _vocabulary(workdir: str, cfg: Config):
  """(raw ids str[N], corpus fingerprint, the dataset if it had to be loaded or None)."""
  path = os.path.join(workdir, VOCAB_FILE)
  if os.path.exists(path):
    v = _read_json(path)
    return np.asarray(v["item_raw_ids"], dtype=str), v["corpus_fingerprint"], None
  # A run made before the vocabulary file: load the dataset through the config.
  ds, _ = load_data(cfg)
  return np.asarray(ds.item_raw_ids, dtype=str), corpus_fingerprint(ds), ds


# ---- the methods -----------------------------------------------------------------------------

def _check_config_record(ck: _Checkpoint, cfg: Config) -> None:
  """Refuses a tree-method checkpoint written under another config, naming the setting."""
  want = cfg.fingerprint()
  if ck.meta.get("config_fingerprint") == want:
    return
  record = ck.meta.get("record") or {}
  mine = cfg.to_json()
  for name, value, f in leaves(cfg):
    fp = f.metadata.get("fingerprint", True)
    if fp is False or (fp == "if_set" and value is None):
      continue
    section = next((s for s, c in SECTIONS.items()
                    if name in {x.name for x in dataclasses.fields(c)}), None)
    got = (record.get(section) or {}).get(name) if section else record.get(name)
    mine_v = mine[section][name] if section else mine[name]
    if _jsonable(got) != _jsonable(mine_v):
      ck.refuse(f"--{name} {got!r} != {mine_v!r}")
  ck.refuse(f"config fingerprint {ck.meta.get('config_fingerprint')} != {want}")


def _tree_round(workdir: str, sub: str, cfg: Config, num_items: int, corpus_fp: str, r: int):
  path = os.path.join(sub, "trees", f"round_{r}.npy")
  if not os.path.exists(path):
    raise InputError(f"{workdir}: no tree {path}")
  tree = tree_lib.from_item_to_leaf(np.load(path), branching=cfg.tree.branching,
                                    num_items=num_items)
  ck = _Checkpoint(workdir, os.path.join(sub, f"round_{r}", "checkpoints"))
  _check_config_record(ck, cfg)
  ck.expect("corpus_fingerprint", corpus_fp, "another corpus")
  ck.expect("tree_fingerprint", training.fingerprint(np.asarray(tree.item_to_leaf)),
            f"another tree than {path}")
  score_fn, params = tree_family.build_model(cfg, tree)
  params, _ = ck.restore(training.init_state(params, train.make_optimizer()))
  return score_fn, tree, params


def _load_tree(workdir, sub, cfg: Config, num_items, corpus_fp, use_forest) -> _Model:
  last = cfg.tree.tree_rounds - 1
  rounds = range(last + 1) if use_forest else [last]
  loaded = [_tree_round(workdir, sub, cfg, num_items, corpus_fp, r) for r in rounds]
  score_fn = loaded[-1][0]
  trees = [t for _, t, _ in loaded]
  params = [p for _, _, p in loaded]
  path_scores = cfg.train.loss == "plt"
  disc_fn = label_tree.path_score_fn(score_fn) if path_scores else score_fn

  def search(args, history, k, beam):
    trees_dev, params_dev = args
    per_tree = [bs.beam_search(score_fn, p, t, history, beam_size=beam, topk=k,
                               path_scores=path_scores) for t, p in zip(trees_dev, params_dev)]
    if len(per_tree) == 1:
      return per_tree[0]
    cand = jnp.concatenate([items for items, _ in per_tree], axis=1)  # [B, R k]
    c = cand.shape[1]
    earlier = jnp.tril(jnp.ones((c, c), bool), -1)  # [i, j]: j before i
    repeated = jnp.any((cand[:, :, None] == cand[:, None, :]) & earlier[None], axis=2)
    cand = jnp.where(repeated | (cand < 0), -1, cand)
    return forest_lib.rerank(disc_fn, params_dev[-1], trees_dev[-1], history, cand, topk=k)

  return _Model(search=search, args=jax.device_put((trees, params)),
                default_beam=cfg.eval.beam_size, info={"rounds": len(loaded), "score_fn": score_fn, "trees": trees,
                      "params": params, "path_scores": path_scores})


def _load_dr(workdir, sub, cfg: Config, num_items, corpus_fp) -> _Model:
  _, dcfg = dr_family.dr_settings(cfg)
  ck = _Checkpoint(workdir, os.path.join(sub, "checkpoints"))
  record = ck.meta.get("record") or {}
  diff = (_first_difference(record.get("dr") or {}, deep_retrieval.dr_identity(dcfg), "dr.",
                            exact=True)
          or _first_difference(record.get("fit") or {}, {
              "seed": cfg.seed, "history_len": cfg.data.history_len,
              "batch_size": cfg.train.batch_size,
              "max_train_samples": cfg.data.max_train_samples or 0}, "fit.")
          or _first_difference(record, {"corpus": corpus_fp}))
  if diff:
    ck.refuse(diff)
  net = structure_net.StructureNet(
      num_items=num_items, width=dcfg.width, depth=dcfg.depth, embed_dim=dcfg.embed_dim,
      user_dim=dcfg.user_dim, path_dim=dcfg.path_dim, hidden=dcfg.hidden,
      user_encoder=dcfg.user_encoder, rerank_dim=dcfg.rerank_dim if dcfg.reranker else 0,
      prefix_bias=dcfg.prefix_bias, rngs=nnx.Rngs(params=jax.random.key(0)))
  graphdef, params = nnx.split(net)
  optimizer = train.make_optimizer()
  if dcfg.reranker and dcfg.rerank_esteps is not None and dcfg.rerank_esteps <= dcfg.em_rounds:
    optimizer = deep_retrieval.freeze_after(optimizer, 1, lambda n: n.startswith("rerank_"))
  carry = {"paths": np.zeros((num_items, dcfg.num_paths, dcfg.depth), np.int32),
           "msteps": np.zeros((), np.int32)}
  params, carry = ck.restore(training.init_state(params, optimizer), carry)
  paths = np.asarray(carry["paths"], np.int32)
  ids = structure_net.path_ids(paths.astype(np.int64), width=dcfg.width)
  offsets, path_items, max_size = deep_retrieval.path_index(
      ids, num_structure_paths=dcfg.num_structure_paths)

  def search(args, history, k, beam):
    params_dev, offsets_dev, items_dev = args
    items, _, scores = deep_retrieval._retrieve_batch(
        graphdef, params_dev, history, offsets_dev, items_dev, beam=beam, topk=k,
        max_path_size=max(max_size, 1), use_reranker=dcfg.reranker)
    return items, scores

  model = deep_retrieval.DRModel(graphdef=graphdef, params=params, paths=paths, config=dcfg,
                                 info={})
  return _Model(search=search, args=jax.device_put((params, offsets, path_items)),
                default_beam=dcfg.beam_size,
                info={"num_structure_paths": dcfg.num_structure_paths, "model": model})


def _baseline_checkpoint(workdir, sub, name, cfg: Config, corpus_fp, identity_want: dict):
  ck = _Checkpoint(workdir, os.path.join(sub, name, "checkpoints"))
  record = ck.meta.get("record") or {}
  fit_want = {"seed": cfg.seed, "batch_size": cfg.train.batch_size,
              "history_len": cfg.data.history_len,
              "max_train_samples": cfg.data.max_train_samples or 0}
  diff = (_first_difference(record.get("identity") or {}, identity_want, f"{name}.")
          or _first_difference(record.get("fit") or {}, fit_want, "fit.")
          or _first_difference(record, {"corpus": corpus_fp}))
  if diff:
    ck.refuse(diff)
  return ck, record


def _load_din(workdir, sub, cfg: Config, num_items, corpus_fp) -> _Model:
  want = {"windows": list(cfg.model.windows), "embed_dim": cfg.model.embed_dim,
          "attention_hidden": list(cfg.model.attention_hidden),
          "mlp_hidden": list(cfg.model.mlp_hidden),
          "num_negatives": max(cfg.train.num_negatives, 1), "warm_start": cfg.tree.warm_start}
  ck, record = _baseline_checkpoint(workdir, sub, "din", cfg, corpus_fp, want)
  ident = record["identity"]
  tree = tree_lib.build_random(np.random.default_rng([cfg.seed, 5]), num_items, branching=2)
  model = din_lib.init_din(jax.random.key(0), num_nodes=tree.num_nodes,
                           embed_dim=ident["embed_dim"], windows=tuple(ident["windows"]),
                           attention_hidden=tuple(ident["attention_hidden"]),
                           mlp_hidden=tuple(ident["mlp_hidden"]), hierarchical=False)
  graphdef, params = nnx.split(model)
  opt = train.make_optimizer()
  params, _ = ck.restore(training.init_state(params, opt))
  score_fn = scorer.din_score_fn(graphdef)
  att = (ident["attention_hidden"] or [1])[0]

  def search(args, history, k, beam):
    del beam
    params_dev, tree_dev = args
    chunk = max(1, min(num_items, (1 << 25) // (history.shape[0] * history.shape[1] * att)))
    return bs.brute_force(score_fn, params_dev, tree_dev, history, topk=k, chunk_size=chunk)

  return _Model(search=search, args=jax.device_put((params, tree)), info={"tree": tree, "params": params, "score_fn": score_fn})


def _load_youtube_dnn(workdir, sub, cfg: Config, num_items, corpus_fp) -> _Model:
  ck, record = _baseline_checkpoint(workdir, sub, "youtube_dnn", cfg, corpus_fp, {})
  ident = record["identity"]
  net = youtube_dnn.YouTubeDNN(num_items=num_items, embed_dim=ident["embed_dim"],
                               hidden=tuple(ident["mlp"][:-1]),
                               tie_embeddings=ident["tie_embeddings"],
                               rngs=nnx.Rngs(params=jax.random.key(0)))
  graphdef, params = nnx.split(net)
  params, _ = ck.restore(training.init_state(params, train.make_optimizer()))

  def search(params_dev, history, k, beam):
    del beam
    m = nnx.merge(graphdef, params_dev)
    return youtube_dnn.mips_topk(m.user_vectors(history), m.item_vectors(), topk=k)

  return _Model(search=search, args=jax.device_put(params), info={"graphdef": graphdef, "params": params})


def _load_itemcf(cfg: Config, ds) -> _Model:
  """Item-CF as the run fitted it (the targets of the run's training samples), rebuilt."""
  samples = batches_lib.training_samples(ds, max_train_samples=cfg.data.max_train_samples or 0,
                                         seed=cfg.seed)
  model = itemcf.fit(ds, samples=samples)
  order = model.tie_order()

  def search(args, history, k, beam):
    del args, beam
    rows, pos = np.nonzero(history >= 0)
    hist = itemcf._binary_csr(rows, history[rows, pos], (len(history), model.num_items))
    dense = np.asarray(itemcf.score_users(model, hist).toarray(), np.float32)
    items = topk_rows(dense, k, column_order=order)
    scores = np.where(items >= 0, np.take_along_axis(dense, np.maximum(items, 0), 1), -np.inf)
    return items, scores.astype(np.float32)

  return _Model(search=search, jittable=False, info={"model": model})
