"""Bucket sampler, flow-matching timestep conventions (seed Sec. 2.2, Table 3), training and sampling feeding the
transformer alike, memory settings and accounting, validation protocol, parameter checks."""
import copy
import itertools

import pytest
import torch

from conftest import ROOT
from ultraflux.training.flow import pack, predict_velocity, sample_sigmas, sigma_table, unpack
from ultraflux.training.memory import gradient_checkpointing, zero2_memory
from ultraflux.training.sampler import BucketBatchSampler
from ultraflux.training.validation import VAL_COLUMNS, VAL_SIGMAS, fixed_noise


def test_stage2_range_is_the_high_noise_end():
    # Index 0 of the scheduler's descending table is sigma = 1; index 459 is unshifted sigma 0.541 (Table 3: 0-459).
    unshifted = sigma_table(shift=1.0)
    assert unshifted[0] == 1.0
    assert unshifted[459] == pytest.approx(0.541)
    assert unshifted[999] == pytest.approx(0.001)
    shifted = sigma_table(shift=3.0)
    assert shifted[459] == pytest.approx(3 * 0.541 / (1 + 2 * 0.541))
    g = torch.Generator().manual_seed(0)
    s = sample_sigmas(4096, 0, 459, 3.0, g)
    assert s.min() >= shifted[459] - 1e-6 and s.max() <= 1.0


def test_pack_unpack_roundtrip():
    x = torch.randn(2, 16, 6, 10)
    assert torch.equal(unpack(pack(x), 6, 10), x)


@pytest.mark.parametrize("embeds", [True, False], ids=["guidance-embedding", "no-guidance-embedding"])
def test_training_feeds_guidance_only_to_a_guidance_embedding_transformer(params, embeds):
    """As FluxPipeline does: a transformer without a guidance embedding (FLUX.1-schnell, ``model.tiny.guidance_embeds:
    false``) takes none; feeding it one failed with diffusers' TypeError."""
    from ultraflux.models.transformer import build_transformer

    model_cfg = copy.deepcopy(params["model"])
    model_cfg["tiny"]["guidance_embeds"] = embeds
    transformer = build_transformer(model_cfg, params["rope"])
    g = torch.Generator().manual_seed(0)
    tiny = model_cfg["tiny"]
    x = torch.randn(1, 16, 4, 4, generator=g)
    text = torch.randn(1, 8, tiny["joint_attention_dim"], generator=g)
    pooled = torch.randn(1, tiny["pooled_projection_dim"], generator=g)
    with torch.no_grad():
        v1, v4 = (predict_velocity(transformer, x, torch.tensor([0.5]), text, pooled, torch.float32, guidance=s)
                  for s in (1.0, 4.0))
    assert v1.shape == x.shape
    assert (not torch.equal(v1, v4)) == embeds, "the guidance value must reach exactly the guidance-embedding model"


def test_training_gives_the_transformer_what_the_pipeline_gives_it(params):
    """At each step of a sampling run, ``predict_velocity`` on the same noisy latents and sigma feeds the transformer
    exactly what FluxPipeline does (packed latents, timestep = sigma, guidance, text and position ids), and the
    pipeline's sigmas are training's shifted table (``sigma_table``)."""
    from ultraflux.models.transformer import build_transformer
    from ultraflux.models.vae import build_vae
    from ultraflux.pipelines.pipeline_ultraflux import UltraFluxPipeline, static_shift_scheduler
    from ultraflux.training.flow import GUIDANCE_TRAIN

    shift, size, tiny = 3.0, 64, params["model"]["tiny"]
    transformer = build_transformer(params["model"], params["rope"]).eval()
    calls = []
    transformer.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    pipe = UltraFluxPipeline(static_shift_scheduler(shift), build_vae(params["model"]), None, None, None, None,
                             transformer)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, 8, tiny["joint_attention_dim"], generator=g)
    pooled = torch.randn(1, tiny["pooled_projection_dim"], generator=g)
    with torch.no_grad():
        pipe(prompt_embeds=text, pooled_prompt_embeds=pooled, height=size, width=size, num_inference_steps=2,
             guidance_scale=GUIDANCE_TRAIN, generator=g, output_type="latent")
        sampled, calls[:] = list(calls), []
        sigmas = pipe.scheduler.sigmas[:2]
        for kw, sigma in zip(sampled, sigmas):
            x_t = unpack(kw["hidden_states"], size // 16, size // 16)
            predict_velocity(transformer, x_t, sigma.reshape(1), text, pooled, torch.float32)
    assert torch.allclose(sigmas.double(), sigma_table(shift)[[0, 500]], atol=1e-6)   # sigmas 1, 0.5 shifted
    for kw_sample, kw_train in zip(sampled, calls, strict=True):
        assert set(kw_sample) <= set(kw_train) | {"joint_attention_kwargs", "return_dict"}
        for name in ("hidden_states", "guidance", "pooled_projections", "encoder_hidden_states", "txt_ids",
                     "img_ids"):
            assert torch.equal(kw_sample[name], kw_train[name]), name
        assert torch.allclose(kw_sample["timestep"], kw_train["timestep"], atol=1e-6)


def test_bucket_batches_single_bucket_disjoint_equal_across_ranks():
    buckets = ["1:1"] * 11 + ["16:9"] * 7 + ["2:1"] * 3
    ranks = [BucketBatchSampler(buckets, batch_size=2, seed=3, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batches_per_epoch == 3   # one epoch = 2 + 1 global batches of 4 (2:1 too small, remainders dropped)
    seen = [[], []]
    for batches in itertools.islice(zip(*ranks), 3):
        assert len({buckets[i] for b in batches for i in b}) == 1, "a step mixes buckets"
        assert set(batches[0]).isdisjoint(batches[1]), "ranks share images"
        for r in range(2):
            seen[r] += batches[r]
    assert all(len(s) == 6 for s in seen)
    assert len(set(seen[0] + seen[1])) == 12       # within an epoch no image is seen twice


def test_bucket_sampler_resume_continues_exactly():
    buckets = ["a"] * 9 + ["b"] * 6
    ref = list(itertools.islice(iter(BucketBatchSampler(buckets, 3, seed=1)), 12))
    assert ref[:5] != ref[5:10]                      # epochs reshuffle
    resumed = BucketBatchSampler(buckets, 3, seed=1)
    resumed.seek(5)                                  # e.g. step 5 of grad_accum 1, restored from a checkpoint
    assert list(itertools.islice(iter(resumed), 7)) == ref[5:]
    assert [resumed.batch(n) for n in range(12)] == ref


def test_bucket_sampler_explains_too_small_buckets():
    with pytest.raises(ValueError, match="bucket sizes"):
        BucketBatchSampler(["a", "b", "c"], batch_size=2, seed=0)


def test_gradient_checkpointing_setting():
    assert gradient_checkpointing("auto") is torch.cuda.is_available()   # today's implicit behaviour
    assert gradient_checkpointing(True) is True and gradient_checkpointing(False) is False
    with pytest.raises(ValueError, match="dit_stage1.gradient_checkpointing"):
        gradient_checkpointing("yes", "dit_stage1.gradient_checkpointing")


def test_zero2_accounting_matches_the_zero_paper_and_deepspeed():
    # ZeRO paper (Rajbhandari et al. 2020), Fig. 1: a 7.5B model, mixed-precision Adam (K = 12), 64 GPUs:
    # baseline DP 120 GB per GPU, P_os+g (ZeRO-2) 16.6 GB.
    assert zero2_memory(7.5e9, 1)["zero_paper_model"] / 1e9 == pytest.approx(120.0)
    assert zero2_memory(7.5e9, 64)["zero_paper_model"] / 1e9 == pytest.approx(16.6, abs=0.05)
    # Our itemisation (DeepSpeed stage_1_and_2: bf16 grad partitions, two 5e8-element bf16 buckets with overlap_comm)
    m = zero2_memory(11.9e9, 8)
    assert m["params_bf16_replicated"] == 2 * 11.9e9
    assert m["grads_bf16_partition"] + m["master_fp32_partition"] + m["adam_moments_fp32_partition"] == \
        pytest.approx(14 * 11.9e9 / 8)
    assert m["static_total"] - m["reduce_buckets"] == pytest.approx(m["zero_paper_model"])
    assert m["reduce_buckets"] == 2 * 5e8 * 2
    assert m["static_total"] == pytest.approx((2 + 14 / 8) * 11.9e9 + 2e9)   # 43.4 GiB: fits an 80 GB GPU ...
    assert zero2_memory(11.9e9, 1)["zero_paper_model"] / 2**30 > 177           # ... where 16 P on one GPU cannot
    assert zero2_memory(11.9e9, 1, overlap_comm=False)["static_total"] - 1e9 == pytest.approx(16 * 11.9e9)


def test_validation_protocol_fixed_sigmas_and_noise():
    assert VAL_SIGMAS == (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)    # MLPerf: 8 equidistant in [0, 7/8]
    assert VAL_COLUMNS[1:9] == [f"val_loss_t{k}" for k in range(8)]
    key = "0123456789abcdef" * 2
    a = fixed_noise(0, key, 3, (16, 4, 4))
    assert torch.equal(a, fixed_noise(0, key, 3, (16, 4, 4)))                 # same image, same sigma: same noise
    assert not torch.equal(a, fixed_noise(0, key, 4, (16, 4, 4)))             # another sigma
    assert not torch.equal(a, fixed_noise(0, "f" + key[1:], 3, (16, 4, 4)))   # another image
    assert not torch.equal(a, fixed_noise(1, key, 3, (16, 4, 4)))             # another seed


def test_zero2_rank_emulation_holds_one_partition(monkeypatch):
    """bench_training.py --full's one-rank ZeRO-2 layout, on the CPU: what it keeps is what the accounting counts."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from bench_training import Zero2Rank

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(8)]).to(torch.bfloat16)
    before = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    opt = Zero2Rank(model, world=4, lr=1e-2)
    owned = sum(p.numel() for p in opt.owned)
    assert total / 4 <= owned < total / 4 + max(p.numel() for p in params)     # 1/N, up to tensor boundaries
    model(torch.randn(4, 32, dtype=torch.bfloat16)).square().mean().backward()
    owned_ids = {id(p) for p in opt.owned}
    assert all((p.grad is not None) == (id(p) in owned_ids) for p in params)   # others' gradients dropped
    opt.step()
    state_bytes = sum(t.numel() * t.element_size() for s in opt.opt.state.values() for t in s.values()
                      if torch.is_tensor(t) and t.dim() > 0)
    master_bytes = sum(m.numel() * m.element_size() for m in opt.master)
    assert (master_bytes, state_bytes) == (4 * owned, 8 * owned)             # fp32 master + m, v for 1/N only
    m = zero2_memory(owned * 4, 4)
    assert master_bytes + state_bytes == m["master_fp32_partition"] + m["adam_moments_fp32_partition"]
    changed = [not torch.equal(p, b) for p, b in zip(params, before)]
    assert changed == [id(p) in owned_ids for p in params]                   # only the owned partition is updated
    assert all(p.grad is None for p in params)
