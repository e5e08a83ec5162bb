"""Deep Retrieval (tdr_jax.deep_retrieval, tdr_jax.models.structure_net): path probabilities,
path beam search, the multi-path objective, the M-step (scores, Algorithm 2), and run_dr end to
end with resume."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tdr_jax import deep_retrieval as dr
from tdr_jax import experiment, metrics, train, training
from tdr_jax.data import batches as batches_lib
from tdr_jax.errors import InputError
from tdr_jax.models import structure_net as dr_model

# ---- structure network on a tiny structure (K=3, D=3) ---------------------------------------

_HIST = np.array([[-1, -1, 2, 3], [1, 2, 3, 4], [-1, -1, -1, -1], [5, 5, 0, 7]], np.int32)


@pytest.fixture(scope="module", params=["gru", "mean", "gru+prefix_bias"])
def tiny(request):
  encoder = request.param.split("+")[0]
  net = dr_model.StructureNet(num_items=8, width=3, depth=3, embed_dim=4, user_dim=5,
                              path_dim=3, hidden=(7,), user_encoder=encoder,
                              rerank_dim=4, rngs=nnx.Rngs(request.param == "gru"),
                              prefix_bias="prefix_bias" in request.param)
  if net.use_prefix_bias:
    net.prefix_bias[...] = jax.random.normal(jax.random.key(3), net.prefix_bias[...].shape)
  user = dr_model.encode_users(net, jnp.asarray(_HIST))
  return net, user, np.asarray(dr_model.all_path_log_probs(net, user))


def test_path_probabilities_sum_to_one(tiny):
  _, _, logp = tiny
  assert logp.shape == (len(_HIST), 27)
  np.testing.assert_allclose(np.exp(logp).sum(axis=1), 1.0, rtol=1e-5)
  assert np.ptp(logp, axis=1).min() > 1e-3  # not the uniform distribution


def test_path_ids_round_trip():
  codes = dr_model.all_paths(3, 3)
  np.testing.assert_array_equal(dr_model.path_ids(codes.astype(np.int64), width=3), np.arange(27))
  np.testing.assert_array_equal(codes[5], [0, 1, 2])
  np.testing.assert_array_equal(dr_model.path_codes(np.array([-1, 26]), width=3, depth=3),
                                [[-1, -1, -1], [2, 2, 2]])
  jax_ids = dr_model.path_ids(jnp.asarray(codes), width=3)
  np.testing.assert_array_equal(jax_ids, np.arange(27))


@pytest.mark.parametrize("beam", [9, 27])
def test_beam_search_equals_exhaustive_when_exact(tiny, beam):
  # beam >= K^(D-1) keeps every prefix until the last layer: exactly the top-beam paths.
  net, user, logp = tiny
  codes, scores = dr_model.beam_search_paths(net, user, beam=beam)
  ids = np.asarray(dr_model.path_ids(codes, width=3))
  expect = np.argsort(-logp, axis=1, kind="stable")[:, :beam]
  np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(expect, axis=1))
  np.testing.assert_allclose(scores, np.take_along_axis(logp, expect, axis=1), atol=1e-5)
  np.testing.assert_allclose(scores, np.take_along_axis(logp, ids, axis=1), atol=1e-5)


def test_path_only_order_is_the_multi_path_likelihood(tiny):
  # With a beam over all K^D paths every item's J paths are found, so the path-only order is
  # log sum_j p(pi_j(v) | x) computed exhaustively (ties to the lower item id); items on no
  # path are not retrieved.
  net, _, logp = tiny
  graphdef, params = nnx.split(net)
  ids = np.array([[0, 13], [13, 26], [5, 6], [7, 8], [1, 2], [2, 1], [20, 21], [22, 3]])
  config = dr.DRConfig(width=3, depth=3, beam_size=27, num_paths=2, top_paths=2,
                       reranker=True)
  model = dr.DRModel(graphdef=graphdef, params=params,
                     paths=dr_model.path_codes(ids, width=3, depth=3).astype(np.int32),
                     config=config, info={})
  got, n = dr.retrieve(model, _HIST, topk=8, use_reranker=False)
  like = np.logaddexp.reduce(logp[:, ids], axis=2)  # [U, N]
  expect = np.argsort(-like, axis=1, kind="stable")
  np.testing.assert_array_equal(got, expect)
  assert (n == 8).all()
  # The reranked order is another order of the same candidates.
  reranked, _ = dr.retrieve(model, _HIST, topk=8)
  np.testing.assert_array_equal(np.sort(reranked, 1), np.sort(got, 1))


def test_beam_search_small_beam_scores_and_padding(tiny):
  net, user, logp = tiny
  codes, scores = dr_model.beam_search_paths(net, user, beam=4)
  ids = np.asarray(dr_model.path_ids(codes, width=3))
  assert (np.diff(np.asarray(scores), axis=1) <= 1e-6).all()  # best first
  # Path probability = product over layers (not the last layer alone).
  np.testing.assert_allclose(scores, np.take_along_axis(logp, ids, axis=1), atol=1e-5)
  assert (np.asarray(scores)[:, 0] <= logp.max(axis=1) + 1e-6).all()  # a beam may miss the best
  # A beam larger than K^D: the extra entries are -1 / -inf.
  small = dr_model.StructureNet(num_items=8, width=2, depth=2, user_dim=5, rngs=nnx.Rngs(0))
  codes, scores = dr_model.beam_search_paths(small, user, beam=6)
  assert np.isfinite(scores[:, :4]).all() and np.isneginf(scores[:, 4:]).all()
  assert (np.asarray(codes)[:, 4:] == -1).all()
  assert all(len(set(r)) == 4 for r in np.asarray(dr_model.path_ids(codes, width=2))[:, :4]
             .tolist())


def test_multi_path_objective_is_logsumexp_hand_case():
  # Zero kernels: every layer's softmax is softmax(bias), whatever the user.
  net = dr_model.StructureNet(num_items=3, width=2, depth=2, embed_dim=2, user_dim=3,
                              path_dim=2, hidden=(4,), rngs=nnx.Rngs(0))
  for k in net.kernels:
    k[...] = jnp.zeros_like(k[...])
  net.biases[-1][...] = jnp.log(jnp.array([[1.0, 3.0], [1.0, 4.0]]))  # p1 = (1/4, 3/4), p2 = (1/5, 4/5)
  graphdef, params = nnx.split(net)
  config = dr.DRConfig(width=2, depth=2, beam_size=2, num_paths=2, top_paths=2, reranker=False)
  loss_fn = dr.make_loss_fn(graphdef, config, num_items=3)
  # Item 1 lies on paths (0, 1) and (1, 0): 1/4 * 4/5 + 3/4 * 1/5 = 0.35.
  paths = jnp.array([[[0, 0], [1, 1]], [[0, 1], [1, 0]], [[1, 1], [0, 1]]], jnp.int32)
  batch = train.Batch(jnp.array([[0, 2], [-1, 0]], jnp.int32), jnp.array([1, 1], jnp.int32),
                      jnp.ones((2, 1)), jnp.array([True, False]))
  loss, aux = loss_fn(params, batch, (paths, np.float32(1.0)), jax.random.key(0))
  np.testing.assert_allclose(loss, -math.log(0.35), rtol=1e-6)
  user = dr_model.encode_users(net, batch.history)
  lp = dr_model.path_log_probs(net, user, paths[batch.target])
  np.testing.assert_allclose(lp[0], [math.log(0.2), math.log(0.15)], rtol=1e-6)
  np.testing.assert_allclose(dr_model.multi_path_log_likelihood(lp)[0], math.log(0.35), rtol=1e-6)


def test_frozen_reranker_sends_no_gradient(tiny):
  # rerank_on = 0: the loss is the structure term alone and so is its gradient, the shared
  # user encoder included; rerank_on = 1 moves the encoder by the reranker's term too.
  net, _, _ = tiny
  graphdef, params = nnx.split(net)
  config = dr.DRConfig(width=3, depth=3, beam_size=4, num_paths=2, top_paths=2,
                       rerank_negatives=5)
  loss_fn = dr.make_loss_fn(graphdef, config, num_items=8)
  paths = jnp.asarray(np.random.default_rng(0).integers(0, 3, (8, 2, 3)), jnp.int32)
  batch = train.Batch(jnp.asarray(_HIST), jnp.array([1, 4, 0, 6], jnp.int32),
                      jnp.ones((4, 1)), jnp.ones(4, bool))
  key = jax.random.key(1)
  frozen = jax.grad(lambda p: loss_fn(p, batch, (paths, 0.0), key)[0])(params)
  structure = jax.grad(lambda p: loss_fn(p, batch, (paths, 1.0), key)[1]["structure"])(params)
  joint = jax.grad(lambda p: loss_fn(p, batch, (paths, 1.0), key)[0])(params)
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(structure)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  enc = [k for k in ("gru", "pool") if k in frozen][0]
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(frozen[enc]),
                                                   jax.tree.leaves(joint[enc])))


def test_prefix_bias_rows_by_hand():
  # Zero MLP: layer d's logits are the prefix-bias row of c_1..c_{d-1} alone. K=2, D=3: rows
  # 0 (layer 1), 1-2 (layer 2: c_1), 3-6 (layer 3: 2 c_1 + c_2).
  net = dr_model.StructureNet(num_items=3, width=2, depth=3, embed_dim=2, user_dim=3,
                              path_dim=2, hidden=(4,), prefix_bias=True, rngs=nnx.Rngs(0))
  for k in net.kernels:
    k[...] = jnp.zeros_like(k[...])
  for b in net.biases:
    b[...] = jnp.zeros_like(b[...])
  assert net.prefix_bias[...].shape == (7, 2)
  bias = np.log(np.array([[1, 3], [1, 1], [2, 3], [1, 4], [1, 1], [5, 1], [1, 1]], np.float64))
  net.prefix_bias[...] = jnp.asarray(bias, jnp.float32)
  user = dr_model.encode_users(net, jnp.zeros((1, 2), jnp.int32))
  codes = jnp.asarray([[[1, 0, 0], [0, 1, 0], [1, 1, 1]]], jnp.int32)
  lp = np.asarray(dr_model.path_log_probs(net, user, codes))[0]
  # (1,0,0): 3/4 * 2/5 * 5/6; (0,1,0): 1/4 * 1/2 * 1/2; (1,1,1): 3/4 * 3/5 * 1/2.
  np.testing.assert_allclose(np.exp(lp), [3 / 4 * 2 / 5 * 5 / 6, 1 / 16, 3 / 4 * 3 / 5 / 2],
                             rtol=1e-5)
  # Greedy (beam 1) follows c_2 = 1 (3/5) and misses the best path; beam 2 keeps both
  # layer-2 prefixes under c_1 = 1 and finds it.
  codes, scores = dr_model.beam_search_paths(net, user, beam=1)
  np.testing.assert_array_equal(codes[0, 0], [1, 1, 0])  # tie at layer 3: lower code
  np.testing.assert_allclose(np.exp(scores[0, 0]), 3 / 4 * 3 / 5 / 2, rtol=1e-5)
  codes, scores = dr_model.beam_search_paths(net, user, beam=2)
  np.testing.assert_array_equal(codes[0], [[1, 0, 0], [1, 1, 0]])
  np.testing.assert_allclose(np.exp(scores[0]), [3 / 4 * 2 / 5 * 5 / 6, 3 / 4 * 3 / 5 / 2],
                             rtol=1e-5)


def test_prior_prefix_bias_by_hand():
  # K=2, D=2, J=2: item 0 (2 targets) on paths (0,1), (1,0); item 1 (4) on (0,1), (0,0);
  # item 2 (0) on (1,1), (1,0). Each path of an item gets count/J; add-1 smoothing.
  codes = np.array([[[0, 1], [1, 0]], [[0, 1], [0, 0]], [[1, 1], [1, 0]]])
  table = dr.prior_prefix_bias(codes, np.array([2, 4, 0]), width=2, smoothing=1.0)
  want = np.log(np.array([[6 / 8, 2 / 8],    # layer 1: c_1 = 0 holds 1 + 2 + 2, c_1 = 1 holds 1
                          [3 / 7, 4 / 7],    # layer 2 after c_1 = 0: (0,0) 2, (0,1) 1 + 2
                          [2 / 3, 1 / 3]]))  # after c_1 = 1: (1,0) 1 + 0, (1,1) 0
  np.testing.assert_allclose(table, want, rtol=1e-6)
  # As the only logits (zero MLP) the layers give the smoothed path frequencies, summing to 1.
  net = dr_model.StructureNet(num_items=3, width=2, depth=2, embed_dim=2, user_dim=3,
                              path_dim=2, hidden=(4,), prefix_bias=True, rngs=nnx.Rngs(0))
  for k in net.kernels:
    k[...] = jnp.zeros_like(k[...])
  for b in net.biases:
    b[...] = jnp.zeros_like(b[...])
  net.prefix_bias[...] = jnp.asarray(table)
  user = dr_model.encode_users(net, jnp.zeros((1, 2), jnp.int32))
  every = jnp.asarray([[[0, 0], [0, 1], [1, 0], [1, 1]]], jnp.int32)
  p = np.exp(np.asarray(dr_model.path_log_probs(net, user, every))[0])
  np.testing.assert_allclose(p, [6 / 8 * 3 / 7, 6 / 8 * 4 / 7, 2 / 8 * 2 / 3, 2 / 8 / 3],
                             rtol=1e-5)
  with pytest.raises(InputError, match="needs prefix_bias"):
    dr.dr_config("smoke", prefix_bias_init="prior")
  with pytest.raises(InputError, match="prefix_bias_init"):
    dr.dr_config("smoke", prefix_bias=True, prefix_bias_init="ones")
  with pytest.raises(InputError, match="freeze_prefix_bias needs"):
    dr.dr_config("smoke", prefix_bias=True, freeze_prefix_bias=True)
  # Left at "zeros" the option is outside the checkpoint identity (old runs keep theirs).
  assert "prefix_bias_init" not in dr.dr_identity(dr.dr_config("smoke", prefix_bias=True))
  assert dr.dr_identity(dr.dr_config("smoke", prefix_bias=True, prefix_bias_init="prior"))[
      "prefix_bias_init"] == "prior"


# ---- M-step ---------------------------------------------------------------------------------

def test_path_scores_sum_and_streaming_hand_case():
  # Item 0 seen twice (paths 5, 7 then 7, 9), item 2 once; item 1 never.
  items = np.array([0, 2, 0])
  ids = np.array([[5, 7], [3, -1], [7, 9]])
  probs = np.array([[0.5, 0.2], [0.9, 0.0], [0.4, 0.3]])
  p, s = dr.aggregate_path_scores(items, ids, probs, num_items=3, top=2)
  np.testing.assert_array_equal(p, [[7, 5], [-1, -1], [3, -1]])
  np.testing.assert_allclose(s, [[0.6, 0.5], [0, 0], [0.9, 0]])
  # Streaming, eta = 0.5: after (5: .5, 7: .2), min_score = .2; 7 -> .5*.2 + .4 = .5,
  # 9 (new) -> .5*.2 + .3 = .4, 5 (old only) -> .5*.5 = .25 drops out.
  p, s = dr.streaming_path_scores(items, ids, probs, num_items=3, top=2, decay=0.5)
  np.testing.assert_array_equal(p, [[7, 9], [-1, -1], [3, -1]])
  np.testing.assert_allclose(s, [[0.5, 0.4], [0, 0], [0.9, 0]], rtol=1e-6)


def test_candidate_lists_append_current_and_drop_repeats():
  cand, sc = dr.candidate_lists(np.array([[4, 2, -1]]), np.array([[0.5, 0.25, 0.0]]),
                                np.array([[2, 7]]))
  np.testing.assert_array_equal(cand, [[4, 2, -1, -1, 7]])
  np.testing.assert_allclose(sc, [[0.5, 0.25, 0, 0, 0]])


def test_coordinate_descent_greedy_hand_case():
  # K^D = 4 paths, J = 2, alpha = 0.1, f(x+1) - f(x) = 0.25, 3.75, 16.25 at x = 0, 1, 2.
  # Every item: N_v = 1, s = (.4, .3, .2, .1) on paths 0..3, starts on {0, 1} (sizes 3, 3, 0, 0).
  # Item 0 leaves (sizes 2, 2, 0, 0): gains log s - .1 * df = (-2.54, -2.83, -1.63, -2.33) -> 2;
  #   then log(.2 + s) - pen = (-2.14, -2.32, -, -1.23) -> 3.
  # Items 1 and 2 leave (sizes 1, 1, 1, 1): equal penalties, so the best scores 0 then 1.
  cand = np.tile(np.arange(4, dtype=np.int32), (3, 1))
  scores = np.tile(np.array([0.4, 0.3, 0.2, 0.1], np.float32), (3, 1))
  counts = np.ones(3)
  current = np.array([[0, 1]] * 3)
  new, obj = dr.coordinate_descent(cand, scores, counts, current, num_structure_paths=4,
                                   alpha=0.1, iterations=1)
  np.testing.assert_array_equal(new, [[2, 3], [0, 1], [0, 1]])
  expect = math.log(0.3) + 2 * math.log(0.7) - 0.1 * (2 ** 4 + 2 ** 4 + 1 + 1) / 4
  np.testing.assert_allclose(obj, [expect], rtol=1e-6)
  # Without the penalty every item takes its two best paths.
  new, _ = dr.coordinate_descent(cand, scores, counts, current, num_structure_paths=4,
                                 alpha=0.0, iterations=2)
  np.testing.assert_array_equal(new, [[0, 1]] * 3)


def _reference_cd(cand, scores, counts, current, num_paths_total, alpha):
  """Plain-Python Algorithm 2 (one sweep) for comparison."""
  cur = [list(r) for r in current]
  sizes = np.bincount(np.ravel(current), minlength=num_paths_total).astype(np.int64)
  for v in range(len(cur)):
    for c in cur[v]:
      sizes[c] -= 1
    partial, picks = 0.0, []
    for _ in range(len(cur[v])):
      best, best_gain = None, -np.inf
      for c, s in zip(cand[v], scores[v]):
        if c < 0 or c in picks:
          continue
        fit = counts[v] * math.log(max(partial + s, 1e-30)) if counts[v] > 0 else 0.0
        gain = fit - alpha * (((sizes[c] + 1) ** 4 - sizes[c] ** 4) / 4)
        if gain > best_gain:
          best, best_gain = c, gain
      picks.append(best)
      sizes[best] += 1
      partial += scores[v][list(cand[v]).index(best)]
    cur[v] = picks
  return np.array(cur)


def test_coordinate_descent_matches_reference_and_paths_distinct():
  rng = np.random.default_rng(0)
  n, total, s_keep, j = 60, 16, 5, 3
  beam = np.stack([rng.choice(total, s_keep, replace=False) for _ in range(n)])
  sc = np.sort(rng.gamma(1.0, size=(n, s_keep)), axis=1)[:, ::-1]
  current = dr.random_paths(rng, num_items=n, num_structure_paths=total, num_paths=j)
  counts = rng.integers(0, 4, n).astype(np.float64)  # some items never seen: no scores
  beam[counts == 0] = -1
  cand, cand_s = dr.candidate_lists(beam, sc, current)
  new, _ = dr.coordinate_descent(cand, cand_s, counts, current, num_structure_paths=total,
                                 alpha=0.05, iterations=1)
  np.testing.assert_array_equal(new, _reference_cd(cand, cand_s, counts, current, total, 0.05))
  assert new.shape == (n, j) and not metrics.repeated_in_row(new).any()
  assert ((new >= 0) & (new < total)).all()
  # Items never seen keep their paths (their only candidates).
  unseen = counts == 0
  np.testing.assert_array_equal(np.sort(new[unseen], 1), np.sort(current[unseen], 1))


def test_alpha_shrinks_largest_path():
  # 300 items that all score path 0 best, paths 1..5 a bit lower.
  rng = np.random.default_rng(1)
  n, total = 300, 64
  paths = np.tile(np.arange(6), (n, 1))
  scores = np.tile([1.0, 0.5, 0.4, 0.3, 0.2, 0.1], (n, 1)) * rng.uniform(0.5, 1.5, (n, 1))
  current = dr.random_paths(rng, num_items=n, num_structure_paths=total, num_paths=2)
  cand, cand_s = dr.candidate_lists(paths, scores, current)
  counts = np.full(n, 5.0)
  sizes = {}
  for alpha in (0.0, 1e-6, 1e-4):
    new, obj = dr.coordinate_descent(cand, cand_s, counts, current, num_structure_paths=total,
                                     alpha=alpha, iterations=3)
    sizes[alpha] = dr.path_statistics(new, num_structure_paths=total)["max_path_size"]
  assert sizes[0.0] == n  # everyone on path 0
  assert sizes[0.0] > 1.5 * sizes[1e-6] and sizes[1e-6] > 1.5 * sizes[1e-4]


def test_random_paths_distinct_and_seeded():
  a = dr.random_paths(np.random.default_rng(3), num_items=500, num_structure_paths=8,
                      num_paths=3)
  b = dr.random_paths(np.random.default_rng(3), num_items=500, num_structure_paths=8,
                      num_paths=3)
  np.testing.assert_array_equal(a, b)
  assert not metrics.repeated_in_row(a).any() and a.min() >= 0 and a.max() < 8
  c = dr.random_paths(np.random.default_rng(3), num_items=500, num_structure_paths=1000,
                      num_paths=3)
  assert not metrics.repeated_in_row(c).any()


def _blobs(centers: np.ndarray, per: int, spread: float, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return np.repeat(centers, per, axis=0) + spread * rng.normal(size=(len(centers) * per,
                                                                      centers.shape[1]))


@pytest.mark.parametrize("width,depth,num_paths", [(3, 2, 2), (4, 3, 3), (2, 2, 3), (5, 1, 5)])
def test_kmeans_paths_codes_valid_distinct_seeded(width, depth, num_paths):
  x = np.random.default_rng(0).normal(size=(60, 5))
  ids = dr.kmeans_paths(x, width=width, depth=depth, num_paths=num_paths, seed=1)
  assert ids.shape == (60, num_paths) and ids.dtype == np.int64
  codes = dr_model.path_codes(ids, width=width, depth=depth)  # [N, J, D]
  assert ((codes >= 0) & (codes < width)).all()
  assert not metrics.repeated_in_row(ids).any()
  np.testing.assert_array_equal(
      ids, dr.kmeans_paths(x, width=width, depth=depth, num_paths=num_paths, seed=1))
  if num_paths <= width:  # the J paths share the first D - 1 codes (next-best last codes)
    assert (codes[:, :, :-1] == codes[:, :1, :-1]).all()


def test_kmeans_paths_identical_and_separated_vectors():
  # Three well-separated blobs of 10 items (K = 3): three distinct level-1 codes, one per blob.
  centers = np.array([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
  x = _blobs(centers, 10, 0.01, seed=2)
  for seed in range(5):
    codes = dr_model.path_codes(dr.kmeans_paths(x, width=3, depth=2, num_paths=2, seed=seed),
                                width=3, depth=2)
    first = codes[:, 0, 0].reshape(3, 10)
    assert (first == first[:, :1]).all() and len(set(first[:, 0].tolist())) == 3
  # Identical vectors get identical codes (here 4 copies each of 5 vectors, K = 2 < 5).
  y = np.repeat(np.random.default_rng(3).normal(size=(5, 4)), 4, axis=0)
  ids = dr.kmeans_paths(y, width=2, depth=3, num_paths=2, seed=0)
  np.testing.assert_array_equal(ids.reshape(5, 4, 2), np.repeat(ids[::4, None], 4, axis=1))
  # Hand case: items 0, 1 near each other, item 2 far (K = 3, D = 1): the first path is the
  # item's own code, the second its nearest neighbour's.
  ids = dr.kmeans_paths(np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), width=3, depth=1,
                        num_paths=2)
  np.testing.assert_array_equal(ids, [[0, 1], [1, 0], [2, 1]])
  # Zero vectors (items without training data) get random paths, not one shared path.
  z = np.vstack([np.zeros((50, 3)), x])
  ids = dr.kmeans_paths(z, width=3, depth=4, num_paths=2, seed=0)
  assert len(np.unique(ids[:50, 0])) > 20 and not metrics.repeated_in_row(ids).any()
  np.testing.assert_array_equal(
      dr_model.path_codes(ids[50:], width=3, depth=4)[:, 0, 0].reshape(3, 10)[:, 1:],
      np.repeat(dr_model.path_codes(ids[50:], width=3, depth=4)[:, 0, 0].reshape(3, 10)[:, :1],
                9, axis=1))
  assert dr.expected_nonempty_paths(num_items=1, num_structure_paths=10, num_paths=3) == \
      pytest.approx(3.0)


def test_path_index_and_statistics():
  ids = np.array([[0, 3], [3, 1], [3, 0]])
  offsets, items, largest = dr.path_index(ids, num_structure_paths=5)
  np.testing.assert_array_equal(offsets, [0, 2, 3, 3, 6, 6])
  np.testing.assert_array_equal(items, [0, 2, 1, 0, 1, 2])
  assert largest == 3
  assert dr.path_statistics(ids, num_structure_paths=5) == {
      "max_path_size": 3, "mean_items_per_nonempty_path": 2.0, "nonempty_paths": 3,
      "num_structure_paths": 5}


def test_bad_settings_are_refused():
  with pytest.raises(ValueError, match="beam_size"):
    dr.DRConfig(width=3, depth=2, beam_size=0)
  with pytest.raises(ValueError, match="beam_size"):
    dr.DRConfig(width=3, depth=2, beam_size=10)
  with pytest.raises(ValueError, match="num_paths"):
    dr.DRConfig(width=2, depth=1, beam_size=1, top_paths=1, num_paths=3)
  # Paths have no capacity in DR: K^D J = 18 < 19 items is fine (the old rule refused it);
  # only an empty corpus is refused.
  dr.DRConfig(width=3, depth=2, beam_size=5, top_paths=5, num_paths=2).check_corpus(19)
  with pytest.raises(ValueError, match="no items"):
    dr.DRConfig(width=3, depth=2, beam_size=5, top_paths=5, num_paths=2).check_corpus(0)
  with pytest.raises(ValueError, match="init_paths"):
    dr.dr_config("smoke", init_paths="tree")
  with pytest.raises(ValueError, match="user_encoder"):
    dr.dr_config("smoke", user_encoder="lstm")
  with pytest.raises(ValueError, match="unknown DR preset"):
    dr.dr_config("nope")
  for name in dr.PRESETS:
    dr.dr_config(name)
  assert dr.dr_config("movielens").alpha == 3e-5 and dr.dr_config("amazon_books").width == 100


# ---- end to end on the smoke data, crash and resume -----------------------------------------

@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  # World v1 (strong item co-occurrence): 800 training samples are enough there for DR to
  # retrieve clearly better than random, which is what these pipeline tests check.
  cfg = experiment.make_config("smoke", data_dir=str(tmp_path_factory.mktemp("data")),
                               synthetic_world="v1")
  ds, _ = experiment.load_data(cfg)
  ev = experiment.evaluation_set(cfg, ds)
  run = dict(topk=max(cfg.eval.topk), seed=cfg.seed, history_len=cfg.data.history_len,
             batch_size=cfg.train.batch_size, max_train_samples=cfg.data.max_train_samples)
  return cfg, ds, ev, run


@pytest.fixture(scope="module")
def smoke_run(smoke, tmp_path_factory):
  _, ds, ev, run = smoke
  workdir = str(tmp_path_factory.mktemp("dr_full"))
  return workdir, dr.run_dr(ds, ev, dr.dr_config("smoke"), workdir=workdir, **run)


def test_run_dr_retrieves_valid_items(smoke, smoke_run):
  _, ds, ev, run = smoke
  _, (retrieved, seconds, settings) = smoke_run
  assert retrieved.shape == (ev.num_users, run["topk"]) and retrieved.dtype == np.int32
  assert ((retrieved >= 0) & (retrieved < ds.num_items)).all()
  assert not metrics.repeated_in_row(retrieved).any()
  assert settings["msteps"] == 1 and settings["steps"] == sum(settings["steps_per_estep"])
  assert len(set(settings["steps_per_estep"])) == 1 and len(settings["steps_per_estep"]) == 2
  stats = settings["path_stats"]
  assert 1 <= stats["max_path_size"] and stats["nonempty_paths"] <= 8 ** 3
  assert settings["candidates_per_user"]["min"] >= run["topk"]
  assert seconds > 0
  r20 = metrics.retrieval_metrics(retrieved, ev.label_offsets, ev.label_items,
                                  num_items=ds.num_items, ks=(20,))["recall@20"]
  assert r20 > 1.5 * 20 / ds.num_items  # better than random
  path_f = settings["path_only"][f"f_measure@{run['topk']}"]  # paths alone, no reranker
  assert 0.0 <= path_f <= 1.0
  assert 0 < settings["random_nonempty_paths"] <= 8 ** 3
  json.dumps(settings)


def test_kmeans_init_and_small_structure_train(smoke):
  # K^D J = 4 < N items now trains (paths hold many items); kmeans initial paths from item
  # vectors; without vectors kmeans init is refused.
  _, ds, ev, run = smoke
  config = dr.dr_config("smoke", width=2, depth=2, num_paths=1, beam_size=4, top_paths=4,
                        init_paths="kmeans")
  assert config.num_structure_paths * config.num_paths < ds.num_items
  vectors = np.random.default_rng(0).normal(size=(ds.num_items, 6)).astype(np.float32)
  with pytest.raises(ValueError, match="item vectors"):
    dr.run_dr(ds, ev, config, workdir=None, **run)
  retrieved, _, settings = dr.run_dr(ds, ev, config, workdir=None, item_vectors=vectors,
                                     ks=(run["topk"],), **run)
  assert ((retrieved >= 0) & (retrieved < ds.num_items)).all()
  assert settings["path_stats"]["nonempty_paths"] <= 4
  assert 0.0 <= settings["path_only"][f"f_measure@{run['topk']}"] <= 1.0


def test_run_dr_crash_and_resume_match(smoke, smoke_run, tmp_path):
  _, ds, ev, run = smoke
  _, (full, _, full_settings) = smoke_run
  config = dr.dr_config("smoke")
  steps = full_settings["steps_per_estep"][0]
  workdir = str(tmp_path / "dr")
  # Crash at the end of E-step 0 (before the M-step), then mid E-step 1 (after a checkpoint
  # that is not the crash step), then finish.
  with pytest.raises(dr.SimulatedCrash):
    dr.run_dr(ds, ev, config, workdir=workdir, stop_after_step=steps, **run)
  with pytest.raises(dr.SimulatedCrash):
    dr.run_dr(ds, ev, config, workdir=workdir, stop_after_step=steps + 7, **run)
  again, _, settings = dr.run_dr(ds, ev, config, workdir=workdir, **run)
  assert settings["resumed_from_checkpoint"] is not None and settings["steps_run"] < steps
  np.testing.assert_array_equal(again, full)
  assert settings["path_stats"] == full_settings["path_stats"]
  # Another configuration refuses the checkpoint.
  with pytest.raises(ValueError, match="another dr run"):
    dr.run_dr(ds, ev, dr.dr_config("smoke", alpha=0.5), workdir=workdir, **run)


def test_phase_ends_equal_and_given_lengths():
  assert training.phase_ends(4, 12) == [4, 8, 12]
  assert training.phase_ends(5, 12) == [5, 10, 12]  # the last phase may be shorter
  assert training.phase_ends([6, 3, 3], 12) == [6, 9, 12]
  with pytest.raises(ValueError, match="sum to"):
    training.phase_ends([6, 3], 12)
  with pytest.raises(ValueError, match=">= 1"):
    training.phase_ends([0, 12], 12)


def test_longer_first_estep_and_frozen_reranker(smoke, tmp_path):
  """first_estep_epochs=2 makes E-step 0 twice as long (the M-step comes after it);
  rerank_esteps=1 freezes the reranker after E-step 0: its parameters equal those of a run
  that stops after E-step 0, while the structure network keeps training. A crash at the end
  of the long first E-step resumes to the uninterrupted run."""
  _, ds, ev, run = smoke
  fit_args = dict(seed=run["seed"], history_len=run["history_len"],
                  batch_size=run["batch_size"], max_train_samples=run["max_train_samples"])
  config = dr.dr_config("smoke", first_estep_epochs=2.0, rerank_esteps=1)
  full = dr.fit(ds, config, workdir=None, **fit_args)
  first, per = full.info["steps_per_estep"]
  assert first == 2 * per and full.info["msteps"] == 1 and full.info["steps"] == first + per
  only_first = dr.fit(ds, dr.dr_config("smoke", first_estep_epochs=2.0, rerank_esteps=1,
                                       em_rounds=0), workdir=None, **fit_args)

  def part(model, rerank):
    flat = jax.tree_util.tree_flatten_with_path(model.params)[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat
            if jax.tree_util.keystr(p).startswith("['rerank_") == rerank}

  frozen, stopped = part(full, True), part(only_first, True)
  assert frozen and frozen.keys() == stopped.keys()
  for k in frozen:
    np.testing.assert_allclose(frozen[k], stopped[k], rtol=1e-6, atol=1e-7, err_msg=k)
  moved = part(full, False)
  assert any(not np.allclose(moved[k], v) for k, v in part(only_first, False).items())
  workdir = str(tmp_path / "dr")
  with pytest.raises(dr.SimulatedCrash):
    dr.fit(ds, config, workdir=workdir, stop_after_step=first, **fit_args)
  again = dr.fit(ds, config, workdir=workdir, **fit_args)
  assert again.info["resumed_from_checkpoint"] == first
  np.testing.assert_array_equal(again.paths, full.paths)
  for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(full.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_prior_prefix_bias_is_the_start_and_frozen_stays(smoke):
  """prefix_bias_init="prior" starts the table at `prior_prefix_bias` of the training targets'
  initial paths; with freeze_prefix_bias it ends there after the EM, while learned it moves."""
  _, ds, _, run = smoke
  fit_args = dict(seed=run["seed"], history_len=run["history_len"],
                  batch_size=run["batch_size"], max_train_samples=run["max_train_samples"])
  base = dict(prefix_bias=True, prefix_bias_init="prior", em_rounds=0)
  frozen = dr.fit(ds, dr.dr_config("smoke", freeze_prefix_bias=True, **base), **fit_args)
  learned = dr.fit(ds, dr.dr_config("smoke", **base), **fit_args)
  config = dr.dr_config("smoke", **base)
  ids = dr.initial_paths(config, num_items=ds.num_items, seed=run["seed"])
  samples = batches_lib.training_samples(ds, max_train_samples=run["max_train_samples"],
                                         seed=run["seed"])
  targets = batches_lib.window_labels(ds, samples, 1)[:, 0]
  want = dr.prior_prefix_bias(
      dr_model.path_codes(ids, width=config.width, depth=config.depth),
      np.bincount(targets, minlength=ds.num_items), width=config.width,
      smoothing=config.prior_smoothing)
  np.testing.assert_allclose(np.asarray(jax.tree.leaves(frozen.params["prefix_bias"])[0]), want, rtol=1e-6)
  assert not np.allclose(np.asarray(jax.tree.leaves(learned.params["prefix_bias"])[0]), want, atol=1e-4)
