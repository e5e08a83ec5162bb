"""Named datasets: loader + preprocessing + an on-disk cache.

``load_dataset(name, data_dir, **settings)`` reads the raw files with the
loader of ``name``, runs :func:`~tdr_jax.data.preprocess.preprocess` and
stores the resulting arrays in ``data_dir/cache/<name>-<key>.npz`` with a
``.json`` file of metadata beside it.  The key is a hash of the dataset name,
the loader options, the preprocessing settings, ``skip_bad_rows`` and the
size + modification time of every raw file read, so editing a raw file or a
setting misses the cache; the next call with the same inputs loads the
``.npz`` instead of re-reading the raw data.  Both files are written to a
temporary name and renamed, so an interrupted run never leaves a half-written
cache entry (the ``.json`` is renamed last and marks the entry complete).

Keyword settings are routed by name: preprocessing settings
(``min_user_interactions``, ``split``, ``seed``) go to ``preprocess``, the
loader's options (see ``LOADERS[name].defaults``) to the loader, and, for
datasets with a ``prepare`` step (``"synthetic"``), everything else to it.

Loader options given as ``"key=value"`` strings are converted by
:func:`parse_loader_options`.  The returned dataset's ``source`` holds the
loader's report (``load_report``: rows read, skipped with examples, filtered),
also on a cache hit (``cache_file`` then names the entry); :func:`summary`
gives it as a JSON-able dict and :func:`describe` as a few lines.  Expected
bad input (unknown dataset, missing file, malformed row, nothing left after
filtering) raises :class:`tdr_jax.errors.InputError` subclasses.

The ``"synthetic"`` dataset is provided by ``tdr_jax.data.synthetic`` (imported
lazily).  If it defines ``prepare(data_dir, **options) -> dict | None``, that
is called: it writes ``interactions.csv`` (header
``user,item[,timestamp][,category]``) -- leaving an identical existing file
untouched so that the cache stays valid -- and may return extra options for
the ``csv`` loader (e.g. ``{"path": ...}``).  Otherwise
``materialize(data_dir, SyntheticConfig(**options))`` is used and the csv in
the folder it returns is read; the generator seed is then given as
``synthetic_seed`` because ``seed`` is the user-split seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from absl import logging as _log

from tdr_jax.data.loaders import LOADERS, load_interactions
from tdr_jax.data.preprocess import UNKNOWN_CATEGORY, Dataset, preprocess, preprocess_settings
from tdr_jax.errors import InputError, MissingFileError, UnknownNameError

__all__ = ["DATASETS", "DatasetSpec", "load_dataset", "cache_key", "save_dataset", "load_cached",
           "parse_loader_options", "summary", "describe", "check_usable"]

CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  name: str
  loader: str
  description: str
  prepare: Callable[..., Any] | None = None


def _prepare_synthetic(data_dir, **options):
  try:
    mod = importlib.import_module("tdr_jax.data.synthetic")
  except ModuleNotFoundError as e:
    if e.name not in ("tdr_jax.data.synthetic",):
      raise
    raise ModuleNotFoundError(
        "dataset 'synthetic' needs the module tdr_jax/data/synthetic.py providing "
        "prepare(data_dir, **options), which is not installed"
    ) from e
  prepare = getattr(mod, "prepare", None)
  if prepare is not None:
    return prepare(data_dir, **options)
  if hasattr(mod, "materialize") and hasattr(mod, "SyntheticConfig"):
    # materialize(data_dir, SyntheticConfig) -> (folder holding interactions.csv, world);
    # the generator's seed is passed as synthetic_seed (``seed`` is the split seed)
    options = dict(options)
    if "synthetic_seed" in options:
      options["seed"] = options.pop("synthetic_seed")
    folder, _ = mod.materialize(os.fspath(data_dir), mod.SyntheticConfig(**options))
    return {"path": os.path.join(folder, "interactions.csv")}
  raise AttributeError(
      "tdr_jax.data.synthetic must define prepare(data_dir, **options) or "
      "materialize(data_dir, SyntheticConfig) writing interactions.csv"
  )


DATASETS: dict[str, DatasetSpec] = {
    name: DatasetSpec(name, name, loader.description) for name, loader in LOADERS.items()
}
DATASETS["synthetic"] = DatasetSpec(
    "synthetic",
    "csv",
    "synthetic interactions written by tdr_jax.data.synthetic, read with the csv loader",
    _prepare_synthetic,
)


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, Path):
    return os.fspath(x)
  return x


def _file_fingerprint(data_dir: Path, files) -> list:
  out = []
  for f in files:
    f = Path(f)
    st = f.stat()
    try:
      name = os.fspath(f.resolve().relative_to(data_dir.resolve()))
    except ValueError:
      name = os.fspath(f.resolve())
    out.append([name, st.st_size, st.st_mtime_ns])
  return out


def cache_key(name: str, data_dir, loader_options: dict, settings: dict, skip_bad_rows: bool,
              files) -> tuple[str, dict]:
  material = {
      "version": CACHE_VERSION,
      "dataset": name,
      "loader_options": _jsonable(loader_options),
      "preprocess": _jsonable(settings),
      "skip_bad_rows": bool(skip_bad_rows),
      "files": _file_fingerprint(Path(data_dir), files),
  }
  blob = json.dumps(material, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(blob.encode()).hexdigest()[:16], material


def _atomic_write(path: Path, write: Callable) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise


def save_dataset(ds: Dataset, npz_path, meta: dict | None = None) -> None:
  """Write ``ds`` as ``npz_path`` (+ ``.json`` beside it), atomically."""
  npz_path = Path(npz_path)
  arrays = ds.arrays()
  scalars = {k: np.int64(getattr(ds, k)) for k in ("num_users", "num_items", "num_categories")}
  _atomic_write(npz_path, lambda f: np.savez(f, **arrays, **scalars))
  info = {
      "settings": _jsonable(ds.settings),
      "source": _jsonable(ds.source),
      "stats": _jsonable(ds.stats()),
  }
  if meta:
    info.update(_jsonable(meta))
  blob = json.dumps(info, indent=1, sort_keys=True).encode()
  _atomic_write(npz_path.with_suffix(".json"), lambda f: f.write(blob))


def load_cached(npz_path) -> Dataset:
  npz_path = Path(npz_path)
  info = json.loads(npz_path.with_suffix(".json").read_text())
  with np.load(npz_path, allow_pickle=False) as z:
    arrays = {k: z[k] for k in Dataset.ARRAY_FIELDS}
    scalars = {k: int(z[k]) for k in ("num_users", "num_items", "num_categories")}
  return Dataset(**scalars, **arrays, settings=info.get("settings", {}), source=info.get("source", {}))


def _route(spec: DatasetSpec, settings: dict) -> tuple[dict, dict, dict]:
  loader_defaults = LOADERS[spec.loader].defaults
  pre_keys = set(preprocess_settings())
  pre, load, extra = {}, {}, {}
  for k, v in settings.items():
    if k in pre_keys:
      pre[k] = v
    elif k in loader_defaults:
      load[k] = v
    else:
      extra[k] = v
  if extra and spec.prepare is None:
    raise TypeError(
        f"{spec.name}: unknown setting(s) {sorted(extra)}; loader options: "
        f"{sorted(loader_defaults)}; preprocessing settings: {sorted(pre_keys)}"
    )
  return pre, load, extra


def _spec(name: str) -> DatasetSpec:
  if name not in DATASETS:
    raise UnknownNameError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
  return DATASETS[name]


def parse_loader_options(name: str, pairs, *, flag: str = "loader option") -> dict:
  """The options of dataset ``name``'s loader from ``"key=value"`` strings
  (see :meth:`~tdr_jax.data.loaders.Loader.parse_options`).  Raises
  :class:`~tdr_jax.errors.InputError` for an unknown dataset, key or value."""
  return LOADERS[_spec(name).loader].parse_options(pairs, flag=flag)


def load_dataset(name: str, data_dir, *, cache: bool = True, cache_dir=None,
                 skip_bad_rows: bool = False, **settings: Any) -> Dataset:
  """Load dataset ``name`` from ``data_dir`` (raw files as distributed),
  preprocess it and cache the result in ``cache_dir`` (default
  ``data_dir/cache``); see the module docstring."""
  spec = _spec(name)
  data_dir = Path(data_dir)
  pre, load_opts, extra = _route(spec, settings)
  if spec.prepare is not None:
    data_dir.mkdir(parents=True, exist_ok=True)
    more = spec.prepare(data_dir, **extra) or {}
    load_opts = {**load_opts, **more}
  loader = LOADERS[spec.loader]
  load_opts = loader.options(**load_opts)
  pre = preprocess_settings(**pre)
  try:
    files = loader.files(data_dir, **load_opts)
  except FileNotFoundError as e:
    if data_dir.is_dir():
      raise
    raise MissingFileError(f"{e} (the folder {data_dir} does not exist)") from None
  key, material = cache_key(name, data_dir, {**load_opts, **({"prepare": extra} if extra else {})},
                            pre, skip_bad_rows, files)
  npz_path = Path(cache_dir or data_dir / "cache") / f"{name}-{key}.npz"
  if cache and npz_path.is_file() and npz_path.with_suffix(".json").is_file():
    t0 = time.perf_counter()
    ds = load_cached(npz_path)
    ds.source["cache_file"] = os.fspath(npz_path)
    _log.info("%s: loaded cached dataset %s (%.2fs)", name, npz_path, time.perf_counter() - t0)
    return ds
  t0 = time.perf_counter()
  table, report = load_interactions(spec.loader, data_dir, skip_bad_rows=skip_bad_rows, **load_opts)
  t_load = time.perf_counter() - t0
  _log.info("%s: read %s in %.2fs", name, report.summary(), t_load)
  for ex in report.skipped_examples:
    _log.warning("%s: skipped %s", name, ex)
  ds = preprocess(table, **pre)
  del table
  ds.source.update(
      {
          "dataset": name,
          "data_dir": os.fspath(data_dir),
          "loader": spec.loader,
          "loader_options": _jsonable(load_opts),
          "load_report": _jsonable(report.to_dict()),
          "load_seconds": round(t_load, 3),
          "cache_key": key,
      }
  )
  if extra:
    ds.source["prepare_options"] = _jsonable(extra)
  _log.info("%s: preprocessed %s in %.2fs", name, ds.stats(), ds.source["preprocess_seconds"])
  if cache:
    t1 = time.perf_counter()
    save_dataset(ds, npz_path, {"key": key, "key_material": material})
    _log.info("%s: wrote cache %s (%.2fs)", name, npz_path, time.perf_counter() - t1)
  return ds


# ---------------------------------------------------------------------------
# what was read


def summary(ds: Dataset) -> dict:
  """JSON-able account of how ``ds`` was read: the loader's report (rows
  read, skipped with examples, filtered on purpose), the user filter, the
  sizes after filtering and the categories."""
  src = ds.source
  rep = src.get("load_report", {})
  names = [str(x) for x in ds.category_names]
  unknown = (
      int(np.sum(ds.item_category == names.index(UNKNOWN_CATEGORY)))
      if UNKNOWN_CATEGORY in names else 0
  )
  out = {
      "dataset": src.get("dataset"),
      "loader": src.get("loader"),
      "loader_options": src.get("loader_options", {}),
      "files": rep.get("files", []),
      "rows_read": rep.get("rows_read"),
      "rows_skipped": rep.get("rows_skipped", 0),
      "skipped_examples": rep.get("skipped_examples", []),
      "rows_filtered": rep.get("rows_filtered", {}),
      "rows_loaded": rep.get("rows_out"),
      "notes": rep.get("notes", []),
      "min_user_interactions": ds.settings.get("min_user_interactions"),
      "users_before_filter": src.get("users_before_filter"),
      "rows_dropped_by_user_filter": src.get("rows_dropped_by_user_filter"),
      **ds.stats(),
      "distinct_categories": ds.num_categories - (1 if unknown else 0),
      "items_without_category": unknown,
      "cache_file": src.get("cache_file"),
  }
  return _jsonable(out)


def check_usable(ds: Dataset) -> None:
  """Raises :class:`~tdr_jax.errors.InputError` unless ``ds`` has a test
  user and a training sample (a train-evaluate run needs both)."""
  st = ds.stats()
  if st["test_users"] < 1 or st["samples"] < 1:
    raise InputError(
        f"too little data left after filtering: {st['users']} users with >= "
        f"{ds.settings.get('min_user_interactions')} interactions give {st['test_users']} "
        f"test users and {st['samples']} training samples (split "
        f"{ds.settings.get('split')}); a run needs at least one of each"
    )


def describe(ds: Dataset, name: str | None = None, max_examples: int = 3) -> str:
  """A few lines on what was read (see :func:`summary`), for the log of a run."""
  s = summary(ds)
  name = name or s["dataset"] or "?"
  cached = f" (cached: {s['cache_file']})" if s["cache_file"] else ""
  if s["rows_read"] is None:
    lines = [f"dataset {name}: no load report"]
  else:
    lines = [f"dataset {name}: read {s['rows_read']} rows from {len(s['files'])} file(s) "
             f"with the {s['loader']} loader, kept {s['rows_loaded']}{cached}"]
  if s["rows_skipped"]:
    lines.append(f"  skipped {s['rows_skipped']} malformed row(s), e.g.:")
    lines += [f"    {ex}" for ex in s["skipped_examples"][:max_examples]]
  else:
    lines.append("  skipped 0 malformed rows")
  for reason, n in s["rows_filtered"].items():
    lines.append(f"  filtered on purpose: {n} row(s) ({reason})")
  lines.append(f"  user filter (< {s['min_user_interactions']} interactions): removed "
               f"{s['users_before_filter'] - s['users']} of {s['users_before_filter']} users, "
               f"{s['rows_dropped_by_user_filter']} rows")
  lines.append(f"  {s['users']} users, {s['items']} items, {s['interactions']} interactions, "
               f"{s['samples']} training samples ({s['train_users']} train / {s['valid_users']} "
               f"valid / {s['test_users']} test users)")
  if s["distinct_categories"]:
    lines.append(f"  categories: {s['distinct_categories']} distinct; "
                 f"{s['items_without_category']} item(s) without one")
  else:
    lines.append("  categories: none (every item in one unknown category)")
  lines += [f"  note: {n}" for n in s["notes"]]
  return "\n".join(lines)
