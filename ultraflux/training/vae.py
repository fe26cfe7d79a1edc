"""F16 VAE decoder post-training (seed Sec. 2.2 "VAE Training", Table 3 "F16 VAE post-training").

Encoder frozen, decoder trained on random ``resolution``^2 crops (paper: 512) of the top ``flat_top_fraction`` (50%)
of curated training images by texture score. AdamW, Table 3: lr 1e-4, weight decay 1e-2 (the text of Sec. 2.2 says
1e-5; Table 3 is the more specific "final configuration" table, so it wins; set ``vae_train.lr`` to use the other).

Loss = lambda_L2 * MSE(D(z), x) + lambda_perc * perceptual(D(z), x) + lambda_vae * MSE(D(z), D0(z))      (1, 0.1, 0.2)
* perceptual: LPIPS when local backbone weights are given (``vae_train.lpips_weights``); otherwise the clearly named
  weight-free stand-in ``standin:1-ssim`` (1 - SSIM, differentiable). Never under ``no_grad``.
* the lambda_vae term: the main paper calls the post-training non-adversarial; the closest public recipe (Diffusion-4K's
  decoder-only SC-VAE) adds a consistency term against the original decoder, so lambda_vae weights the distance to the
  frozen initial decoder D0 on the same latents, keeping the post-trained decoder in the latent space the DiT learns.
  An adversarial PatchGAN term is not part of the default (``vae_train.adversarial: false``).
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from tqdm import tqdm

from ultraflux.io import atomic_path
from ultraflux.training.cache import load_image_tensor

PERCEPTUAL_STANDIN = "standin:1-ssim (no LPIPS weights)"


def select_vae_rows(manifest: pd.DataFrame, top_fraction: float) -> tuple[list[dict], list[dict]]:
    kept = manifest[manifest["kept"]]
    train = kept[kept["split"] == "train"].sort_values("texture_rank", ascending=False)
    train = train.head(max(1, int(round(len(train) * top_fraction))))
    return train.to_dict("records"), kept[kept["split"] == "holdout"].to_dict("records")


def random_crop(img: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    _, h, w = img.shape
    if h < size or w < size:
        img = F.interpolate(img[None], size=(max(h, size), max(w, size)), mode="bilinear", align_corners=False)[0]
        _, h, w = img.shape
    y = int(torch.randint(0, h - size + 1, (1,), generator=gen))
    x = int(torch.randint(0, w - size + 1, (1,), generator=gen))
    return img[:, y:y + size, x:x + size]


def center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    _, h, w = img.shape
    y, x = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return img[:, y:y + size, x:x + size]


def reconstruct(vae, x: torch.Tensor) -> torch.Tensor:
    z = vae.encode(x).latent_dist.mode()
    return vae.decode(z).sample


@torch.no_grad()
def reconstruction_metrics(vae, images: list[torch.Tensor]) -> dict[str, float]:
    """PSNR / SSIM / NMSE (seed Table 2 columns that need no learned weights) on images in [-1, 1]."""
    psnr, ssim, nmse = [], [], []
    for x in images:
        x = x[None]
        r = reconstruct(vae, x).clamp(-1, 1)
        a, b = (x + 1) / 2, (r + 1) / 2
        psnr.append(float(peak_signal_noise_ratio(b, a, data_range=1.0)))
        ssim.append(float(structural_similarity_index_measure(b, a, data_range=1.0)))
        nmse.append(float(((r - x) ** 2).sum() / (x ** 2).sum().clamp_min(1e-12)))
    n = max(1, len(images))
    return {"psnr": sum(psnr) / n, "ssim": sum(ssim) / n, "nmse": sum(nmse) / n}


def perceptual_loss(recon: torch.Tensor, target: torch.Tensor, lpips_model=None) -> torch.Tensor:
    if lpips_model is not None:
        return lpips_model(recon, target).mean()
    return 1 - structural_similarity_index_measure((recon.clamp(-1, 1) + 1) / 2, (target + 1) / 2, data_range=1.0)


def train_vae(params: dict, curated_dir: Path, out_dir: Path, logger=None, progress: bool = True) -> dict:
    """Post-train the decoder; writes ``out_dir/vae`` (diffusers format) and ``out_dir/loss.csv``."""
    from ultraflux.models.vae import build_vae

    cfg, seed = params["vae_train"], params["seed"]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    manifest = pd.read_parquet(curated_dir / "manifest.parquet")
    train_rows, holdout_rows = select_vae_rows(manifest, cfg["flat_top_fraction"])
    if not train_rows:
        raise ValueError(f"vae: no kept training images in {curated_dir}/manifest.parquet")
    images = [load_image_tensor(curated_dir / r["image"]) for r in train_rows]
    holdout = [center_crop(load_image_tensor(curated_dir / r["image"]), cfg["resolution"]) for r in holdout_rows]

    vae = build_vae(params["model"])
    vae.encoder.requires_grad_(False)
    if getattr(vae, "quant_conv", None) is not None:
        vae.quant_conv.requires_grad_(False)
    original_decoder = copy.deepcopy(vae.decoder).requires_grad_(False).eval()
    post_quant = vae.post_quant_conv if getattr(vae, "post_quant_conv", None) is not None else torch.nn.Identity()
    trainable = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    lam_l2, lam_perc, lam_vae = cfg["lambda_l2"], cfg["lambda_perc"], cfg["lambda_vae"]
    if logger is not None:
        logger.set_tags({"vae.perceptual": PERCEPTUAL_STANDIN})

    history = []
    before = reconstruction_metrics(vae.eval(), holdout) if holdout else {}
    bar = tqdm(range(1, cfg["steps"] + 1), desc="vae", disable=not progress)
    for step in bar:
        t0 = time.perf_counter()
        vae.train()
        for _ in range(cfg["grad_accum"]):
            idx = torch.randint(0, len(images), (cfg["batch_size"],), generator=gen).tolist()
            x = torch.stack([random_crop(images[i], cfg["resolution"], gen) for i in idx])
            with torch.no_grad():
                z = vae.encode(x).latent_dist.sample(generator=gen)
                ref = original_decoder(post_quant(z))
            recon = vae.decode(z).sample
            l2 = F.mse_loss(recon, x)
            perc = perceptual_loss(recon, x)
            consistency = F.mse_loss(recon, ref)
            loss = (lam_l2 * l2 + lam_perc * perc + lam_vae * consistency) / cfg["grad_accum"]
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step, "loss": float(loss) * cfg["grad_accum"], "loss_l2": float(l2),
                  "loss_perceptual": float(perc), "loss_consistency": float(consistency),
                  "images_per_s": cfg["batch_size"] * cfg["grad_accum"] / (time.perf_counter() - t0)}
        if holdout and (step % cfg["eval_every"] == 0 or step == cfg["steps"]):
            record.update({f"holdout_{k}": v for k, v in reconstruction_metrics(vae.eval(), holdout).items()})
        history.append(record)
        if logger is not None:
            logger.log_metrics({k: v for k, v in record.items() if k != "step"}, step=step)
        bar.set_postfix(loss=f"{record['loss']:.4f}")

    with atomic_path(out_dir / "vae") as tmp:
        vae.eval().save_pretrained(tmp)
    pd.DataFrame(history).to_csv(out_dir / "loss.csv", index=False)
    after = reconstruction_metrics(vae.eval(), holdout) if holdout else {}
    return {"final_loss": history[-1]["loss"], "num_train_images": len(images), "num_holdout_images": len(holdout),
            **{f"holdout_{k}_before": v for k, v in before.items()}, **{f"holdout_{k}": v for k, v in after.items()},
            "perceptual": PERCEPTUAL_STANDIN}
