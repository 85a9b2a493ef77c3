"""Person re-identification evaluation: CMC and mAP as the RGA original computes them, and the
``reid`` protocol of ``python -m zoo eval`` (spec ``shared/specs/rga.md`` §5-§6).

Metric functions (importable on their own, numpy in and out):

- :func:`cmc` - cumulative matching characteristics with open-reid's options
  (``separate_camera_set``, ``single_gallery_shot``, ``first_match_break``);
- :func:`mean_ap` - mean average precision, modern scikit-learn (step-wise) AP by default,
  scikit-learn 0.18.1's trapezoidal AP with ``legacy_sklearn=True``;
- :func:`average_precision` - the AP of one ranked list, both flavours, without scikit-learn;
- :func:`cosine_distance` - ``1 - cos`` between L2-normalised feature rows.

Query filtering shared by both metrics: gallery entries with the **same id and the same camera**
as the query are removed (the only junk rule of the original); a query with no remaining
match is skipped (it counts in neither numerator nor denominator).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from zoo.data.imagefolder import load_rgb
from zoo.data.reid import REID_DATASETS, read_reid_dataset
from zoo.errors import ConfigError, InputError, InputTypeError
from zoo.eval.protocol import Protocol, register_protocol

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]

__all__ = ["cmc", "mean_ap", "average_precision", "cosine_distance", "ReidProtocol"]


def _to_numpy(value: ArrayLike, name: str, ndim: int) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.ndim != ndim:
        raise InputError(f"{name} must be a {ndim}-D array, got shape {array.shape}")
    return array


def _check_inputs(distmat, query_ids, gallery_ids, query_cams, gallery_cams):
    distmat = _to_numpy(distmat, "distmat", 2)
    if not np.issubdtype(distmat.dtype, np.floating) and not np.issubdtype(distmat.dtype, np.integer):
        raise InputTypeError(f"distmat must be numeric, got dtype {distmat.dtype}")
    m, n = distmat.shape
    arrays = []
    for name, value, size in (("query_ids", query_ids, m), ("gallery_ids", gallery_ids, n),
                              ("query_cams", query_cams, m), ("gallery_cams", gallery_cams, n)):
        array = _to_numpy(value, name, 1)
        if array.shape[0] != size:
            raise InputError(f"{name} has {array.shape[0]} entries but distmat is {m}x{n} (expected {size})")
        arrays.append(array)
    return (distmat, *arrays)


def _ranked(distmat: np.ndarray, query_ids, gallery_ids, query_cams, gallery_cams):
    """Gallery order per query (ascending distance, stable) and the per-query match / valid masks.

    Returns ``indices [m, n]``, ``matches [m, n]`` (ranked gallery id == query id) and
    ``same_cam [m, n]`` (ranked gallery camera == query camera).
    """
    # Stable sort: equal distances keep gallery order. The original uses numpy's default
    # (quicksort/introsort, unstable) order, so its CMC for tied distances can depend on numpy's
    # sort implementation (even on the CPU's SIMD support); this one is deterministic.
    indices = np.argsort(distmat, axis=1, kind="stable")
    matches = gallery_ids[indices] == query_ids[:, None]
    same_cam = gallery_cams[indices] == query_cams[:, None]
    return indices, matches, same_cam


def cmc(distmat: ArrayLike, query_ids: ArrayLike, gallery_ids: ArrayLike, query_cams: ArrayLike,
        gallery_cams: ArrayLike, topk: int = 100, separate_camera_set: bool = False,
        single_gallery_shot: bool = False, first_match_break: bool = False,
        rng: Optional[np.random.RandomState] = None) -> np.ndarray:
    """Cumulative matching characteristics, open-reid style (the RGA original's ``ranking.cmc``).

    Args:
        distmat: ``[m, n]`` query-to-gallery distances (smaller = more similar); numpy or torch.
        query_ids, gallery_ids: ``[m]`` / ``[n]`` identity labels.
        query_cams, gallery_cams: ``[m]`` / ``[n]`` camera ids.
        topk: length of the returned curve.
        separate_camera_set: also drop every gallery entry from the query's camera.
        single_gallery_shot: old CUHK03 protocol - 10 repeats, each keeping one randomly chosen
            entry per gallery identity (``np.random.choice`` on the legacy global RNG, identities in
            order of first appearance in the ranked list, as the original; pass ``rng`` - a
            ``np.random.RandomState`` - to use another generator).
        first_match_break: count only the first match of each query (rank-k accuracy; the only
            setting the RGA driver uses). Otherwise every match adds ``1 / #matches`` at its rank
            among the non-matches.

    Returns ``[topk]`` float64: CMC[k] = fraction of (non-skipped) queries matched within rank k+1.

    Ranking uses a **stable** sort: equal distances keep gallery order, so the result is
    deterministic. The original sorts with numpy's default (unstable) ``argsort``, whose order of
    tied distances is unspecified; results differ only where a tie straddles a match.
    """
    distmat, query_ids, gallery_ids, query_cams, gallery_cams = _check_inputs(
        distmat, query_ids, gallery_ids, query_cams, gallery_cams)
    if topk < 1:
        raise InputError(f"topk must be >= 1, got {topk}")
    choice = (rng or np.random).choice
    indices, matches, same_cam = _ranked(distmat, query_ids, gallery_ids, query_cams, gallery_cams)
    curve = np.zeros(topk)
    num_valid = 0
    for i in range(distmat.shape[0]):
        valid = ~(matches[i] & same_cam[i])  # drop same id + same camera
        if separate_camera_set:
            valid &= ~same_cam[i]
        if not np.any(matches[i, valid]):
            continue
        if single_gallery_shot:
            repeat = 10
            positions_by_id: dict = {}  # insertion order = first appearance in the ranked list
            for position in np.flatnonzero(valid):
                positions_by_id.setdefault(gallery_ids[indices[i, position]], []).append(position)
        else:
            repeat = 1
        for _ in range(repeat):
            if single_gallery_shot:
                sampled = np.zeros_like(valid)
                for positions in positions_by_id.values():
                    sampled[choice(positions)] = True
                hits = np.flatnonzero(matches[i, valid & sampled])
            else:
                hits = np.flatnonzero(matches[i, valid])
            delta = 1.0 / (len(hits) * repeat)
            for j, k in enumerate(hits):
                rank = k - j  # rank among the non-matches
                if rank >= topk:
                    break
                if first_match_break:
                    curve[rank] += 1
                    break
                curve[rank] += delta
        num_valid += 1
    if num_valid == 0:
        raise RuntimeError("cmc: no query has a valid match in the gallery")
    return curve.cumsum() / num_valid


def average_precision(y_true: ArrayLike, y_score: ArrayLike, legacy_sklearn: bool = False) -> float:
    """Average precision of one ranked list, as scikit-learn's ``average_precision_score``.

    Args:
        y_true: ``[n]`` bool, relevant entries (at least one).
        y_score: ``[n]`` scores, larger = ranked earlier; equal scores form one threshold, so
            the result does not depend on the order of ties.
        legacy_sklearn: scikit-learn 0.18.1's AP (what the original pins): trapezoidal area under
            the precision-recall curve from (recall 0, precision 1) to the first threshold reaching
            full recall. Default: scikit-learn >= 0.19's step sum ``sum_k (R_k - R_{k-1}) P_k``.
            E.g. one relevant item ranked 2nd: 0.5 (default) vs 0.25 (legacy).
    """
    y_true = _to_numpy(y_true, "y_true", 1).astype(bool)
    y_score = _to_numpy(y_score, "y_score", 1)
    if y_true.shape != y_score.shape:
        raise InputError(f"y_true {y_true.shape} and y_score {y_score.shape} differ in shape")
    if not y_true.any():
        raise InputError("average_precision needs at least one relevant entry")
    order = np.argsort(-y_score, kind="stable")
    y_true, y_score = y_true[order], y_score[order]
    # one point of the curve per distinct score (the last index of each run of equal scores)
    ends = np.r_[np.flatnonzero(np.diff(y_score)), y_true.size - 1]
    tps = np.cumsum(y_true)[ends].astype(np.float64)
    precision = tps / (ends + 1)
    recall = tps / tps[-1]
    if not legacy_sklearn:
        return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    last = int(np.searchsorted(tps, tps[-1]))  # first threshold with full recall
    recall = np.r_[0.0, recall[: last + 1]]
    precision = np.r_[1.0, precision[: last + 1]]
    return float(np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2))


def mean_ap(distmat: ArrayLike, query_ids: ArrayLike, gallery_ids: ArrayLike, query_cams: ArrayLike,
            gallery_cams: ArrayLike, legacy_sklearn: bool = False, return_per_query: bool = False):
    """Mean average precision over the queries, as the RGA original's ``ranking.mean_ap``.

    Args: as :func:`cmc` (``distmat`` numpy or torch); ``legacy_sklearn`` as in
    :func:`average_precision` (default: modern scikit-learn's step-wise AP).
    ``return_per_query=True`` also returns ``(ap [v], valid_query_index [v])``.

    Returns the mean AP in [0, 1] over the queries that keep at least one match after removing
    same-id-same-camera gallery entries (others are skipped). No top-k cut.
    """
    distmat, query_ids, gallery_ids, query_cams, gallery_cams = _check_inputs(
        distmat, query_ids, gallery_ids, query_cams, gallery_cams)
    indices, matches, same_cam = _ranked(distmat, query_ids, gallery_ids, query_cams, gallery_cams)
    aps, valid_queries = [], []
    for i in range(distmat.shape[0]):
        valid = ~(matches[i] & same_cam[i])
        y_true = matches[i, valid]
        if not y_true.any():
            continue
        y_score = -distmat[i][indices[i]][valid]
        aps.append(average_precision(y_true, y_score, legacy_sklearn=legacy_sklearn))
        valid_queries.append(i)
    if not aps:
        raise RuntimeError("mean_ap: no query has a valid match in the gallery")
    result = float(np.mean(aps))
    if return_per_query:
        return result, np.asarray(aps), np.asarray(valid_queries, dtype=np.int64)
    return result


def cosine_distance(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """``[m, d]``, ``[n, d]`` -> ``[m, n]`` float32 ``1 - <q/|q|, g/|g|>`` (eps 1e-12), as the original."""
    if query.dim() != 2 or gallery.dim() != 2 or query.shape[1] != gallery.shape[1]:
        raise InputError(f"cosine_distance expects [m, d] and [n, d] features, got {tuple(query.shape)} and "
                         f"{tuple(gallery.shape)}")
    q = torch.nn.functional.normalize(query.float(), dim=1, eps=1e-12)
    g = torch.nn.functional.normalize(gallery.float(), dim=1, eps=1e-12)
    return 1.0 - q @ g.t()


# ---------------------------------------------------------------------------------------------
# The `reid` protocol of `python -m zoo eval`


class _ReidSamples:
    """Indexable query + gallery images; item i -> ``(image [3, H, W], (is_query, pid, camid))``.

    Picklable (paths only), so DataLoader workers can read the images.
    """

    def __init__(self, query: tuple, gallery: tuple, transform: Callable[..., torch.Tensor]):
        self.items = [(True, image) for image in query] + [(False, image) for image in gallery]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        is_query, image = self.items[index]
        return self.transform(load_rgb(image.path)), (is_query, image.pid, image.camid)


def _limit_split(query: tuple, gallery: tuple, limit: int) -> tuple[tuple, tuple]:
    """``--limit N``: the first ``N // 2`` queries (at least 1) and ``N - that`` gallery images,
    preferring the valid matches of those queries (same id, other camera), then their other images,
    then the rest; the chosen gallery images keep gallery order."""
    if limit < 2:
        raise ConfigError(f"--limit for re-id needs at least 2 samples (a query and a gallery image), got {limit}")
    query = query[: max(1, limit // 2)]
    room = limit - len(query)
    pids = {image.pid for image in query}
    query_cams = {(image.pid, image.camid) for image in query}

    def priority(i: int) -> tuple:
        image = gallery[i]
        if image.pid not in pids:
            return (2, i)
        return (1 if (image.pid, image.camid) in query_cams else 0, i)

    keep = sorted(sorted(range(len(gallery)), key=priority)[:room])
    return query, tuple(gallery[i] for i in keep)


@register_protocol("reid")
class ReidProtocol(Protocol):
    """Single-query re-id evaluation as the RGA original runs it (spec §5.1, §6).

    Query and gallery features from ``model(images)`` in eval mode (the model's test feature),
    images resized to the config's ``input_size`` (256 x 128) with PIL bilinear and
    ImageNet-normalised; cosine distance; CMC (``first_match_break=True``, the driver's only
    setting) and mAP. Metrics in percent: ``rank1``, ``rank5``, ``rank10``, ``mAP``.

    Options (config ``eval`` mapping or ``--options``):
        dataset: ``cuhk03_labeled`` (default), ``cuhk03_detected`` or ``market1501``.
        legacy_sklearn: mAP with scikit-learn 0.18.1's trapezoidal AP (default False: step-wise).
        separate_camera_set, single_gallery_shot, first_match_break: :func:`cmc` options
            (defaults False, False, True). ``single_gallery_shot`` draws from a
            ``np.random.RandomState(seed)`` (default seed 0: the draws of ``np.random.seed(0)``).
        keep_junk: keep Market-1501 junk images (pid -1) in the gallery (default False).
        input_size: ``[height, width]`` overriding the config's preprocessing (for models built
            for another size).
    """

    task = "person re-identification"

    _KNOWN = {"dataset", "legacy_sklearn", "separate_camera_set", "single_gallery_shot", "first_match_break",
              "keep_junk", "input_size", "seed"}

    def __init__(self, data_dir: Path, model_config, options: dict, limit: Optional[int] = None):
        super().__init__(data_dir, model_config, options, limit)
        unknown = sorted(set(self.options) - self._KNOWN)
        if unknown:
            raise ConfigError(f"unknown reid protocol option(s) {unknown}; known: {sorted(self._KNOWN)}")
        self.dataset_name = self.options.get("dataset", "cuhk03_labeled")
        if self.dataset_name not in REID_DATASETS:
            raise ConfigError(f"reid protocol: unknown dataset {self.dataset_name!r}; known: {', '.join(REID_DATASETS)}")
        self.split = "test"  # the query and gallery images
        overrides = {"input_size": self.options["input_size"]} if self.options.get("input_size") else {}
        self.transform = self.eval_transform(**overrides)
        self._samples: Optional[_ReidSamples] = None

    def dataset(self) -> _ReidSamples:
        if self._samples is None:
            split = read_reid_dataset(self.data_dir, self.dataset_name, keep_junk=bool(self.options.get("keep_junk")))
            query, gallery = split.query, split.gallery
            if self.limit is not None:
                query, gallery = _limit_split(query, gallery, self.limit)
            self._samples = _ReidSamples(query, gallery, self.transform)
        return self._samples

    def collate(self, items: list):
        images = torch.stack([image for image, _ in items])
        return images, [meta for _, meta in items]

    def predict(self, model, batch, device) -> list:
        images, metas = batch
        features = model(images.to(device))
        if isinstance(features, (tuple, list)):
            raise TypeError("reid protocol: the model returned a tuple; evaluate it in eval mode, where it returns "
                            "one [B, D] test feature")
        if features.dim() != 2 or features.shape[0] != len(metas):
            raise InputError(f"reid protocol: expected features [{len(metas)}, D], got {tuple(features.shape)}")
        features = features.float().cpu()
        # clone: a row view would pickle the whole batch's storage when gathered across processes
        return [(feature.clone(), meta) for feature, meta in zip(features, metas)]

    def compute(self, predictions: list) -> dict[str, float]:
        query = [(f, m) for f, m in predictions if m[0]]
        gallery = [(f, m) for f, m in predictions if not m[0]]
        if not query or not gallery:
            raise InputError(f"reid protocol: need queries and gallery images, got {len(query)} and {len(gallery)}")
        distmat = cosine_distance(torch.stack([f for f, _ in query]), torch.stack([f for f, _ in gallery]))
        ids_cams = [np.array([m[k] for _, m in part], dtype=np.int64) for part in (query, gallery) for k in (1, 2)]
        query_ids, query_cams, gallery_ids, gallery_cams = ids_cams
        args = (distmat.numpy(), query_ids, gallery_ids, query_cams, gallery_cams)
        opts = self.options
        # the same draws as np.random.seed(seed) before the original's call, without touching numpy's global RNG
        rng = np.random.RandomState(int(opts.get("seed", 0)))
        curve = cmc(*args, topk=100, separate_camera_set=bool(opts.get("separate_camera_set", False)),
                    single_gallery_shot=bool(opts.get("single_gallery_shot", False)),
                    first_match_break=bool(opts.get("first_match_break", True)), rng=rng)
        m_ap = mean_ap(*args, legacy_sklearn=bool(opts.get("legacy_sklearn", False)))
        self.curves = {"cmc": {"ranks": list(range(1, len(curve) + 1)), "cmc": [100 * float(c) for c in curve],
                               "mAP": 100 * m_ap}}
        return {"rank1": 100 * float(curve[0]), "rank5": 100 * float(curve[4]), "rank10": 100 * float(curve[9]),
                "mAP": 100 * m_ap}
