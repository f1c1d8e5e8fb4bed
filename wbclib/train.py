"""The end-to-end trainer: one run folder per experiment, resumable.

A run folder holds

* ``config.json`` – everything that defines the run;
* ``checkpoint.pt`` – the last finished epoch (model, optimisers, schedulers,
  history), written atomically after every epoch;
* ``best.pt`` – the weights with the best validation macro-F1;
* ``history.csv`` – per-epoch loss and validation scores;
* ``predictions_<set>.csv`` – per image: path, label, prediction and one
  ``prob_<class>`` column per class, for every evaluation set;
* ``metrics.json`` – the scores of every evaluation set, then ``done`` (written
  last: its presence marks a finished run, which is then skipped on re-runs).
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from . import _io
from . import distributed
from . import metrics as M
from . import precision
from .streams import forward_in_streams
from .augment import eval_transform, make_augmentation
from .methods import Method, create_method
from ._parallel import batches, image_loader
from .models import ImageTable, Normalized, create_backbone, default_device, pretrained_weights_available
from .runs import Run, RunMismatch, code_version, inputs_fingerprint
from .runs import run as runs_run  # noqa: F401 (RunMismatch re-exported)
from .samplers import SeededDraws, make_sampler
from .swad import SWAD, update_bn


@dataclass
class TrainConfig:
    method: str = "erm"
    backbone: str = "tf_efficientnet_lite0"
    pretrained: bool = True
    image_size: int = 128
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    loss: str = "ce"
    sampler: str = "instance"
    augmentation: str = "dihedral_jitter"
    hparams: Dict[str, object] = field(default_factory=dict)
    patience: int = 5
    seed: int = 0
    num_workers: Optional[int] = None
    degrade_seed: int = 0
    #: Stem and leading stages kept frozen (``models.Normalized``); 0 fine-tunes everything.
    frozen_stages: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def split_by_domain(x, y, d, num_domains: int) -> List[tuple]:
    # One pair per domain, in domain order and empty when a domain is absent from
    # the batch: DANN and BoDA read the position as the domain label.
    return [(x[d == k], y[d == k]) for k in range(num_domains)]


def train_epoch(method: Method, batches, update, schedulers: Sequence, averager: Optional[SWAD] = None) -> List[dict]:
    """One epoch of the one training step every trainer shares (images here,
    cached feature maps in ``crosslab.train_on_maps``): ``update(batch)`` (the
    method's update on one batch; returns its logged values), then every
    scheduler steps, then SWAD collects the weights. Returns the logs."""
    logs = []
    for batch in batches:
        logs.append(update(batch))
        for scheduler in schedulers:
            scheduler.step()
        if averager is not None:
            averager.collect(method)
    return logs


def validation_step(val_probs: np.ndarray, val_labels: np.ndarray, num_classes: int,
                    averager: Optional[SWAD] = None) -> tuple:
    """The end of every epoch: validation scores and loss (mean negative log
    probability of the true class), which closes SWAD's segment. Returns
    ``(scores, loss)``."""
    val_labels = np.asarray(val_labels)
    scores = M.scores(val_labels, val_probs.argmax(1), num_classes)
    true_prob = val_probs[np.arange(len(val_probs)), val_labels]
    loss = float(-np.log(np.clip(true_prob, 1e-12, None)).mean())
    if averager is not None:
        averager.end_segment(loss)
    return scores, loss


@torch.no_grad()
def predict_proba(method: Method, dataset: ImageTable, batch_size: int = 128,
                  device: Optional[torch.device] = None, num_workers: Optional[int] = None,
                  desc: str = "predict") -> np.ndarray:
    """Class probabilities (N, C) for every image of ``dataset``, in order."""
    device = device or next(method.parameters()).device
    loader = image_loader(dataset, batch_size, device, num_workers, shuffle=False)
    method.eval()
    out = []
    for x, _, _ in batches(loader, desc=desc, leave=False):
        with precision.autocast(device):  # bf16 where the hardware has it; WBC_PRECISION=fp32 turns it off
            out.append(torch.softmax(forward_in_streams(method.predict, x.to(device)).float(), dim=1).cpu())
    return torch.cat(out).numpy()


def predictions_frame(table: pd.DataFrame, probs: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """The per-image prediction table written to ``predictions_<set>.csv``."""
    keep = [c for c in ("path", "lab", "label", "degradation", "severity") if c in table]
    out = table[keep].reset_index(drop=True).copy()
    out["pred"] = [classes[i] for i in probs.argmax(1)]
    for j, c in enumerate(classes):
        out[f"prob_{c}"] = probs[:, j]
    return out


def score_predictions(pred: pd.DataFrame, classes: Sequence[str], n_boot: int = 1000) -> Dict[str, float]:
    index = {c: i for i, c in enumerate(classes)}
    return M.evaluate(pred["label"].map(index).to_numpy(), pred["pred"].map(index).to_numpy(),
                      len(classes), n_boot=n_boot)


def build_method(config: TrainConfig, num_classes: int, num_domains: int, class_counts: Sequence[int]) -> Method:
    backbone = create_backbone(config.backbone, pretrained=config.pretrained)
    hparams = dict(lr=config.lr, weight_decay=config.weight_decay, loss=config.loss, **config.hparams)
    return create_method(config.method, Normalized(backbone, config.frozen_stages), backbone.num_features, num_classes,
                         num_domains=num_domains, class_counts=class_counts, hparams=hparams)


def run_identity(config: TrainConfig, split: pd.DataFrame, root: Path, eval_sets: Dict[str, pd.DataFrame],
                 swad: Optional[dict] = None, n_boot: int = 1000, tags: Optional[dict] = None,
                 device: Optional[torch.device] = None, classes: Optional[Sequence[str]] = None) -> tuple:
    """(configuration, inputs) that identify a training run. ``num_workers`` is
    left out: it changes how fast a run is, never its numbers (per-draw seeds).
    ``tags`` (e.g. ``rho``, ``fold``) are index keys the protocol adds;
    ``classes`` (the output order) is recorded so the folder alone can be applied."""
    config_dict = {k: v for k, v in asdict(config).items() if k != "num_workers"}
    if classes is not None:
        config_dict["classes"] = list(classes)
    # What the backbone really starts from: hub weights fall back to random init offline.
    config_dict["pretrained"] = bool(config.pretrained) and pretrained_weights_available(config.backbone)
    config_dict["n_boot"] = n_boot
    device = device or default_device()
    config_dict["precision"] = dict(train=precision.precision_tag(device, training=True),
                                    predict=precision.precision_tag(device))
    if swad is not None:
        config_dict["swad"] = dict(swad)
    if distributed.planned_world_size() > 1:
        # Batch statistics, dropout and the float summation order change with it (see distributed.py).
        config_dict["world_size"] = distributed.planned_world_size()
    config_dict.update(tags or {})
    inputs = inputs_fingerprint(dict(split=split, **{f"eval:{k}": t for k, t in eval_sets.items()}), root)
    return config_dict, inputs


def train_run(config: TrainConfig, split: pd.DataFrame, root: Path, run_dir: Path, classes: Sequence[str],
              eval_sets: Optional[Dict[str, pd.DataFrame]] = None, device: Optional[torch.device] = None,
              n_boot: int = 1000, swad: Optional[dict] = None, protocol: str = "train",
              tags: Optional[dict] = None) -> Dict[str, Dict[str, float]]:
    """Train ``config.method`` on ``split`` (rows with split train / val), keep the
    epoch with the best validation macro-F1, and evaluate it on ``eval_sets``
    (name -> table; default: the split's test rows).

    ``swad`` (a dict of :class:`swad.SWAD` settings, ``{}`` for its defaults)
    evaluates the SWAD average of the weights instead (segments = epochs,
    chosen by validation loss; batch-norm statistics re-estimated), saved as
    ``swad.pt``; it is recorded in ``config.json``.

    ``run_dir`` is guarded by :class:`runs.Run`: its ``config.json`` holds the
    configuration, a fingerprint of the split and evaluation sets (rows, data
    root, file sizes and times) and the code version, and a folder holding a
    run of any other identity raises :class:`runs.RunMismatch`. A finished run
    (``done``) returns its saved metrics; an interrupted one resumes from
    ``checkpoint.pt``. Protocols let :func:`train_in` choose the folder (its
    name changes with the identity). Returns ``{set name: scores}``.

    With ``$WBC_NPROC`` above 1 the run trains data-parallel on that many
    processes under torchrun (:func:`distributed.launch`); inside
    such a process group each rank trains on its shard of every batch and
    only rank 0 writes the run folder (see :mod:`wbclib.distributed`). Where
    training autocasts to float16 (GPUs without bfloat16) the loss is scaled
    (``torch.amp.GradScaler``, through ``Method.step``).
    """
    eval_sets = eval_sets if eval_sets is not None else {"test": split[split["split"] == "test"]}
    config_dict, inputs = run_identity(config, split, root, eval_sets, swad, n_boot, tags, device, classes)
    run = Run(Path(run_dir), dict(protocol=protocol, config=config_dict, inputs=inputs, code=code_version()))
    with distributed.main_first():  # rank 0 creates config.json, the others check it
        run.open()
    if run.done:
        return run.metrics()
    if distributed.should_launch():  # the ranks open this same folder (same identity) and train it
        return distributed.launch(train_run, dict(
            config=config, split=split, root=root, run_dir=run_dir, classes=classes, eval_sets=eval_sets,
            device=device, n_boot=n_boot, swad=swad, protocol=protocol, tags=tags))

    seed_everything(config.seed)
    device = device or default_device()
    workers = config.num_workers  # None: one per core on CPU, at low priority (_parallel.image_loader)
    train_rows = split[split["split"] == "train"]
    val_rows = split[split["split"] == "val"]
    train_set = ImageTable(train_rows, root, classes, config.image_size, config.degrade_seed,
                           transform=make_augmentation(config.augmentation, config.image_size))
    # Presets that crop during training crop every evaluation image the same way.
    test_view = eval_transform(config.augmentation, config.image_size)
    val_set = ImageTable(val_rows, root, classes, config.image_size, config.degrade_seed, transform=test_view)
    counts = np.bincount(train_set.labels, minlength=len(classes))
    method = build_method(config, len(classes), len(train_set.domain_names), counts.tolist())
    method = distributed.sync_batch_norm(method, device).to(device)
    distributed.broadcast_state(method)  # every rank starts from rank 0's weights
    distributed.average_gradients(method)
    if precision.autocast_dtype(device, training=True) == torch.float16:
        # float16 gradients underflow without loss scaling; Method.step scales, unscales and steps.
        method.grad_scaler = torch.amp.GradScaler(torch.device(device).type)

    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, config.epochs * steps_per_epoch))
                  for opt in method.optimizers()]
    start_epoch, best, bad_epochs, history = 0, -1.0, 0, []
    averager = SWAD(**swad) if swad is not None else None
    ckpt_path, best_path = run.path("checkpoint.pt"), run.path("best.pt")
    if ckpt_path.is_file():
        state = _io.torch_load(ckpt_path, map_location=device, weights_only=False)
        method.load_state_dict(state["model"])
        for opt, s in zip(method.optimizers(), state["optimizers"]):
            opt.load_state_dict(s)
        for sch, s in zip(schedulers, state["schedulers"]):
            sch.load_state_dict(s)
        start_epoch, best, bad_epochs, history = state["epoch"] + 1, state["best"], state["bad_epochs"], state["history"]
        if averager is not None and state.get("swad"):
            averager.load_state_dict(state["swad"])
        if method.grad_scaler is not None and state.get("grad_scaler"):
            method.grad_scaler.load_state_dict(state["grad_scaler"])

    def update(batch):
        x, y, d = (t.to(device) for t in batch)
        with precision.autocast(device, training=True):
            stats = method.update(split_by_domain(x, y, d, method.num_domains))
        distributed.broadcast_state(method, parameters=False)  # rank 0's batch-norm statistics everywhere
        return dict(stats, loss=distributed.mean_over_ranks(stats["loss"]))

    for epoch in range(start_epoch, config.epochs):
        if bad_epochs >= config.patience:
            break
        method.train()
        method.set_epoch(epoch)
        # Main-process randomness (dropout, mixing) depends only on (seed, epoch), and each
        # draw's augmentation only on (seed, epoch, draw): a resumed run repeats them, and the
        # number of loader workers changes nothing.
        # Each rank of a process group draws its own dropout masks (rank 0 the one-process ones).
        torch.manual_seed(config.seed * 1000 + epoch + 1_000_003 * distributed.rank())
        draws = SeededDraws(make_sampler(config.sampler, train_set.labels, seed=config.seed * 1000 + epoch),
                            seed=config.seed, epoch=epoch)
        drop_last, batch_size = len(train_set) > config.batch_size, config.batch_size
        if distributed.world_size() > 1:  # this rank's share of every batch, each draw with its own seed
            draws = distributed.shard_draws(draws.draws, config.batch_size, drop_last)
            batch_size = distributed.local_batch_size(config.batch_size)
        loader = image_loader(train_set, batch_size, device, workers, drop_last=drop_last, sampler=draws)
        epoch_batches = batches(loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                                disable=not distributed.is_main())
        losses = [log["loss"] for log in train_epoch(method, epoch_batches, update, schedulers, averager)]
        # Rank 0 validates; every rank takes the same decisions (best epoch, patience, SWAD) from its numbers.
        val_probs = distributed.broadcast_object(
            predict_proba(method, val_set, device=device, num_workers=workers, desc="validate")
            if distributed.is_main() else None)
        val_scores, _ = validation_step(val_probs, val_set.labels, len(classes), averager)
        history.append(dict(epoch=epoch, loss=float(np.mean(losses)), **{f"val_{k}": v for k, v in val_scores.items()}))
        if val_scores["macro_f1"] > best:
            best, bad_epochs = val_scores["macro_f1"], 0
            if distributed.is_main():
                _io.torch_save(method.state_dict(), best_path)
        else:
            bad_epochs += 1
        if distributed.is_main():
            extra = {} if method.grad_scaler is None else dict(grad_scaler=method.grad_scaler.state_dict())
            _io.torch_save(dict(model=method.state_dict(), optimizers=[o.state_dict() for o in method.optimizers()],
                                schedulers=[s.state_dict() for s in schedulers], epoch=epoch, best=best,
                                bad_epochs=bad_epochs, history=history,
                                swad=averager.state_dict() if averager is not None else None, **extra), ckpt_path)
            run.write_csv("history.csv", pd.DataFrame(history))
        distributed.barrier()  # best.pt and checkpoint.pt are written before any rank reads them

    if averager is not None:
        method.load_state_dict(averager.averaged_state(method))
        bn_loader = image_loader(ImageTable(train_rows, root, classes, config.image_size, config.degrade_seed,
                                            transform=test_view), config.batch_size, device, workers)
        # Every rank, on the same (whole) loader: with SyncBatchNorm it is a collective operation.
        update_bn(method, bn_loader, forward=lambda batch: method.predict(batch[0].to(device)))
        if distributed.is_main():
            _io.torch_save(method.state_dict(), run.path("swad.pt"))
    else:
        method.load_state_dict(_io.torch_load(best_path, map_location=device))
    if not distributed.is_main():  # rank 0 evaluates and finishes the run; the others return its metrics
        return distributed.broadcast_object(None)
    results = {}
    for name, table in eval_sets.items():
        dataset = ImageTable(table, root, classes, config.image_size, config.degrade_seed, transform=test_view)
        probs = predict_proba(method, dataset, device=device, num_workers=workers, desc=name)
        pred = predictions_frame(table, probs, classes)
        run.write_csv(f"predictions_{name}.csv", pred)
        results[name] = score_predictions(pred, classes, n_boot=n_boot)
    results["best_val_macro_f1"] = {"macro_f1": best}
    if averager is not None:
        results["swad"] = averager.summary()
    return distributed.broadcast_object(run.finish(results))


def train_in(results_dir: Path, protocol: str, tags: dict, config: TrainConfig, split: pd.DataFrame, root: Path,
             classes: Sequence[str], eval_sets: Optional[Dict[str, pd.DataFrame]] = None, **kwargs) -> tuple:
    """:func:`train_run` in the run folder :func:`runs.run` names for this
    protocol, tags (``rho``, ``fold``, ``seed`` ...: readable in the folder
    name and queryable with :func:`runs.find`) and identity. Returns ``(run, results)``."""
    eval_sets = eval_sets if eval_sets is not None else {"test": split[split["split"] == "test"]}
    config_dict, inputs = run_identity(config, split, root, eval_sets, kwargs.get("swad"), kwargs.get("n_boot", 1000),
                                       tags, kwargs.get("device"), classes)
    run = runs_run(results_dir, protocol, config_dict, inputs, keys=list(tags))
    return run, train_run(config, split, root, run.dir, classes, eval_sets=eval_sets, protocol=protocol, tags=tags,
                          **kwargs)


def load_predictions(run_dir: Path, name: str = "test") -> pd.DataFrame:
    return _io.read_csv(Path(run_dir) / f"predictions_{name}.csv")
