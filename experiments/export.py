"""Exports a finished run's retrieval (beam search + scorer + tree arrays + parameters) as one
serialized `jax.export` function, with its item vocabulary and a standalone loader.

  python experiments/export.py --workdir=runs/X --out=retriever/ [--k=50] [--beam_size=60]
  python experiments/export.py --workdir=runs/X --method=tdr_t --use_forest --out=...

The folder `--out` then holds (see tdr_jax/exporting.py, BUILD_NOTES "Exported artifact"):

  search.jaxexport   the serialized function history int32[b, L] -> top-k (items, scores),
                     batch dimension b symbolic, lowered for cpu and cuda
  params.npz         its tree arrays and scorer parameters (passed as arguments)
  item_vocab.json    internal item id -> raw item id
  manifest.json      method, k, beam, history length, platforms, fingerprints, file sizes/sha256
  retriever_loader.py  the loader (jax + numpy only):
                     python <out>/retriever_loader.py --history=i12,i7,i33

Exportable: the tree methods (tdr*, tdm, jtm, otm, plt; with --use_forest their forest) and
dr. Bad input ends with one line `error: <message>` on stderr and exit status 2.
"""

import json
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# --workdir, --method and --beam_size are experiments/cli.py's flags (shared with run.py).
from experiments import cli  # noqa: E402,F401
from experiments.cli import (FLAGS, check_served_run_flags, exit_on_input_error,  # noqa: E402
                             parse_flags)
from tdr_jax import exporting, serving  # noqa: E402
from tdr_jax.errors import InputError  # noqa: E402
from tdr_jax.methods import tree_family  # noqa: E402

flags.DEFINE_string("out", None, "Output folder of the artifact (created; files replaced).")
flags.DEFINE_integer("k", 50, "Items the exported function returns per user (fixed at export; "
                     "the loader may ask for fewer).")
flags.DEFINE_bool("use_forest", False, "Tree methods: export every round's (tree, model) with "
                  "the last model's reranking (the run's forest row).")
flags.DEFINE_list("platforms", list(exporting.PLATFORMS), "Platforms to lower for; if lowering "
                  "for all fails, cpu alone (noted in the manifest).")

ALLOWED_CONFIG_FLAGS = {"method", "beam_size"}
EXPORTABLE = tuple(tree_family.METHODS) + ("dr",)
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def _check_out(out: str) -> None:
  """--out must be a folder or a path that can become one (checked before any work)."""
  path = os.path.abspath(out)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise InputError(f"--out={out}: {path} exists and is not a folder")


def export(workdir: str, out: str, *, method=None, k: int = 50, beam_size=None,
           use_forest: bool = False, platforms=exporting.PLATFORMS) -> dict:
  """Writes the artifact of `workdir`'s `method` into `out`; returns its manifest."""
  if k < 1:
    raise InputError(f"--k={k} must be at least 1")
  bad = [p for p in platforms if p not in KNOWN_PLATFORMS]
  if bad or not platforms:
    raise InputError(f"--platforms={','.join(platforms)}: choose from "
                     f"{', '.join(KNOWN_PLATFORMS)}")
  _check_out(out)
  r = serving.Retriever.load(workdir, method=method, use_forest=use_forest)
  return export_retriever(r, out, k=k, beam_size=beam_size, platforms=platforms)


def export_retriever(r: serving.Retriever, out: str, *, k: int = 50, beam_size=None,
                     platforms=exporting.PLATFORMS) -> dict:
  """Writes the artifact of a loaded Retriever (also one with items added by `add_items`)."""
  if k < 1:
    raise InputError(f"--k={k} must be at least 1")
  _check_out(out)
  workdir, use_forest = r.workdir, r.use_forest
  if r.method not in EXPORTABLE:
    raise InputError(f"--method={r.method}: only {', '.join(EXPORTABLE)} can be exported "
                     f"(the brute-force models are served by experiments/retrieve.py)")
  model = r._model
  beam = model.default_beam if beam_size is None else int(beam_size)
  if k > len(r.vocab):
    raise InputError(f"--k={k}: must lie in [1, {len(r.vocab)}] (the number of items)")
  if r.method in tree_family.METHODS and k > beam:
    raise InputError(f"--k={k} exceeds the beam size {beam}; pass --beam_size >= k")
  if r.method == "dr" and not 1 <= beam <= model.info["num_structure_paths"]:
    raise InputError(f"--beam_size={beam}: DR's beam must lie in "
                     f"[1, {model.info['num_structure_paths']}]")
  exported, arrays, lowered, note = exporting.export_search(
      lambda args, history: model.search(args, history, k, beam), model.args,
      history_len=r.history_len, platforms=tuple(platforms))
  fingerprint = {"config": r.cfg.fingerprint()}
  vocab_path = os.path.join(workdir, serving.VOCAB_FILE)
  if os.path.exists(vocab_path):
    with open(vocab_path) as f:
      fingerprint["corpus"] = json.load(f)["corpus_fingerprint"]
  return exporting.write_artifact(
      out, exported, arrays, r.vocab, k=k, history_len=r.history_len, platforms=lowered,
      note=note, info={"method": r.method, "use_forest": bool(use_forest), "beam_size": beam,
                       "fingerprint": fingerprint, "workdir": os.path.abspath(workdir)})


def run(argv):
  check_served_run_flags(argv, FLAGS, binary="export.py", allowed=ALLOWED_CONFIG_FLAGS)
  if not FLAGS.out:
    raise InputError("--out is required (the artifact folder to write)")
  logging.set_verbosity(logging.ERROR)  # Orbax is chatty at INFO/WARNING
  m = export(FLAGS.workdir, FLAGS.out, method=FLAGS.method, k=FLAGS.k,
             beam_size=FLAGS.beam_size, use_forest=FLAGS.use_forest,
             platforms=tuple(FLAGS.platforms))
  sizes = ", ".join(f"{n} {r['bytes']} B" for n, r in m["files"].items())
  print(f"{m['method']}{' forest' if m['use_forest'] else ''}: k={m['k']} beam={m['beam_size']} "
        f"platforms={','.join(m['platforms'])} -> {FLAGS.out} ({sizes})")
  if m["platforms_note"]:
    print(f"note: {m['platforms_note']}")


def main(argv):
  exit_on_input_error(run, argv)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
