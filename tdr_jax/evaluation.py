"""Evaluation: the test users, the generator's exact eta, a results row, and retrieval for all
users in fixed-size batches split over the device mesh (beam search; forest reranking).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np
from jax.sharding import Mesh

from tdr_jax import beam_search as bs
from tdr_jax import forest as forest_lib
from tdr_jax import metrics as metrics_lib
from tdr_jax import parallel
from tdr_jax.config import Config
from tdr_jax.data import synthetic
from tdr_jax.data.preprocess import eval_split


def evaluation_set(cfg: Config, ds):
  ev = eval_split(ds, "test", cfg.data.history_len)
  if cfg.eval.max_eval_users and cfg.eval.max_eval_users < len(ev.users):
    n = cfg.eval.max_eval_users
    lab_end, hist_end = ev.label_offsets[n], ev.full_history_offsets[n]
    ev = dataclasses.replace(
        ev, users=ev.users[:n], history=ev.history[:n], label_offsets=ev.label_offsets[:n + 1],
        label_items=ev.label_items[:lab_end], full_history_offsets=ev.full_history_offsets[:n + 1],
        full_history_items=ev.full_history_items[:hist_end])
  return ev


def synthetic_eta(world, ds, ev) -> np.ndarray:
  hist = [ev.full_history_items[ev.full_history_offsets[i]:ev.full_history_offsets[i + 1]]
          for i in range(len(ev.users))]
  horizons = [int(ds.seq_offsets[u + 1] - ds.seq_offsets[u]) - len(h)
              for u, h in zip(ev.users, hist)]
  return synthetic.dataset_eta(world, ds.item_raw_ids, hist, horizons)


def result_row(method: str, retrieved: np.ndarray, ev, ds, cfg: Config, eta, *,
               train_seconds: float, settings: dict) -> dict:
  row = {"method": method}
  row.update(metrics_lib.retrieval_metrics(retrieved, ev.label_offsets, ev.label_items,
                                           num_items=ds.num_items, ks=cfg.eval.topk))
  if eta is not None:
    row.update(metrics_lib.oracle_ratio(retrieved, eta, ks=cfg.eval.topk))
  row["train_seconds"] = float(train_seconds)
  row["settings"] = settings
  return row


def retrieve(score_fn, params, tree, history: np.ndarray, *, beam_size: int, topk: int,
             batch_size: int, mesh: Mesh, path_scores: bool = False) -> np.ndarray:
  """Beam search for all users in fixed-size batches (one compilation). int32[U, topk].

  `path_scores`: rank nodes by the sum of log-sigmoids along their path (PLT)."""
  params, tree_dev = parallel.replicate((params, tree), mesh)
  return parallel.map_user_batches(
      lambda h: bs.beam_search(score_fn, params, tree_dev, h, beam_size=beam_size,
                               topk=topk, path_scores=path_scores)[0], [history],
      batch_size=batch_size, mesh=mesh)


def retrieve_at_beams(score_fn, params, tree, ev, ds, cfg: Config, eta, *, label: str,
                      beams: Sequence[int], mesh: Mesh, path_scores: bool = False
                      ) -> list[dict]:
  """One trained (tree, params) retrieved for the test users `ev` at each beam size: a result
  row per beam (`label`, `beam_size`, `queries_per_second`, metrics at cfg.eval.topk).

  Each beam's search runs twice: the first call compiles it, the second is timed, so
  `queries_per_second` = test users / seconds of a compiled search (batches of
  cfg.eval.eval_batch_size users over the mesh). Its retrieved items are the scored ones."""
  kmax = max(cfg.eval.topk)
  rows = []
  for beam in beams:
    def search():
      return retrieve(score_fn, params, tree, ev.history, beam_size=beam, topk=kmax,
                      batch_size=cfg.eval.eval_batch_size, mesh=mesh, path_scores=path_scores)
    t0 = time.perf_counter()
    search()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    retrieved = search()
    seconds = time.perf_counter() - t0
    row = result_row(label, retrieved, ev, ds, cfg, eta, train_seconds=0.0,
                     settings={"beam_size": int(beam), "search_seconds": seconds,
                               "first_call_seconds": first})
    row["beam_size"] = int(beam)
    row["queries_per_second"] = len(ev.users) / max(seconds, 1e-9)
    rows.append(row)
  return rows


def rerank_all(score_fn, params, tree, history: np.ndarray, candidates: np.ndarray, *,
               topk: int, batch_size: int, mesh: Mesh) -> np.ndarray:
  """Forest reranking in fixed-size, data-parallel batches. int32[U, topk]."""
  params, tree_dev = parallel.replicate((params, tree), mesh)
  return parallel.map_user_batches(
      lambda h, c: forest_lib.rerank(score_fn, params, tree_dev, h, c, topk=topk)[0],
      [history, candidates], batch_size=batch_size, mesh=mesh)

