"""Suppress-and-Rescue (Nguyen et al., WBCBench 2026, Algorithm 1), generalised,
with its semantic verification branch.

A classifier trained on a long tail rarely *predicts* a rare class even when
it gives it some probability. Algorithm 1 post-processes the classifier's
saved probabilities, one image at a time:

1. **sensitivity boosting** – the rare classes' probabilities are multiplied
   by boost factors (inverse log-frequency of the training counts, raised to a
   ``strength``); if the boosted arg-max is not a rare class, the base
   prediction stands;
2. **semantic verification** – a second, independent model (the paper: a
   contrastive projection head on MedSigLIP embeddings) must give the
   candidate class a probability of at least ``tau``;
3. **biological filtering** – the cell's morphology must agree: a contour
   spikiness above ``tau_s`` (the paper's prolymphocyte rule) or a
   class-conditional Mahalanobis distance of (N:C ratio, staining intensity,
   nucleus offset) within ``tau_m`` (its plasma-cell rule).

Only a candidate passing every enabled check replaces the base prediction;
anything else is *suppressed* (the base prediction is kept). The paper's two
rare classes and their rules are parameters here: any ``rare_classes``, each
with its own ``morphology`` rule ("none", "spikiness" or "mahalanobis") and
thresholds, all chosen by :func:`fit_thresholds` on validation predictions.

The verification branch is :func:`fit_contrastive_head`: an MLP projection
trained with the supervised contrastive loss (:func:`supcon_loss`, Khosla et
al. 2020) on fixed embeddings, giving class probabilities by a temperature
softmax over cosine similarities to class prototypes. Embeddings are the
book's backbone features by default (:class:`wbclib.embeddings.EmbeddingStore`)
or a SigLIP vision tower (:class:`SiglipEmbedder`, e.g. MedSigLIP weights
that the user has locally).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .heads import single_torch_thread, train_on_embeddings
from .losses import inverse_log_frequency_weights
from .metrics import paired_difference, scores as _scores
from .morphology import PAPER_FEATURES, MahalanobisFilter

PathLike = Union[str, Path]

#: The biological checks a rare class can have (Algorithm 1, phase 3).
MORPHOLOGY_RULES = ("none", "spikiness", "mahalanobis")
#: The cumulative phases of Algorithm 1, as in the paper's Table 2.
PHASES = ("boost", "semantic", "morphology")


# --------------------------------------------------------------------------
# Supervised contrastive learning on fixed embeddings
# --------------------------------------------------------------------------


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss, L_out of Khosla et al. 2020 (eq. 2).

    For every anchor i with at least one positive (another row of its class),

        ``l_i = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / T) / sum_{a != i} exp(z_i.z_a / T) )``

    and the loss is the mean of l_i over those anchors (0 when there are
    none). ``z`` must be L2-normalised (N, D). Unlike the authors' code there
    is no extra ``T / base_T`` factor.
    """
    if z.ndim != 2 or len(z) != len(labels):
        raise ValueError(f"z must be (N, D) with one label per row; got {tuple(z.shape)} and {len(labels)} labels")
    labels = torch.as_tensor(labels, device=z.device)
    n = len(z)
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = positives.sum(1)
    anchors = n_pos > 0
    if not anchors.any():
        return z.sum() * 0.0
    per_anchor = -log_prob.masked_fill(~positives, 0.0).sum(1) / n_pos.clamp_min(1)
    return per_anchor[anchors].mean()


class ProjectionHead(nn.Module):
    """Standardise, then Linear -> BatchNorm -> ReLU -> Linear, L2-normalised:
    the "advanced projection head" of the paper's contrastive branch (its
    layout is not given; this is the SimCLR / SupCon projection)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, hidden: int = 256, out_dim: int = 64):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        d = self.mean.numel()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net((x - self.mean) / self.std), dim=1)


class ContrastiveVerifier(nn.Module):
    """A trained :class:`ProjectionHead` and one prototype per class (the
    normalised mean projection of its training rows): ``predict_proba`` is a
    softmax over cosine similarity to each prototype divided by
    ``temperature``. A class without training rows gets probability ~0."""

    def __init__(self, head: ProjectionHead, prototypes: torch.Tensor, present: torch.Tensor, temperature: float):
        super().__init__()
        self.head = head
        self.register_buffer("prototypes", prototypes)
        self.register_buffer("present", present)
        self.temperature = float(temperature)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        sim = self.head(x) @ self.prototypes.T / self.temperature
        return sim.masked_fill(~self.present, float("-inf"))

    @torch.no_grad()
    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        self.eval()
        x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
        with single_torch_thread():
            return torch.softmax(self.logits(x), dim=1).numpy()

    @torch.no_grad()
    def project(self, features: np.ndarray) -> np.ndarray:
        self.eval()
        return self.head(torch.as_tensor(np.asarray(features), dtype=torch.float32)).numpy()


def fit_contrastive_head(features: np.ndarray, labels: Sequence[int], num_classes: int, hidden: int = 256,
                         out_dim: int = 64, temperature: float = 0.1, epochs: int = 30, batch_size: int = 256,
                         lr: float = 1e-2, weight_decay: float = 1e-4, sampler: str = "class_balanced",
                         seed: int = 0, proba_temperature: Optional[float] = None) -> ContrastiveVerifier:
    """Train a projection head with :func:`supcon_loss` on fixed ``features``
    (N, D) and return the :class:`ContrastiveVerifier`.

    Batches follow the named sampler (class-balanced by default, so a batch
    holds positives for the rare classes too); AdamW with a cosine schedule.
    Rows may include several views of one image (e.g. pristine and degraded),
    which are then positives of each other. Probabilities use
    ``proba_temperature`` (default: the training temperature).
    """
    with single_torch_thread():
        return _fit_contrastive_head(features, labels, num_classes, hidden, out_dim, temperature, epochs, batch_size,
                                     lr, weight_decay, sampler, seed, proba_temperature)


def _fit_contrastive_head(features, labels, num_classes, hidden, out_dim, temperature, epochs, batch_size, lr,
                          weight_decay, sampler, seed, proba_temperature) -> ContrastiveVerifier:
    torch.manual_seed(seed)
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    y = torch.as_tensor(np.array(labels, dtype=np.int64))
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need at least two rows and one label per row; got {len(x)} rows, {len(y)} labels")
    head = ProjectionHead(x.mean(0), x.std(0).clamp_min(1e-6), hidden, out_dim)
    train_on_embeddings(head, list(head.parameters()), x, y, lambda z, labels: supcon_loss(z, labels, temperature),
                        sampler, epochs, lr, weight_decay, batch_size, seed, min_batch=2)
    with torch.no_grad():
        z = head(x)
        prototypes = torch.zeros(num_classes, z.shape[1])
        present = torch.zeros(num_classes, dtype=torch.bool)
        for c in range(num_classes):
            if (y == c).any():
                prototypes[c] = F.normalize(z[y == c].mean(0), dim=0)
                present[c] = True
    return ContrastiveVerifier(head, prototypes, present, proba_temperature or temperature)


# --------------------------------------------------------------------------
# SigLIP embeddings (MedSigLIP when the user has its weights)
# --------------------------------------------------------------------------


def _import_siglip():
    try:
        from transformers import SiglipVisionConfig, SiglipVisionModel
    except ImportError:
        raise ImportError("the SigLIP embedder needs transformers (pip install transformers)") from None
    return SiglipVisionConfig, SiglipVisionModel


class SiglipEmbedder(nn.Module):
    """The pooled output of a SigLIP vision tower, as a :class:`wbclib.models.Backbone`
    for :class:`wbclib.embeddings.EmbeddingStore`.

    :meth:`from_pretrained` reads local weights only (a folder written by
    ``save_pretrained``: MedSigLIP's own checkpoint, a full SigLIP model whose
    vision tower is taken, or a vision model); :meth:`from_config` builds a
    randomly initialised tower (tests). Images are resized to the model's
    ``image_size`` and scaled to [-1, 1] (SigLIP's mean = std = 0.5).
    """

    def __init__(self, model, tag: str, name: str = "siglip"):
        super().__init__()
        self.model = model
        self.tag = tag
        self.name = name

    @classmethod
    def from_pretrained(cls, path: PathLike, name: str = "siglip") -> "SiglipEmbedder":
        _, SiglipVisionModel = _import_siglip()
        path = Path(path).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such folder; give the local folder of SigLIP / MedSigLIP weights "
                                    "(config.json + model.safetensors)")
        model = SiglipVisionModel.from_pretrained(str(path), local_files_only=True).eval()
        stamp = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(path.iterdir())
                         if p.is_file())
        return cls(model, hashlib.sha256(f"{path.resolve()}|{stamp}".encode()).hexdigest()[:16], name)

    @classmethod
    def from_config(cls, config=None, seed: int = 0, name: str = "siglip_random", **config_kwargs) -> "SiglipEmbedder":
        SiglipVisionConfig, SiglipVisionModel = _import_siglip()
        config = config if config is not None else SiglipVisionConfig(**config_kwargs)
        torch.manual_seed(seed)
        model = SiglipVisionModel(config).eval()
        tag = hashlib.sha256(f"{config.to_json_string()}|seed={seed}".encode()).hexdigest()[:16]
        return cls(model, tag, name)

    @property
    def image_size(self) -> int:
        return int(self.model.config.image_size)

    @property
    def num_features(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).pooler_output

    def backbone(self):
        from .models import Backbone

        return Backbone(name=self.name, model=self, num_features=self.num_features, mean=(0.5, 0.5, 0.5),
                        std=(0.5, 0.5, 0.5), pretrained=False)

    def store(self, tables: Sequence[pd.DataFrame], root: Path, cache_dir: Optional[Path], batch_size: int = 32):
        """An :class:`~wbclib.embeddings.EmbeddingStore` of ``tables`` embedded by this tower."""
        from .embeddings import EmbeddingStore

        return EmbeddingStore(tables, self.name, self.image_size, root, cache_dir, desc=f"{self.name} embeddings",
                              backbone=self.backbone(), weights_tag=self.tag, batch_size=batch_size)


# --------------------------------------------------------------------------
# Suppress-and-Rescue
# --------------------------------------------------------------------------


def prob_classes(frame: pd.DataFrame) -> List[str]:
    """Class names of a predictions table's ``prob_<class>`` columns, in order."""
    classes = [c[len("prob_"):] for c in frame.columns if c.startswith("prob_")]
    if not classes:
        raise ValueError("the predictions table has no prob_<class> columns")
    return classes


def class_counts(labels: Sequence[str], classes: Sequence[str]) -> Dict[str, int]:
    """Training images per class, in ``classes`` order (0 for an absent class)."""
    counts = pd.Series(list(labels)).value_counts()
    return {c: int(counts.get(c, 0)) for c in classes}


def rarest_classes(counts: Mapping[str, int], n: int) -> List[str]:
    """The ``n`` classes with the fewest training images (ties: the later one in ``counts``' order)."""
    order = sorted(enumerate(counts.items()), key=lambda item: (item[1][1], -item[0]))
    return [name for _, (name, _) in order[:n]]


def boost_factors(counts: Mapping[str, int], rare_classes: Sequence[str], strength: float = 1.0) -> Dict[str, float]:
    """B_c = w_c ** strength for each rare class, w the inverse log-frequency
    weights 1 / log(1 + n_c) of the training counts scaled to mean 1
    (:func:`wbclib.losses.inverse_log_frequency_weights`); strength 0 is no boost."""
    names = list(counts)
    w = inverse_log_frequency_weights([max(1, int(counts[c])) for c in names])
    weight = dict(zip(names, w))
    return {c: float(weight[c] ** strength) for c in rare_classes}


def _per_class(value, cls: str, default):
    if isinstance(value, Mapping):
        return value.get(cls, default)
    return default if value is None else value


MorphologySource = Union[pd.DataFrame, Callable[[pd.DataFrame], pd.DataFrame], None]


def _rows_features(morph: MorphologySource, frame: pd.DataFrame, rows: np.ndarray) -> pd.DataFrame:
    """Morphology features of ``frame``'s rows at positions ``rows``: from a
    table aligned with ``frame`` or a callable measuring only those rows."""
    if morph is None:
        raise ValueError("a morphology rule is enabled but no morphology features were given")
    if callable(morph):
        out = morph(frame.iloc[rows])
        if len(out) != len(rows):
            raise ValueError(f"the morphology callable returned {len(out)} rows for {len(rows)}")
        return out.reset_index(drop=True)
    if len(morph) != len(frame):
        raise ValueError(f"morphology table has {len(morph)} rows, the predictions {len(frame)}")
    return morph.iloc[rows].reset_index(drop=True)


def _verify_matrix(verify_probs, classes: Sequence[str], n: int) -> np.ndarray:
    if verify_probs is None:
        raise ValueError("semantic verification is enabled but no verification probabilities were given")
    if isinstance(verify_probs, pd.DataFrame):
        verify_probs = verify_probs[[f"prob_{c}" for c in classes]].to_numpy(float)
    v = np.asarray(verify_probs, dtype=float)
    if v.shape != (n, len(classes)):
        raise ValueError(f"verification probabilities must be ({n}, {len(classes)}), got {v.shape}")
    return v


@dataclass
class SuppressAndRescue:
    """Algorithm 1 with configurable rare classes (see the module docstring).

    ``boosts`` maps each rare class to its factor B_c; ``tau`` (semantic),
    ``tau_s`` (spikiness) and ``tau_m`` (Mahalanobis) are numbers or per-class
    mappings; ``morphology`` is a rule name or a per-class mapping of
    :data:`MORPHOLOGY_RULES`. ``verify=False`` skips phase 2. ``mahalanobis``
    is a fitted :class:`wbclib.morphology.MahalanobisFilter` over
    ``mahalanobis_features`` (needed only by the "mahalanobis" rule).
    """

    rare_classes: Sequence[str]
    boosts: Mapping[str, float]
    tau: Union[float, Mapping[str, float]] = 0.0
    tau_s: Union[float, Mapping[str, float]] = -math.inf
    tau_m: Union[float, Mapping[str, float]] = math.inf
    morphology: Union[str, Mapping[str, str]] = "none"
    verify: bool = True
    mahalanobis: Optional[MahalanobisFilter] = field(default=None, repr=False)
    mahalanobis_features: Sequence[str] = PAPER_FEATURES
    #: What :func:`fit_thresholds` recorded (validation scores, strength).
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        for c in self.rare_classes:
            rule = self.rule(c)
            if rule not in MORPHOLOGY_RULES:
                raise ValueError(f"unknown morphology rule {rule!r} for {c}; known: {MORPHOLOGY_RULES}")

    def rule(self, cls: str) -> str:
        return _per_class(self.morphology, cls, "none")

    def to_dict(self) -> dict:
        """The parameters as plain JSON-able values (the filter's statistics are not included)."""
        out = {k: v for k, v in asdict(self).items() if k != "mahalanobis"}
        out["rare_classes"] = list(self.rare_classes)
        out["mahalanobis_features"] = list(self.mahalanobis_features)
        return json.loads(json.dumps(out, default=float))

    def candidates(self, frame: pd.DataFrame) -> tuple:
        """(classes, base prediction, boosted candidate) for every row."""
        classes = prob_classes(frame)
        probs = frame[[f"prob_{c}" for c in classes]].to_numpy(float)
        base = frame["pred"].astype(str).to_numpy() if "pred" in frame else np.asarray(classes)[probs.argmax(1)]
        unknown = set(self.rare_classes) - set(classes)
        if unknown:
            raise ValueError(f"rare classes {sorted(unknown)} have no prob_ column")
        boost = np.array([float(self.boosts.get(c, 1.0)) if c in self.rare_classes else 1.0 for c in classes])
        candidate = np.asarray(classes)[(probs * boost).argmax(1)]
        return classes, base, candidate

    def apply(self, pred_frame: pd.DataFrame, verify_probs=None, morph_features: MorphologySource = None) -> pd.DataFrame:
        """Algorithm 1 on every row of a predictions table (``prob_<class>``
        columns, ``pred``): returns a copy with the new ``pred`` and
        ``base_pred``, ``candidate`` and ``rescue`` (``no_candidate``,
        ``semantic_reject``, ``morphology_reject`` or ``rescued``).

        ``verify_probs`` (N, C) in the table's class order (array or a table
        with ``prob_<class>`` columns) is read only for rows with a rare
        candidate; ``morph_features`` (a table aligned with the rows, or a
        callable measuring a subset of rows) only for rows that pass phase 2
        and whose candidate has a morphology rule.
        """
        classes, base, candidate = self.candidates(pred_frame)
        n = len(pred_frame)
        index = {c: i for i, c in enumerate(classes)}
        surfaced = np.isin(candidate, list(self.rare_classes)) & (candidate != base)
        outcome = np.where(surfaced, "rescued", "no_candidate").astype(object)
        keep = surfaced.copy()
        if self.verify and keep.any():
            v = _verify_matrix(verify_probs, classes, n)
            p = v[np.arange(n), [index[c] for c in candidate]]
            tau = np.array([float(_per_class(self.tau, c, 0.0)) for c in candidate])
            failed = keep & ~(p >= tau)
            outcome[failed] = "semantic_reject"
            keep &= ~failed
        needs = keep & np.array([self.rule(c) != "none" for c in candidate], dtype=bool)
        if needs.any():
            rows = np.flatnonzero(needs)
            passed = self.morphology_pass(_rows_features(morph_features, pred_frame, rows), candidate[rows])
            failed_rows = rows[~passed]
            outcome[failed_rows] = "morphology_reject"
            keep[failed_rows] = False
        out = pred_frame.copy()
        out["base_pred"] = base
        out["candidate"] = candidate
        out["pred"] = np.where(keep, candidate, base)
        out["rescue"] = outcome
        return out

    def morphology_pass(self, features: pd.DataFrame, candidates: Sequence[str]) -> np.ndarray:
        """Phase 3 for rows with these ``features`` and candidate classes; a
        missing (NaN) measurement fails."""
        passed = np.ones(len(candidates), dtype=bool)
        for c in set(candidates):
            at = np.asarray(candidates) == c
            rule = self.rule(c)
            if rule == "spikiness":
                s = features.loc[at, "spikiness"].to_numpy(float)
                passed[at] = np.nan_to_num(s, nan=-np.inf) > float(_per_class(self.tau_s, c, -math.inf))
            elif rule == "mahalanobis":
                d = self.distances(features.loc[at], c)
                passed[at] = np.nan_to_num(d, nan=np.inf) <= float(_per_class(self.tau_m, c, math.inf))
        return passed

    def distances(self, features: pd.DataFrame, cls: str) -> np.ndarray:
        if self.mahalanobis is None:
            raise ValueError(f"class {cls} uses the Mahalanobis rule but no fitted MahalanobisFilter was given")
        x = features[list(self.mahalanobis_features)].to_numpy(float)
        return self.mahalanobis.distance(x, cls)


# --------------------------------------------------------------------------
# Choosing the parameters on validation predictions
# --------------------------------------------------------------------------


#: Default boost strengths searched on validation. The former grid (max 4.0)
#: was chosen at its top in 3 of 4 ``cpu`` runs; at the ``cpu`` PBC-LT counts 16 boosts
#: the rarest class ~3e5-fold, past any useful value.
BOOST_STRENGTHS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)


@dataclass
class RescueGrid:
    """Candidate values searched by :func:`fit_thresholds`."""

    #: Exponents of the inverse log-frequency boosts (0: no boost).
    strengths: Sequence[float] = BOOST_STRENGTHS
    #: When validation picks the largest strength, the grid is extended by this
    #: factor (repeatedly, up to ``max_strength``) so the chosen value is interior;
    #: at ``max_strength`` (or with a factor <= 1) a warning says it is at the edge.
    extend_factor: float = 2.0
    max_strength: float = 64.0
    #: Semantic thresholds on the verifier's probability (above 1: reject all).
    taus: Sequence[float] = (1.01, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)
    #: Morphology thresholds per class: this many quantiles of the feature over
    #: the validation rows that surface as that class.
    morphology_quantiles: int = 10
    #: Rounds of coordinate ascent over the rare classes.
    rounds: int = 2


def fit_thresholds(val_frame: pd.DataFrame, counts: Mapping[str, int], rare_classes: Sequence[str],
                   verify_probs=None, morph_features: MorphologySource = None, phase: str = "morphology",
                   grid: Optional[RescueGrid] = None, mahalanobis: Optional[MahalanobisFilter] = None,
                   mahalanobis_features: Sequence[str] = PAPER_FEATURES, metric: str = "macro_f1",
                   start: Optional[SuppressAndRescue] = None) -> SuppressAndRescue:
    """Choose Algorithm 1's parameters on **validation** predictions only.

    ``val_frame`` is a saved ``predictions_val*.csv`` (with true ``label``),
    ``counts`` the training images per class (they give the boosts),
    ``verify_probs`` and ``morph_features`` the verifier's probabilities and
    morphology for the same rows. ``phase`` selects how much of Algorithm 1 is
    on: ``"boost"`` (phase 1 alone, the strength only), ``"semantic"``
    (phases 1-2: strength and a ``tau`` per rare class) or ``"morphology"``
    (phases 1-3: also each rare class's rule among :data:`MORPHOLOGY_RULES`
    and its threshold; "mahalanobis" only for classes ``mahalanobis`` was
    fitted on).

    For each strength of the grid, the per-class parameters are set by
    coordinate ascent on the validation ``metric`` (macro-F1), starting from
    "reject everything" (or the best of ``start`` when given, so that a later
    phase never scores below an earlier one on validation); among equal
    scores the setting that changes the fewest validation predictions wins,
    so nothing is rescued unless it helps. Test predictions never enter.

    A strength chosen at the top of the grid extends it (``grid.extend_factor``
    up to ``grid.max_strength``) and the search is repeated; one still at an
    edge (the top, or a lowest strength above 0) is flagged in
    ``info["strength_at_edge"]`` with a warning.
    """
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; known: {PHASES}")
    grid = grid or RescueGrid()
    classes = prob_classes(val_frame)
    rare = [c for c in rare_classes if c in classes]
    index = {c: i for i, c in enumerate(classes)}
    y = val_frame["label"].map(index).to_numpy()
    if np.isnan(y.astype(float)).any():
        raise ValueError("validation labels must all be among the prob_ classes")
    y = y.astype(int)
    n = len(val_frame)
    probs = val_frame[[f"prob_{c}" for c in classes]].to_numpy(float)
    base_names = val_frame["pred"].astype(str).to_numpy() if "pred" in val_frame else np.asarray(classes)[probs.argmax(1)]
    base = np.array([index[c] for c in base_names])
    rare_idx = np.array([index[c] for c in rare], dtype=int)

    # Candidates under every strength
    cands = {}
    for s in grid.strengths:
        boost = np.ones(len(classes))
        for c, b in boost_factors(counts, rare, s).items():
            boost[index[c]] = b
        cand = (probs * boost).argmax(1)
        cands[s] = (cand, np.isin(cand, rare_idx) & (cand != base))
    any_surface = np.zeros(n, dtype=bool)
    for _, surfaced in cands.values():
        any_surface |= surfaced

    verify = phase in ("semantic", "morphology")
    v = _verify_matrix(verify_probs, classes, n) if verify else None

    # Morphology of every row that can surface, measured once
    spiky = np.full(n, np.nan)
    dist = {c: np.full(n, np.nan) for c in rare}
    rules_for = {c: ["none"] for c in rare}
    if phase == "morphology" and any_surface.any() and morph_features is not None:
        rows = np.flatnonzero(any_surface)
        feats = _rows_features(morph_features, val_frame, rows)
        if "spikiness" in feats:
            spiky[rows] = feats["spikiness"].to_numpy(float)
            for c in rare:
                rules_for[c].append("spikiness")
        if mahalanobis is not None and set(mahalanobis_features) <= set(feats.columns):
            x = feats[list(mahalanobis_features)].to_numpy(float)
            for c in rare:
                if c in mahalanobis.classes_:
                    dist[c][rows] = mahalanobis.distance(x, c)
                    rules_for[c].append("mahalanobis")

    def thresholds(values: np.ndarray, surfaced_as_c: np.ndarray, ascending: bool) -> List[float]:
        vals = values[surfaced_as_c]
        vals = np.unique(vals[np.isfinite(vals)])
        if vals.size == 0:
            return []
        qs = np.unique(np.quantile(vals, np.linspace(0, 1, grid.morphology_quantiles)))
        # midpoints below/above each quantile so "keep all" and "keep none" are reachable
        cuts = sorted(set(qs.tolist()) | {float(vals.min()) - 1e-9, float(vals.max()) + 1e-9})
        return cuts if ascending else cuts[::-1]

    def evaluate(s, params) -> tuple:
        cand, surfaced = cands[s]
        keep = surfaced.copy()
        for c in rare:
            ci = index[c]
            at = keep & (cand == ci)
            if not at.any():
                continue
            p = params[c]
            ok = np.ones(n, dtype=bool)
            if verify:
                ok &= v[:, ci] >= p["tau"]
            if p["rule"] == "spikiness":
                ok &= np.nan_to_num(spiky, nan=-np.inf) > p["tau_s"]
            elif p["rule"] == "mahalanobis":
                ok &= np.nan_to_num(dist[c], nan=np.inf) <= p["tau_m"]
            keep &= ~at | ok
        pred = np.where(keep, cand, base)
        return _scores(y, pred, len(classes))[metric], int(keep.sum())

    strict = dict(tau=grid.taus[0] if verify else 0.0, rule="none", tau_s=-math.inf, tau_m=math.inf)
    reject_all = dict(strict, tau=math.inf)  # nothing surfaces through: identical to the base predictions

    def better(a, b) -> bool:
        # higher score; among equal scores fewer changed predictions
        return a[0] > b[0] + 1e-12 or (abs(a[0] - b[0]) <= 1e-12 and a[1] < b[1])

    best_key, best_s, best_params = evaluate(grid.strengths[0], {c: reject_all for c in rare}), grid.strengths[0], \
        {c: dict(reject_all) for c in rare}
    for s in grid.strengths:
        starts = [{c: dict(reject_all) for c in rare}]
        if phase == "boost":
            starts = [{c: dict(strict, tau=0.0) for c in rare}]
        else:
            starts.append({c: dict(strict, tau=0.0) for c in rare})
            if start is not None:
                starts.append({c: dict(tau=float(_per_class(start.tau, c, 0.0)) if start.verify else 0.0,
                                       rule=start.rule(c), tau_s=float(_per_class(start.tau_s, c, -math.inf)),
                                       tau_m=float(_per_class(start.tau_m, c, math.inf))) for c in rare})
        scored = [(evaluate(s, p), p) for p in starts]
        key, params = scored[0]
        for k, p in scored[1:]:
            if better(k, key):
                key, params = k, p
        params = {c: dict(p) for c, p in params.items()}
        if phase != "boost":
            cand, surfaced = cands[s]
            for _ in range(grid.rounds):
                for c in rare:
                    at_c = surfaced & (cand == index[c])
                    options = []
                    for tau in grid.taus:
                        options.append(dict(tau=tau, rule="none", tau_s=-math.inf, tau_m=math.inf))
                        if phase == "morphology":
                            if "spikiness" in rules_for[c]:
                                options += [dict(tau=tau, rule="spikiness", tau_s=t, tau_m=math.inf)
                                            for t in thresholds(spiky, at_c, ascending=False)]
                            if "mahalanobis" in rules_for[c]:
                                options += [dict(tau=tau, rule="mahalanobis", tau_s=-math.inf, tau_m=t)
                                            for t in thresholds(dist[c], at_c, ascending=True)]
                    for option in options:
                        trial = dict(params, **{c: option})
                        k = evaluate(s, trial)
                        if better(k, key):
                            key, params = k, trial
        if better(key, best_key):
            best_key, best_s, best_params = key, s, params
    strengths = sorted(float(v) for v in grid.strengths)
    at_top = len(strengths) > 1 and best_s == strengths[-1] and best_s > 0
    if at_top and grid.extend_factor > 1 and strengths[-1] * grid.extend_factor <= grid.max_strength:
        wider = dataclasses.replace(grid, strengths=tuple(strengths) + (strengths[-1] * grid.extend_factor,))
        return fit_thresholds(val_frame, counts, rare_classes, verify_probs, morph_features, phase, wider,
                              mahalanobis, mahalanobis_features, metric, start)
    at_edge = at_top or (len(strengths) > 1 and best_s == strengths[0] and best_s > 0)
    if at_edge:
        warnings.warn(f"boost strength {best_s:g} chosen on validation is at the edge of the grid "
                      f"{strengths}: a value outside it might score better")
    changed = best_key[1]
    base_score = _scores(y, base, len(classes))[metric]
    taus = {c: (None if not math.isfinite(p["tau"]) else float(p["tau"])) for c, p in best_params.items()}
    # a class nothing may pass through is recorded with tau = inf
    taus = {c: (math.inf if t is None else t) for c, t in taus.items()}
    return SuppressAndRescue(
        rare_classes=list(rare), boosts=boost_factors(counts, rare, best_s),
        tau=taus if verify else 0.0,
        tau_s={c: p["tau_s"] for c, p in best_params.items()},
        tau_m={c: p["tau_m"] for c, p in best_params.items()},
        morphology={c: p["rule"] for c, p in best_params.items()},
        verify=verify or any(not math.isfinite(p["tau"]) for p in best_params.values()),
        mahalanobis=mahalanobis, mahalanobis_features=tuple(mahalanobis_features),
        info=dict(phase=phase, strength=float(best_s), val_score=float(best_key[0]), val_base_score=float(base_score),
                  val_rescued=int(changed), metric=metric, val_rows=int(n), strengths=strengths,
                  strength_at_edge=bool(at_edge)))


def paired_bootstrap_gain(labels: Sequence[str], before: Sequence[str], after: Sequence[str],
                          classes: Sequence[str], n_boot: int = 1000, seed: int = 0) -> dict:
    """Macro-F1 of ``after`` minus ``before`` on the same images (class names),
    with its 95 % paired percentile interval: :func:`metrics.paired_difference`,
    the book's one paired bootstrap. Returns ``gain``, ``low`` and ``high``."""
    index = {c: i for i, c in enumerate(classes)}
    y, a, b = ([index[c] for c in names] for names in (labels, before, after))
    d = paired_difference(y, b, a, len(classes), metrics=("macro_f1",), n_boot=n_boot, seed=seed)
    return dict(gain=d["macro_f1"], low=d["macro_f1_low"], high=d["macro_f1_high"])


# --------------------------------------------------------------------------
# The book's experiment: rescue on saved PBC-LT predictions
# --------------------------------------------------------------------------

#: Table 2 of Nguyen et al. 2026 (WBCBench 2026 private leaderboard, macro-F1).
PAPER_TABLE2 = {
    "Baseline (Single Fold Swin-T)": 0.63857,
    "Swin-T (5-Fold + TTA) + Over-sampling": 0.65318,
    "Swin-T (5-Fold + TTA) + LDAM Loss": 0.66520,
    "Swin-T (5-Fold + TTA) + Decoupling Classifier": 0.66251,
    "Swin-T (5-Fold + TTA)": 0.66585,
    "+ MedSigLIP Semantic Verification (Phase 2)": 0.71528,
    "+ Biological Filtering (Phase 3)": 0.77139,
}


def read_paper_table2(path: PathLike) -> Dict[str, float]:
    """Table 2's rows (method -> macro-F1) parsed from the paper's markdown
    text (tab-separated rows after the "Table 2." caption)."""
    text = Path(path).read_text()
    start = text.index("**Table 2.**")
    rows = {}
    for line in text[start:].splitlines()[1:]:
        parts = [p.strip() for p in line.split("\t")]
        if len(parts) != 2:
            if rows:
                break
            continue
        name, value = parts
        name = name.replace("<b>", "").replace("</b>", "").strip()
        value = value.replace("<b>", "").replace("</b>", "").strip()
        try:
            rows[name] = float(value)
        except ValueError:
            continue  # the header row
    if not rows:
        raise ValueError(f"{path}: no Table 2 rows found")
    return rows
