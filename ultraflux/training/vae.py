"""F16 VAE decoder post-training (seed Sec. 2.2 "VAE Training", Table 3 "F16 VAE post-training").

Encoder frozen, decoder trained on random ``resolution``^2 crops (paper: 512) of the top ``flat_top_fraction`` (50%)
of curated training images by texture score. AdamW, Table 3: lr 1e-4, weight decay 1e-2 (the text of Sec. 2.2 says
1e-5; Table 3 is the more specific "final configuration" table, so it wins; set ``vae_train.lr`` to use the other).

Loss = lambda_L2 * MSE(D(z), x) + lambda_perc * perceptual(D(z), x) + lambda_vae * MSE(D(z), D0(z))      (1, 0.1, 0.2)
       [+ lambda_adv * hinge-GAN generator term, only with ``vae_train.adversarial: true``]
* perceptual: LPIPS (VGG) when ``vae_train.lpips_weights`` names a local directory with its weights (needs the
  ``lpips`` package and torchvision: ``pip install -e .[vision]`` on a machine with a matching torch); otherwise the
  clearly named weight-free stand-in ``standin:1-ssim`` (1 - SSIM, differentiable). It is a training loss, so it is
  never computed under ``no_grad`` (the LPIPS network is frozen, the gradient flows through it into the decoder).
* the lambda_vae term: the main paper calls the post-training non-adversarial; the closest public recipe (Diffusion-4K's
  decoder-only SC-VAE) adds a consistency term against the original decoder, so lambda_vae weights the distance to the
  frozen initial decoder D0 on the same latents, keeping the post-trained decoder in the latent space the DiT learns.
* adversarial (option, default off; ``vae_train.adversarial``, ``lambda_adv`` 0.05, ``adv_start`` step): a PatchGAN
  discriminator (pix2pix N-layer, as in the LDM/SD VAE recipes) with hinge losses. Its step scores ``recon.detach()``
  (the discriminator loss never reaches the decoder); the generator term is computed with the discriminator's
  parameters frozen (it never reaches the discriminator).

Data: the training images are streamed from the curated shards (``ultraflux.data.shards``), one row read per crop by
DataLoader workers; nothing holds the image set. Crop number n (which image, where) and the posterior noise of
micro-batch n are pure functions of (seed, n), drawn from the manifest's ``width``/``height`` (:class:`CropSampler`),
so the crops are deterministic by seed and a resumed run needs only its step.

Checkpoints (``ckpt_dir``): every ``checkpoint_every`` steps accelerate's ``save_state`` writes the decoder,
discriminator, both optimizers, the RNG states and the registered :class:`TrainState` (step, loss history, initial
metrics), in the ``training/checkpoint.py`` layout shared with the DiT loop; a re-run resumes (``load_state``) and ends
with the same weights as an uninterrupted run, also after ``steps`` was raised. The disk check, the stop on a
non-finite loss or gradient norm and the RNG-neutral evaluations come with the loop both trainers run
(``training/loop.py``). Held-out PSNR / SSIM / NMSE (``ultraflux.evaluation.reconstruction``, the seed Table 2 columns
that need no learned weights) on the first ``eval_images`` held-out images every ``eval_every`` steps.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torchmetrics.functional.image import structural_similarity_index_measure

from ultraflux.data.shards import load_image_tensor
from ultraflux.distributed import average_gradients, init_cpu_group, mean_over_processes
from ultraflux.evaluation.reconstruction import reconstruction_metrics
from ultraflux.io import atomic_path, naming_disk_full, sha256_file, sha256_json
from ultraflux.models.lpips import LPIPS_BACKBONE_FILE, load_lpips  # noqa: F401 - LPIPS_BACKBONE_FILE for tests
from ultraflux.training.checkpoint import Checkpointer, Fingerprint
from ultraflux.training.layout import stage_layout
from ultraflux.training.loop import (TrainLoop, check_training_disk, checkpoint_bytes, decided_by_main, grad_norm_of,
                                     rng_neutral, write_csv)

PERCEPTUAL_STANDIN = "standin:1-ssim (no LPIPS weights)"


ROW_COLUMNS = ["id", "shard", "key", "offset", "nbytes", "image", "width", "height"]   # what a crop needs of a row


def select_vae_rows(manifest: pd.DataFrame, top_fraction: float, eval_images: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training rows: top ``top_fraction`` of kept train rows by texture, holdout rows: first ``eval_images``)."""
    kept = manifest[manifest["kept"]]
    train = kept[kept["split"] == "train"].sort_values("texture_rank", ascending=False, kind="stable")
    train = train.head(max(1, int(round(len(train) * top_fraction))))
    holdout = manifest[manifest["eval"]].head(int(eval_images))   # the evaluation set, shared by the data variants
    cols = [c for c in ROW_COLUMNS if c in manifest.columns]
    return train[cols].reset_index(drop=True), holdout[cols].reset_index(drop=True)


def _seed(*parts) -> int:
    """A generator seed hashed from ``parts`` (torch's CPU generator keeps 32 bits; Python's ``hash`` is salted)."""
    return int(sha256_json(["vae-crops", *parts])[:8], 16)


class CropSampler:
    """Micro-batches of crops (row, top, left); micro-batch n is a pure function of (seed, n): ``seek(n)`` resumes.

    Optimizer step s draws its whole global batch of ``batch_size x world x accum`` crops from one generator keyed by
    (seed, s): a row uniformly among the training rows, the window uniformly inside the image (``sizes`` from the
    manifest; an image smaller than ``size`` is upscaled to it first, as :func:`crop` does). Micro-batch m of rank r
    takes positions ``(m x world + r) x batch_size`` onwards (``training/layout.py``), so a step trains on the same
    crops and posterior noise whatever the number of processes. Used as a DataLoader's ``batch_sampler``.
    """

    def __init__(self, sizes: list[tuple[int, int]], batch_size: int, size: int, seed: int, rank: int = 0,
                 world: int = 1, accum: int = 1):
        self.sizes, self.batch_size, self.size, self.seed, self.start = sizes, batch_size, size, seed, 0
        self.rank, self.world, self.accum = rank, world, accum

    def _slice(self, n: int) -> slice:
        first = (n % self.accum * self.world + self.rank) * self.batch_size
        return slice(first, first + self.batch_size)

    def batch(self, n: int) -> list[tuple[int, int, int]]:
        g = torch.Generator().manual_seed(_seed(self.seed, 1, n // self.accum))
        out = []
        for r in torch.randint(0, len(self.sizes), (self.batch_size * self.world * self.accum,), generator=g).tolist():
            w, h = self.sizes[r]
            top = int(torch.randint(0, max(h, self.size) - self.size + 1, (1,), generator=g))
            left = int(torch.randint(0, max(w, self.size) - self.size + 1, (1,), generator=g))
            out.append((r, top, left))
        return out[self._slice(n)]

    def noise(self, n: int, shape) -> torch.Tensor:
        """The posterior-sampling noise [batch_size, *shape] of micro-batch ``n`` (its rows of the step's draw)."""
        g = torch.Generator().manual_seed(_seed(self.seed, 2, n // self.accum))
        return torch.randn((self.batch_size * self.world * self.accum, *shape), generator=g)[self._slice(n)]

    def seek(self, n: int) -> None:
        self.start = int(n)

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        n = self.start
        while True:
            yield self.batch(n)
            n += 1


def crop(img: torch.Tensor, top: int, left: int, size: int) -> torch.Tensor:
    """``size`` x ``size`` window at (top, left); an image smaller than ``size`` is first upscaled (bilinear) to it."""
    _, h, w = img.shape
    if h < size or w < size:
        img = F.interpolate(img[None], size=(max(h, size), max(w, size)), mode="bilinear", align_corners=False)[0]
    return img[:, top:top + size, left:left + size]


def center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    _, h, w = img.shape
    y, x = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return img[:, y:y + size, x:x + size]


class CropDataset(Dataset):
    """Crop ``(row, top, left)`` of a training image, read from its shard when asked (one row, one read)."""

    def __init__(self, rows: pd.DataFrame, curated_dir: Path, size: int):
        self.rows, self.curated_dir, self.size = rows, Path(curated_dir), size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: tuple[int, int, int]) -> torch.Tensor:
        r, top, left = item
        return crop(load_image_tensor(self.curated_dir, self.rows.iloc[r].to_dict()), top, left, self.size)


def holdout_crops(rows: pd.DataFrame, curated_dir: Path, size: int) -> Iterator[torch.Tensor]:
    """Centre crops of the held-out images, read one at a time."""
    for row in rows.to_dict("records"):
        yield center_crop(load_image_tensor(curated_dir, row), size)


# --------------------------------------------------------------------------------------------- perceptual term
def perceptual_loss(recon: torch.Tensor, target: torch.Tensor, lpips_model=None) -> torch.Tensor:
    """Differentiable in ``recon``: a training loss (no ``no_grad``; LPIPS weights frozen, not its input)."""
    if lpips_model is not None:
        return lpips_model(recon, target).mean()
    return 1 - structural_similarity_index_measure((recon.clamp(-1, 1) + 1) / 2, (target + 1) / 2, data_range=1.0)


# --------------------------------------------------------------------------------------------- adversarial term
class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix ``NLayerDiscriminator``): a map of real/fake logits, one per receptive-field patch."""

    def __init__(self, in_channels: int = 3, width: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = width
        for i in range(1, n_layers + 1):
            out = width * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.GroupNorm(_groups(out), out),
                       nn.LeakyReLU(0.2, True)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _groups(c: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0)


def discriminator_loss(disc: nn.Module, real: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator step. Scores ``recon.detach()``: nothing flows back into the decoder."""
    return 0.5 * (F.relu(1 - disc(real)).mean() + F.relu(1 + disc(recon.detach())).mean())


def generator_adv_loss(disc: nn.Module, recon: torch.Tensor) -> torch.Tensor:
    """Generator hinge term -D(recon). Call with the discriminator frozen (``requires_grad_(False)``)."""
    return -disc(recon).mean()


# --------------------------------------------------------------------------------------------- training
def training_rows(cfg: dict, curated_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training rows, held-out rows) of the curated manifest; no training image, or no image sizes, is an error."""
    manifest = pd.read_parquet(curated_dir / "manifest.parquet")
    train_rows, holdout_rows = select_vae_rows(manifest, cfg["flat_top_fraction"], cfg["eval_images"])
    if train_rows.empty:
        raise ValueError(f"vae: no kept training images in {curated_dir}/manifest.parquet")
    for col in ("width", "height"):
        if col not in train_rows.columns:
            raise ValueError(f"vae: {curated_dir}/manifest.parquet has no '{col}' column (image sizes pick the crops)")
    return train_rows, holdout_rows


@dataclass
class VaeModels:
    """The VAE whose decoder trains, the frozen initial decoder D0, their optimizer, the optional discriminator."""

    vae: Any
    original_decoder: nn.Module
    post_quant: nn.Module
    trainable: list
    optimizer: Any
    disc: Any
    opt_d: Any
    lpips_model: Any
    perceptual_name: str

    @property
    def checkpointed(self) -> tuple[list, list]:
        """(models, trainable parameters) a checkpoint holds: the disk check's sizes."""
        extra = list(self.disc.parameters()) if self.disc is not None else []
        return [self.vae, self.disc], self.trainable + extra


def build_models(params: dict, accelerator) -> VaeModels:
    """Encoder frozen, decoder trainable (AdamW); with ``adversarial`` a PatchGAN discriminator seeded by seed + 1."""
    from ultraflux.models.vae import build_vae

    cfg, seed, device = params["vae_train"], params["seed"], accelerator.device
    vae = build_vae(params["model"])
    vae.encoder.requires_grad_(False)
    if getattr(vae, "quant_conv", None) is not None:
        vae.quant_conv.requires_grad_(False)
    original_decoder = copy.deepcopy(vae.decoder).requires_grad_(False).eval().to(device)
    trainable = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    # no DDP wrapper (the loop calls vae.encode / vae.decode, not forward): gradients are averaged over processes
    vae, optimizer = accelerator.prepare_model(vae, evaluation_mode=True), accelerator.prepare_optimizer(optimizer)
    post_quant = vae.post_quant_conv if getattr(vae, "post_quant_conv", None) is not None else torch.nn.Identity()
    weights = cfg["lpips_weights"]
    lpips_model = load_lpips(weights).to(device) if weights else None
    perceptual_name = f"lpips:vgg ({weights})" if lpips_model is not None else PERCEPTUAL_STANDIN
    disc = opt_d = None
    if cfg["adversarial"]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            disc = PatchDiscriminator()
        opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg["lr"], betas=(0.5, 0.9), weight_decay=cfg["weight_decay"])
        disc, opt_d = accelerator.prepare(disc, opt_d)
    return VaeModels(vae, original_decoder, post_quant, trainable, optimizer, disc, opt_d, lpips_model,
                     perceptual_name)


def check_vae_disk(cfg: dict, ckpt: Checkpointer | None, out_dir: Path, models: VaeModels, accelerator) -> None:
    """Room for ``keep_checkpoints`` + 1 checkpoints (all weights + AdamW state) and the final VAE, before training;
    decided by the main process for all (as the DiT's check), so every rank stops together."""
    modules, trainable = models.checkpointed
    n = sum(p.numel() for m in modules if m is not None for p in m.parameters())
    per = checkpoint_bytes(n, sum(p.numel() for p in trainable))
    final = sum(p.numel() for p in models.vae.parameters()) * 4
    decided_by_main(accelerator, lambda: check_training_disk("vae", "vae_train.keep_checkpoints",
                                                             cfg["keep_checkpoints"], ckpt, out_dir, per, final))


@dataclass
class VaeSteps:
    """The VAE's parts of the :class:`~ultraflux.training.loop.TrainLoop`: one optimizer step and the held-out
    evaluation."""

    cfg: dict
    loop: TrainLoop
    models: VaeModels
    sampler: CropSampler
    accum: int
    holdout_rows: pd.DataFrame
    curated_dir: Path

    def step(self, step: int, crops) -> dict:
        """Optimizer step ``step`` (decoder, then the discriminator on the detached reconstructions): its record."""
        m, cfg, accum, acc = self.models, self.cfg, self.accum, self.loop.accelerator
        t0 = time.perf_counter()
        m.vae.train()
        use_adv = m.disc is not None and step > cfg["adv_start"]
        sums = {"loss": 0.0, "loss_l2": 0.0, "loss_perceptual": 0.0, "loss_consistency": 0.0}
        if use_adv:
            sums.update({"loss_adv_g": 0.0, "loss_disc": 0.0})
            m.disc.requires_grad_(False)          # the generator term must not train the discriminator
        recons = []
        for micro in range(accum):
            x = next(crops).to(acc.device, non_blocking=True)
            loss, terms, recon = self._losses(x, (step - 1) * accum + micro, use_adv)
            if use_adv:
                recons.append((x, recon.detach()))
            acc.backward(loss / accum)
            for k, v in terms.items():
                sums[k] += float(v.detach()) / accum
        average_gradients(m.trainable)
        sums = mean_over_processes(sums)
        grad_norm = grad_norm_of(m.trainable)
        m.optimizer.step()
        m.optimizer.zero_grad(set_to_none=True)
        if use_adv:                               # discriminator step on the detached reconstructions
            m.disc.requires_grad_(True)
            for x, recon in recons:
                d_loss = discriminator_loss(m.disc, x, recon)
                acc.backward(d_loss / accum)
                sums["loss_disc"] += float(d_loss.detach()) / accum
            m.opt_d.step()
            m.opt_d.zero_grad(set_to_none=True)
        return {"step": step, **sums, "images_per_s": cfg["global_batch"] / (time.perf_counter() - t0),
                "lr": m.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm}

    def _losses(self, x: torch.Tensor, n: int, use_adv: bool):
        """(loss, its terms, reconstruction) of crops ``x``, micro-batch ``n``'s posterior noise (module doc)."""
        m, cfg = self.models, self.cfg
        with torch.no_grad():                     # frozen encoder and frozen reference decoder only
            dist = m.vae.encode(x).latent_dist
            z = dist.mean + dist.std * self.sampler.noise(n, dist.mean.shape[1:]).to(dist.mean)
            ref = m.original_decoder(m.post_quant(z))
        recon = m.vae.decode(z).sample
        terms = {"loss_l2": F.mse_loss(recon, x), "loss_perceptual": perceptual_loss(recon, x, m.lpips_model),
                 "loss_consistency": F.mse_loss(recon, ref)}
        loss = (cfg["lambda_l2"] * terms["loss_l2"] + cfg["lambda_perc"] * terms["loss_perceptual"]
                + cfg["lambda_vae"] * terms["loss_consistency"])
        if use_adv:
            terms["loss_adv_g"] = generator_adv_loss(m.disc, recon)
            loss = loss + cfg["lambda_adv"] * terms["loss_adv_g"]
        return loss, {"loss": loss, **terms}, recon

    def holdout_metrics(self) -> dict:
        """PSNR / SSIM / NMSE on the held-out centre crops; RNG-neutral (how often it runs cannot change training)."""
        if not len(self.holdout_rows):
            return {}
        with rng_neutral():
            crops = holdout_crops(self.holdout_rows, self.curated_dir, int(self.cfg["resolution"]))
            return reconstruction_metrics(self.models.vae.eval(), crops)

    def evaluate(self, step: int) -> None:
        """Step 0: the initial decoder's metrics (kept in the checkpointed state); later: into the step's record."""
        metrics = self.holdout_metrics()
        state, named = self.loop.state, {f"holdout_{k}": v for k, v in metrics.items()}
        if step == 0:
            state.extra["before"] = metrics
        else:
            state.history[-1].update(named)
        self.loop.log(named, step)


def train_vae(params: dict, curated_dir: Path, out_dir: Path, logger=None, progress: bool = True,
              ckpt_dir: Path | None = None, on_step=None) -> dict:
    """Post-train the decoder; writes ``out_dir/vae`` (diffusers format) and ``out_dir/loss.csv``.

    With ``ckpt_dir`` the run checkpoints every ``vae_train.checkpoint_every`` steps and resumes from there.
    ``on_step(step)`` is called after every optimizer step (tests slow a run down with it to kill it mid-way).
    """
    from accelerate import Accelerator

    cfg, seed = params["vae_train"], params["seed"]
    size, (batch_size, accum) = int(cfg["resolution"]), stage_layout(cfg, "vae_train")   # global_batch / processes
    torch.manual_seed(seed)
    curated_dir, out_dir = Path(curated_dir), Path(out_dir)
    train_rows, holdout_rows = training_rows(cfg, curated_dir)
    init_cpu_group()   # several CPU processes: gloo, MULTI_CPU (else accelerate sees no distributed run)
    accelerator = Accelerator(mixed_precision="no")   # fp32 decoder training; accelerate keeps device and state
    models = build_models(params, accelerator)
    if logger is not None:
        logger.set_tags({"vae.perceptual": models.perceptual_name, "vae.adversarial": str(cfg["adversarial"])})
    ckpt = None
    if ckpt_dir is not None:
        ckpt = Checkpointer(ckpt_dir, "vae", cfg["keep_checkpoints"], accelerator)
        ckpt.reconcile(Fingerprint.of({"vae_train": cfg, "model": params["model"], "seed": seed,
                                       "manifest_sha256": sha256_file(curated_dir / "manifest.parquet")},
                                      world={"num_processes": accelerator.num_processes}), cfg["steps"])
    loop = TrainLoop("vae", accelerator, ckpt, cfg["steps"], cfg["eval_every"], cfg["checkpoint_every"], logger,
                     progress)
    check_vae_disk(cfg, ckpt, out_dir, models, accelerator)
    loop.resume()
    sampler = CropSampler(list(zip(train_rows["width"].astype(int), train_rows["height"].astype(int))),
                          batch_size, size, seed, accelerator.process_index, accelerator.num_processes, accum)
    run = VaeSteps(cfg, loop, models, sampler, accum, holdout_rows, curated_dir)
    loop.run(loop.stream(CropDataset(train_rows, curated_dir, size), sampler, accum, cfg["num_workers"], 2),
             run.step, run.evaluate, on_step)

    vae = accelerator.unwrap_model(models.vae)
    if accelerator.is_main_process:   # the ranks hold the same weights; one writes them
        with naming_disk_full(out_dir, "vae final weights and loss curve"):
            with atomic_path(out_dir / "vae") as tmp:
                vae.eval().save_pretrained(tmp)
            write_csv(out_dir / "loss.csv", loop.state.history)
    before, after = loop.state.extra["before"], run.holdout_metrics()
    return {"final_loss": loop.state.history[-1]["loss"] if loop.state.history else float("nan"),
            "num_train_images": len(train_rows), "num_holdout_images": len(holdout_rows),
            **{f"holdout_{k}_before": v for k, v in before.items()}, **{f"holdout_{k}": v for k, v in after.items()},
            "perceptual": models.perceptual_name, "adversarial": cfg["adversarial"],
            "num_processes": accelerator.num_processes}
