"""Item-based collaborative filtering with cosine similarity (the Item-CF row of TDR Table 2).

Model
-----
* Binary user-item matrix X (rows = users, columns = items; an item a user touched several
  times counts once). By default the rows are the *training users' whole sequences* -- the
  same users every other method trains on. `include_eval_histories=True` adds the visible
  first halves of the validation and test users as extra rows (their second halves, the
  labels, are never used).
* Similarity of items i != j: cosine between their columns,
  ``sim(i, j) = |U_i & U_j| / sqrt(|U_i| * |U_j|)`` with U_i the set of rows holding item i.
  The diagonal is 0 by default (an item is not its own neighbour); `include_self=True` sets
  ``sim(i, i) = 1`` for every item seen in X.
* `num_neighbors=k` keeps only the k largest similarities in every row i (ties: lower item id),
  so the stored matrix has at most k entries per item; 0 keeps every non-zero similarity.
* The similarity matrix is built in blocks of consecutive items (one sparse product
  ``X[:, block]^T X`` each), sized so a block holds at most `max_block_entries`
  co-occurrence entries (bounded in advance from the users' lengths), so memory is bounded by
  one block plus the kept entries -- with `num_neighbors` this scales to 10^5-10^6 items.

Retrieval
---------
A user's score of item j is ``sum_{i in H} sim(i, j)`` over the *distinct* items H of the
history: by default the whole visible first half (`EvalSet.full_history_*`), or only the last
L items (`EvalSet.history`) with `history="window"`. Items already in the history are kept in
the ranking (`exclude_history=False`): in this protocol the label set is the unique items of
the second half, which often repeats first-half items. The top K is exact; ties (including
the items scored 0 when fewer than K items have a positive score) are broken by popularity
(number of rows of X holding the item, higher first), then by the lower item id, so the
ranking falls back to the most popular items.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from tdr_jax.exact_topk import _lax_top_k, pad_rows, topk_rows

__all__ = ["ItemCF", "user_item_matrix", "item_similarity", "fit", "retrieve", "score_users"]


@dataclasses.dataclass
class ItemCF:
  """A fitted Item-CF model.

  similarity: CSR float32[N, N], row i holds sim(i, .) (only the kept neighbours).
  popularity: int64[N] number of rows of the user-item matrix holding each item.
  settings: the fit options.
  """
  similarity: sp.csr_matrix
  popularity: np.ndarray
  settings: dict

  @property
  def num_items(self) -> int:
    return int(self.similarity.shape[0])

  def tie_order(self) -> np.ndarray:
    """Items by popularity (descending), then id (ascending): the tie-breaking order."""
    n = self.num_items
    return np.lexsort((np.arange(n), -self.popularity)).astype(np.int64)


def _binary_csr(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
  """0/1 CSR matrix with a 1 at every (row, col) listed (repeats count once)."""
  rows = np.asarray(rows, np.int64)
  cols = np.asarray(cols, np.int64)
  m = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=shape)
  m.sum_duplicates()
  m.data[:] = 1.0
  return m


def user_item_matrix(ds, *, include_eval_histories: bool = False,
                     samples: np.ndarray | None = None) -> sp.csr_matrix:
  """Binary CSR [num_users, N] of the training users' sequences (and, optionally, the first
  halves of the validation/test users); rows of other users are empty.

  `samples`: indices of training samples; when given, only their targets are training
  interactions (the interactions a run's learned methods train on), not whole sequences."""
  lengths = np.diff(ds.seq_offsets)
  owner = np.repeat(np.arange(ds.num_users, dtype=np.int64), lengths)
  split = ds.user_split[owner]
  keep = split == 0
  if samples is not None:
    keep = np.zeros(len(ds.seq_items), bool)
    keep[np.asarray(ds.train_sample_pos)[np.asarray(samples)]] = True
  if include_eval_histories:
    pos = np.arange(len(ds.seq_items), dtype=np.int64)
    first_half_end = ds.seq_offsets[owner] + lengths[owner] // 2
    keep |= (split != 0) & (pos < first_half_end)
  return _binary_csr(owner[keep], ds.seq_items[keep], (ds.num_users, ds.num_items))


def _keep_top_per_row(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, k: int,
                      num_rows: int, num_cols: int):
  """Entries among the k largest values of their row, ties to the lower column.

  `rows` are local row ids in [0, num_rows), `vals` > 0. Only rows with more than k entries
  are sorted, by one packed uint64 key (row, value descending, column): positive float32 values
  order like their bit patterns, so the key orders exactly as (row, -value, column)."""
  counts = np.bincount(rows, minlength=num_rows)
  big = counts[rows] > k
  if not big.any():
    return rows, cols, vals
  col_bits = max(1, int(num_cols - 1).bit_length())
  row_bits = max(1, int(num_rows - 1).bit_length())
  if row_bits + 32 + col_bits > 64:
    raise ValueError(f"block of {num_rows} rows too large for {num_cols} columns")
  r, c, v = rows[big], cols[big], vals[big]
  inv_v = np.uint64(0xFFFFFFFF) - v.astype(np.float32).view(np.uint32).astype(np.uint64)
  key = ((r.astype(np.uint64) << np.uint64(32 + col_bits)) | (inv_v << np.uint64(col_bits))
         | c.astype(np.uint64))
  key.sort()
  r = (key >> np.uint64(32 + col_bits)).astype(rows.dtype)
  starts = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=num_rows))])
  keep = np.arange(len(key)) - starts[r] < k
  key = key[keep]
  r = r[keep]
  c = (key & np.uint64((1 << col_bits) - 1)).astype(cols.dtype)
  v = (np.uint64(0xFFFFFFFF) - ((key >> np.uint64(col_bits)) & np.uint64(0xFFFFFFFF))
       ).astype(np.uint32).view(np.float32)
  small = ~big
  return (np.concatenate([rows[small], r]), np.concatenate([cols[small], c]),
          np.concatenate([vals[small].astype(np.float32), v]))


def _top_k_dense(block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Positive entries among the k largest of every row of a dense block (ties: lower
  column, `lax.top_k`'s rule); rows padded to a power of two so few shapes compile."""
  rows = block.shape[0]
  padded = 1 << max(0, (rows - 1).bit_length())
  vals, idx = jax.device_get(_lax_top_k(jnp.asarray(pad_rows(block, padded, 0.0)),
                                        min(k, block.shape[1])))
  vals, idx = vals[:rows], idx[:rows]
  r, j = np.nonzero(vals > 0)
  return r.astype(np.int32), idx[r, j].astype(np.int32), vals[r, j]


def _item_blocks(x: sp.csr_matrix, xt: sp.csr_matrix, block_items: int,
                 max_block_entries: int) -> list[tuple[int, int]]:
  """Consecutive item ranges whose co-occurrence rows hold at most `max_block_entries`
  entries (bounded above by sum over the range of min(sum of its users' lengths, N)) and at
  most `block_items` items; a range holds at least one item."""
  n = x.shape[1]
  user_len = np.diff(x.indptr).astype(np.int64)
  # Per item: sum of its users' lengths (= products its co-occurrence row costs), capped at N.
  work = np.minimum(np.rint(xt @ user_len.astype(np.float64)).astype(np.int64), n)
  blocks, a = [], 0
  csum = np.concatenate([[0], np.cumsum(work)])
  while a < n:
    b = int(np.searchsorted(csum, csum[a] + max_block_entries, side="right")) - 1
    b = max(a + 1, min(b, a + block_items, n))
    blocks.append((a, b))
    a = b
  return blocks


def item_similarity(x: sp.spmatrix, *, include_self: bool = False, num_neighbors: int = 0,
                    block_items: int = 4096, max_block_entries: int = 1 << 25,
                    dense_topk: bool | None = None) -> tuple[sp.csr_matrix, np.ndarray]:
  """Cosine similarity between the columns of a binary user-item matrix.

  Args:
    x: 0/1 sparse [num_rows, N].
    include_self: put 1 on the diagonal of every item with at least one row (else 0).
    num_neighbors: keep the k largest entries per row (0 = all non-zero ones).
    block_items: at most this many items (rows of the result) per sparse product.
    max_block_entries: bound on the co-occurrence entries of one block (memory).
    dense_topk: how `num_neighbors` selects per block: densify the block and take
      `lax.top_k` (fast when the block is dense), or sort the block's entries by a packed key
      (cost proportional to its entries); None picks dense when at least 1/16 of the block is
      non-zero and the dense block is at most 4 x `max_block_entries`. Same result either way.
  Returns:
    (similarity CSR float32[N, N], popularity int64[N] = column sums of x).
  """
  x = sp.csr_matrix(x, dtype=np.float32)
  x.sum_duplicates()
  n = x.shape[1]
  pop = np.asarray(x.sum(axis=0)).ravel().astype(np.int64)
  inv_norm = np.where(pop > 0, 1.0 / np.sqrt(np.maximum(pop, 1)), 0.0).astype(np.float32)
  xt = x.T.tocsr()  # [N, num_rows]
  parts_r, parts_c, parts_v = [], [], []
  k = int(num_neighbors) if num_neighbors and num_neighbors > 0 else 0
  if k:  # the packed sort key needs row_bits + col_bits <= 32
    block_items = min(block_items, 1 << max(0, 32 - max(1, (n - 1).bit_length())))
  for a, b in _item_blocks(x, xt, max(1, int(block_items)), max(1, int(max_block_entries))):
    co = (xt[a:b] @ x).tocsr()  # [b - a, N] co-occurrence counts (exact in float32)
    r = np.repeat(np.arange(b - a, dtype=np.int32), np.diff(co.indptr))
    c = co.indices.astype(np.int32, copy=False)
    v = co.data.astype(np.float32, copy=False)
    del co
    v *= inv_norm[r + a] * inv_norm[c]  # the product of the two norms is symmetric in (i, j)
    diag = c == r + a  # present exactly for the items with pop > 0
    if include_self:
      v[diag] = 1.0
    else:
      keep = ~diag
      r, c, v = r[keep], c[keep], v[keep]
    use_dense = dense_topk
    if use_dense is None:
      use_dense = len(v) * 16 >= (b - a) * n and (b - a) * n <= 4 * max_block_entries
    if k and use_dense:
      block = np.zeros((b - a, n), np.float32)  # dense block: one lax.top_k
      block[r, c] = v
      r, c, v = _top_k_dense(block, k)
      del block
    elif k:
      r, c, v = _keep_top_per_row(r, c, v, k, b - a, n)
    parts_r.append(r + a)
    parts_c.append(c)
    parts_v.append(v)
  r = np.concatenate(parts_r) if parts_r else np.zeros(0, np.int32)
  c = np.concatenate(parts_c) if parts_c else np.zeros(0, np.int32)
  v = np.concatenate(parts_v) if parts_v else np.zeros(0, np.float32)
  sim = sp.csr_matrix((v, (r, c)), shape=(n, n), dtype=np.float32)
  sim.sort_indices()
  return sim, pop


def fit(ds, *, samples: np.ndarray | None = None, include_eval_histories: bool = False,
        include_self: bool = False, num_neighbors: int = 0, block_items: int = 4096,
        max_block_entries: int = 1 << 25) -> ItemCF:
  """Builds the item-item cosine similarity from the dataset (see the module docstring).

  `samples` (indices of training samples, e.g. `preprocess.training_samples`): count only
  their targets, the interactions the learned methods of a run train on; None: every
  training user's whole sequence.
  """
  t0 = time.perf_counter()
  x = user_item_matrix(ds, include_eval_histories=include_eval_histories, samples=samples)
  sim, pop = item_similarity(x, include_self=include_self, num_neighbors=num_neighbors,
                             block_items=block_items, max_block_entries=max_block_entries)
  settings = {"include_eval_histories": bool(include_eval_histories),
              "include_self": bool(include_self), "num_neighbors": int(num_neighbors),
              "block_items": int(block_items), "max_block_entries": int(max_block_entries),
              "similarity": "cosine",
              "training_interactions": "all" if samples is None else "sample targets",
              "rows": int(np.count_nonzero(np.diff(x.indptr))), "matrix_nnz": int(x.nnz),
              "similarity_nnz": int(sim.nnz), "fit_seconds": time.perf_counter() - t0}
  return ItemCF(similarity=sim, popularity=pop, settings=settings)


def history_matrix(eval_set, num_items: int, *, history: str = "full") -> sp.csr_matrix:
  """Binary CSR [U, N] of each evaluation user's distinct history items."""
  if history == "full":
    counts = np.diff(eval_set.full_history_offsets)
    rows = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    cols = np.asarray(eval_set.full_history_items, np.int64)
  elif history == "window":
    h = np.asarray(eval_set.history)
    rows, pos = np.nonzero(h >= 0)
    cols = h[rows, pos].astype(np.int64)
  else:
    raise ValueError(f"history must be 'full' or 'window', got {history!r}")
  return _binary_csr(rows, cols, (eval_set.num_users, num_items))


def score_users(model: ItemCF, hist: sp.csr_matrix) -> sp.csr_matrix:
  """Scores ``hist @ similarity``: user u's score of j = sum over u's items i of sim(i, j)."""
  return (hist @ model.similarity).tocsr()


def retrieve(model: ItemCF, eval_set, *, topk: int, history: str = "full",
             exclude_history: bool = False, max_block_elements: int = 1 << 25) -> np.ndarray:
  """Exact top-K items per evaluation user (ties: popularity, then id). int32[U, topk]."""
  n = model.num_items
  hist = history_matrix(eval_set, n, history=history)
  order = model.tie_order()
  num_users = hist.shape[0]
  rows_per_block = max(1, min(num_users, max_block_elements // max(n, 1)))
  out = []
  for lo in range(0, num_users, rows_per_block):
    h = hist[lo:lo + rows_per_block]
    dense = np.asarray(score_users(model, h).toarray(), np.float32)
    if exclude_history:
      dense[h.nonzero()] = -np.inf
    out.append(topk_rows(dense, topk, column_order=order,
                         rows_per_call=min(256, rows_per_block)))
  if not out:
    return np.zeros((0, topk), np.int32)
  return np.concatenate(out).astype(np.int32)
