"""Benchmark the model pieces (issue 3); every ratio is measured within one run, interleaving the variants.

1. DiT training step (forward + backward + loss) of the tiny Flux transformer, objective ``ultraflux`` vs ``l2``
   (goal: <= 3% overhead for the SNR-aware Huber wavelet objective).
2. Transformer forward with Resonance 2D RoPE + YaRN vs Flux RoPE at an already seen resolution (goal: no measurable
   difference, the cos/sin tables are cached), and the RoPE module alone (cached vs diffusers' FluxPosEmbed).
3. F16 VAE decode, plain vs partitioned (the release's four-quadrant last upsample + conv): seconds and the peak
   resident-memory growth of the decode (polled), interleaved, at --decode-px (tiny VAE of params.yaml).

    python benchmarks/bench_model_pieces.py [--grid 32 32] [--batch 2] [--reps 30] [--decode-px 2048]
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from common import peak_rss_growth, timed
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

from ultraflux.config import load_params
from ultraflux.losses import dit_loss
from ultraflux.models.rope import UltraFluxPosEmbed, build_pos_embed
from ultraflux.models.vae import build_vae

ROOT = Path(__file__).resolve().parents[1]


def tiny_transformer(tiny: dict) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=tiny["num_layers"], num_single_layers=tiny["num_single_layers"],
        attention_head_dim=tiny["attention_head_dim"], num_attention_heads=tiny["num_attention_heads"],
        joint_attention_dim=tiny["joint_attention_dim"], pooled_projection_dim=tiny["pooled_projection_dim"],
        guidance_embeds=tiny["guidance_embeds"], axes_dims_rope=tuple(tiny["axes_dims_rope"]))


def pack(z: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C] (Flux 2x2 packing)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, n, d = x.shape
    c = d // 4
    return x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def img_ids(h: int, w: int) -> torch.Tensor:
    hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.zeros(h * w), hh.flatten().float(), ww.flatten().float()], dim=-1)


def bench_decode(model_cfg: dict, px: int, reps: int) -> None:
    vae = build_vae(model_cfg).eval()
    z = torch.randn(1, 16, px // 16, px // 16, generator=torch.Generator().manual_seed(0))
    runs = {"plain": [], "partitioned": []}
    with torch.no_grad():
        for i in range(reps):                            # ABBA order
            for mode in (("plain", "partitioned") if i % 2 == 0 else ("partitioned", "plain")):
                vae.set_decode_mode(mode)
                runs[mode].append(peak_rss_growth(lambda: vae.decode(z))[1:])
    c0 = vae.decoder.conv_out.in_channels
    for mode, r in runs.items():
        print(f"[vae decode {px}x{px}]  {mode:11s} {statistics.median(s for s, _ in r):7.2f} s   peak RSS growth "
              f"{statistics.median(m for _, m in r) / 2**20:7.0f} MiB   (largest upsampled map "
              f"{c0 * px * px * 4 / (4 if mode == 'partitioned' else 1) / 2**20:.0f} MiB fp32, {c0} channels)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", type=int, nargs=2, default=(32, 32), help="latent H W (tokens = H/2 x W/2)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--decode-px", type=int, default=2048, help="image side for the decode comparison (0 = skip)")
    ap.add_argument("--decode-reps", type=int, default=4)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_params(ROOT / "params.yaml")
    tiny, rope_cfg, loss_cfg = params["model"]["tiny"], params["rope"], params["loss"]
    h, w = args.grid
    b = args.batch
    model = tiny_transformer(tiny)
    model.pos_embed = build_pos_embed(rope_cfg, tiny["axes_dims_rope"])
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(b, 16, h, w, generator=g)
    noise = torch.randn(b, 16, h, w, generator=g)
    sigmas = torch.rand(b, generator=g) * 0.9 + 0.05
    s = sigmas.view(-1, 1, 1, 1)
    x_t = pack((1 - s) * latents + s * noise)
    txt = torch.randn(b, tiny["text_max_length"], tiny["text_hidden"], generator=g)
    pooled = torch.randn(b, tiny["pooled_projection_dim"], generator=g)
    ids = img_ids(h // 2, w // 2)
    txt_ids = torch.zeros(tiny["text_max_length"], 3)
    guidance = torch.full((b,), 4.0) if tiny["guidance_embeds"] else None
    kw = dict(encoder_hidden_states=txt, pooled_projections=pooled, timestep=sigmas, img_ids=ids, txt_ids=txt_ids,
              guidance=guidance)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; tiny Flux: "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params; latent {b}x16x{h}x{w} "
          f"({h // 2}x{w // 2} = {h * w // 4} image tokens), rope {rope_cfg['kind']} L={rope_cfg['train_len']}")

    # 1. training step, ultraflux vs l2 (interleaved)
    def step(objective):
        model.zero_grad(set_to_none=True)
        pred = unpack(model(hidden_states=x_t, **kw).sample, h, w)
        loss, _ = dit_loss(pred, noise, latents, sigmas, objective, loss_cfg)
        loss.backward()

    def loss_only(objective):
        pred = unpack(model(hidden_states=x_t, **kw).sample, h, w).detach().requires_grad_(True)
        return pred

    for obj in ("l2", "ultraflux"):
        for _ in range(3):
            step(obj)
    t_l2, t_uf = [], []
    for i in range(args.reps):                           # ABBA order: drift and warm caches hit both sides
        order = ("l2", "ultraflux") if i % 2 == 0 else ("ultraflux", "l2")
        for obj in order:
            (t_l2 if obj == "l2" else t_uf).extend(timed(lambda: step(obj), 1))
    m_l2, m_uf = statistics.median(t_l2), statistics.median(t_uf)
    print(f"[step fwd+bwd]  l2 {1e3 * m_l2:8.2f} ms   ultraflux {1e3 * m_uf:8.2f} ms   "
          f"overhead {100 * (m_uf / m_l2 - 1):+.2f}%  (median of {args.reps}; goal <= 3%)")
    pred = loss_only("l2")
    lo = {}
    for obj in ("l2", "ultraflux"):
        def f():
            loss, _ = dit_loss(pred, noise, latents, sigmas, obj, loss_cfg)
            loss.backward()
        for _ in range(3):
            f()
        lo[obj] = statistics.median(timed(f, args.reps * 3))
    print(f"[loss alone fwd+bwd]  l2 {1e3 * lo['l2']:.3f} ms   ultraflux {1e3 * lo['ultraflux']:.3f} ms   "
          f"(difference = {100 * (lo['ultraflux'] - lo['l2']) / m_l2:+.2f}% of an l2 step)")

    # 2. forward, resonance_yarn vs flux RoPE at a seen resolution (interleaved)
    pes = {"flux (diffusers FluxPosEmbed)": FluxPosEmbed(rope_cfg["theta"], list(tiny["axes_dims_rope"])),
           "flux (UltraFluxPosEmbed)": UltraFluxPosEmbed(rope_cfg["theta"], tiny["axes_dims_rope"], kind="flux",
                                                         train_len=rope_cfg["train_len"]),
           "resonance_yarn": build_pos_embed({**rope_cfg, "kind": "resonance_yarn"}, tiny["axes_dims_rope"])}
    fwd = {k: [] for k in pes}
    with torch.no_grad():
        for pe in pes.values():
            model.pos_embed = pe
            for _ in range(3):
                model(hidden_states=x_t, **kw)
        for _ in range(args.reps):
            for name, pe in pes.items():
                model.pos_embed = pe
                fwd[name] += timed(lambda: model(hidden_states=x_t, **kw), 1)
    base = statistics.median(fwd["flux (diffusers FluxPosEmbed)"])
    for name, ts in fwd.items():
        m = statistics.median(ts)
        print(f"[forward]  {name:32s} {1e3 * m:8.2f} ms   vs diffusers flux {100 * (m / base - 1):+.2f}%")
    all_ids = torch.cat([txt_ids, ids])
    for name, pe in pes.items():
        pe(all_ids)
        m = statistics.median(timed(lambda: pe(all_ids), args.reps * 10))
        print(f"[rope module]  {name:32s} {1e6 * m:9.1f} us per call")
    # paper profile: Flux axes, L = 64, a 2048 x 4096 px image = 64 x 128 tokens (YaRN s = 2 on the width only)
    paper = build_pos_embed({**rope_cfg, "train_len": 64}, [16, 56, 56])
    big = torch.cat([torch.zeros(512, 3), img_ids(64, 128)])
    t0 = timed(lambda: paper(big), 1)[0]
    t1 = statistics.median(timed(lambda: paper(big), 20))
    ref = FluxPosEmbed(10_000, [16, 56, 56])
    t2 = statistics.median(timed(lambda: ref(big), 5))
    print(f"[rope module, paper axes, 64x128 tokens, s = {paper.last_scales[1:]}]  first call "
          f"{1e3 * t0:.1f} ms, cached {1e3 * t1:.2f} ms, diffusers FluxPosEmbed {1e3 * t2:.1f} ms")

    # 3. VAE decode, plain vs partitioned
    if args.decode_px:
        bench_decode(params["model"], args.decode_px, args.decode_reps)


if __name__ == "__main__":
    main()
