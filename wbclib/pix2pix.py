"""Pix2Pix (Isola et al. 2017) for leukocyte images: a U-Net generator and a
PatchGAN discriminator, L1 (lambda 100) plus the conditional adversarial
loss, trained on random crops of synthetic (degraded, clean) pairs
(:func:`restore.make_pairs`) in one resumable run folder
(:func:`train_pix2pix`), and applied fully convolutionally to whole images
(:class:`Pix2PixRestorer`). The restoration stage of Nguyen et al. (2026).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import _io, runs
from .models import default_device, default_workers, load_table_image
from .restore import make_pairs, random_crop
from .runs import inputs_fingerprint

class UNetGenerator(nn.Module):
    """Isola et al.'s U-Net with ``depth`` stride-2 levels.

    Encoder ``C(c)-C(2c)-...`` (4x4 convolutions, stride 2, batch norm except
    on the first and innermost level, leaky ReLU 0.2), decoder of transposed
    convolutions (ReLU) with skip connections to the mirrored encoder level;
    channels ``c * min(2^i, 8)``. Two departures, both switchable, that make
    it learn impulse removal within a CPU budget:

    * ``full_res``: Isola's outermost level sees the image only through a
      stride-2 convolution, so no layer knows which pixel of a 2x2 block is
      the impulse; here the last transposed convolution gives ``c`` channels,
      concatenated with the input image and mapped to the output by two 3x3
      convolutions at full resolution;
    * ``residual``: the output is added to the input image (the network
      predicts a correction, as in DnCNN-style restoration) instead of being
      a ``tanh`` image, so the identity is free and only the damage is learned.

    Inputs and outputs are in [-1, 1] (residual outputs are clamped when
    converted to images); sides must be multiples of ``2^depth``
    (:class:`Pix2PixRestorer` pads whole images).
    """

    def __init__(self, channels: int = 32, depth: int = 4, residual: bool = True, full_res: bool = True,
                 in_channels: int = 3):
        super().__init__()
        if depth < 2:
            raise ValueError("depth must be at least 2")
        self.depth, self.residual = depth, residual
        widths = [channels * min(2 ** i, 8) for i in range(depth)]
        self.down = nn.ModuleList()
        for i in range(depth):
            layers = [] if i == 0 else [nn.LeakyReLU(0.2)]
            layers.append(nn.Conv2d(in_channels if i == 0 else widths[i - 1], widths[i], 4, 2, 1, bias=False))
            if 0 < i < depth - 1:
                layers.append(nn.BatchNorm2d(widths[i]))
            self.down.append(nn.Sequential(*layers))
        self.up = nn.ModuleList()
        for i in reversed(range(depth)):
            c_in = widths[i] if i == depth - 1 else 2 * widths[i]
            if i == 0 and not full_res:
                self.up.append(nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(c_in, in_channels, 4, 2, 1)))
            elif i == 0:
                self.up.append(nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(c_in, widths[0], 4, 2, 1), nn.ReLU()))
            else:
                self.up.append(nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(c_in, widths[i - 1], 4, 2, 1, bias=False),
                                             nn.BatchNorm2d(widths[i - 1])))
        self.full_res = full_res
        if full_res:
            self.head = nn.Sequential(nn.Conv2d(widths[0] + in_channels, widths[0], 3, 1, 1), nn.ReLU(),
                                      nn.Conv2d(widths[0], in_channels, 3, 1, 1))

    @property
    def multiple(self) -> int:
        return 2 ** self.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips, h = [], x
        for block in self.down:
            h = block(h)
            skips.append(h)
        for k, block in enumerate(self.up):
            if k > 0:
                h = torch.cat([h, skips[self.depth - 1 - k]], 1)
            h = block(h)
        if self.full_res:
            h = self.head(torch.cat([h, x], 1))
        return x + h if self.residual else torch.tanh(h)


class PatchDiscriminator(nn.Module):
    """Isola et al.'s PatchGAN on (condition, image) pairs: ``layers`` stride-2
    4x4 convolutions, one stride-1, then a 1-channel map of patch logits.
    ``layers=3`` is the 70x70 PatchGAN; 2 sees 34x34 and 1 sees 16x16 patches
    (for small crops)."""

    def __init__(self, channels: int = 32, layers: int = 3, in_channels: int = 6):
        super().__init__()
        seq = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2 ** n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            width = out
        seq.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.model = nn.Sequential(*seq)

    @staticmethod
    def receptive_field(layers: int) -> int:
        field_ = 1
        for k, s in reversed([(4, 2)] * layers + [(4, 1), (4, 1)]):
            field_ = (field_ - 1) * s + k
        return field_

    def forward(self, condition: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.model(torch.cat([condition, image], 1))


@dataclass
class Pix2PixConfig:
    """Everything that defines a Pix2Pix run (stored as the run's ``config.json``)."""

    kinds: List[str] = field(default_factory=lambda: ["salt_pepper"])
    crop: int = 64
    epochs: int = 10
    crops_per_image: int = 1
    batch_size: int = 16
    channels: int = 32
    depth: int = 4
    d_channels: int = 32
    d_layers: int = 2
    residual: bool = True
    full_res: bool = True
    lambda_l1: float = 100.0
    lr: float = 2e-4
    beta1: float = 0.5
    seed: int = 0
    degrade_seed: int = 0
    #: data-loading processes; None: none on a CPU (the networks need the cores), several on a GPU
    num_workers: Optional[int] = None


class Pix2Pix(nn.Module):
    """Generator, discriminator and their Adam optimisers; :meth:`step` is one
    training iteration of Isola et al. (D on real and fake pairs, then G on
    the adversarial loss plus ``lambda_l1`` times L1)."""

    def __init__(self, config: Pix2PixConfig):
        super().__init__()
        self.config = config
        self.generator = UNetGenerator(config.channels, config.depth, config.residual, config.full_res)
        self.discriminator = PatchDiscriminator(config.d_channels, config.d_layers)
        betas = (config.beta1, 0.999)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=config.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=config.lr, betas=betas)
        self.bce = nn.BCEWithLogitsLoss()

    def optimizers(self) -> List[torch.optim.Optimizer]:
        return [self.opt_g, self.opt_d]

    def step(self, noisy: torch.Tensor, clean: torch.Tensor) -> Dict[str, float]:
        fake = self.generator(noisy)
        self.opt_d.zero_grad(set_to_none=True)
        real_logits = self.discriminator(noisy, clean)
        fake_logits = self.discriminator(noisy, fake.detach())
        loss_d = 0.5 * (self.bce(real_logits, torch.ones_like(real_logits))
                        + self.bce(fake_logits, torch.zeros_like(fake_logits)))
        loss_d.backward()
        self.opt_d.step()
        self.opt_g.zero_grad(set_to_none=True)
        fake_logits = self.discriminator(noisy, fake)
        loss_gan = self.bce(fake_logits, torch.ones_like(fake_logits))
        loss_l1 = (fake - clean).abs().mean()
        (loss_gan + self.config.lambda_l1 * loss_l1).backward()
        self.opt_g.step()
        return dict(loss_d=loss_d.item(), loss_gan=loss_gan.item(), loss_l1=loss_l1.item())


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``uint8`` (H, W, 3) -> float (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1.0


def to_image(x: torch.Tensor) -> np.ndarray:
    """float (3, H, W) in [-1, 1] -> ``uint8`` (H, W, 3)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


class PairCrops(Dataset):
    """Random (degraded, clean) crops of the images listed in ``table``.

    Each image is loaded as the loader sees it (its ``degradation`` /
    ``severity`` applied: the "raw" data set whose clean part we train on),
    kept in memory, degraded by :func:`make_pairs` at full size (so blur and
    densities are relative to the whole field) and cropped. Item ``i`` of
    epoch ``e`` depends only on ``(seed, e, i)``: a resumed run sees the same
    crops.
    """

    def __init__(self, table: pd.DataFrame, root: Path, kinds: Sequence[str], crop: int, crops_per_image: int = 1,
                 seed: int = 0, degrade_seed: int = 0, ranges: Optional[dict] = None, desc: str = "load images"):
        kinds_col = table["degradation"] if "degradation" in table else [None] * len(table)
        levels = table["severity"] if "severity" in table else [0] * len(table)
        self.images = [load_table_image(root, p, k, l, degrade_seed)
                       for p, k, l in tqdm(list(zip(table["path"], kinds_col, levels)), desc=desc, leave=False)]
        self.kinds, self.crop, self.per_image = list(kinds), crop, crops_per_image
        self.seed, self.ranges, self.epoch, self.stream = seed, ranges, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images) * self.per_image

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.stream, self.epoch, i])
        clean = self.images[i // self.per_image]
        noisy = make_pairs([clean], self.kinds, rng, self.ranges)[0][0]
        noisy, clean = random_crop([noisy, clean], self.crop, rng)
        return to_tensor(noisy), to_tensor(clean)


def fixed_pairs(dataset: PairCrops, n: int, seed: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` deterministic validation crops (a random stream of their own)."""
    stream, dataset.stream = dataset.stream, 1 + seed
    pairs = [dataset[i % len(dataset)] for i in range(n)]
    dataset.stream = stream
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def _seed_all(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_pix2pix(config: Pix2PixConfig, table: pd.DataFrame, root: Path, run_dir: Path,
                  val_table: Optional[pd.DataFrame] = None, device: Optional[torch.device] = None,
                  val_crops: int = 32) -> UNetGenerator:
    """Train Pix2Pix on synthetic pairs from the images of ``table``; returns the generator.

    The run folder (as :func:`train.train_run`'s) holds ``config.json``,
    ``checkpoint.pt`` (after every epoch: both networks, optimisers,
    schedules, history), ``history.csv`` (losses; L1 and PSNR on fixed crops
    of ``val_table``) and, when finished, ``generator.pt`` and
    ``summary.json``; a finished run is loaded, an interrupted one resumes.
    Learning rates are constant for the first half of the epochs and decay
    linearly to zero over the second half (Isola et al.).
    """
    run_dir = Path(run_dir)
    # The folder's identity: every setting but the worker count (which changes no number), the
    # training and validation rows, the data root and its files, and the code.
    settings = {k: v for k, v in asdict(config).items() if k != "num_workers"}
    tables = dict(train=table, **({"val": val_table} if val_table is not None else {}))
    run = runs.Run(run_dir, dict(protocol="restore/pix2pix", config=settings, inputs=inputs_fingerprint(tables, root),
                                 code=runs.code_version())).open()
    device = device or default_device()
    if run.done:
        return load_generator(run_dir, device)

    _seed_all(config.seed)
    model = Pix2Pix(config).to(device)
    workers = config.num_workers if config.num_workers is not None else (
        default_workers() if device.type == "cuda" else 0)
    data = PairCrops(table, root, config.kinds, config.crop, config.crops_per_image, config.seed,
                     config.degrade_seed, desc="Pix2Pix images")
    val_x = val_y = None
    if val_table is not None and len(val_table):
        val_data = PairCrops(val_table, root, config.kinds, config.crop, max(1, -(-val_crops // len(val_table))),
                             config.seed, config.degrade_seed,
                             desc="Pix2Pix validation images")
        val_x, val_y = fixed_pairs(val_data, val_crops)
    steps = max(1, math.ceil(len(data) / config.batch_size))
    half = config.epochs // 2

    def factor(step: int) -> float:
        epoch = step // steps
        return 1.0 if epoch < half else max(0.0, 1.0 - (step - half * steps) / max(1, (config.epochs - half) * steps))

    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in model.optimizers()]
    start, history = 0, []
    ckpt = run_dir / "checkpoint.pt"
    if ckpt.is_file():
        state = _io.torch_load(ckpt, map_location=device, weights_only=False)
        model.generator.load_state_dict(state["generator"])
        model.discriminator.load_state_dict(state["discriminator"])
        for opt, s in zip(model.optimizers(), state["optimizers"]):
            opt.load_state_dict(s)
        for sch, s in zip(schedulers, state["schedulers"]):
            sch.load_state_dict(s)
        start, history = state["epoch"] + 1, state["history"]
    for epoch in range(start, config.epochs):
        began = time.time()
        data.set_epoch(epoch)
        torch.manual_seed(config.seed * 1000 + epoch)
        loader = DataLoader(data, batch_size=config.batch_size, shuffle=True, drop_last=len(data) > config.batch_size,
                            num_workers=workers,
                            generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
        model.train()
        logs = []
        for noisy, clean in tqdm(loader, desc=f"Pix2Pix epoch {epoch + 1}/{config.epochs}", leave=False):
            logs.append(model.step(noisy.to(device), clean.to(device)))
            for sch in schedulers:
                sch.step()
        row = dict(epoch=epoch, **{k: float(np.mean([l[k] for l in logs])) for k in logs[0]})
        if val_x is not None:
            model.generator.eval()
            with torch.no_grad():
                out = model.generator(val_x.to(device)).clamp(-1, 1).cpu()
            row["val_l1"] = float((out - val_y).abs().mean() * 127.5)
            mse = ((out - val_y) * 127.5).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
            row["val_psnr"] = float((10 * torch.log10(255.0 ** 2 / mse)).mean())
            row["val_l1_input"] = float((val_x - val_y).abs().mean() * 127.5)
        row["seconds"] = time.time() - began
        history.append(row)
        _io.torch_save(dict(generator=model.generator.state_dict(), discriminator=model.discriminator.state_dict(),
                            optimizers=[o.state_dict() for o in model.optimizers()],
                            schedulers=[s.state_dict() for s in schedulers], epoch=epoch, history=history), ckpt)
        run.write_csv("history.csv", pd.DataFrame(history))
    _io.torch_save(model.generator.state_dict(), run_dir / "generator.pt")
    summary = dict(epochs=config.epochs, train_images=len(data.images), steps_per_epoch=steps,
                   seconds=float(sum(h["seconds"] for h in history)),
                   generator_parameters=sum(p.numel() for p in model.generator.parameters()),
                   discriminator_parameters=sum(p.numel() for p in model.discriminator.parameters()),
                   discriminator_receptive_field=PatchDiscriminator.receptive_field(config.d_layers))
    run.write_json("summary.json", summary)
    # metrics.json holds only what a rerun reproduces; the wall time stays in summary.json.
    run.finish({k: v for k, v in summary.items() if k != "seconds"})
    return model.generator.eval()


def load_generator(run_dir: Path, device: Optional[torch.device] = None) -> UNetGenerator:
    """The trained generator of a finished run folder, in eval mode."""
    run_dir = Path(run_dir)
    config = Pix2PixConfig(**_io.read_json(run_dir / "config.json")["identity"]["config"])
    generator = UNetGenerator(config.channels, config.depth, config.residual, config.full_res)
    generator.load_state_dict(_io.torch_load(run_dir / "generator.pt"))
    return generator.to(device or default_device()).eval()


class Pix2PixRestorer:
    """A generator applied to whole ``uint8`` images (fully convolutional):
    mirrored padding to a multiple of ``2^depth``, batch norm in eval mode."""

    def __init__(self, generator: UNetGenerator, device: Optional[torch.device] = None):
        self.device = device or next(generator.parameters()).device
        self.generator = generator.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        m = self.generator.multiple
        ph, pw = (-h) % m, (-w) % m
        x = to_tensor(image)[None].to(self.device)
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = nn.functional.pad(x, (0, pw, 0, ph), mode=mode)
        return to_image(self.generator(x)[0, :, :h, :w])
