"""Loaders read small fixtures written in the exact distributed formats."""

from __future__ import annotations

import calendar
import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
import pytest

from tdr_jax.data import LOADERS, DataFormatError, load_dataset, load_interactions
from tdr_jax.data.datasets import check_usable, describe, parse_loader_options, summary
from tdr_jax.data.loaders import ML100K_GENRES
from tdr_jax.errors import InputError, MissingFileError


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(text.encode(encoding))
  return path


def rows(table: pa.Table) -> list[tuple]:
  d = table.to_pydict()
  return list(zip(d["user"], d["item"], d["timestamp"], d["category"]))


def epoch(y, mo, d, h, mi, s) -> int:
  return calendar.timegm(dt.datetime(y, mo, d, h, mi, s).timetuple())


# ---------------------------------------------------------------------------
# fixtures in the distributed formats; each returns (dir, expected rows)


def flags(*on: int) -> str:
  return "|".join("1" if k in on else "0" for k in range(19))


def ml100k(d: Path, genre_file: bool = True):
  write(d / "u.data", "1\t10\t5\t881250949\n1\t20\t3\t881250950\n2\t10\t4\t881250940\n2\t30\t1\t881250941\n")
  write(
      d / "u.item",
      f"10|Caf\xe9 Society (1995)|01-Jan-1995||http://us.imdb.com/x|{flags(3, 5)}\n"
      f"20|Nothing (1996)|01-Jan-1996||http://us.imdb.com/y|{flags()}\n"
      f"30|Mystery Film (1994)|01-Jan-1994||http://us.imdb.com/z|{flags(0, 13)}\n",
      encoding="latin-1",
  )
  if genre_file:
    custom = ["unknown", "Action", "Adventure", "Cartoon"] + list(ML100K_GENRES[4:])
    write(d / "u.genre", "".join(f"{g}|{i}\n" for i, g in enumerate(custom)) + "\n")
  first = "Cartoon" if genre_file else "Animation"
  return d, [
      ("1", "10", 881250949, first),
      ("1", "20", 881250950, None),
      ("2", "10", 881250940, first),
      ("2", "30", 881250941, "unknown"),
  ]


def ml1m(d: Path):
  write(d / "ratings.dat", "1::1193::5::978300760\n1::2::3::978302109\n2::3::4::978301968\n")
  write(
      d / "movies.dat",
      "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
      "2::Caf\xe9 Lumi\xe8re: Part 2 (1990)::Animation|Children's|Comedy\n"
      "3::Nothing (2000)::(no genres listed)\n",
      encoding="latin-1",
  )
  return d, [
      ("1", "1193", 978300760, "Drama"),
      ("1", "2", 978302109, "Animation"),
      ("2", "3", 978301968, None),
  ]


def ml25m(d: Path):
  write(d / "ratings.csv", "userId,movieId,rating,timestamp\n1,296,5.0,1147880044\n1,306,3.5,1147868817\n2,9,0.5,1147868828\n")
  write(
      d / "movies.csv",
      "movieId,title,genres\n"
      '296,"Pulp Fiction, The (1994)",Comedy|Crime|Drama|Thriller\n'
      '306,"Three Colors: Red (Trois couleurs: Rouge) (1994)",Drama\n'
      "9,Sudden Death (1995),Action\n",
  )
  return d, [
      ("1", "296", 1147880044, "Comedy"),
      ("1", "306", 1147868817, "Drama"),
      ("2", "9", 1147868828, "Action"),
  ]


def tmall(d: Path):
  write(
      d / "user_log_format1.csv",
      "action_type,time_stamp,item_id,user_id,brand_id,seller_id,cat_id\n"
      "0,1111,631,328862,,2882,1505\n"
      "2,0829,631,328862,2661,2882,1505\n"
      "0,0101,100,7,12,9,35\n"
      "0,0512,100,328862,12,9,35\n"
      "3,1111,5,7,12,9,35\n",
  )
  # day of year (2015): Nov 11 = 315, Jan 1 = 1, May 12 = 132
  return d, [
      ("328862", "631", 315, "1505"),
      ("7", "100", 1, "35"),
      ("328862", "100", 132, "35"),
  ]


def taobao(d: Path):
  write(
      d / "UserBehavior.csv",
      "1,2268318,2520377,pv,1511544070\n"
      "1,2333346,2520771,buy,1511561733\n"
      "2,2576651,149192,pv,1511572885\n"
      "2,3830808,4181361,fav,1511593493\n",
  )
  return d, [
      ("1", "2268318", 1511544070, "2520377"),
      ("2", "2576651", 1511572885, "149192"),
  ]


AMAZON_META = (
    json.dumps({"asin": "0001", "title": "A", "categories": [["Kindle Store", "X"], ["Books", "Literature & Fiction", "Classics"]], "salesRank": {"Books": 5}}) + "\n"
    + json.dumps({"asin": "0002", "category": ["Books", "Mystery, Thriller & Suspense", "Thrillers"], "price": "$1"}) + "\n"
    + json.dumps({"asin": "0003", "categories": [["Movies & TV", "Drama"]]}) + "\n"
)


def amazon_ratings(d: Path, meta: bool = True):
  write(d / "ratings_Books.csv", "AH2L9G3DQHHAJ,0001,4.0,1116547200\nA2IIIDRK3PRRZY,0002,1.0,1239148800\nAH2L9G3DQHHAJ,0004,5.0,1381968000\n")
  if meta:
    write(d / "meta_Books.json", AMAZON_META)
  return d, [
      ("AH2L9G3DQHHAJ", "0001", 1116547200, "Classics" if meta else None),
      ("A2IIIDRK3PRRZY", "0002", 1239148800, "Thrillers" if meta else None),
      ("AH2L9G3DQHHAJ", "0004", 1381968000, None),
  ]


def amazon_reviews(d: Path, name: str = "reviews_Books_5.json"):
  recs = [
      {"reviewerID": "A10000012B7CGYKOMPQ4L", "asin": "0003", "reviewerName": "Adam", "helpful": [0, 0],
       "reviewText": 'Spiritually and mentally inspiring! "A book"', "overall": 5.0, "summary": "Wish",
       "unixReviewTime": 1355616000, "reviewTime": "12 16, 2012"},
      {"overall": 3.0, "verified": True, "reviewTime": "03 3, 2014", "reviewerID": "A2S166WSCFIFP5", "asin": "0001",
       "style": {"Format:": " Paperback"}, "reviewerName": "x", "reviewText": "ok", "summary": "s",
       "unixReviewTime": 1393804800},
  ]
  write(d / name, "".join(json.dumps(r) + "\n" for r in recs))
  write(d / "meta_Books.json", AMAZON_META)
  return d, [
      ("A10000012B7CGYKOMPQ4L", "0003", 1355616000, "Movies & TV"),
      ("A2S166WSCFIFP5", "0001", 1393804800, "Classics"),
  ]


def mind(d: Path, news: bool = True):
  write(
      d / "behaviors.tsv",
      "1\tU13740\t11/11/2019 9:05:58 AM\tN55189 N42782\tN55689-1 N35729-0\n"
      "2\tU91836\t11/12/2019 12:02:03 PM\t\tN20678-0 N39317-1 N58114-1\n"
      "3\tU13740\t11/13/2019 12:00:00 AM\tN55189 N42782\tN35729-1\n",
  )
  if news:
    write(
        d / "news.tsv",
        'N55189\ttv\ttvnews\t"Wheel Of Fortune" Guest\tAbstract "quoted"\thttps://x\t[]\t[]\n'
        "N42782\tsports\tbaseball\tTitle\tAbs\thttps://y\t[]\t[]\n"
        "N39317\tnews\tnewsus\tTitle\t\thttps://z\t[]\t[]\n",
    )
  t1 = epoch(2019, 11, 11, 9, 5, 58)
  t2 = epoch(2019, 11, 12, 12, 2, 3)
  t3 = epoch(2019, 11, 13, 0, 0, 0)
  c = (lambda x: x) if news else (lambda x: None)
  return d, [
      ("U13740", "N55189", t1 - 2, c("tv")),
      ("U13740", "N42782", t1 - 1, c("sports")),
      ("U13740", "N55689", t1, None),
      ("U91836", "N39317", t2, c("news")),
      ("U91836", "N58114", t2, None),
      ("U13740", "N35729", t3, None),
  ]


def generic_csv(d: Path):
  write(d / "interactions.csv", 'item,extra,user\nA,"x, y",u1\nB,z,u2\nA,,u2\n')
  return d, [("u1", "A", 0, None), ("u2", "B", 1, None), ("u2", "A", 2, None)]


# ---------------------------------------------------------------------------
# exact contents


@pytest.mark.parametrize(
    "name,make,opts",
    [
        ("movielens", ml100k, {}),
        ("movielens", lambda d: ml100k(d, genre_file=False), {}),
        ("movielens", ml1m, {}),
        ("movielens", ml25m, {}),
        ("tmall", tmall, {}),
        ("taobao", taobao, {}),
        ("amazon_books", amazon_ratings, {}),
        ("amazon_books", lambda d: amazon_ratings(d, meta=False), {}),
        ("amazon_books", amazon_reviews, {}),
        ("amazon_books", lambda d: amazon_reviews(d, "Books_5.json"), {}),
        ("mind", mind, {}),
        ("mind", lambda d: mind(d, news=False), {}),
        ("csv", generic_csv, {}),
    ],
)
def test_loader_exact(tmp_path, name, make, opts):
  d, expected = make(tmp_path)
  table, report = load_interactions(name, d, **opts)
  assert table.schema.names == ["user", "item", "timestamp", "category"]
  assert table.schema.field("timestamp").type == pa.int64()
  assert rows(table) == expected
  assert report.rows_out == len(expected)
  assert report.rows_skipped == 0


def test_movielens_options(tmp_path):
  d, _ = ml25m(tmp_path)
  t, rep = load_interactions("movielens", d, min_rating=1.0, genre="all")
  assert rows(t) == [
      ("1", "296", 1147880044, "Comedy|Crime|Drama|Thriller"),
      ("1", "306", 1147868817, "Drama"),
  ]
  assert rep.rows_filtered == {"rating < 1.0": 1}
  t, _ = load_interactions("movielens", d, genre="none")
  assert t["category"].null_count == 3


def test_filters_are_counted(tmp_path):
  d, _ = tmall(tmp_path)
  t, rep = load_interactions("tmall", d, actions=(0, 2))
  assert t.num_rows == 4
  assert rep.rows_filtered == {"action_type not in (0, 2)": 1}
  assert rep.rows_read == 5
  d2, _ = taobao(tmp_path / "tb")
  t, rep = load_interactions("taobao", d2, behaviors=("pv", "buy", "fav"))
  assert t.num_rows == 4 and rep.rows_filtered == {}
  d3, _ = mind(tmp_path / "mind")
  _, rep = load_interactions("mind", d3)
  assert rep.rows_filtered == {"impression not clicked": 2, "repeated history item": 2}


def test_amazon_top_category_and_forced_format(tmp_path):
  d, _ = amazon_ratings(tmp_path)
  amazon_reviews(tmp_path)  # both formats present; auto picks the ratings CSV
  t, rep = load_interactions("amazon_books", d, meta_category="top")
  assert rep.variant == "ratings"
  assert t["category"].to_pylist() == ["Literature & Fiction", "Mystery, Thriller & Suspense", None]
  t, rep = load_interactions("amazon_books", d, format="reviews", meta=False)
  assert rep.variant == "reviews" and t.num_rows == 2 and t["category"].null_count == 2


def test_gzip_copy_is_read(tmp_path):
  import gzip

  d, expected = taobao(tmp_path)
  raw = (d / "UserBehavior.csv").read_bytes()
  (d / "UserBehavior.csv").unlink()
  (d / "UserBehavior.csv.gz").write_bytes(gzip.compress(raw))
  t, _ = load_interactions("taobao", d)
  assert rows(t) == expected


# ---------------------------------------------------------------------------
# malformed rows and missing files

# (loader, fixture, file, 1-based line to replace, replacement, reason substring)
BAD = [
    ("movielens", ml100k, "u.data", 2, "1\tabc\t3\t881250950", "item is not an integer"),
    ("movielens", ml100k, "u.item", 2, "20|Short|x", "expected 24 fields"),
    ("movielens", ml1m, "ratings.dat", 3, "2::3::4", "expected 4"),
    ("movielens", ml1m, "movies.dat", 2, "two::Title::Drama", "item is not an integer"),
    ("movielens", ml25m, "ratings.csv", 3, "1,306,3.5,yesterday", "timestamp is not an integer"),
    ("tmall", tmall, "user_log_format1.csv", 3, "2,1340,631,328862,2661,2882,1505", "mmdd"),
    ("tmall", tmall, "user_log_format1.csv", 4, "0,0101,100,7,12,9", "expected 7 fields, found 6"),
    ("taobao", taobao, "UserBehavior.csv", 2, "1,12ab,2520771,buy,1511561733", "item_id is not an integer"),
    ("taobao", taobao, "UserBehavior.csv", 3, "2,2576651,149192,click,1511572885", "behavior_type"),
    ("amazon_books", amazon_ratings, "ratings_Books.csv", 2, "A2IIIDRK3PRRZY,0002,1.0", "expected 4 fields"),
    ("amazon_books", amazon_reviews, "reviews_Books_5.json", 2, '{"reviewerID": "A", "asin": ', "invalid JSON"),
    ("amazon_books", amazon_reviews, "reviews_Books_5.json", 1, '{"asin": "0003", "unixReviewTime": 1}', "reviewerID"),
    ("mind", mind, "behaviors.tsv", 2, "2\tU91836\t11/12/2019 25:02:03 PM\t\tN20678-0", "unparseable time"),
    ("mind", mind, "behaviors.tsv", 3, "3\tU13740\t11/13/2019 12:00:00 AM\tN1\tN35729-7", "malformed impressions"),
    ("mind", mind, "behaviors.tsv", 1, "1\tU13740\t11/11/2019 9:05:58 AM", "expected 5 fields"),
    ("csv", generic_csv, "interactions.csv", 3, "B,z", "expected 3 fields"),
    ("csv", generic_csv, "interactions.csv", 4, ",,u2", "empty item"),
]


def corrupt(path: Path, line: int, text: str) -> None:
  raw = path.read_bytes().decode("latin-1").split("\n")
  raw[line - 1] = text
  path.write_bytes("\n".join(raw).encode("latin-1"))


@pytest.mark.parametrize("name,make,fname,line,text,reason", BAD, ids=[f"{b[0]}-{b[2]}-{b[3]}" for b in BAD])
def test_malformed_row(tmp_path, name, make, fname, line, text, reason):
  d, expected = make(tmp_path)
  corrupt(d / fname, line, text)
  with pytest.raises(DataFormatError) as err:
    load_interactions(name, d)
  msg = str(err.value)
  assert f"{fname}:{line}:" in msg
  assert reason in msg
  table, report = load_interactions(name, d, skip_bad_rows=True)
  assert report.rows_skipped == 1
  assert len(report.skipped_examples) == 1
  assert f"{fname}:{line}: " in report.skipped_examples[0] and reason in report.skipped_examples[0]
  if fname in ("u.data", "ratings.dat", "ratings.csv", "UserBehavior.csv", "user_log_format1.csv",
               "ratings_Books.csv", "reviews_Books_5.json", "interactions.csv"):
    # one interaction row fewer (unless it was filtered anyway)
    assert table.num_rows in (len(expected) - 1, len(expected))


def test_many_bad_rows_are_counted_with_ten_examples(tmp_path):
  body = "user,item,timestamp\n" + "".join(
      f"u{i},i{i},{'bad' if i % 2 else i}\n" for i in range(30)
  )
  write(tmp_path / "interactions.csv", body)
  with pytest.raises(DataFormatError, match=r"interactions.csv:3: .*and 14 more"):
    load_interactions("csv", tmp_path)
  t, rep = load_interactions("csv", tmp_path, skip_bad_rows=True)
  assert t.num_rows == 15 and rep.rows_skipped == 15 and len(rep.skipped_examples) == 10
  assert rep.skipped_examples[0].endswith("interactions.csv:3: timestamp is not an integer: 'bad'")


def test_blank_lines_are_not_rows(tmp_path):
  write(tmp_path / "UserBehavior.csv", "1,2,3,pv,10\n\n1,3,3,pv,11\n")
  t, rep = load_interactions("taobao", tmp_path)
  assert t.num_rows == 2 and rep.blank_lines == 1 and rep.rows_skipped == 0


def test_header_missing_column(tmp_path):
  write(tmp_path / "user_log_format1.csv", "user_id,item_id,time_stamp,action_type\n1,2,1111,0\n")
  with pytest.raises(DataFormatError, match=r"user_log_format1.csv:1: .*cat_id"):
    load_interactions("tmall", tmp_path)


@pytest.mark.parametrize(
    "name,opts,fname,words",
    [
        ("movielens", {}, "u.data", ["movielens", "ratings.dat", "ratings.csv"]),
        ("tmall", {}, "user_log_format1.csv", ["tmall", "IJCAI-15"]),
        ("taobao", {}, "UserBehavior.csv", ["taobao"]),
        ("amazon_books", {}, "ratings_Books.csv", ["amazon_books", "reviews_Books_5.json"]),
        ("mind", {}, "behaviors.tsv", ["mind"]),
        ("csv", {}, "interactions.csv", ["csv"]),
        ("amazon_books", {"meta": True}, "meta_Books.json", ["amazon_books"]),
        ("mind", {"categories": True}, "news.tsv", ["mind"]),
    ],
)
def test_missing_file(tmp_path, name, opts, fname, words):
  if fname == "meta_Books.json":
    amazon_ratings(tmp_path, meta=False)
  if fname == "news.tsv":
    mind(tmp_path, news=False)
  with pytest.raises(FileNotFoundError) as err:
    load_interactions(name, tmp_path, **opts)
  msg = str(err.value)
  assert str(tmp_path) in msg and fname in msg
  for w in words:
    assert w in msg


def test_missing_movie_list(tmp_path):
  d, _ = ml1m(tmp_path)
  (d / "movies.dat").unlink()
  with pytest.raises(FileNotFoundError, match=r"movielens: expected movies.dat .* at .*movies.dat"):
    load_interactions("movielens", d)
  t, _ = load_interactions("movielens", d, genre="none")
  assert t.num_rows == 3


def test_unknown_option_and_registry(tmp_path):
  assert set(LOADERS) == {"movielens", "tmall", "taobao", "amazon_books", "mind", "csv"}
  generic_csv(tmp_path)
  with pytest.raises(TypeError, match="unknown loader option"):
    load_interactions("csv", tmp_path, actions=(0,))
  with pytest.raises(KeyError):
    load_interactions("nope", tmp_path)


def test_csv_delimiter_timestamp_category_and_report(tmp_path):
  write(tmp_path / "log.tsv", "category\tuser\titem\ttimestamp\nbooks\tu1\ti1\t30\n\tu2\ti2\t10\n")
  t, rep = load_interactions("csv", tmp_path, path="log.tsv", delimiter="\t")
  assert rows(t) == [("u1", "i1", 30, "books"), ("u2", "i2", 10, None)]
  assert rep.files == [str(tmp_path / "log.tsv")] and rep.rows_read == 2 and rep.rows_out == 2


def test_empty_files(tmp_path):
  write(tmp_path / "UserBehavior.csv", "")
  t, rep = load_interactions("taobao", tmp_path)
  assert t.num_rows == 0 and rep.rows_read == 0
  write(tmp_path / "interactions.csv", "user,item\n")
  t, _ = load_interactions("csv", tmp_path)
  assert t.num_rows == 0 and t.schema.names == ["user", "item", "timestamp", "category"]


def test_missing_data_dir_names_expected_file(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"tmall: expected user_log_format1.csv \(IJCAI-15"):
    load_interactions("tmall", tmp_path / "nope")


# ---------------------------------------------------------------------------
# options from strings (--loader_option), error classes, what-was-read report


def test_parse_options_converts_by_default_type():
  assert LOADERS["tmall"].parse_options(["actions=0, 2", "file=log.csv"]) == {
      "actions": (0, 2), "file": "log.csv"}
  taobao = LOADERS["taobao"]
  assert taobao.parse_options([("behaviors", "pv,buy")]) == {"behaviors": ("pv", "buy")}
  ml = LOADERS["movielens"]
  assert ml.parse_options(["min_rating=4", "genre=all"]) == {"min_rating": 4.0, "genre": "all"}
  # the last value of a key wins; "none" gives a None default back
  assert ml.parse_options(["min_rating=3.5", "min_rating=none"]) == {"min_rating": None}
  amazon = LOADERS["amazon_books"]
  for text, want in (("false", False), ("YES", True), ("1", True), ("auto", "auto")):
    assert amazon.parse_options([f"meta={text}"]) == {"meta": want}
  assert LOADERS["mind"].parse_options(["categories=no"]) == {"categories": False}
  assert LOADERS["csv"].parse_options(["delimiter=;", "path=a=b.csv"]) == {
      "delimiter": ";", "path": "a=b.csv"}
  assert LOADERS["csv"].parse_options([]) == {}


def test_option_types_and_none_default():
  ml = LOADERS["movielens"]
  assert ml.option_type("min_rating") == "float" and ml.option_type("genre") == "str"
  assert LOADERS["tmall"].option_type("actions") == "list[int]"
  assert LOADERS["taobao"].option_type("behaviors") == "list[str]"
  # a None default without a declared type: int if it parses, else the string
  from tdr_jax.data.loaders import Loader

  toy = Loader("toy", "", {"x": None, "on": False, "n": 3, "f": 0.5}, None, None)
  assert toy.parse_options(["x=7"]) == {"x": 7}
  assert toy.parse_options(["x=abc"]) == {"x": "abc"}
  assert toy.parse_options(["x="]) == {"x": None}
  assert toy.parse_options(["on=True", "n=-2", "f=1e-3"]) == {"on": True, "n": -2, "f": 1e-3}


@pytest.mark.parametrize(
    "name,pair,words",
    [
        ("tmall", "nope=1", ["--loader_option nope", "tmall", "actions=0 (list[int])",
                             "file='user_log_format1.csv'"]),
        ("tmall", "actions", ["'actions'", "key=value"]),
        ("tmall", "actions=0,x", ["actions=0,x", "'x' is not int"]),
        ("tmall", "actions=,", ["needs at least one value"]),
        ("tmall", "actions=7", ["takes 0, 1, 2, 3", "got 7"]),
        ("taobao", "behaviors=pv,click", ["takes pv, buy, cart, fav", "got click"]),
        ("movielens", "genre=second", ["genre", "first, all, none"]),
        ("movielens", "min_rating=high", ["'high' is not float", "default None"]),
        ("amazon_books", "meta=maybe", ["meta", "auto, True, False"]),
    ],
)
def test_parse_options_errors(name, pair, words):
  with pytest.raises(InputError) as err:
    LOADERS[name].parse_options([pair], flag="--loader_option")
  msg = str(err.value)
  assert "\n" not in msg and name in msg
  for w in words:
    assert w in msg, msg


def test_expected_errors_are_input_errors(tmp_path):
  with pytest.raises(MissingFileError) as err:  # also a FileNotFoundError
    load_interactions("tmall", tmp_path)
  assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, InputError)
  assert issubclass(DataFormatError, InputError) and issubclass(InputError, ValueError)
  with pytest.raises(KeyError) as err:
    load_interactions("nope", tmp_path)
  assert isinstance(err.value, InputError) and str(err.value).startswith("unknown dataset loader")
  with pytest.raises(InputError, match="genre must be"):
    load_interactions("movielens", ml1m(tmp_path)[0], genre="second")
  with pytest.raises(InputError, match=r"unknown dataset 'nope'; known: amazon_books, csv"):
    parse_loader_options("nope", [])
  assert parse_loader_options("synthetic", ["delimiter=;"]) == {"delimiter": ";"}  # csv loader


def test_load_report_kept_in_cache_and_described(tmp_path):
  lines = ["user,item,timestamp,category"]
  lines += [f"u{u},i{(u + j) % 9},{j},{'' if (u + j) % 9 == 8 else 'c%d' % ((u + j) % 3)}"
            for u in range(12) for j in range(4)]
  lines.insert(3, "u0,i1,soon,c0")
  lines.insert(5, "u0,i1")
  write(tmp_path / "interactions.csv", "\n".join(lines) + "\n")
  with pytest.raises(DataFormatError, match=r"interactions.csv:4: .*--skip_bad_rows"):
    load_dataset("csv", tmp_path, min_user_interactions=4)
  first = load_dataset("csv", tmp_path, min_user_interactions=4, skip_bad_rows=True)
  cached = load_dataset("csv", tmp_path, min_user_interactions=4, skip_bad_rows=True)
  assert "cache_file" not in first.source and cached.source["cache_file"].endswith(".npz")
  assert cached.source["load_report"] == first.source["load_report"]
  s = summary(cached)
  assert json.loads(json.dumps(s)) == s
  assert (s["rows_read"], s["rows_skipped"], s["rows_loaded"]) == (50, 2, 48)
  first_skip = s["skipped_examples"][0]
  assert first_skip.endswith("interactions.csv:4: timestamp is not an integer: 'soon'")
  assert (s["users"], s["items"], s["users_before_filter"]) == (12, 9, 12)
  assert (s["distinct_categories"], s["items_without_category"]) == (3, 1)
  text = describe(cached, "mine")
  assert text.startswith("dataset mine: read 50 rows from 1 file(s) with the csv loader, kept 48")
  assert "skipped 2 malformed row(s)" in text and "interactions.csv:6: expected 4 fields" in text
  assert "12 users, 9 items, 48 interactions" in text and "3 distinct; 1 item(s) without" in text
  check_usable(cached)
  few = load_dataset("csv", tmp_path, min_user_interactions=4, skip_bad_rows=True,
                     split=(1.0, 0.0, 0.0))
  with pytest.raises(InputError, match="0 test users"):
    check_usable(few)
  with pytest.raises(InputError, match="no data left after filtering"):
    load_dataset("csv", tmp_path, min_user_interactions=5, skip_bad_rows=True)
  with pytest.raises(MissingFileError, match=r"the folder .*nope does not exist"):
    load_dataset("csv", tmp_path / "nope")
