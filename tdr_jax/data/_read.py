"""Low-level readers shared by the dataset loaders.

Every reader returns a ``pyarrow.Table`` of typed columns and records what it
read in a :class:`LoadReport`.  The main path is a multi-threaded
``pyarrow.csv`` / ``pyarrow.json`` read with explicit column types.  Only when
that read reports a problem (wrong field count, a value that does not convert,
an empty required field, a failed semantic check) do we re-read the file in a
*diagnostic* mode that keeps exact 1-based physical line numbers, so that the
error (or the skipped-row report) can say ``path:line: reason``.

Line numbering in the diagnostic CSV mode relies on two pyarrow facts:
with ``use_threads=False`` the ``InvalidRow.number`` given to the
``invalid_row_handler`` is the physical line number (header included), and
with ``ignore_empty_lines=False`` a blank line becomes a row of empty values
instead of disappearing.  Every physical line is therefore either a table row
or a reported invalid row, which gives a vectorised row -> line mapping.
"""

from __future__ import annotations

import csv as _pycsv
import dataclasses
import gzip
import io
import json
import os
from typing import Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pjson

from tdr_jax.errors import InputError

__all__ = ["DataFormatError", "LoadReport", "Col"]

MAX_EXAMPLES = 10

# Values that pyarrow would parse as int64 in a CSV column (it trims spaces,
# rejects a leading '+').  Used in the diagnostic path to find the bad rows.
_INT_RE = r"^\s*-?[0-9]{1,18}\s*$"
_FLOAT_RE = r"^\s*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\s*$"

_ARROW_TYPES = {
    "int": pa.int64(),
    "float": pa.float64(),
    "str": pa.string(),
    "optstr": pa.string(),
}


class DataFormatError(InputError):
  """A raw data file does not have the documented format.

  The message starts with ``path:line:`` (1-based, header line counted).
  An :class:`~tdr_jax.errors.InputError` (hence a ``ValueError``).
  """


@dataclasses.dataclass
class LoadReport:
  """What a loader read, skipped and filtered.

  ``rows_read`` counts data rows of every file read (interactions and
  metadata; blank lines excluded).  ``rows_skipped`` counts malformed rows
  skipped because ``skip_bad_rows=True``; ``skipped_examples`` keeps the
  first few as ``path:line: reason``.  ``rows_filtered`` counts rows removed
  on purpose (e.g. non-click actions), keyed by the reason.
  """

  dataset: str
  variant: str | None = None
  files: list = dataclasses.field(default_factory=list)
  file_rows: dict = dataclasses.field(default_factory=dict)
  rows_read: int = 0
  rows_skipped: int = 0
  skipped_examples: list = dataclasses.field(default_factory=list)
  blank_lines: int = 0
  rows_filtered: dict = dataclasses.field(default_factory=dict)
  rows_out: int = 0
  notes: list = dataclasses.field(default_factory=list)

  def add_file(self, path, rows: int) -> None:
    path = str(path)
    if path not in self.files:
      self.files.append(path)
    self.file_rows[path] = self.file_rows.get(path, 0) + int(rows)
    self.rows_read += int(rows)

  def skip(self, path, line: int, reason: str) -> None:
    self.rows_skipped += 1
    if len(self.skipped_examples) < MAX_EXAMPLES:
      self.skipped_examples.append(f"{path}:{line}: {reason}")

  def filtered(self, reason: str, count: int) -> None:
    if count:
      self.rows_filtered[reason] = self.rows_filtered.get(reason, 0) + int(count)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def summary(self) -> str:
    parts = [
        f"{self.dataset}" + (f" ({self.variant})" if self.variant else ""),
        f"files={len(self.files)}",
        f"rows_read={self.rows_read}",
        f"rows_out={self.rows_out}",
        f"skipped={self.rows_skipped}",
    ]
    if self.blank_lines:
      parts.append(f"blank_lines={self.blank_lines}")
    for k, v in self.rows_filtered.items():
      parts.append(f"filtered[{k}]={v}")
    return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class Col:
  """A column to read: ``source`` is its header name (or assigned name for
  header-less files), ``kind`` one of int / float / str (required,
  non-empty) / optstr (empty -> null)."""

  source: str
  kind: str = "str"

  @property
  def required(self) -> bool:
    return self.kind != "optstr"


# A validator looks at the typed table and returns (bad_mask, describe) pairs:
# describe(i) gives the reason for table row i.
Validator = Callable[[pa.Table], Sequence[tuple]]


# ---------------------------------------------------------------------------
# small helpers


def open_binary(path) -> io.BufferedIOBase:
  path = os.fspath(path)
  if path.endswith(".gz"):
    return gzip.open(path, "rb")
  return open(path, "rb")


def read_first_line(path, encoding: str) -> str:
  with open_binary(path) as f:
    raw = f.readline()
  text = raw.decode(encoding, errors="replace")
  return text.lstrip("\ufeff").rstrip("\r\n")


def parse_header(path, delimiter: str, encoding: str, quoted: bool) -> list[str]:
  line = read_first_line(path, encoding)
  if quoted:
    names = next(_pycsv.reader([line], delimiter=delimiter))
  else:
    names = line.split(delimiter)
  names = [n.strip() for n in names]
  # tolerate a quoted header in an otherwise unquoted file
  return [n[1:-1] if len(n) >= 2 and n[0] == n[-1] == '"' else n for n in names]


def to_numpy(arr) -> np.ndarray:
  if isinstance(arr, pa.ChunkedArray):
    arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
  return arr.to_numpy(zero_copy_only=False)


def _as_array(col) -> pa.Array:
  if isinstance(col, pa.ChunkedArray):
    if col.num_chunks == 1:
      return col.chunk(0)
    if col.num_chunks == 0:
      return pa.array([], type=col.type)
    return col.combine_chunks()
  return col


def _empty_table(cols: Sequence[Col]) -> pa.Table:
  return pa.table({c.source: pa.array([], _ARROW_TYPES[c.kind]) for c in cols})


def _is_empty_csv(e: Exception) -> bool:
  return "Empty CSV file" in str(e)


def _raise_or_skip(
    path,
    bad: list[tuple[int, str]],
    n_bad: int,
    skip_bad_rows: bool,
    report: LoadReport,
) -> None:
  """``bad`` holds (line, reason) for (at least) the first MAX_EXAMPLES bad
  rows in line order; ``n_bad`` is the total number of bad rows."""
  if not n_bad:
    return
  if not skip_bad_rows:
    line, reason = bad[0]
    more = ""
    if n_bad > 1:
      more = f" (and {n_bad - 1} more malformed row(s))"
    raise DataFormatError(
        f"{path}:{line}: {reason}{more}; pass skip_bad_rows=True (run.py: --skip_bad_rows) "
        "to skip malformed rows"
    )
  for line, reason in bad:
    report.skip(path, line, reason)
  # rows beyond the listed ones are only counted
  report.rows_skipped += n_bad - len(bad)


# ---------------------------------------------------------------------------
# turning string columns into typed columns with row-level diagnostics


def _kind_problems(col: pa.Array, c: Col) -> tuple[np.ndarray, Callable[[int], str]]:
  """Per-row bad mask for a string column that should hold ``c.kind``."""
  n = len(col)
  filled = pc.fill_null(col, "")
  empty = to_numpy(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(filled)), 0)).astype(bool)
  if c.kind == "optstr":
    return np.zeros(n, bool), lambda i: ""
  if c.kind == "str":
    return empty, lambda i: f"empty {c.source}"
  pattern = _INT_RE if c.kind == "int" else _FLOAT_RE
  ok = to_numpy(pc.match_substring_regex(filled, pattern)).astype(bool)
  what = "an integer" if c.kind == "int" else "a number"

  def describe(i, _col=filled, _empty=empty):
    if _empty[i]:
      return f"empty {c.source}"
    return f"{c.source} is not {what}: {_col[i].as_py()!r}"

  return ~ok, describe


def _cast_clean(col: pa.Array, c: Col) -> pa.Array:
  if c.kind in ("int", "float"):
    return pc.cast(pc.utf8_trim_whitespace(col), _ARROW_TYPES[c.kind])
  if c.kind == "optstr":
    return pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)
  return col


def finish_from_strings(
    path,
    table: pa.Table,
    lines: np.ndarray,
    cols: Sequence[Col],
    *,
    pre_bad: Iterable[tuple[int, str]] = (),
    pre_bad_count: int | None = None,
    validators: Sequence[Validator] = (),
    skip_bad_rows: bool,
    report: LoadReport,
) -> pa.Table:
  """Validate string columns row by row, cast them, run validators, and
  either raise for the first bad line or drop + report the bad rows.

  ``lines`` gives the physical line number of each table row; ``pre_bad``
  lists problems found earlier (e.g. wrong field counts) as (line, reason),
  at least the first MAX_EXAMPLES of them; ``pre_bad_count`` is their total
  (default ``len(pre_bad)``).
  """
  n = table.num_rows
  bad = np.zeros(n, bool)
  describers: list[tuple[np.ndarray, Callable[[int], str]]] = []
  for c in cols:
    mask, describe = _kind_problems(_as_array(table[c.source]), c)
    if mask.any():
      describers.append((mask, describe))
      bad |= mask
  typed_cols = {}
  good_idx = np.flatnonzero(~bad)
  good = table.take(pa.array(good_idx)) if bad.any() else table
  for c in cols:
    typed_cols[c.source] = _cast_clean(_as_array(good[c.source]), c)
  typed = pa.table(typed_cols)
  # semantic checks on the typed rows
  for v in validators:
    for mask, describe in v(typed):
      mask = np.asarray(mask, bool)
      if mask.any():
        full = np.zeros(n, bool)
        full[good_idx[mask]] = True
        sub_idx = np.flatnonzero(mask)
        pos_in_good = np.full(n, -1, np.int64)
        pos_in_good[good_idx[sub_idx]] = sub_idx

        def desc(i, _d=describe, _p=pos_in_good):
          return _d(int(_p[i]))

        describers.append((full, desc))
        bad |= full
  pre_bad = sorted(pre_bad)
  if pre_bad_count is None:
    pre_bad_count = len(pre_bad)
  bad_rows = np.flatnonzero(bad)
  n_bad = len(bad_rows) + pre_bad_count
  if n_bad:
    # first MAX_EXAMPLES problems in line order
    cand = [(int(lines[i]), int(i)) for i in bad_rows[:MAX_EXAMPLES]]
    listing: list[tuple[int, str]] = list(pre_bad[:MAX_EXAMPLES])
    for line, i in cand:
      for mask, describe in describers:
        if mask[i]:
          listing.append((line, describe(i)))
          break
    listing.sort()
    _raise_or_skip(path, listing[:MAX_EXAMPLES], n_bad, skip_bad_rows, report)
    if bad.any():
      keep = np.flatnonzero(~bad[good_idx])
      typed = typed.take(pa.array(keep))
  return typed


# ---------------------------------------------------------------------------
# CSV-like files


def _read_strings_with_handler(path, names, skip_rows, encoding, parse_kw, on_invalid) -> pa.Table:
  """All columns as strings, one thread (so InvalidRow.number is the
  physical line number)."""
  try:
    return pcsv.read_csv(
        path,
        read_options=pcsv.ReadOptions(
            use_threads=False,
            block_size=1 << 24,
            skip_rows=skip_rows,
            column_names=list(names),
            encoding=encoding,
        ),
        parse_options=pcsv.ParseOptions(invalid_row_handler=on_invalid, **parse_kw),
        convert_options=pcsv.ConvertOptions(
            column_types={nm: pa.string() for nm in names},
            null_values=[],
            strings_can_be_null=False,
        ),
    )
  except pa.ArrowInvalid as e:
    if _is_empty_csv(e):
      return pa.table({nm: pa.array([], pa.string()) for nm in names})
    raise


def read_delimited(
    path,
    cols: Sequence[Col],
    *,
    names: Sequence[str] | None = None,
    header: bool = False,
    delimiter: str = ",",
    quoted: bool = False,
    encoding: str = "utf8",
    validators: Sequence[Validator] = (),
    skip_bad_rows: bool,
    report: LoadReport,
    dataset: str,
    header_aliases: dict | None = None,
) -> pa.Table:
  """Read a delimiter-separated file into a typed table with the columns
  ``[c.source for c in cols]``.

  Either ``header=True`` (column names come from the first line; the
  columns in ``cols`` must be among them, any order) or ``names`` gives the
  names of all fields of a header-less file.
  """
  path = os.fspath(path)
  if header:
    names = parse_header(path, delimiter, encoding, quoted)
    missing = [c.source for c in cols if c.source not in names]
    if missing:
      raise DataFormatError(
          f"{path}:1: {dataset}: header lacks column(s) {missing} (found {names})"
      )
    if len(set(names)) != len(names):
      # make duplicates unique so pyarrow accepts them; only the first
      # occurrence of a name is used
      seen: dict = {}
      uniq = []
      for nm in names:
        k = seen.get(nm, 0)
        uniq.append(nm if k == 0 else f"{nm}.{k}")
        seen[nm] = k + 1
      names = uniq
  assert names is not None
  first_line = 2 if header else 1
  skip_rows = 1 if header else 0
  include = [c.source for c in cols]
  parse_kw = dict(
      delimiter=delimiter,
      quote_char='"' if quoted else False,
      double_quote=quoted,
      escape_char=False,
      newlines_in_values=False,
      ignore_empty_lines=False,
  )

  # ---- main path: typed, multi-threaded
  try:
    table = pcsv.read_csv(
        path,
        read_options=pcsv.ReadOptions(
            use_threads=True,
            block_size=1 << 24,
            skip_rows=skip_rows,
            column_names=list(names),
            encoding=encoding,
        ),
        parse_options=pcsv.ParseOptions(**parse_kw),
        convert_options=pcsv.ConvertOptions(
            column_types={c.source: _ARROW_TYPES[c.kind] for c in cols},
            include_columns=include,
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        ),
    )
    ok = all(table[c.source].null_count == 0 for c in cols if c.required)
    if ok:
      for v in validators:
        for mask, _ in v(table):
          if np.asarray(mask, bool).any():
            ok = False
    if ok:
      report.add_file(path, table.num_rows)
      return table
  except pa.ArrowInvalid as e:
    if _is_empty_csv(e):
      report.add_file(path, 0)
      return _empty_table(cols)

  # ---- diagnostic path: strings, single thread, exact line numbers
  invalid: list[tuple[int, str]] = []

  def on_invalid(row):
    invalid.append(
        (int(row.number), f"expected {row.expected_columns} fields, found {row.actual_columns}")
    )
    return "skip"

  try:
    table = _read_strings_with_handler(path, names, skip_rows, encoding, parse_kw, on_invalid)
  except pa.ArrowInvalid as e:
    raise DataFormatError(f"{path}:?: unreadable ({e})") from e
  n_rows = table.num_rows
  lines = np.arange(first_line, first_line + n_rows + len(invalid), dtype=np.int64)
  if invalid:
    lines = np.delete(lines, np.array([ln for ln, _ in invalid]) - first_line)
  # blank lines: every field empty
  blank = np.ones(n_rows, bool)
  for nm in names:
    blank &= to_numpy(pc.equal(table[nm], "")).astype(bool)
  if blank.any():
    report.blank_lines += int(blank.sum())
    keep = np.flatnonzero(~blank)
    table = table.take(pa.array(keep))
    lines = lines[keep]
  report.add_file(path, table.num_rows + len(invalid))
  return finish_from_strings(
      path,
      table.select(include),
      lines,
      cols,
      pre_bad=invalid,
      validators=validators,
      skip_bad_rows=skip_bad_rows,
      report=report,
  )


def read_multichar(
    path,
    cols: Sequence[Col],
    *,
    names: Sequence[str],
    separator: str,
    encoding: str = "utf8",
    validators: Sequence[Validator] = (),
    skip_bad_rows: bool,
    report: LoadReport,
    data: bytes | None = None,
) -> pa.Table:
  """Read a header-less file whose fields are separated by a multi-character
  separator (MovieLens ``::``): each line is read as one string, split with
  ``pyarrow.compute.split_pattern`` and validated.  Line i of the file is
  row i-1, so line numbers are exact without a second pass."""
  path = os.fspath(path)
  source = pa.BufferReader(data) if data is not None else path
  try:
    table = pcsv.read_csv(
        source,
        read_options=pcsv.ReadOptions(
            use_threads=True, block_size=1 << 24, column_names=["line"], encoding=encoding
        ),
        parse_options=pcsv.ParseOptions(
            delimiter="\x1f", quote_char=False, escape_char=False, ignore_empty_lines=False
        ),
        convert_options=pcsv.ConvertOptions(
            column_types={"line": pa.string()}, null_values=[], strings_can_be_null=False
        ),
    )
  except pa.ArrowInvalid as e:  # e.g. a line holding the 0x1F control character
    if _is_empty_csv(e):
      report.add_file(path, 0)
      return _empty_table(cols)
    raise DataFormatError(f"{path}:?: unreadable line ({e})") from e
  line_col = _as_array(table["line"])
  if line_col.type != pa.string():
    line_col = line_col.cast(pa.string())
  n = len(line_col)
  lines = np.arange(1, n + 1, dtype=np.int64)
  blank = to_numpy(pc.equal(pc.utf8_length(pc.utf8_rtrim(line_col, characters="\r")), 0)).astype(bool)
  if blank.any():
    report.blank_lines += int(blank.sum())
    keep = np.flatnonzero(~blank)
    line_col = line_col.take(pa.array(keep))
    lines = lines[keep]
  line_col = pc.utf8_rtrim(line_col, characters="\r")
  parts = pc.split_pattern(line_col, separator)
  nfields = to_numpy(pc.list_value_length(parts))
  wrong = nfields != len(names)
  pre_bad = []
  if wrong.any():
    wrong_idx = np.flatnonzero(wrong)
    pre_bad = [
        (int(lines[i]), f"expected {len(names)} '{separator}'-separated fields, found {int(nfields[i])}")
        for i in wrong_idx[:MAX_EXAMPLES]
    ]
    n_wrong = len(wrong_idx)
    keep = np.flatnonzero(~wrong)
    parts = parts.take(pa.array(keep))
    lines_ok = lines[keep]
  else:
    n_wrong = 0
    lines_ok = lines
  report.add_file(path, len(lines))
  fields = {}
  for c in cols:
    k = list(names).index(c.source)
    fields[c.source] = pc.list_element(parts, k) if len(parts) else pa.array([], pa.string())
  str_table = pa.table(fields)
  return finish_from_strings(
      path,
      str_table,
      lines_ok,
      cols,
      pre_bad=pre_bad,
      pre_bad_count=n_wrong,
      validators=validators,
      skip_bad_rows=skip_bad_rows,
      report=report,
  )


# ---------------------------------------------------------------------------
# JSON lines


def _py_matches(value, typ: pa.DataType) -> bool:
  if value is None:
    return True
  if pa.types.is_string(typ):
    return isinstance(value, str)
  if pa.types.is_integer(typ):
    return isinstance(value, int) and not isinstance(value, bool)
  if pa.types.is_floating(typ):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if pa.types.is_list(typ):
    return isinstance(value, list) and all(_py_matches(v, typ.value_type) for v in value)
  return True


def read_jsonl(
    path,
    schema: pa.Schema,
    required: Sequence[str],
    *,
    skip_bad_rows: bool,
    report: LoadReport,
) -> pa.Table:
  """Read JSON lines with an explicit schema (other fields ignored).

  Main path: ``pyarrow.json.read_json``.  If it fails or a required field
  is missing, the file is scanned line by line (Python ``json``) to find
  the offending lines; the good lines are then read with pyarrow again.
  """
  path = os.fspath(path)
  parse = pjson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
  ropts = pjson.ReadOptions(use_threads=True, block_size=1 << 25)
  try:
    table = pjson.read_json(path, read_options=ropts, parse_options=parse)
    if all(table[f].null_count == 0 for f in required):
      report.add_file(path, table.num_rows)
      return table
  except pa.ArrowInvalid:
    pass
  # locate bad lines (slow path, only after pyarrow reported a problem)
  good_lines: list[bytes] = []
  bad: list[tuple[int, str]] = []
  n_bad = 0
  n_rows = 0
  with open_binary(path) as f:
    for lineno, raw in enumerate(f, 1):
      if not raw.strip():
        report.blank_lines += 1
        continue
      n_rows += 1
      reason = None
      try:
        obj = json.loads(raw)
      except ValueError as e:
        reason = f"invalid JSON ({e.msg})"
      else:
        if not isinstance(obj, dict):
          reason = "not a JSON object"
        else:
          for fld in schema:
            v = obj.get(fld.name)
            if fld.name in required and v is None:
              reason = f"missing field {fld.name!r}"
              break
            if not _py_matches(v, fld.type):
              reason = f"field {fld.name!r} has unexpected type ({type(v).__name__})"
              break
      if reason is None:
        good_lines.append(raw if raw.endswith(b"\n") else raw + b"\n")
      else:
        n_bad += 1
        if len(bad) < MAX_EXAMPLES:
          bad.append((lineno, reason))
  report.add_file(path, n_rows)
  _raise_or_skip(path, bad, n_bad, skip_bad_rows, report)
  if not good_lines:
    return schema.empty_table()
  return pjson.read_json(
      pa.BufferReader(b"".join(good_lines)), read_options=ropts, parse_options=parse
  )
