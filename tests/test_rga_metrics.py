"""Re-id CMC / mAP against the original ranking.py results (fixtures metrics_*)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import load_case
from zoo.eval.reid import average_precision, cmc, cosine_distance, mean_ap

CASES = ["metrics_cuhk03_like", "metrics_market_like"]
ARGS = ["distmat", "query_ids", "gallery_ids", "query_cams", "gallery_cams"]


def _args(tensors, as_numpy: bool):
    return [tensors[k].numpy() if as_numpy else tensors[k] for k in ARGS]


@pytest.mark.parametrize("as_numpy", [True, False], ids=["numpy", "torch"])
@pytest.mark.parametrize("case", CASES)
def test_cmc_variants(case, as_numpy):
    meta, t = load_case("rga", case)
    args = _args(t, as_numpy)
    atol = meta["tolerance"]["cmc"]["atol"]
    rank = cmc(*args, separate_camera_set=False, single_gallery_shot=False, first_match_break=True)
    np.testing.assert_allclose(rank, t["cmc_rank_results_stable"].numpy(), rtol=0, atol=atol)
    assert rank.shape == (100,) and rank.dtype == np.float64
    np.testing.assert_allclose(rank[[0, 4, 9]], meta["summary"]["rank_results_top1_5_10"], rtol=0, atol=atol)
    allshots = cmc(*args)  # first_match_break=False is the signature's default, as in the original
    np.testing.assert_allclose(allshots, t["cmc_allshots_stable"].numpy(), rtol=0, atol=atol)
    np.random.seed(0)  # the original draws from numpy's legacy global RNG
    classic = cmc(*args, separate_camera_set=True, single_gallery_shot=True, first_match_break=False)
    np.testing.assert_allclose(classic, t["cmc_cuhk03_classic_stable"].numpy(), rtol=0, atol=atol)
    # the same draws through an explicit generator
    classic_rng = cmc(*args, separate_camera_set=True, single_gallery_shot=True, rng=np.random.RandomState(0))
    np.testing.assert_allclose(classic_rng, classic, rtol=0, atol=0)


@pytest.mark.parametrize("as_numpy", [True, False], ids=["numpy", "torch"])
@pytest.mark.parametrize("case", CASES)
def test_mean_ap_both_flavours(case, as_numpy):
    meta, t = load_case("rga", case)
    args = _args(t, as_numpy)
    atol = meta["tolerance"]["mAP"]["atol"]
    value, per_query, valid = mean_ap(*args, return_per_query=True)
    assert abs(value - meta["summary"]["mAP"]) <= atol
    np.testing.assert_allclose(per_query, t["ap_per_valid_query"].numpy(), rtol=0, atol=atol)
    np.testing.assert_array_equal(valid, t["valid_query_index"].numpy())
    assert len(valid) == meta["summary"]["num_valid_queries"]
    legacy = mean_ap(*args, legacy_sklearn=True)
    assert abs(legacy - meta["summary"]["mAP_sklearn018_interpolated"]) <= atol
    _, per_query_legacy, _ = mean_ap(*args, legacy_sklearn=True, return_per_query=True)
    np.testing.assert_allclose(per_query_legacy, t["ap_per_valid_query_sklearn018"].numpy(), rtol=0, atol=atol)


def test_average_precision_examples():
    # one relevant item ranked 2nd: step AP 0.5, scikit-learn 0.18.1's trapezoid 0.25 (spec §6.2)
    assert average_precision([0, 1, 0], [3.0, 2.0, 1.0]) == pytest.approx(0.5)
    assert average_precision([0, 1, 0], [3.0, 2.0, 1.0], legacy_sklearn=True) == pytest.approx(0.25)
    # relevant at ranks 1 and 3: (1 + 2/3) / 2
    assert average_precision([1, 0, 1, 0], [4.0, 3.0, 2.0, 1.0]) == pytest.approx(5 / 6)
    # ties form one threshold: order of tied entries does not matter
    a = average_precision([1, 0, 0], [1.0, 1.0, 0.0])
    b = average_precision([0, 1, 0], [1.0, 1.0, 0.0])
    assert a == b == pytest.approx(0.5)
    with pytest.raises(ValueError, match="relevant"):
        average_precision([0, 0], [1.0, 2.0])


def test_ties_are_stable_and_deterministic():
    """Equal distances keep gallery order (stable sort): the first of the tied entries ranks first."""
    distmat = np.array([[0.5, 0.5, 0.5, 0.9]], dtype=np.float32)
    ids_q, cams_q = np.array([7]), np.array([1])
    cams_g = np.array([2, 2, 2, 2])
    match_last = cmc(distmat, ids_q, np.array([1, 2, 7, 3]), cams_q, cams_g, topk=4, first_match_break=True)
    np.testing.assert_allclose(match_last, [0, 0, 1, 1])
    match_first = cmc(distmat, ids_q, np.array([7, 2, 1, 3]), cams_q, cams_g, topk=4, first_match_break=True)
    np.testing.assert_allclose(match_first, [1, 1, 1, 1])
    # AP ignores tie order (scikit-learn groups equal scores)
    ap_last = mean_ap(distmat, ids_q, np.array([1, 2, 7, 3]), cams_q, cams_g)
    ap_first = mean_ap(distmat, ids_q, np.array([7, 2, 1, 3]), cams_q, cams_g)
    assert ap_last == ap_first == pytest.approx(1 / 3)


def test_same_id_same_camera_filter_and_skipped_queries():
    distmat = np.array([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]])
    query_ids, gallery_ids = np.array([1, 2]), np.array([1, 1, 5])
    query_cams, gallery_cams = np.array([1, 1]), np.array([1, 2, 1])
    # query 0: gallery 0 (same id, same camera) is removed -> first match at rank 1; query 1 has no match
    np.testing.assert_allclose(cmc(distmat, query_ids, gallery_ids, query_cams, gallery_cams, topk=3,
                                   first_match_break=True), [1, 1, 1])
    assert mean_ap(distmat, query_ids, gallery_ids, query_cams, gallery_cams) == pytest.approx(1.0)
    with pytest.raises(RuntimeError, match="no query"):
        mean_ap(distmat, np.array([8, 9]), gallery_ids, query_cams, gallery_cams)


def test_bad_inputs():
    d = np.zeros((2, 3))
    with pytest.raises(ValueError, match="gallery_ids has 2 entries"):
        cmc(d, [1, 2], [1, 2], [0, 0], [0, 0, 0])
    with pytest.raises(ValueError, match="distmat must be a 2-D"):
        mean_ap(np.zeros(3), [1], [1, 2, 3], [0], [0, 0, 0])


def test_cosine_distance():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    g = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    d = cosine_distance(q, g)
    expected = torch.tensor([[0.0, 1 - 2 ** -0.5, 1.0], [1.0, 1 - 2 ** -0.5, 1.0]])
    torch.testing.assert_close(d, expected)
    assert d.dtype == torch.float32
