"""Training methods with one interface (DomainBed style), created by name.

A method owns the classifier built on top of a feature extractor and its
optimiser(s). Training code only calls ``update(minibatches) -> dict`` and
``predict(x) -> logits``:

* ``minibatches`` is a list with one ``(x, y)`` pair per training domain (a
  lab, or a stain-cluster pseudo-domain), in domain order: position ``k`` holds
  domain ``k``, and a domain absent from the batch is an empty pair. DANN and
  BoDA need that order (they use the position as the domain label); in-lab
  training passes a single pair.
* the returned dict holds floats for logging: ``loss`` at least, the objective
  the classifier minimises (for DANN only its classification part, since the
  adversarial total is a saddle point whose value says nothing about progress).

Every method classifies with ``self.criterion`` (a long-tail loss from
``losses.py`` when configured) on the pooled batch (Mixup: on mixed images),
so methods differ from ERM only by what they add.

Hyper-parameters have declared defaults in ``Method.defaults``; a user's
``hparams`` override them and unknown names are rejected.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# The interface and registry live in ``method_base`` (shared with ``sada``); re-exported here.
from .method_base import METHODS, Method, Minibatches, full_precision  # noqa: E402,F401


def mlp(num_inputs: int, width: int, depth: int, num_outputs: int, dropout: float = 0.0) -> nn.Sequential:
    """``depth`` linear layers with ReLU (and dropout) between them."""
    layers: List[nn.Module] = []
    size = num_inputs
    for _ in range(depth - 1):
        layers += [nn.Linear(size, width), nn.Dropout(dropout), nn.ReLU()]
        size = width
    layers.append(nn.Linear(size, num_outputs))
    return nn.Sequential(*layers)


@METHODS.register("erm")
class ERM(Method):
    """Empirical risk minimisation: the loss over all domains pooled."""

    def update(self, minibatches: Minibatches) -> Dict[str, float]:
        x, y, _ = self.pool(minibatches)
        loss = self.criterion(self.predict(x), y)
        self.step(loss)
        return {"loss": loss.item()}


def coral_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared differences of the means and covariances of two feature sets, each
    averaged over entries (DomainBed's CORAL: mean, not sum, so the scale does
    not grow with the feature width). Both sets need at least two rows."""
    with full_precision(a):
        a, b = a.float(), b.float()
        mean_a, mean_b = a.mean(0, keepdim=True), b.mean(0, keepdim=True)
        cov_a = (a - mean_a).T @ (a - mean_a) / (len(a) - 1)
        cov_b = (b - mean_b).T @ (b - mean_b) / (len(b) - 1)
        return (mean_a - mean_b).pow(2).mean() + (cov_a - cov_b).pow(2).mean()


def coral_penalty(features: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
    """``coral_distance`` averaged over all pairs of domains with at least two
    images in the batch (covariance needs two); zero when fewer than two such
    domains are present, e.g. in single-domain training."""
    groups = [features[domains == k] for k in torch.unique(domains).tolist()]
    groups = [g for g in groups if len(g) >= 2]
    pairs = [coral_distance(groups[i], groups[j]) for i in range(len(groups)) for j in range(i + 1, len(groups))]
    return torch.stack(pairs).mean() if pairs else features.new_zeros((), dtype=torch.float32)


@METHODS.register("coral")
class CORAL(Method):
    """Deep CORAL (Sun & Saenko 2016) as in DomainBed: the classification loss plus
    ``coral_lambda`` times the mean and covariance mismatch of the features,
    averaged over domain pairs. With one domain the penalty is zero: plain ERM."""

    defaults = {"coral_lambda": 1.0}

    def update(self, minibatches: Minibatches) -> Dict[str, float]:
        x, y, domains = self.pool(minibatches)
        features = self.featurize(x)
        ce = self.criterion(self.classifier(features), y)
        penalty = coral_penalty(features, domains)
        loss = ce + self.hparams["coral_lambda"] * penalty
        self.step(loss)
        return {"loss": loss.item(), "ce": ce.item(), "penalty": penalty.item()}


@METHODS.register("dann")
class DANN(Method):
    """Domain-adversarial training (Ganin et al. 2016) with DomainBed's alternating
    updates: an MLP discriminator learns to tell the domain from the features
    for ``d_steps_per_g`` steps, then one step trains featurizer and classifier
    on the classification loss minus ``dann_lambda`` times the discriminator's
    loss. ``grad_penalty`` weighs the squared gradient of the discriminator's
    true-domain probability with respect to its input (a smoothness term).

    Both optimisers use Adam's beta1 = ``beta1`` (0.5 steadies adversarial
    training). With one domain there is nothing to tell apart: every step is
    an ERM step and the discriminator is left untouched.
    """

    defaults = {"dann_lambda": 1.0, "d_steps_per_g": 1, "grad_penalty": 0.0, "weight_decay_d": 0.0,
                "beta1": 0.5, "mlp_width": 256, "mlp_depth": 3, "mlp_dropout": 0.0}

    def __init__(self, featurizer: nn.Module, num_features: int, num_classes: int, num_domains: int = 1,
                 class_counts: Optional[Sequence[int]] = None, hparams: Optional[dict] = None):
        super().__init__(featurizer, num_features, num_classes, num_domains, class_counts, hparams)
        h = self.hparams
        self.discriminator = mlp(num_features, h["mlp_width"], h["mlp_depth"], num_domains, h["mlp_dropout"])
        self.discriminator_optimizer = torch.optim.AdamW(
            self.discriminator.parameters(), lr=h["lr"], weight_decay=h["weight_decay_d"], betas=(h["beta1"], 0.9))
        # A buffer, so a resumed run continues the discriminator/generator rhythm.
        self.register_buffer("update_count", torch.zeros((), dtype=torch.long))

    def make_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"],
                                 betas=(self.hparams["beta1"], 0.9))

    def optimizers(self) -> List[torch.optim.Optimizer]:
        return [self.optimizer, self.discriminator_optimizer]


    def update(self, minibatches: Minibatches) -> Dict[str, float]:
        x, y, domains = self.pool(minibatches)
        if self.num_domains < 2:
            loss = self.criterion(self.predict(x), y)
            self.step(loss)
            return {"loss": loss.item()}
        self.require_one_pair_per_domain(minibatches)
        self.update_count += 1
        d_steps = self.hparams["d_steps_per_g"]
        if self.update_count.item() % (1 + d_steps) < d_steps:
            with torch.no_grad():
                features = self.featurize(x)
                ce = self.criterion(self.classifier(features), y)
            features.requires_grad_(self.hparams["grad_penalty"] > 0)
            domain_logits = self.discriminator(features)
            disc_loss = F.cross_entropy(domain_logits, domains)
            total = disc_loss
            if self.hparams["grad_penalty"] > 0:
                true_domain_prob = F.softmax(domain_logits, 1).gather(1, domains[:, None]).sum()
                grad = torch.autograd.grad(true_domain_prob, features, create_graph=True)[0]
                total = total + self.hparams["grad_penalty"] * grad.pow(2).sum(1).mean()
            self.discriminator_optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.discriminator_optimizer.step()
        else:
            features = self.featurize(x)
            ce = self.criterion(self.classifier(features), y)
            domain_logits = self.discriminator(features)
            disc_loss = F.cross_entropy(domain_logits, domains)
            # The generator ascends the discriminator's loss; the gradient penalty
            # regularises the discriminator only, so it is not part of this objective.
            self.step(ce - self.hparams["dann_lambda"] * disc_loss)
        disc_acc = (domain_logits.argmax(1) == domains).float().mean().item()
        return {"loss": ce.item(), "disc_loss": disc_loss.item(), "disc_acc": disc_acc}


@METHODS.register("mixup")
class Mixup(Method):
    """Inter-domain mixup (Xu et al. 2020; Yan et al. 2020) as in DomainBed: the
    domains are put in a random cycle and each is mixed with the next, image by
    image, with one weight lam ~ Beta(alpha, alpha) per pair; the loss is the
    lam-weighted classification loss of both label sets, averaged over pairs.
    The partner's images are shuffled, so with one domain this is ordinary
    (intra-domain) mixup. Empty domains are skipped.

    uint8 images are mixed after conversion to floats in [0, 1], the scale
    :class:`models.Normalized` gives uint8 input (it takes float input to be in
    [0, 1] already), so mixed training images and unmixed test images reach
    the network alike; float inputs (e.g. cached feature maps) are mixed as
    they are.
    """

    defaults = {"mixup_alpha": 0.2}

    @staticmethod
    def unit_scale(x: torch.Tensor) -> torch.Tensor:
        """uint8 images as floats in [0, 1]; anything else unchanged."""
        return x.float() / 255.0 if x.dtype == torch.uint8 else x

    def update(self, minibatches: Minibatches) -> Dict[str, float]:
        present = [(self.unit_scale(x), y) for x, y in minibatches if len(y) > 0]
        order = torch.randperm(len(present)).tolist()
        beta = torch.distributions.Beta(self.hparams["mixup_alpha"], self.hparams["mixup_alpha"])
        mixed, pairs = [], []
        for i, j in zip(order, order[1:] + order[:1]):
            (xi, yi), (xj, yj) = present[i], present[j]
            n = min(len(yi), len(yj))
            partner = torch.randperm(len(yj), device=yj.device)[:n]
            lam = beta.sample().item()
            mixed.append(lam * xi[:n] + (1 - lam) * xj[partner])
            pairs.append((lam, yi[:n], yj[partner]))
        # One forward pass over every pair's mixed images: batch norm sees the whole batch.
        all_logits = self.predict(torch.cat(mixed)).split([len(m) for m in mixed])
        loss = sum(lam * self.criterion(logits, yi) + (1 - lam) * self.criterion(logits, yj)
                   for logits, (lam, yi, yj) in zip(all_logits, pairs)) / len(present)
        self.step(loss)
        return {"loss": loss.item()}


@METHODS.register("selfreg")
class SelfReg(Method):
    """SelfReg (Kim et al. 2021), self-supervised contrastive regularisation with
    positives only: each image is paired with a random image of the same class
    (from any domain), and

    * its logits are pulled towards the partner's logits;
    * its features are pulled towards the partner's features passed through a
      projection MLP (the "class-specific domain perturbation layer": three
      linear layers with batch norm, width = feature width);
    * the same two terms again for a second partner mixed from two random
      same-class partners with lam ~ Beta(mix_alpha, mix_alpha) (in-class mixup).

    Loss = CE + min(CE, 1) * (lam * (L_logit + w_f L_feat) + (1 - lam) *
    (L_logit_mix + w_f L_feat_mix)), all terms mean squared errors, w_f =
    ``feature_weight``. The min(CE, 1) factor keeps the regulariser weak until
    the classifier fits. An image that is alone in its class pairs with itself.
    """

    defaults = {"mix_alpha": 0.5, "feature_weight": 0.3}

    def __init__(self, featurizer: nn.Module, num_features: int, num_classes: int, num_domains: int = 1,
                 class_counts: Optional[Sequence[int]] = None, hparams: Optional[dict] = None):
        super().__init__(featurizer, num_features, num_classes, num_domains, class_counts, hparams)
        width = num_features
        self.projection = nn.Sequential(
            nn.Linear(num_features, width), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Linear(width, num_features), nn.BatchNorm1d(num_features))
        # The projection trains with the network, so the optimiser is rebuilt to include it.
        self.optimizer = self.make_optimizer(self.parameters())

    @staticmethod
    def same_class_partner(y: torch.Tensor) -> torch.Tensor:
        """For each index, a random index with the same label (a permutation within each class)."""
        partner = torch.empty_like(y)
        for c in torch.unique(y):
            members = (y == c).nonzero().squeeze(1)
            partner[members] = members[torch.randperm(len(members), device=y.device)]
        return partner

    def update(self, minibatches: Minibatches) -> Dict[str, float]:
        x, y, _ = self.pool(minibatches)
        features = self.featurize(x)
        logits = self.classifier(features)
        projected = self.projection(features)
        first, second = self.same_class_partner(y), self.same_class_partner(y)
        lam = torch.distributions.Beta(self.hparams["mix_alpha"], self.hparams["mix_alpha"]).sample().item()
        mixed_logits = lam * logits[first] + (1 - lam) * logits[second]
        mixed_projected = lam * projected[first] + (1 - lam) * projected[second]
        w = self.hparams["feature_weight"]
        pair_term = F.mse_loss(logits, logits[first]) + w * F.mse_loss(features, projected[first])
        mixed_term = F.mse_loss(logits, mixed_logits) + w * F.mse_loss(features, mixed_projected)
        ce = self.criterion(logits, y)
        regulariser = lam * pair_term + (1 - lam) * mixed_term
        loss = ce + min(ce.item(), 1.0) * regulariser
        self.step(loss)
        return {"loss": loss.item(), "ce": ce.item(), "regulariser": regulariser.item()}


def boda_calibration(counts: torch.Tensor, nu: float) -> torch.Tensor:
    """BoDA's calibration weights for a (domains x classes) table of sample counts:
    ``w[a, b] = (N_b / N_a) ** nu`` for anchor pair ``a`` and centroid pair ``b``,
    both indexing the flattened table (domain-major). Counts are clamped to 1:
    a pair without samples has no centroid, so its weights are never used."""
    n = counts.flatten().float().clamp_min(1)
    return (n[None, :] / n[:, None]) ** nu


@METHODS.register("boda")
class BoDA(Method):
    """Balanced domain-class distribution alignment (Yang et al. 2022), as used
    for WBCs by Umer et al. 2023: CE + ``boda_lambda`` * L_BoDA (eq. 3) +
    ``coral_weight`` * CORAL (the authors' code).

    For every image z_i of domain d_i and class c_i, with centroids psi_{d,c}
    (running feature means of each domain-class pair seen so far),

        logit_{d',c'} = -w^{d',c'}_{d_i,c_i} * dist(z_i, psi_{d',c'}) / N_{d_i,c_i} / temperature,
        w^{d',c'}_{d_i,c_i} = (N_{d',c'} / N_{d_i,c_i}) ** nu   (``boda_calibration``),

    and the loss is the negative log-softmax of each positive (same class,
    other domain) over all seen pairs except (d_i, c_i), averaged over all
    (image, positive) pairs of the batch (as the authors' code does; eq. 3's
    ``1/(|D|-1)`` when every class occurs in every domain). Dividing by N_{d_i,c_i}
    (the "balanced distance") weakens the pull on images of large pairs.

    ``distance``: ``"euclidean"``, or ``"mahalanobis"`` with each pair's running
    covariance, shrunk by ``covariance_shrinkage`` towards a multiple of the
    identity (the average variance over pairs) because few-sample covariances
    are singular. The Mahalanobis variant keeps a (features x features) matrix
    per pair: domains * classes * features^2 floats.

    ``domain_class_counts``: training images per (domain, class), a nested list
    (num_domains x num_classes). Without it, each class's count
    (``class_counts``) is split over domains in the proportions seen in the
    batches so far, which stays right under class-rebalancing samplers.

    Statistics are updated from every batch (detached), before the loss, as
    exponential moving averages keeping ``momentum`` of the old value; a pair's
    first batch sets it. The authors' code instead recomputes centroids over the
    whole training set every 120 steps, keeping 0.2 of the old ones; from
    single batches a higher momentum does that averaging. The BoDA term starts after ``warmup_steps`` updates
    (the authors' 500), once centroids are meaningful.

    ``coral_weight`` weighs the CORAL term (:func:`coral_penalty`) that the
    authors' code always adds from the first step ("macro alignment",
    ``macro_weight`` = 1.0 in their ``hparams_registry.py``: "in DG, helps
    improve performance"); it is absent from the papers' equations but part
    of the method as run, so it is on by default (0 gives eq. 3 alone).
    ``boda_lambda`` 0.1, ``temperature`` 1 and ``nu`` 0.5 are the authors'
    defaults too, and the term has their scale (same formula). The balanced
    distance makes its gradient ~1/N_{d_i,c_i}: with ~60 images per pair it
    is hundreds of times weaker than CE's, and CORAL carries most of the
    alignment, as in the authors' configuration.

    With one domain there are no cross-domain positives: the BoDA term is zero
    and training is ERM (plus CORAL, which is zero too).
    """

    defaults = {"boda_lambda": 0.1, "temperature": 1.0, "nu": 0.5, "momentum": 0.9, "warmup_steps": 500,
                "distance": "euclidean", "covariance_shrinkage": 0.1, "coral_weight": 1.0,
                "domain_class_counts": None}

    def __init__(self, featurizer: nn.Module, num_features: int, num_classes: int, num_domains: int = 1,
                 class_counts: Optional[Sequence[int]] = None, hparams: Optional[dict] = None):
        super().__init__(featurizer, num_features, num_classes, num_domains, class_counts, hparams)
        if self.hparams["distance"] not in ("euclidean", "mahalanobis"):
            raise ValueError(f"BoDA distance must be 'euclidean' or 'mahalanobis', not {self.hparams['distance']!r}")
        shape = (num_domains, num_classes)
        declared = self.hparams["domain_class_counts"]
        if declared is not None:
            declared = torch.as_tensor(declared, dtype=torch.float32)
            if declared.shape != shape:
                raise ValueError(f"domain_class_counts has shape {tuple(declared.shape)}, expected {shape}")
        self.register_buffer("declared_counts", declared, persistent=False)
        self.register_buffer("total_class_counts", torch.as_tensor(self.class_counts, dtype=torch.float32),
                             persistent=False)
        # Statistics are buffers so checkpoints carry them.
        self.register_buffer("observed_counts", torch.zeros(shape))
        self.register_buffer("centroids", torch.zeros(*shape, num_features))
        if self.hparams["distance"] == "mahalanobis":
            self.register_buffer("second_moments", torch.zeros(*shape, num_features, num_features))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def domain_class_counts(self) -> torch.Tensor:
        """N_{d,c}: the declared table, else ``class_counts`` split by observed domain shares."""
        if self.declared_counts is not None:
            return self.declared_counts
        shares = self.observed_counts / self.observed_counts.sum(0, keepdim=True).clamp_min(1)
        return shares * self.total_class_counts

    @torch.no_grad()
    def update_statistics(self, features: torch.Tensor, pairs: torch.Tensor) -> None:
        """Moving averages of the mean (and second moment) of each domain-class pair
        in the batch; pairs absent from the batch are left as they are."""
        with full_precision(features):
            features = features.float()
            present, inverse, batch_counts = torch.unique(pairs, return_inverse=True, return_counts=True)
            onehot = F.one_hot(inverse, len(present)).float() / batch_counts
            seen = self.observed_counts.view(-1)[present] > 0
            rate = torch.where(seen, 1 - self.hparams["momentum"], 1.0)[:, None]
            centroids = self.centroids.view(-1, self.num_features)
            centroids[present] += rate * (onehot.T @ features - centroids[present])
            if self.hparams["distance"] == "mahalanobis":
                moments = self.second_moments.view(-1, self.num_features, self.num_features)
                batch_moments = torch.einsum("bp,bi,bj->pij", onehot, features, features)
                moments[present] += rate[:, :, None] * (batch_moments - moments[present])
            self.observed_counts.view(-1).index_add_(0, present, batch_counts.float())

    @torch.no_grad()
    def whitening_factors(self) -> torch.Tensor:
        """Cholesky factors L_k of each pair's shrunk covariance (Sigma_k = L_k L_k^T)."""
        eye = torch.eye(self.num_features, device=self.centroids.device)
        means = self.centroids.view(-1, self.num_features)
        cov = self.second_moments.view(-1, self.num_features, self.num_features) - means[:, :, None] * means[:, None, :]
        seen = self.observed_counts.view(-1) > 0
        variance = torch.diagonal(cov[seen], dim1=1, dim2=2).mean().clamp_min(1e-6)
        s = self.hparams["covariance_shrinkage"]
        return torch.linalg.cholesky((1 - s) * cov + (s * variance + 1e-6) * eye)

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """(N, pairs) distances from each feature vector to each pair's centroid."""
        centroids = self.centroids.view(-1, self.num_features)
        diff = features[:, None, :] - centroids[None, :, :]
        if self.hparams["distance"] == "mahalanobis":
            # ||L^-1 (z - psi)||^2 = (z - psi)^T Sigma^-1 (z - psi), per pair.
            white = torch.linalg.solve_triangular(self.whitening_factors(), diff.permute(1, 2, 0), upper=False)
            squared = white.pow(2).sum(1).T
        else:
            squared = diff.pow(2).sum(-1)
        return squared.clamp_min(1e-12).sqrt()  # clamped: sqrt has an infinite gradient at 0

    def boda_loss(self, features: torch.Tensor, pairs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Eq. 3 for features (N, F) of domain-class ``pairs`` (flattened index) and classes ``y``."""
        counts = self.domain_class_counts()
        n = counts.flatten().clamp_min(1)
        calibration = boda_calibration(counts, self.hparams["nu"])[pairs]
        logits = -calibration * self.distances(features) / n[pairs, None] / self.hparams["temperature"]
        seen = self.observed_counts.flatten() > 0
        pair_ids = torch.arange(len(seen), device=y.device)
        contrast = seen[None, :] & (pair_ids[None, :] != pairs[:, None])
        # The image's own pair is outside the contrast set, so its same-class pairs there are the other domains'.
        positive = contrast & (pair_ids[None, :] % self.num_classes == y[:, None])
        if not positive.any():
            return features.new_zeros(())
        log_prob = logits - torch.logsumexp(logits.masked_fill(~contrast, float("-inf")), 1, keepdim=True)
        return -log_prob[positive].mean()

    def update(self, minibatches: Minibatches) -> Dict[str, float]:
        self.require_one_pair_per_domain(minibatches)
        x, y, domains = self.pool(minibatches)
        features = self.featurize(x)
        ce = self.criterion(self.classifier(features), y)
        pairs = domains * self.num_classes + y
        self.update_statistics(features.detach(), pairs)
        loss = ce
        stats = {"ce": ce.item()}
        if self.hparams["coral_weight"] > 0:
            penalty = coral_penalty(features, domains)
            loss = loss + self.hparams["coral_weight"] * penalty
            stats["penalty"] = penalty.item()
        if self.steps.item() >= self.hparams["warmup_steps"]:
            with full_precision(features):
                boda = self.boda_loss(features.float(), pairs, y)
            loss = loss + self.hparams["boda_lambda"] * boda
            stats["boda"] = boda.item()
        self.steps += 1
        self.step(loss)
        return {"loss": loss.item(), **stats}


def create_method(name: str, featurizer: nn.Module, num_features: int, num_classes: int, **kwargs) -> Method:
    return METHODS.create(name, featurizer, num_features, num_classes, **kwargs)


# SADA lives in its own module (stain decomposition, re-staining); importing it registers "sada".
from . import sada as _sada  # noqa: E402,F401
