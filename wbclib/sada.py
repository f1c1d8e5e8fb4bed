"""SADA: stain-aware domain alignment (Li et al. 2024), as a registered method.

Stage 1 learns domain-invariant features from raw images and re-stained copies:

1. **stain decomposition** – each image's stain matrix W (3 x 2) and the 99th
   percentile of its stain densities, by Vahadane's sparse NMF under the
   Beer-Lambert law (:func:`stain_statistics`, batched, from ``stain.py``),
   with the two stain columns given one meaning across images
   (:func:`align_stain_order`; a per-image rule orders them inconsistently);
2. **pseudo-domains** – k-means (k = 3) over the flattened stain matrices of
   the mini-batch (:func:`kmeans`): stain-colour clusters rather than labs,
   since one lab's colours vary too;
3. **re-staining** – every image is re-stained once with the stain matrix of
   a random member of each *other* cluster, its densities rescaled so their
   99th percentiles match the target's (eq. 2-3; :func:`restain_views`), which
   gives k - 1 views that keep the cell's structure and change its colour;
4. **local alignment** (eq. 4-5) – feature maps of the raw image and each view
   pass a 1x1-conv MLP, are L2-normalised per position and pulled together;
5. **domain-invariant supervised contrast** (eq. 6) – each anchor is the mean
   of the normalised projections of an image and its views; positives are all
   raw and re-stained embeddings of the same class.

Stage 1 minimises L_DISC + beta * L_LA (eq. 7). Stage 2 (from epoch
``stage1_epochs``) trains the linear classifier with cross-entropy on the
frozen features (the decoupling of Kang et al. that the paper cites;
``stage2="all"`` fine-tunes everything instead, as the released code does).
During stage 1 the classifier is already trained on *detached* features so
that validation scores and early stopping see a working classifier; this
does not touch the features. SWAD averages stage 2 only
(:attr:`SADA.swad_eligible`), as the authors' trainer does.

Choices where paper and released code (github.com/AnoK3111/SADA) differ:
the local alignment is the code's mean squared error over channels,
positions and images (eq. 4-5 sum; the two differ by the constant factor
``local_dim`` x positions x images, which beta absorbs, and beta = 0.1 was
tuned with the code); anchors are averages of unit vectors and
are not re-normalised (as in the code); the projector is the code's
non-linear MLP. The code's default configuration trains with the plain
supervised contrastive loss and ``la_weight = 0``; here the paper's loss is
the default and those variants are the ablations (``anchors="self"``,
``beta=0``).

Views: a batch of uint8 images (N, 3, H, W) is decomposed, clustered and
re-stained inside :meth:`SADA.update` (the paper's per-batch procedure). A
5-D input (N, 1 + V, ...) instead carries V precomputed views per sample
(e.g. frozen-backbone feature maps of re-stained images), used as they are.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import cluster
from . import stain as S
from .method_base import METHODS, Method, Minibatches, full_precision


# --------------------------------------------------------------------------
# Stain statistics, pseudo-domains, re-staining
# --------------------------------------------------------------------------


def stain_statistics(images: torch.Tensor, normalizer: Optional[S.VahadaneNormalizer] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each image's Vahadane stain matrix (N, 3, 2) and the 99th percentile of
    its stain densities (N, 2), for uint8 images (N, H, W, 3) (numpy or torch),
    from one sparse NMF per image (:meth:`stain.VahadaneNormalizer.stain_statistics`)."""
    return (normalizer or S.VahadaneNormalizer()).stain_statistics(images)


def align_stain_order(matrices: torch.Tensor, maxima: torch.Tensor, n_iter: int = 3
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Give every image's two stain columns the same meaning.

    Per-image decompositions order their two stains by a fixed rule (the
    stain absorbing more red first), which flips between images when both
    stains absorb red alike; the nuclear stain of one image would then be
    swapped for the cytoplasm stain of its donor, inverting the re-stained
    image. Each image's columns (and density percentiles) are swapped where
    that raises their summed cosine similarity to a reference, the mean
    aligned stain matrix (refined ``n_iter`` times from the first image).
    """
    matrices, maxima = matrices.clone(), maxima.clone()
    if len(matrices) == 0:
        return matrices, maxima
    reference = matrices[0]
    for _ in range(n_iter):
        keep = (matrices * reference).sum((1, 2))
        swap = (matrices.flip(-1) * reference).sum((1, 2)) > keep
        matrices[swap] = matrices[swap].flip(-1)
        maxima[swap] = maxima[swap].flip(-1)
        reference = matrices.mean(0)
    return matrices, maxima


def kmeans(points: torch.Tensor, k: int, n_init: int = 5,
           generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`wbclib.cluster.kmeans` on a tensor, seeded by one draw from
    ``generator``: labels (N,) and centroids (k, D) on the points' device."""
    seed = int(torch.randint(2 ** 31 - 1, (1,), generator=generator))
    labels, centres = cluster.kmeans(points.detach().cpu().double().numpy(), k, seed=seed, n_init=n_init)
    return (torch.from_numpy(labels).to(points.device),
            torch.from_numpy(centres).to(device=points.device, dtype=torch.float32))


def pseudo_domains(stain_matrices: torch.Tensor, k: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Stain-colour cluster (0..k-1) of each image, from its (3, 2) stain matrix."""
    return kmeans(stain_matrices.flatten(1), k, generator=generator)[0]


def pick_targets(labels: torch.Tensor, k: int, generator: Optional[torch.Generator] = None,
                 pool_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indices (k - 1, N) into the pool (default: the batch itself) of the
    stain donors: for image i in cluster c_i, row v holds a random member of
    the v-th cluster other than c_i. A cluster with no members is replaced by
    a random image of any other cluster (or any image when all share one)."""
    pool_labels = labels if pool_labels is None else pool_labels
    n, device = len(labels), labels.device
    targets = torch.empty(max(k - 1, 0), n, dtype=torch.long)
    others = torch.tensor([[c for c in range(k) if c != own] for own in range(k)], dtype=torch.long).view(k, k - 1)
    for i, own in enumerate(labels.tolist()):
        own = min(int(own), k - 1)
        for v, donor_cluster in enumerate(others[own].tolist()):
            members = (pool_labels == donor_cluster).nonzero().flatten()
            if len(members) == 0:
                members = (pool_labels != own).nonzero().flatten()
            if len(members) == 0:
                members = torch.arange(len(pool_labels), device=pool_labels.device)
            targets[v, i] = members[int(torch.randint(len(members), (1,), generator=generator))]
    return targets.to(device)


def restain_views(images: torch.Tensor, matrices: torch.Tensor, maxima: torch.Tensor, targets: torch.Tensor,
                  pool_matrices: Optional[torch.Tensor] = None, pool_maxima: Optional[torch.Tensor] = None
                  ) -> torch.Tensor:
    """Re-stained copies (V, N, H, W, 3) of uint8 images (N, H, W, 3): view v
    of image i takes the stain matrix and density percentiles of donor
    ``targets[v, i]`` of the pool (default: the batch), eq. 2-3."""
    pool_matrices = matrices if pool_matrices is None else pool_matrices
    pool_maxima = maxima if pool_maxima is None else pool_maxima
    views = [S.restain(images, matrices, pool_matrices[t], pool_maxima[t]) for t in targets]
    return torch.stack(views) if views else images.new_zeros((0,) + tuple(images.shape))


# --------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------


def local_alignment_loss(embeddings: torch.Tensor, num_views: int) -> torch.Tensor:
    """Eq. 4-5 on per-position embeddings ((1 + V) N, D, h, w), raw images
    first then view by view, at the scale of the authors' code
    (``Local_Alignment_Loss``: ``nn.MSELoss`` between the unit embeddings of
    the raw images and of each view, averaged over views): the squared
    difference of each raw position's unit embedding and the same position in
    each view, averaged over the D channels, positions, images and views.

    Eq. 4 sums over channels and eq. 5 over images and positions; the means
    make ``beta`` independent of ``local_dim``, batch and map size, and
    ``beta`` = 0.1 (the paper's choice, made with this code) means what it
    means there. The channel sum is D times this. Ranges over [0, 4 / D]."""
    e = F.normalize(embeddings.float(), dim=1)
    e = e.view(1 + num_views, -1, *e.shape[1:])
    if num_views == 0:
        return e.new_zeros(())
    return (e[1:] - e[:1]).pow(2).mean()


def disc_loss(projections: torch.Tensor, labels: torch.Tensor, num_views: int, temperature: float,
              anchors: str = "mean") -> torch.Tensor:
    """Supervised contrast over the raw and re-stained embeddings ((1 + V) N, D).

    ``anchors="mean"``: L_DISC (eq. 6), one anchor per image, the mean of its
    normalised raw and re-stained embeddings; positives are every embedding
    of the same class (raw or re-stained, the image's own included); the
    denominator runs over all embeddings. ``anchors="self"``: the standard
    supervised contrastive loss (Khosla et al. 2020), every embedding an
    anchor, itself excluded (ablation M3).
    """
    z = F.normalize(projections.float(), dim=1)
    all_labels = labels.repeat(1 + num_views)
    if anchors == "mean":
        anchor = z.view(1 + num_views, -1, z.shape[1]).mean(0)
        logits = anchor @ z.T / temperature
        positive = labels[:, None] == all_labels[None, :]
        log_prob = logits - torch.logsumexp(logits, 1, keepdim=True)
    elif anchors == "self":
        logits = z @ z.T / temperature
        eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
        positive = (all_labels[:, None] == all_labels[None, :]) & ~eye
        log_prob = logits - torch.logsumexp(logits.masked_fill(eye, float("-inf")), 1, keepdim=True)
    else:
        raise ValueError(f"anchors must be 'mean' or 'self', not {anchors!r}")
    counts = positive.sum(1)
    per_anchor = -(log_prob * positive).sum(1) / counts.clamp_min(1)
    return per_anchor[counts > 0].mean() if (counts > 0).any() else z.new_zeros(())


# --------------------------------------------------------------------------
# Feature maps from any featurizer
# --------------------------------------------------------------------------


def feature_maps(featurizer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Spatial features (N, C, h, w) before global pooling.

    A featurizer may define ``feature_map(x)`` and ``pool(maps)``; a
    :class:`models.Normalized` timm backbone gives ``forward_features``; any
    other featurizer's output counts as a 1 x 1 map (local alignment then
    aligns the pooled features).
    """
    if hasattr(featurizer, "feature_map"):
        return featurizer.feature_map(x)
    model = getattr(featurizer, "model", None)
    if model is None or not hasattr(model, "forward_features"):
        return featurizer(x)[:, :, None, None]  # no spatial maps: the features as a 1 x 1 map
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    maps = model.forward_features((x - featurizer.mean) / featurizer.std)
    return maps


def pool_maps(featurizer: nn.Module, maps: torch.Tensor) -> torch.Tensor:
    """Pooled features (N, F) from :func:`feature_maps` output, as the featurizer pools."""
    if hasattr(featurizer, "pool"):
        return featurizer.pool(maps)
    model = getattr(featurizer, "model", None)
    if model is None or not hasattr(model, "forward_head"):
        return maps.flatten(1)
    return model.forward_head(maps, pre_logits=True)


def _channels_first(maps: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, C, h, w) from a map that may be channels-last (N, h, w, C) (Swin)."""
    if maps.ndim == 4 and maps.shape[1] != channels and maps.shape[-1] == channels:
        return maps.permute(0, 3, 1, 2)
    return maps


# --------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------


class StainViews:
    """Mixin for methods that train on SADA's re-stained views: hyper-parameters
    ``k`` (clusters; k - 1 views per image), ``vahadane_max_pixels`` and ``seed``
    (of the clustering and donor draws)."""

    view_defaults = {"k": 3, "vahadane_max_pixels": 4096, "seed": 0}

    def init_views(self) -> None:
        if int(self.hparams["k"]) < 2:
            raise ValueError(f"re-staining needs k >= 2 stain clusters, got {self.hparams['k']}")
        self.generator = torch.Generator().manual_seed(int(self.hparams["seed"]))
        self._normalizer = S.VahadaneNormalizer(max_pixels=int(self.hparams["vahadane_max_pixels"]))

    def set_epoch(self, epoch: int) -> None:
        # The clusters and donors of each epoch come from (seed, epoch), so a run resumed from
        # its checkpoint at an epoch draws what the uninterrupted run drew.
        super().set_epoch(epoch)
        state = np.random.SeedSequence([int(self.hparams["seed"]), int(epoch)]).generate_state(1)[0]
        self.generator.manual_seed(int(state))

    def make_views(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(raw (N, ...), views (V, N, ...)). A 5-D input carries its views;
        uint8 images are decomposed, clustered and re-stained here."""
        if x.ndim == 5:
            return x[:, 0], x[:, 1:].transpose(0, 1)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError("re-staining needs uint8 RGB batches (N, 3, H, W); got "
                             f"{x.dtype} {tuple(x.shape)} (or pass precomputed views as (N, 1 + V, ...))")
        with torch.no_grad(), full_precision(x):
            images = x.permute(0, 2, 3, 1).contiguous()
            k = int(self.hparams["k"])
            # Strong colour jitter can wash an image out until no pixel counts as stained: such an
            # image has no stain to estimate or swap, so its views are plain copies (as
            # augment.RandomStainJitter leaves such a draw unchanged); the others are clustered and
            # re-stained among themselves.
            stained = self._normalizer.has_stain(images)
            if bool(stained.all()):
                views = self._restained(images, k)
            else:
                views = images.unsqueeze(0).repeat(k - 1, 1, 1, 1, 1)
                if bool(stained.any()):
                    views[:, stained] = self._restained(images[stained], k)
        return x, views.permute(0, 1, 4, 2, 3).contiguous()

    def _restained(self, images: torch.Tensor, k: int) -> torch.Tensor:
        """Views (k - 1, N, H, W, 3) of uint8 images (N, H, W, 3) that all have a stain."""
        matrices, maxima = align_stain_order(*stain_statistics(images, self._normalizer))
        labels = pseudo_domains(matrices.cpu(), k, self.generator)
        targets = pick_targets(labels, k, self.generator).to(images.device)
        return restain_views(images, matrices, maxima, targets)


@METHODS.register("sada")
class SADA(StainViews, Method):
    """Stain-aware domain alignment (Li et al. 2024); see the module docstring.

    Hyper-parameters: ``k`` clusters (views per image k - 1), ``beta`` the
    local-alignment weight (eq. 7), ``temperature`` tau of eq. 6, ``anchors``
    ("mean" = L_DISC, "self" = SupCon), ``projection_dim`` and
    ``local_dim``/``local_hidden`` (projector and local MLP widths),
    ``stage1_epochs`` and ``stage2`` ("classifier" or "all"),
    ``vahadane_max_pixels`` (pixels per image for the per-batch NMF).
    """

    defaults = {**StainViews.view_defaults, "beta": 0.1, "temperature": 0.1, "anchors": "mean",
                "projection_dim": 128, "local_dim": 128, "local_hidden": 512, "stage1_epochs": 5,
                "stage2": "classifier"}

    def __init__(self, featurizer: nn.Module, num_features: int, num_classes: int, num_domains: int = 1,
                 class_counts: Optional[Sequence[int]] = None, hparams: Optional[dict] = None):
        super().__init__(featurizer, num_features, num_classes, num_domains, class_counts, hparams)
        h = self.hparams
        if h["anchors"] not in ("mean", "self"):
            raise ValueError(f"anchors must be 'mean' or 'self', not {h['anchors']!r}")
        if h["stage2"] not in ("classifier", "all"):
            raise ValueError(f"stage2 must be 'classifier' or 'all', not {h['stage2']!r}")
        self.init_views()
        channels = getattr(featurizer, "map_channels", num_features)
        self.map_channels = channels
        self.projector = nn.Sequential(nn.Linear(num_features, num_features), nn.ReLU(),
                                       nn.Linear(num_features, h["projection_dim"]))
        self.local_mlp = nn.Sequential(nn.Conv2d(channels, h["local_hidden"], 1), nn.ReLU(),
                                       nn.Conv2d(h["local_hidden"], h["local_dim"], 1))
        self.optimizer = self.make_optimizer(self.parameters())
        self.stage = 1

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.stage = 1 if epoch < self.hparams["stage1_epochs"] else 2

    @property
    def swad_eligible(self) -> bool:
        """SWAD averages stage 2 only, as the authors' trainer (``trainer.py``
        skips SWAD before ``self_supervised_step``): stage 1's validation loss
        scores a classifier fitted on features that are still being learnt."""
        return self.stage == 2

    # losses --------------------------------------------------------------

    def stage1_losses(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        raw, views = self.make_views(x)
        num_views = views.shape[0]
        both = torch.cat([raw[None], views]).flatten(0, 1)
        native = feature_maps(self.featurizer, both)
        features = pool_maps(self.featurizer, native)
        maps = _channels_first(native, self.map_channels)
        with full_precision(features):
            disc = disc_loss(self.projector(features.float()), y, num_views, self.hparams["temperature"],
                             self.hparams["anchors"])
            la = local_alignment_loss(self.local_mlp(maps.float()), num_views) if self.hparams["beta"] > 0 \
                else features.new_zeros((), dtype=torch.float32)
        n = len(y)
        ce = self.criterion(self.classifier(features[:n].detach()), y)
        return {"disc": disc, "la": la, "ce": ce}

    def update(self, minibatches: Minibatches) -> Dict[str, float]:
        x, y, _ = self.pool(minibatches)
        if self.stage == 1:
            parts = self.stage1_losses(x, y)
            representation = parts["disc"] + self.hparams["beta"] * parts["la"]
            self.step(representation + parts["ce"])
            return {"loss": representation.item(), **{k: v.item() for k, v in parts.items()}}
        if x.ndim == 5:
            x = x[:, 0]
        if self.hparams["stage2"] == "classifier":
            self.featurizer.eval()
            with torch.no_grad():
                features = self.featurize(x)
            loss = self.criterion(self.classifier(features), y)
        else:
            loss = self.criterion(self.predict(x), y)
        self.step(loss)
        return {"loss": loss.item(), "ce": loss.item()}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 5:
            x = x[:, 0]
        return self.classifier(self.featurize(x))


@METHODS.register("erm_restain")
class RestainERM(StainViews, Method):
    """A control for SADA: ERM on every image and its k - 1 SADA re-stained
    copies (same clustering and donors), i.e. SADA's augmentation without its
    alignment and contrastive losses or its two stages."""

    defaults = dict(StainViews.view_defaults)

    def __init__(self, featurizer: nn.Module, num_features: int, num_classes: int, num_domains: int = 1,
                 class_counts: Optional[Sequence[int]] = None, hparams: Optional[dict] = None):
        super().__init__(featurizer, num_features, num_classes, num_domains, class_counts, hparams)
        self.init_views()

    def update(self, minibatches: Minibatches) -> Dict[str, float]:
        x, y, _ = self.pool(minibatches)
        raw, views = self.make_views(x)
        both = torch.cat([raw[None], views]).flatten(0, 1)
        loss = self.criterion(self.predict(both), y.repeat(1 + views.shape[0]))
        self.step(loss)
        return {"loss": loss.item()}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 5:
            x = x[:, 0]
        return self.classifier(self.featurize(x))
