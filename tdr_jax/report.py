"""Reporting: the results table, the near-popularity flag, results.json / results.md and the
plots of a run. With several processes (multi-host) every process computes the same results and
only the writer (process 0, `parallel.is_writer`) writes the files.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from tdr_jax import parallel  # noqa: E402


def format_table(rows: Sequence[dict], ks: Sequence[int]) -> str:
  cols = []
  for k in ks:
    cols += [f"precision@{k}", f"recall@{k}", f"f_measure@{k}"]
  has_ratio = any(f"oracle_ratio@{ks[0]}" in r for r in rows)
  if has_ratio:
    cols += [f"oracle_ratio@{k}" for k in ks]
  head = "| method | " + " | ".join(c.replace("f_measure", "F").replace("precision", "P")
                                    .replace("recall", "R").replace("oracle_ratio", "oracle%")
                                    for c in cols) + " | train s |"
  lines = [head, "|" + "---|" * (len(cols) + 2)]
  for r in rows:
    vals = [f"{r[c]:.4f}" if c in r else "-" for c in cols]
    lines.append(f"| {r['method']} | " + " | ".join(vals) + f" | {r['train_seconds']:.1f} |")
  return "\n".join(lines)


# Rows that are not methods under test (oracle, non-learned rankers, random): never flagged.
REFERENCE_ROWS = ("oracle", "popularity", "heuristic", "random")
POPULARITY_MARGIN = 0.05  # a row within 5% of popularity's F@K0 (or below) is flagged
POPULARITY_WARNING = "learned little beyond item popularity: train longer or check the data"


def flag_near_popularity(rows: Sequence[dict], k: int) -> list[str]:
  """Sets row["warning"] of every row: POPULARITY_WARNING for a method row whose F@k is within
  POPULARITY_MARGIN of the popularity row's or below it, else None; returns the printed
  warnings."""
  pop = next((r for r in rows if r["method"] == "popularity"), None)
  key = f"f_measure@{k}"
  out = []
  for r in rows:
    r.setdefault("warning", None)
    if pop is None or r["method"] in REFERENCE_ROWS or key not in r:
      continue
    if r[key] <= (1.0 + POPULARITY_MARGIN) * pop[key]:
      r["warning"] = POPULARITY_WARNING
      out.append(f"warning: {r['method']}: F@{k} {r[key]:.4f} vs popularity {pop[key]:.4f}: "
                 f"{POPULARITY_WARNING}")
  return out


def fmt_or_dash(v) -> str:
  return "-" if v is None else f"{v:.3f}"


def plot_curves(path: str, rounds: list[dict], forest_curve: list[dict], ks: Sequence[int],
                title: str) -> None:
  """PNG: metrics@K0 over tree-learning rounds (TDR Fig. 3 shape) and forest vs last tree."""
  k = ks[0]
  ncols = 2 if forest_curve else 1
  fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4), squeeze=False)
  ax = axes[0, 0]
  x = [r["round"] + 1 for r in rounds]
  for m, name in (("precision", "Precision"), ("recall", "Recall"), ("f_measure", "F-measure")):
    ax.plot(x, [r[f"{m}@{k}"] for r in rounds], marker="o", label=f"{name}@{k}")
  ax.set_xlabel("tree (round of joint learning)")
  ax.set_title(f"{title}: tree learning")
  ax.legend()
  ax.grid(alpha=0.3)
  if forest_curve:
    ax = axes[0, 1]
    x = [c["num_trees"] for c in forest_curve]
    ax.plot(x, [c[f"last_tree_f_measure@{k}"] for c in forest_curve], marker="o",
            label=f"last tree F@{k}")
    ax.plot(x, [c[f"forest_f_measure@{k}"] for c in forest_curve], marker="s",
            label=f"forest F@{k}")
    ax.set_xlabel("number of trees")
    ax.set_title("forest vs last tree")
    ax.legend()
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_beam_diagnostics(path: str, diag: dict, ks: Sequence[int], title: str) -> None:
  """PNG: beam recall per level (share of label items whose level-j ancestor the level-j beam
  kept, `beam_diagnostics.level_recall`), with the beam's and the brute force's recall@K of the
  same model at the leaf level."""
  fig, ax = plt.subplots(figsize=(6.5, 4))
  levels = diag["levels"]
  ax.plot(levels, diag["beam_recall_per_level"], marker="o", color="C0",
          label=f"beam {diag['beam_size']}: recall per level")
  for i, k in enumerate(ks):
    color = f"C{i + 1}"
    ax.axhline(diag[f"brute_force_recall@{k}"], color=color, linestyle="--", alpha=0.8,
               label=f"brute force R@{k}")
    ax.plot([levels[-1]], [diag[f"beam_recall@{k}"]], marker="s", color=color, linestyle="none",
            label=f"beam R@{k}")
  ax.set_xlabel("tree level")
  ax.set_ylabel("share of test label items")
  ax.set_ylim(0.0, 1.02)
  ax.set_xticks(levels)
  ax.set_title(f"{title}: where the beam loses the labels")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_results(cfg, workdir: str, *, rows: list[dict], warnings: list[str],
                  per_method: dict[str, dict], data_summary: dict, num_users: int) -> dict:
  """Prints the table and writes workdir/results.json, results.md and, for the tree methods,
  their rounds and forest tables and plots, and their per-level beam diagnostics
  (results["beam_diagnostics"][label], beam_levels[-label].png). `per_method`: label -> the tree
  method's output (rounds, forest_curve, true_cat, beam_diagnostics). Returns the results dict
  written to results.json. Only the writer process writes (and plots); all return the dict."""
  ks = cfg.eval.topk
  write = parallel.is_writer()
  table = format_table(rows, ks)
  print(table)
  for w in warnings:
    print(w)
  results = {"dataset": cfg.data.dataset, "results": rows, "warnings": warnings,
             "data": data_summary}
  md = [f"# {cfg.data.dataset}: test users {num_users}", "", table, ""]
  if warnings:
    md += [f"* {w}" for w in warnings] + [""]
  single = len(per_method) == 1
  for label, out in per_method.items():
    rounds, forest_curve, true_cat = out["rounds"], out["forest_curve"], out["true_cat"]
    key = "" if single else f"{label} "
    if single:
      results["rounds"] = rounds
      results["forest_curve"] = forest_curve
    else:
      results.setdefault("per_method", {})[label] = {"rounds": rounds,
                                                    "forest_curve": forest_curve}
    if true_cat is not None:
      for what in ("category_purity", "purity_mislabelled", "purity_labelled"):
        results[f"{key}initial_{what}".strip()] = rounds[0].get(what)
        results[f"{key}final_{what}".strip()] = rounds[-1].get(what)
    if len(rounds) > 1:
      round_table = format_table(rounds, ks)
      md += [f"## {label}: tree learning rounds", "", round_table, ""]
      print("\n" + round_table)
      if true_cat is not None:
        md += ["Items in a node whose majority true category is theirs (first level with more "
               "nodes than categories), per round: all " + ", ".join(
                   f"{r['category_purity']:.3f}" for r in rounds) + "; mislabelled " +
               ", ".join(fmt_or_dash(r['purity_mislabelled']) for r in rounds) +
               "; correctly labelled " + ", ".join(
                   fmt_or_dash(r['purity_labelled']) for r in rounds), ""]
      plot_name = "rounds.png" if single else f"rounds-{label}.png"
      if write:
        plot_curves(os.path.join(workdir, plot_name), rounds, forest_curve, ks,
                    f"{cfg.data.dataset} {label}")
    diag = out.get("beam_diagnostics")
    if diag:
      results.setdefault("beam_diagnostics", {})[label] = diag
      if write:
        plot_beam_diagnostics(os.path.join(
            workdir, "beam_levels.png" if single else f"beam_levels-{label}.png"), diag, ks,
            f"{cfg.data.dataset} {label}")
      md += [f"## {label}: beam recall per level (final tree, beam {diag['beam_size']})", "",
             "| level | " + " | ".join(str(j) for j in diag["levels"]) + " |",
             "|---|" + "---|" * len(diag["levels"]),
             "| beam recall | " + " | ".join(f"{v:.4f}" for v in diag["beam_recall_per_level"])
             + " |", "", "Share of label items: " + ", ".join(
                 f"beam R@{k} {diag[f'beam_recall@{k}']:.4f} vs brute force "
                 f"{diag[f'brute_force_recall@{k}']:.4f}" for k in ks), ""]
    if forest_curve:
      md += [f"## {label}: forest vs last tree", "", "| trees | candidates/user | " + " | ".join(
          f"last F@{k} | forest F@{k}" for k in ks) + " |",
          "|---|---|" + "---|---|" * len(ks)]
      for c in forest_curve:
        md.append(f"| {c['num_trees']} | {c['candidates_per_user']:.1f} | " + " | ".join(
            f"{c[f'last_tree_f_measure@{k}']:.4f} | {c[f'forest_f_measure@{k}']:.4f}"
            for k in ks) + " |")
      md.append("")
  if write:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=1)
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write("\n".join(md))
  return results
