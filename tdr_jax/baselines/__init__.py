"""Brute-force comparison baselines of the TDR paper (sec. 8.2): Item-CF, YouTubeDNN and DIN.

Every baseline module has `fit(ds, **options) -> model` and
`retrieve(model, eval_set, *, topk) -> int32[U, K]`; `run_baseline` runs one by name with the
experiment's shared settings and returns what a results row needs.

* `itemcf`: item-item cosine similarity over the binary user-item matrix of the training
  interactions the learned methods use (the targets of the run's training samples); a user's
  score of an item is the sum of its similarities to the distinct items of the visible
  history (the last L, as the learned methods see); exact top-K (history items kept in the
  ranking; ties by popularity).
* `youtube_dnn`: two-tower model (mean-pooled history -> MLP [128, 64, 24]; item embeddings
  of size 24), sampled softmax with logQ over 1000 uniform negatives shared by the batch;
  exact inner-product top-K.
* `din`: the project's DIN scorer trained on items (leaves of a container tree) with sampled
  softmax + logQ over uniform per-sample negatives; exact top-K by scoring every item.

See each module's docstring for the details and the choices made.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

import numpy as np

from tdr_jax.baselines import din_brute, itemcf, youtube_dnn
from tdr_jax.data.preprocess import training_samples

__all__ = ["BASELINES", "LABELS", "run_baseline", "din_brute", "itemcf", "youtube_dnn"]

BASELINES = ("itemcf", "youtube_dnn", "din")
LABELS = {"itemcf": "Item-CF", "youtube_dnn": "YouTubeDNN", "din": "DIN"}
_ALIASES = {"item_cf": "itemcf", "youtubednn": "youtube_dnn", "din_brute": "din"}

# Options each baseline accepts in addition to the shared arguments of `run_baseline`.
_FIT_OPTIONS = {
    "itemcf": ("include_eval_histories", "include_self", "num_neighbors", "block_items",
               "max_block_entries"),
    "youtube_dnn": ("learning_rate", "decay_rate", "embed_dim", "hidden", "num_negatives",
                    "tie_embeddings", "checkpoint_every", "log_every", "verbose"),
    "din": ("learning_rate", "decay_rate", "windows", "embed_dim", "attention_hidden",
            "mlp_hidden", "num_negatives", "checkpoint_every", "log_every", "verbose",
            "item_vectors"),
}
_RETRIEVE_OPTIONS = {
    "itemcf": ("history", "exclude_history"),
    "youtube_dnn": ("batch_size_eval", "chunk_size"),
    "din": ("batch_size_eval", "max_elements"),
}


def _jsonable(v):
  if isinstance(v, dict):
    return {str(k): _jsonable(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_jsonable(x) for x in v]
  if isinstance(v, np.generic):
    return v.item()
  return v


def run_baseline(name: str, ds, ev, *, topk: int | Sequence[int], seed: int = 0,
                 history_len: int = 69, epochs: float = 1.0, batch_size: int = 256,
                 max_train_samples: int = 0, workdir: str | None = None, **options
                 ) -> tuple[np.ndarray, float, dict]:
  """Fits baseline `name` on `ds` and retrieves for the users of `ev`.

  Args:
    name: "itemcf", "youtube_dnn" or "din" (aliases: item_cf, youtubednn, din_brute).
    ds: the `Dataset` (training samples / training users' sequences).
    ev: the `EvalSet` to retrieve for; `ev.history` must have `history_len` columns.
    topk: K, or a sequence of cut-offs (their maximum is retrieved).
    seed, history_len, epochs, batch_size, max_train_samples: shared run settings (the
      training-loop ones are ignored by Item-CF, which has no training loop).
    workdir: checkpoints of the trained baselines go to `<workdir>/<name>/checkpoints`; a
      rerun with the same settings resumes (or, when finished, just restores) from there.
    **options: baseline-specific fit options (see `_FIT_OPTIONS`) and retrieval options
      (`batch_size_eval` for the neural ones, `history`/`exclude_history` for Item-CF).
  Returns:
    (retrieved int32[U, K], train_seconds, settings) -- `settings` is JSON-able and lists the
    options used, the training steps, the final loss and the retrieval time.
  """
  key = _ALIASES.get(name, name)
  if key not in BASELINES:
    raise ValueError(f"unknown baseline {name!r}; choose from {list(BASELINES)}")
  kmax = int(max(topk)) if isinstance(topk, (list, tuple)) else int(topk)
  unknown = set(options) - set(_FIT_OPTIONS[key]) - set(_RETRIEVE_OPTIONS[key])
  if unknown:
    raise TypeError(f"{key}: unknown option(s) {sorted(unknown)}; accepted: "
                    f"{sorted(_FIT_OPTIONS[key] + _RETRIEVE_OPTIONS[key])}")
  fit_opts = {k: v for k, v in options.items() if k in _FIT_OPTIONS[key]}
  ret_opts = {k: v for k, v in options.items() if k in _RETRIEVE_OPTIONS[key]}
  if "batch_size_eval" in ret_opts:
    ret_opts["batch_size"] = ret_opts.pop("batch_size_eval")
  if np.asarray(ev.history).shape[1] != history_len:
    raise ValueError(f"eval histories have {np.asarray(ev.history).shape[1]} columns, "
                     f"history_len is {history_len}")
  sub = os.path.join(workdir, key) if workdir else None
  settings: dict = {"baseline": key}

  t0 = time.perf_counter()
  if key == "itemcf":
    # The same training interactions as every learned method of the run: the targets of its
    # (possibly subsampled) training samples; the same visible history (the last L items).
    samples = training_samples(ds, max_train_samples=max_train_samples, seed=seed)
    ret_opts.setdefault("history", "window")
    model = itemcf.fit(ds, samples=samples, **fit_opts)
    train_seconds = time.perf_counter() - t0
    settings.update(model.settings)
    t1 = time.perf_counter()
    retrieved = itemcf.retrieve(model, ev, topk=kmax, **ret_opts)
    settings.update({"history": ret_opts["history"], "max_train_samples": int(max_train_samples),
                     "history_len": int(history_len),
                     "exclude_history": bool(ret_opts.get("exclude_history", False))})
  else:
    module = youtube_dnn if key == "youtube_dnn" else din_brute
    model = module.fit(ds, seed=seed, epochs=epochs, batch_size=batch_size,
                       history_len=history_len, max_train_samples=max_train_samples,
                       workdir=sub, **fit_opts)
    # Training time of this call (compilation included), not the restore or the setup.
    train_seconds = float(model.info["seconds"])
    settings.update(model.settings)
    losses = model.info["losses"]
    settings.update({"epochs": float(epochs), "batch_size": int(batch_size),
                     "history_len": int(history_len),
                     "max_train_samples": int(max_train_samples), "seed": int(seed),
                     "steps": model.info["steps"], "steps_run": model.info["steps_run"],
                     "resumed_from": model.info["resumed_from"],
                     "final_loss": float(np.mean(losses[-10:])) if len(losses) else None})
    t1 = time.perf_counter()
    retrieved = module.retrieve(model, ev, topk=kmax, **ret_opts)
  settings["retrieve_seconds"] = time.perf_counter() - t1
  return np.asarray(retrieved, np.int32), float(train_seconds), _jsonable(settings)
