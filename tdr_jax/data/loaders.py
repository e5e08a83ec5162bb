"""Loaders for the raw interaction logs used in the experiments.

Each loader reads the files of one public dataset exactly as distributed
(after unpacking the archive; ``.gz`` copies of the text files are also
accepted) and returns one ``pyarrow.Table`` with the columns

* ``user``      string
* ``item``      string
* ``timestamp`` int64   (seconds, or another unit that orders events in time)
* ``category``  string, null where unknown

in file order, together with a :class:`LoadReport`.  Use
:func:`load_interactions` (or ``LOADERS[name]``).

Error handling: a missing file raises ``MissingFileError`` (a
``FileNotFoundError``) naming the path and the file expected there; a
malformed row raises :class:`DataFormatError` (``path:line: reason``) unless
``skip_bad_rows=True``, in which case it is skipped and counted in the
report; a bad option value raises ``InputError``.  All three are
:class:`tdr_jax.errors.InputError` (a ``ValueError``).  Rows removed on
purpose (non-click actions, low ratings, non-clicked impressions) are counted
in ``LoadReport.rows_filtered``.

Options given as strings (the command line's ``--loader_option key=value``)
are converted by :meth:`Loader.parse_options`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tdr_jax.data._read import (
    Col,
    DataFormatError,
    LoadReport,
    open_binary,
    parse_header,
    read_delimited,
    read_jsonl,
    read_multichar,
    to_numpy,
)
from tdr_jax.errors import InputError, MissingFileError, UnknownNameError

__all__ = [
    "DataFormatError",
    "LoadReport",
    "Loader",
    "LOADERS",
    "load_interactions",
    "INTERACTION_SCHEMA",
    "ML100K_GENRES",
]

INTERACTION_SCHEMA = pa.schema(
    [
        ("user", pa.string()),
        ("item", pa.string()),
        ("timestamp", pa.int64()),
        ("category", pa.string()),
    ]
)

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip

NO_GENRE = "(no genres listed)"


# ---------------------------------------------------------------------------
# helpers


def _find(data_dir, name: str) -> Path | None:
  """``data_dir/name`` or its ``.gz`` copy, whichever exists."""
  p = Path(data_dir) / name
  if p.is_file():
    return p
  gz = Path(str(p) + ".gz")
  if gz.is_file():
    return gz
  return None


def _require(data_dir, name: str, dataset: str, what: str) -> Path:
  p = _find(data_dir, name)
  if p is None:
    raise MissingFileError(
        f"{dataset}: expected {name} ({what}) at {Path(data_dir) / name}"
    )
  return p


def _to_str(col) -> pa.Array:
  """Any id column (int, string, dictionary) as a plain string array."""
  col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
  return col if pa.types.is_string(col.type) else pc.cast(col, pa.string())


def _lookup(keys, value_keys, values) -> pa.Array:
  """values[value_keys == key] for each key (first occurrence), null where absent."""
  keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
  value_keys = (
      value_keys.combine_chunks() if isinstance(value_keys, pa.ChunkedArray) else value_keys
  )
  values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
  # de-duplicate the lookup table keeping the first occurrence
  enc = pc.dictionary_encode(value_keys)
  codes = to_numpy(enc.indices).astype(np.int64)
  if len(codes):
    running = np.maximum.accumulate(codes)
    first = np.flatnonzero(np.r_[True, running[1:] > running[:-1]])
    uniq_keys = value_keys.take(pa.array(first))
    uniq_vals = values.take(pa.array(first))
  else:
    uniq_keys, uniq_vals = value_keys, values
  idx = pc.index_in(keys, value_set=uniq_keys)
  return uniq_vals.take(idx)


def _make_table(user, item, timestamp, category=None) -> pa.Table:
  user = _to_str(user)
  item = _to_str(item)
  ts = timestamp.combine_chunks() if isinstance(timestamp, pa.ChunkedArray) else timestamp
  if not isinstance(ts, (pa.Array,)):
    ts = pa.array(ts, pa.int64())
  ts = pc.cast(ts, pa.int64())
  n = len(user)
  if category is None:
    category = pa.nulls(n, pa.string())
  else:
    category = _to_str(category)
  return pa.Table.from_arrays([user, item, ts, category], schema=INTERACTION_SCHEMA)


def _filter(table: pa.Table, mask, report: LoadReport, reason: str) -> pa.Table:
  mask = mask.combine_chunks() if isinstance(mask, pa.ChunkedArray) else mask
  mask = pc.fill_null(mask, False)
  n_drop = len(mask) - pc.sum(mask).as_py() if len(mask) else 0
  report.filtered(reason, n_drop or 0)
  return table.filter(mask) if n_drop else table


def _decode_small_text(path) -> bytes:
  """Return a small metadata file as UTF-8 bytes, decoding latin-1 when
  the file is not valid UTF-8 (MovieLens 1M/100k)."""
  with open_binary(path) as f:
    raw = f.read()
  try:
    raw.decode("utf-8")
    return raw
  except UnicodeDecodeError:
    return raw.decode("latin-1").encode("utf-8")


# ---------------------------------------------------------------------------
# loader objects


_BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _convert(text: str, kind: str):
  """``text`` as ``kind``: bool, int, float, str, ``a|b`` (first that
  parses) or ``list[elem]`` (comma-separated, at least one value)."""
  if kind.startswith("list["):
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
      raise ValueError("needs at least one value")
    return tuple(_convert(p, kind[5:-1]) for p in parts)
  for k in kind.split("|"):
    try:
      if k == "bool":
        return _BOOL_WORDS[text.strip().lower()]
      if k in ("int", "float"):
        return {"int": int, "float": float}[k](text)
      if k == "str":
        return text
    except (KeyError, ValueError):
      pass
  raise ValueError(f"{text!r} is not {' or '.join(kind.split('|'))}"
                   + (" (true/false/yes/no/1/0)" if "bool" in kind else ""))


@dataclasses.dataclass(frozen=True)
class Loader:
  """A named loader: ``defaults`` lists its options; ``files`` tells which
  raw files a load with these options would read (used as cache key);
  ``load`` does the reading.  ``types`` gives an option's type where its
  default does not tell (see :meth:`option_type`), ``choices`` its accepted
  values (of each element, for a list)."""

  name: str
  description: str
  defaults: dict
  _files: Callable[..., list]
  _load: Callable[..., pa.Table]
  types: dict = dataclasses.field(default_factory=dict)
  choices: dict = dataclasses.field(default_factory=dict)

  def option_type(self, key: str) -> str:
    """bool, int, float, str, ``list[int]`` / ``list[str]`` (from a
    tuple or list default), or ``a|b``: the first that parses; a ``None``
    default without an entry in ``types`` is ``int|str``."""
    if key in self.types:
      return self.types[key]
    d = self.defaults[key]
    if isinstance(d, (list, tuple)):
      return f"list[{type(d[0]).__name__ if d else 'str'}]"
    if d is None:
      return "int|str"
    return type(d).__name__

  def describe_options(self) -> str:
    return ", ".join(f"{k}={repr(v) if isinstance(v, str) else self._show(v)} "
                     f"({self.option_type(k)})" for k, v in sorted(self.defaults.items()))

  @staticmethod
  def _show(v) -> str:
    return ",".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)

  def parse_options(self, pairs, *, flag: str = "loader option") -> dict:
    """Options from strings: ``pairs`` holds ``"key=value"`` strings or
    ``(key, value)`` pairs (a later key wins).  Each value is converted to
    :meth:`option_type` (bool: true/false/yes/no/1/0, case-insensitive;
    list: comma-separated); an option whose default is ``None`` also takes
    ``none`` (or an empty value) for ``None``.  Unknown keys, values that
    do not convert or are not among ``choices`` raise
    :class:`~tdr_jax.errors.InputError` naming ``flag``, the loader and
    the accepted keys with their defaults."""
    out = {}
    for pair in pairs:
      if isinstance(pair, str):
        key, eq, text = pair.partition("=")
        if not eq:
          raise InputError(f"{flag} {pair!r}: expected key=value; {self.name} loader "
                           f"options: {self.describe_options()}")
      else:
        key, text = pair
      key = key.strip()
      if key not in self.defaults:
        raise InputError(f"{flag} {key}: unknown option of the {self.name} loader; "
                         f"accepted (default, type): {self.describe_options()}")
      kind = self.option_type(key)
      try:
        if not isinstance(text, str):
          value = text
        elif self.defaults[key] is None and text.strip().lower() in ("", "none"):
          value = None
        else:
          value = _convert(text, kind)
      except ValueError as e:
        raise InputError(f"{flag} {key}={text}: {e} (the {self.name} loader's {key} is "
                         f"{kind}, default {self._show(self.defaults[key])})") from None
      allowed = self.choices.get(key)
      values = value if isinstance(value, tuple) else (value,)
      if allowed is not None and value is not None:
        bad = [v for v in values if v not in allowed]
        if bad:
          raise InputError(f"{flag} {key}={text}: the {self.name} loader's {key} "
                           f"takes {', '.join(map(str, allowed))}; got {self._show(bad)}")
      out[key] = value
    return out

  def options(self, **options) -> dict:
    unknown = sorted(set(options) - set(self.defaults))
    if unknown:
      raise TypeError(
          f"{self.name}: unknown loader option(s) {unknown}; "
          f"accepted: {sorted(self.defaults)}"
      )
    out = dict(self.defaults)
    out.update(options)
    return out

  def files(self, data_dir, **options) -> list[Path]:
    return self._files(Path(data_dir), **self.options(**options))

  def __call__(self, data_dir, *, skip_bad_rows: bool = False, **options):
    opts = self.options(**options)
    report = LoadReport(dataset=self.name)
    table = self._load(Path(data_dir), report, skip_bad_rows, **opts)
    report.rows_out = table.num_rows
    return table, report


# ---------------------------------------------------------------------------
# MovieLens


def _ml_variant(data_dir: Path, variant: str) -> str:
  if variant != "auto":
    if variant not in ("ml-100k", "dat", "csv"):
      raise InputError(f"movielens: variant must be auto, ml-100k, dat or csv, got {variant!r}")
    return variant
  if _find(data_dir, "u.data"):
    return "ml-100k"
  if _find(data_dir, "ratings.dat"):
    return "dat"
  if _find(data_dir, "ratings.csv"):
    return "csv"
  raise MissingFileError(
      f"movielens: expected u.data (ml-100k), ratings.dat (ml-1m / ml-10m) or ratings.csv "
      f"(ml-20m / ml-25m / ml-latest) in {data_dir}"
  )


def _ml_files(data_dir: Path, *, variant, genre, min_rating) -> list:
  v = _ml_variant(data_dir, variant)
  meta = genre != "none"
  if v == "ml-100k":
    files = [_require(data_dir, "u.data", "movielens", "ml-100k ratings")]
    if meta:
      files.append(_require(data_dir, "u.item", "movielens", "ml-100k movie list with genre flags"))
      g = _find(data_dir, "u.genre")
      if g:
        files.append(g)
    return files
  if v == "dat":
    files = [_require(data_dir, "ratings.dat", "movielens", "ml-1m / ml-10m ratings")]
    if meta:
      files.append(_require(data_dir, "movies.dat", "movielens", "ml-1m / ml-10m movie list"))
    return files
  files = [_require(data_dir, "ratings.csv", "movielens", "ml-20m / ml-25m / ml-latest ratings")]
  if meta:
    files.append(_require(data_dir, "movies.csv", "movielens", "ml-20m / ml-25m / ml-latest movie list"))
  return files


def _genre_pick(genres: pa.Array, genre: str) -> pa.Array:
  """From '|'-joined genre strings pick the category."""
  genres = pc.if_else(pc.equal(genres, NO_GENRE), pa.scalar(None, pa.string()), genres)
  genres = pc.if_else(pc.equal(genres, ""), pa.scalar(None, pa.string()), genres)
  if genre == "all":
    return genres
  return pc.list_element(pc.split_pattern(genres, "|"), 0) if len(genres) else genres


def _load_movielens(data_dir: Path, report: LoadReport, skip, *, variant, genre, min_rating):
  if genre not in ("first", "all", "none"):
    raise InputError(f"movielens: genre must be 'first', 'all' or 'none', got {genre!r}")
  files = _ml_files(data_dir, variant=variant, genre=genre, min_rating=min_rating)
  v = _ml_variant(data_dir, variant)
  rating_cols = [Col("user", "int"), Col("item", "int"), Col("rating", "float"), Col("timestamp", "int")]
  names = ["user", "item", "rating", "timestamp"]
  movie_ids = movie_cat = None
  if v == "ml-100k":
    report.variant = "ml-100k"
    r = read_delimited(files[0], rating_cols, names=names, delimiter="\t",
                       skip_bad_rows=skip, report=report, dataset="movielens")
    if genre != "none":
      genre_names = list(ML100K_GENRES)
      gfile = _find(data_dir, "u.genre")
      if gfile is not None:
        g = read_delimited(gfile, [Col("name", "str"), Col("index", "int")],
                           names=["name", "index"], delimiter="|", encoding="latin1",
                           skip_bad_rows=skip, report=report, dataset="movielens")
        idx = to_numpy(g["index"])
        nm = to_numpy(g["name"])
        genre_names = [None] * (int(idx.max()) + 1 if len(idx) else 0)
        for i, name in zip(idx, nm):  # tiny metadata file
          genre_names[int(i)] = str(name)
      n_g = len(genre_names)
      names_item = ["item", "title", "release", "video_release", "url"] + [f"g{k}" for k in range(n_g)]
      flag_cols = [Col(f"g{k}", "int") for k in range(n_g)]
      m = read_delimited(files[1], [Col("item", "int")] + flag_cols, names=names_item,
                         delimiter="|", encoding="latin1", skip_bad_rows=skip,
                         report=report, dataset="movielens")
      flags = np.stack([to_numpy(m[f"g{k}"]) for k in range(n_g)], axis=1) if len(m) else np.zeros((0, n_g))
      flags = flags != 0
      has = flags.any(axis=1)
      if genre == "first":
        first = flags.argmax(axis=1)
        labels = np.array(genre_names, dtype=object)[first]
      else:
        labels = np.array(
            ["|".join(genre_names[k] for k in np.flatnonzero(row)) for row in flags], dtype=object
        )
      labels = np.where(has, labels, None)
      movie_ids = m["item"]
      movie_cat = pa.array(labels.tolist() if len(labels) else [], pa.string())
  elif v == "dat":
    r = read_multichar(files[0], rating_cols, names=names, separator="::",
                       skip_bad_rows=skip, report=report)
    report.variant = "ml-1m/ml-10m"
    if genre != "none":
      m = read_multichar(files[1], [Col("item", "int"), Col("genres", "optstr")],
                         names=["item", "title", "genres"], separator="::",
                         data=_decode_small_text(files[1]), skip_bad_rows=skip, report=report)
      movie_ids, movie_cat = m["item"], _genre_pick(m["genres"].combine_chunks(), genre)
  else:
    report.variant = "ml-20m/ml-25m/ml-latest"
    csv_cols = [Col("userId", "int"), Col("movieId", "int"), Col("rating", "float"), Col("timestamp", "int")]
    r = read_delimited(files[0], csv_cols, header=True, delimiter=",", quoted=True,
                       skip_bad_rows=skip, report=report, dataset="movielens")
    r = r.rename_columns(names)
    if genre != "none":
      m = read_delimited(files[1], [Col("movieId", "int"), Col("genres", "optstr")], header=True,
                         delimiter=",", quoted=True, skip_bad_rows=skip, report=report,
                         dataset="movielens")
      movie_ids, movie_cat = m["movieId"], _genre_pick(m["genres"].combine_chunks(), genre)
  if min_rating is not None:
    r = _filter(r, pc.greater_equal(r["rating"], float(min_rating)), report, f"rating < {min_rating}")
  cat = None
  if movie_ids is not None:
    cat = _lookup(r["item"], movie_ids, movie_cat)
  return _make_table(r["user"], r["item"], r["timestamp"], cat)


# ---------------------------------------------------------------------------
# Tmall (IJCAI-15)

_CUM_DAYS = np.array([0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334], np.int64)
_MONTH_DAYS = np.array([31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], np.int64)


def _mmdd_check(table: pa.Table):
  ts = to_numpy(table["time_stamp"])
  ok = (ts >= 101) & (ts <= 1231)
  ts32 = np.where(ok, ts, 101).astype(np.int32)
  month, day = np.divmod(ts32, 100)
  ok &= (day >= 1) & (day <= _MONTH_DAYS[month - 1])
  return [(~ok, lambda i: f"time_stamp is not a valid mmdd date: {int(ts[i])}")]


def _tmall_files(data_dir: Path, *, actions, file) -> list:
  return [_require(data_dir, file, "tmall", "IJCAI-15 Tmall repeat-buyer data")]


def _load_tmall(data_dir: Path, report: LoadReport, skip, *, actions, file):
  (path,) = _tmall_files(data_dir, actions=actions, file=file)
  cols = [Col("user_id", "int"), Col("item_id", "int"), Col("cat_id", "int"),
          Col("time_stamp", "int"), Col("action_type", "int")]
  t = read_delimited(path, cols, header=True, delimiter=",", validators=[_mmdd_check],
                     skip_bad_rows=skip, report=report, dataset="tmall")
  actions = tuple(int(a) for a in actions)
  t = _filter(t, pc.is_in(t["action_type"], value_set=pa.array(actions, pa.int64())), report,
              f"action_type not in {actions}")
  ts = to_numpy(t["time_stamp"]).astype(np.int64)
  day = _CUM_DAYS[ts // 100 - 1] + ts % 100 if len(ts) else ts
  return _make_table(t["user_id"], t["item_id"], pa.array(day, pa.int64()), t["cat_id"])


# ---------------------------------------------------------------------------
# Taobao UserBehavior

TAOBAO_BEHAVIORS = ("pv", "buy", "cart", "fav")


def _behavior_check(table: pa.Table):
  col = table["behavior_type"]
  ok = to_numpy(pc.is_in(col, value_set=pa.array(TAOBAO_BEHAVIORS))).astype(bool)
  return [(~ok, lambda i: f"unknown behavior_type {col[i].as_py()!r}")]


def _taobao_files(data_dir: Path, *, behaviors, file) -> list:
  return [_require(data_dir, file, "taobao", "Taobao UserBehavior log")]


def _load_taobao(data_dir: Path, report: LoadReport, skip, *, behaviors, file):
  (path,) = _taobao_files(data_dir, behaviors=behaviors, file=file)
  names = ["user_id", "item_id", "category_id", "behavior_type", "timestamp"]
  cols = [Col("user_id", "int"), Col("item_id", "int"), Col("category_id", "int"),
          Col("behavior_type", "str"), Col("timestamp", "int")]
  t = read_delimited(path, cols, names=names, delimiter=",", validators=[_behavior_check],
                     skip_bad_rows=skip, report=report, dataset="taobao")
  if isinstance(behaviors, str):
    behaviors = (behaviors,)
  bad = set(behaviors) - set(TAOBAO_BEHAVIORS)
  if bad:
    raise InputError(f"taobao: unknown behaviors {sorted(bad)}; use {TAOBAO_BEHAVIORS}")
  t = _filter(t, pc.is_in(t["behavior_type"], value_set=pa.array(list(behaviors))), report,
              f"behavior_type not in {tuple(behaviors)}")
  return _make_table(t["user_id"], t["item_id"], t["timestamp"], t["category_id"])


# ---------------------------------------------------------------------------
# Amazon Books

_AMAZON_REVIEW_FILES = ("reviews_Books_5.json", "Books_5.json")


def _amazon_format(data_dir: Path, format: str, ratings_file: str) -> tuple[str, str]:
  if format not in ("auto", "ratings", "reviews"):
    raise InputError(f"amazon_books: format must be auto, ratings or reviews, got {format!r}")
  if format in ("auto", "ratings") and _find(data_dir, ratings_file):
    return "ratings", ratings_file
  if format in ("auto", "reviews"):
    for f in _AMAZON_REVIEW_FILES:
      if _find(data_dir, f):
        return "reviews", f
  if format == "ratings":
    _require(data_dir, ratings_file, "amazon_books", "ratings-only CSV user,item,rating,timestamp")
  if format == "reviews":
    raise MissingFileError(
        f"amazon_books: expected reviews_Books_5.json or Books_5.json (5-core review JSON lines) "
        f"at {data_dir / _AMAZON_REVIEW_FILES[0]}"
    )
  raise MissingFileError(
      f"amazon_books: expected {ratings_file} (ratings-only CSV user,item,rating,timestamp) at "
      f"{data_dir / ratings_file}, or reviews_Books_5.json / Books_5.json (5-core review JSON lines)"
  )


def _amazon_files(data_dir: Path, *, format, ratings_file, meta, meta_file, meta_category, min_rating) -> list:
  fmt, name = _amazon_format(data_dir, format, ratings_file)
  files = [_find(data_dir, name)]
  if meta is True:
    files.append(_require(data_dir, meta_file, "amazon_books", "item metadata JSON lines with categories"))
  elif meta == "auto" and _find(data_dir, meta_file):
    files.append(_find(data_dir, meta_file))
  elif meta not in (True, False, "auto"):
    raise InputError(f"amazon_books: meta must be True, False or 'auto', got {meta!r}")
  return files


def _amazon_categories(table: pa.Table, how: str) -> tuple[pa.Array, pa.Array]:
  """Pick one category per metadata record (see load docs)."""
  asin = table["asin"].combine_chunks()
  n = len(asin)
  paths_parts = []
  owners = []
  # 'categories': list of category paths (2014 metadata)
  if "categories" in table.column_names:
    cats = table["categories"].combine_chunks()
    if cats.null_count < n:
      paths = pc.list_flatten(cats)
      paths_parts.append(paths)
      owners.append(to_numpy(pc.list_parent_indices(cats)))
  # 'category': one path (2018 metadata)
  if "category" in table.column_names:
    cat = table["category"].combine_chunks()
    valid = np.flatnonzero(to_numpy(pc.is_valid(cat)).astype(bool))
    if len(valid):
      paths_parts.append(cat.take(pa.array(valid)))
      owners.append(valid)
  if not paths_parts:
    return asin, pa.nulls(n, pa.string())
  paths = pa.concat_arrays([p.cast(pa.list_(pa.string())) for p in paths_parts])
  owner = np.concatenate(owners).astype(np.int64)
  lengths = to_numpy(pc.fill_null(pc.list_value_length(paths), 0)).astype(np.int64)
  flat = pc.list_flatten(paths)
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
  nonempty = lengths > 0
  first = np.full(len(paths), None, object)
  leaf = np.full(len(paths), None, object)
  second = np.full(len(paths), None, object)
  if len(flat):
    flat_np = to_numpy(flat)
    first[nonempty] = flat_np[starts[nonempty]]
    leaf[nonempty] = flat_np[starts[nonempty] + lengths[nonempty] - 1]
    two = lengths >= 2
    second[two] = flat_np[starts[two] + 1]
  under_books = (first == "Books") & (lengths >= 2)
  pick = leaf if how == "leaf" else second
  # preference: first path under Books (its leaf / top sub-category);
  # otherwise the first element of the first non-empty path
  cat = np.full(n, None, object)
  order = np.lexsort((np.arange(len(paths)), owner))
  for mask, value in ((nonempty, first), (under_books, pick)):  # later overrides earlier
    sel = order[mask[order]]
    if len(sel):
      own = owner[sel]
      _, first_idx = np.unique(own, return_index=True)
      chosen = sel[first_idx]
      cat[owner[chosen]] = value[chosen]
  return asin, pa.array(cat.tolist(), pa.string())


def _load_amazon(data_dir: Path, report: LoadReport, skip, *, format, ratings_file, meta, meta_file,
                 meta_category, min_rating):
  if meta_category not in ("leaf", "top"):
    raise InputError(f"amazon_books: meta_category must be 'leaf' or 'top', got {meta_category!r}")
  files = _amazon_files(data_dir, format=format, ratings_file=ratings_file, meta=meta,
                        meta_file=meta_file, meta_category=meta_category, min_rating=min_rating)
  fmt, _ = _amazon_format(data_dir, format, ratings_file)
  report.variant = fmt
  if fmt == "ratings":
    cols = [Col("user", "str"), Col("item", "str"), Col("rating", "float"), Col("timestamp", "int")]
    r = read_delimited(files[0], cols, names=["user", "item", "rating", "timestamp"], delimiter=",",
                       skip_bad_rows=skip, report=report, dataset="amazon_books")
  else:
    schema = pa.schema([("reviewerID", pa.string()), ("asin", pa.string()),
                        ("unixReviewTime", pa.int64()), ("overall", pa.float64())])
    r = read_jsonl(files[0], schema, ["reviewerID", "asin", "unixReviewTime"],
                   skip_bad_rows=skip, report=report)
    r = r.rename_columns(["user", "item", "timestamp", "rating"])
  if min_rating is not None:
    r = _filter(r, pc.greater_equal(r["rating"], float(min_rating)), report, f"rating < {min_rating}")
  cat = None
  if len(files) > 1:
    schema = pa.schema([("asin", pa.string()),
                        ("categories", pa.list_(pa.list_(pa.string()))),
                        ("category", pa.list_(pa.string()))])
    m = read_jsonl(files[1], schema, ["asin"], skip_bad_rows=skip, report=report)
    keys, values = _amazon_categories(m, meta_category)
    cat = _lookup(r["item"], keys, values)
  else:
    report.notes.append("no metadata file: categories are null")
  return _make_table(r["user"], r["item"], r["timestamp"], cat)


# ---------------------------------------------------------------------------
# MIND

_MIND_TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"


def _mind_time(col) -> pa.Array:
  return pc.strptime(col, format=_MIND_TIME_FORMAT, unit="s", error_is_null=True)


def _mind_check(table: pa.Table):
  t = table["time"]
  bad_time = ~to_numpy(pc.is_valid(_mind_time(t))).astype(bool)
  imp = table["impressions"].combine_chunks()
  n = len(imp)
  bad_imp = np.zeros(n, bool)
  if n:
    tok = pc.split_pattern(pc.fill_null(imp, ""), " ")
    flat = pc.list_flatten(tok)
    parent = to_numpy(pc.list_parent_indices(tok))
    good = pc.or_(pc.equal(flat, ""), pc.match_substring_regex(flat, r"^[^\s-]+(-[01])?$"))
    bad_tok = ~to_numpy(good).astype(bool)
    bad_imp[parent[bad_tok]] = True
  return [
      (bad_time, lambda i: f"unparseable time {t[i].as_py()!r} (expected M/D/YYYY h:mm:ss AM|PM)"),
      (bad_imp, lambda i: f"malformed impressions {imp[i].as_py()!r} (expected 'N1-1 N2-0 ...')"),
  ]


def _mind_files(data_dir: Path, *, categories) -> list:
  files = [_require(data_dir, "behaviors.tsv", "mind", "MIND impression log")]
  if categories is True:
    files.append(_require(data_dir, "news.tsv", "mind", "MIND news list with categories"))
  elif categories == "auto":
    n = _find(data_dir, "news.tsv")
    if n:
      files.append(n)
  elif categories is not False:
    raise InputError(f"mind: categories must be True, False or 'auto', got {categories!r}")
  return files


def _load_mind(data_dir: Path, report: LoadReport, skip, *, categories):
  files = _mind_files(data_dir, categories=categories)
  names = ["impression_id", "user", "time", "history", "impressions"]
  cols = [Col("user", "str"), Col("time", "str"), Col("history", "optstr"), Col("impressions", "optstr")]
  b = read_delimited(files[0], cols, names=names, delimiter="\t", validators=[_mind_check],
                     skip_bad_rows=skip, report=report, dataset="mind")
  n = b.num_rows
  t = to_numpy(pc.cast(_mind_time(b["time"].combine_chunks()), pa.int64())).astype(np.int64)
  user = b["user"].combine_chunks()
  ucodes = to_numpy(pc.dictionary_encode(user).indices).astype(np.int64)

  def tokens(col):
    lst = pc.split_pattern(pc.fill_null(col.combine_chunks(), ""), " ")
    flat = pc.list_flatten(lst)
    parent = to_numpy(pc.list_parent_indices(lst)).astype(np.int64)
    nonempty = to_numpy(pc.not_equal(flat, "")).astype(bool)
    keep = np.flatnonzero(nonempty)
    return flat.take(pa.array(keep)), parent[keep]

  # impressions: clicked items ("-1"), at the impression time
  imp_tok, imp_row = tokens(b["impressions"])
  clicked = to_numpy(pc.ends_with(imp_tok, "-1")).astype(bool) if len(imp_tok) else np.zeros(0, bool)
  report.filtered("impression not clicked", int((~clicked).sum()))
  ck = np.flatnonzero(clicked)
  click_items = pc.utf8_slice_codeunits(imp_tok.take(pa.array(ck)), 0, -2)
  click_row = imp_row[ck]
  click_j = np.arange(len(ck), dtype=np.int64)

  # history: items before the impression, one second apart, order kept
  h_tok, h_row = tokens(b["history"])
  m = len(h_row)
  row_len = np.bincount(h_row, minlength=n).astype(np.int64)
  row_start = np.concatenate([[0], np.cumsum(row_len)[:-1]])
  h_j = np.arange(m, dtype=np.int64) - row_start[h_row]
  h_ts = t[h_row] - (row_len[h_row] - h_j)
  # the same history is repeated for each impression of a user: keep the
  # earliest (user, item) occurrence
  if m:
    icodes = to_numpy(pc.dictionary_encode(h_tok).indices).astype(np.int64)
    n_items = int(icodes.max()) + 1
    key = ucodes[h_row] * n_items + icodes
    order = np.lexsort((h_j, h_row, h_ts, key))
    first = np.ones(m, bool)
    first[1:] = key[order][1:] != key[order][:-1]
    keep = np.sort(order[first])
  else:
    keep = np.zeros(0, np.int64)
  report.filtered("repeated history item", m - len(keep))
  h_items = h_tok.take(pa.array(keep))

  # concatenate in file order: per impression row, history then clicks
  rows = np.concatenate([h_row[keep], click_row])
  kind = np.concatenate([np.zeros(len(keep), np.int64), np.ones(len(ck), np.int64)])
  pos = np.concatenate([h_j[keep], click_j])
  order = np.lexsort((pos, kind, rows))
  items = pa.concat_arrays([h_items.cast(pa.string()), click_items.cast(pa.string())]).take(pa.array(order))
  ts = np.concatenate([h_ts[keep], t[click_row]])[order]
  users = user.take(pa.array(rows[order]))
  cat = None
  if len(files) > 1:
    news_names = ["news_id", "category", "subcategory", "title", "abstract", "url",
                  "title_entities", "abstract_entities"]
    nt = read_delimited(files[1], [Col("news_id", "str"), Col("category", "optstr")],
                        names=news_names, delimiter="\t", skip_bad_rows=skip, report=report,
                        dataset="mind")
    cat = _lookup(items, nt["news_id"], nt["category"])
  else:
    report.notes.append("news.tsv not read: categories are null")
  return _make_table(users, items, pa.array(ts, pa.int64()), cat)


# ---------------------------------------------------------------------------
# generic CSV


def _csv_path(data_dir: Path, path) -> Path:
  p = Path(path)
  return p if p.is_absolute() else data_dir / p


def _csv_files(data_dir: Path, *, path, delimiter) -> list:
  p = _csv_path(data_dir, path)
  if not p.is_file():
    raise MissingFileError(
        f"csv: expected {p.name} (interaction CSV with a header naming user,item"
        f"[,timestamp][,category]) at {p}"
    )
  return [p]


def _load_csv(data_dir: Path, report: LoadReport, skip, *, path, delimiter):
  (p,) = _csv_files(data_dir, path=path, delimiter=delimiter)
  header = parse_header(p, delimiter, "utf8", quoted=True)
  cols = [Col("user", "str"), Col("item", "str")]
  has_ts = "timestamp" in header
  has_cat = "category" in header
  if has_ts:
    cols.append(Col("timestamp", "int"))
  if has_cat:
    cols.append(Col("category", "optstr"))
  t = read_delimited(p, cols, header=True, delimiter=delimiter, quoted=True,
                     skip_bad_rows=skip, report=report, dataset="csv")
  ts = t["timestamp"] if has_ts else pa.array(np.arange(t.num_rows, dtype=np.int64))
  if not has_ts:
    report.notes.append("no timestamp column: file order is time order")
  return _make_table(t["user"], t["item"], ts, t["category"] if has_cat else None)


# ---------------------------------------------------------------------------
# registry

LOADERS: dict[str, Loader] = {
    "movielens": Loader(
        "movielens",
        "MovieLens 100k / 1M / 10M / 20M / 25M / latest (variant auto-detected)",
        {"variant": "auto", "genre": "first", "min_rating": None},
        _ml_files,
        _load_movielens,
        types={"min_rating": "float"},
        choices={"variant": ("auto", "ml-100k", "dat", "csv"), "genre": ("first", "all", "none")},
    ),
    "tmall": Loader(
        "tmall",
        "IJCAI-15 Tmall user_log_format1.csv (clicks by default)",
        {"actions": (0,), "file": "user_log_format1.csv"},
        _tmall_files,
        _load_tmall,
        choices={"actions": (0, 1, 2, 3)},  # click, add-to-cart, purchase, add-to-favourite
    ),
    "taobao": Loader(
        "taobao",
        "Taobao UserBehavior.csv (page views by default)",
        {"behaviors": ("pv",), "file": "UserBehavior.csv"},
        _taobao_files,
        _load_taobao,
        choices={"behaviors": TAOBAO_BEHAVIORS},
    ),
    "amazon_books": Loader(
        "amazon_books",
        "Amazon Books ratings CSV or 5-core reviews JSON, optional metadata categories",
        {
            "format": "auto",
            "ratings_file": "ratings_Books.csv",
            "meta": "auto",
            "meta_file": "meta_Books.json",
            "meta_category": "leaf",
            "min_rating": None,
        },
        _amazon_files,
        _load_amazon,
        types={"meta": "bool|str", "min_rating": "float"},
        choices={"format": ("auto", "ratings", "reviews"), "meta": ("auto", True, False),
                 "meta_category": ("leaf", "top")},
    ),
    "mind": Loader(
        "mind",
        "MIND behaviors.tsv (history + clicked impressions), categories from news.tsv",
        {"categories": "auto"},
        _mind_files,
        _load_mind,
        types={"categories": "bool|str"},
        choices={"categories": ("auto", True, False)},
    ),
    "csv": Loader(
        "csv",
        "generic CSV with a header naming user, item[, timestamp][, category]",
        {"path": "interactions.csv", "delimiter": ","},
        _csv_files,
        _load_csv,
    ),
}


def load_interactions(name: str, data_dir, *, skip_bad_rows: bool = False, **options: Any):
  """Read the raw files of dataset ``name`` from ``data_dir``.

  Returns ``(table, report)``: the interaction table (columns user, item,
  timestamp, category) and a :class:`LoadReport`.
  """
  try:
    loader = LOADERS[name]
  except KeyError:
    raise UnknownNameError(f"unknown dataset loader {name!r}; known: {sorted(LOADERS)}") from None
  return loader(os.fspath(data_dir), skip_bad_rows=skip_bad_rows, **options)
