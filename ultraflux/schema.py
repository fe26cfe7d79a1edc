"""The typed schema of params.yaml: one pydantic model per section, every key with its type, range and seed source.

``Params.model_validate(yaml_dict)`` accepts exactly the keys below: an unknown key is an error (the run must not go
on with a default while the user believes the experiment changed something), values are strict (``"big"`` is not an
integer, ``"maybe"`` is not a boolean, 5.0 is not a step count), and cross-key rules sit next to their section.
``ultraflux.config.validate`` turns pydantic's errors into messages that name the file and the full key.

Seed = the supplementary material of the UltraFlux paper (Ye, Fei, Zhu; CVPR 2026; arXiv:2511.18050). Ranges marked "seed" come from it; the others are what the code
can run with.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

# ----------------------------------------------------------------------------------------------- vocabulary
# The named aspect ratios of the bucket table (seed Sec. 2.2 buckets + Table 5 evaluation ratios); the bucket sizes
# themselves are computed in ultraflux.data.buckets (a test checks both lists agree).
ASPECTS = ("1:1", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16", "2:1", "1:2", "2.39:1", "1:2.39")
Aspect = Literal[ASPECTS]  # type: ignore[valid-type]

PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]          # (0, 1]
Path = str                                              # "" = not set; existence is checked separately
TimestepIndex = Annotated[int, Field(ge=0, le=999)]     # seed Table 3: timestep ranges within 0-999
LearningRate = Annotated[float, Field(gt=0, le=1)]      # (0, 1]: seed Table 3 uses 1e-6 (DiT) and 1e-4 (VAE)
MAX_STEPS = 1_000_000   # ~33x the seed's longest run (stage 1, ~30K steps, Sec. 2.2): a larger value is a typo


def _bounded_steps(value: int) -> int:
    if value > MAX_STEPS:
        raise ValueError(f"must be at most {MAX_STEPS:,} (got {value:,}): the UltraFlux paper's longest stage is "
                         "~30K steps (supplement, Sec. 2.2) and a million steps is months of 8-GPU time at its scale, "
                         "so this is taken for a typo")
    return value


Steps = Annotated[int, Field(ge=1), AfterValidator(_bounded_steps)]


def _has_text(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


Text = Annotated[str, AfterValidator(_has_text)]


class Section(BaseModel):
    """Base of every section: unknown keys are errors, no type coercion ("5" is not 5)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# ----------------------------------------------------------------------------------------------- sections
class Tracking(Section):
    experiment: Text = "ultraflux"


class Synthetic(Section):
    num_images: PosInt
    long_side: Annotated[int, Field(ge=64)]


class MetadataFields(Section):                           # record keys of the released metadata ("" = auto-detect)
    url: str
    caption: str
    caption_zh: str
    quality: str
    aesthetic: str
    flatness: str
    entropy: str
    tag: str
    work_url: str
    photographer: str
    photographer_url: str


class Metadata(Section):                                 # the released MultiAspect-4K-1M metadata as a source
    max_records: NonNegInt                               # 0 = all
    balance_aspects: bool
    fields: MetadataFields


class Data(Section):
    variant: Literal["multiaspect", "baseline"]          # seed Table 1: MultiAspect-4K vs the Diffusion-4K recipe
    source: Path
    synthetic: Synthetic
    metadata: Metadata


class Download(Section):                                 # the download stage (released URLs -> original bytes)
    engine: Literal["local", "ray"]
    engine_workers: PosInt
    workers: Annotated[int, Field(ge=1, le=1024)]
    per_host: Annotated[int, Field(ge=1, le=1024)]
    timeout_s: PosFloat
    retries: Annotated[int, Field(ge=0, le=20)]
    backoff_s: NonNegFloat
    max_backoff_s: NonNegFloat
    max_mb: PosFloat
    max_redirects: Annotated[int, Field(ge=0, le=30)]
    retry_transient: bool
    allow_private_addresses: bool
    user_agent: Text
    shard_max_mb: PosInt
    cache_dir: Text

    @model_validator(mode="after")
    def _backoff(self):
        return _ordered(self, "backoff_s", "max_backoff_s")


class Flat(Section):                                     # seed Sec. 2.1 "Flat-region detection"
    patch: Annotated[int, Field(ge=8)] = 240
    threshold: PosFloat = 800.0
    max_fraction: Fraction = 0.5


class Quality(Section):                                  # seed Sec. 2.1 "Image Quality Filtering" (Q-Align > 4.0)
    source: Literal["computed", "released"]              # released: the metadata's Q-Align scores (data/released.py)
    weights: Path
    threshold: Annotated[float, Field(ge=1, le=5)]       # Q-Align's 1-5 scale
    standin_keep_fraction: Fraction
    batch_size: PosInt


class Aesthetic(Section):                                # seed Sec. 2.1 (ArtiMuse top 30%), Table 3 (stage 2: top 5%)
    source: Literal["computed", "released"]              # released: the metadata's ArtiMuse scores
    weights: Path
    code_dir: Path                                       # a checkout of the ArtiMuse repository (its scoring code)
    keep_top: Fraction
    batch_size: PosInt
    stage2_top: Fraction

    @model_validator(mode="after")
    def _stage2_within_kept(self):
        if self.weights and not self.code_dir:
            raise ValueError("code_dir must name a checkout of the ArtiMuse repository when weights is set (its "
                             "InternVLChatModel.score is the published interface)")
        if self.stage2_top > self.keep_top:
            raise ValueError(f"stage2_top ({self.stage2_top}) must not exceed keep_top ({self.keep_top}): the stage-2 "
                             "subset is taken from the kept images")
        return self


def _ordered(section: BaseModel, low: str, high: str) -> BaseModel:
    """``section`` when ``section.low <= section.high``, else an error naming both keys."""
    a, b = getattr(section, low), getattr(section, high)
    if a > b:
        raise ValueError(f"{low} ({a}) must not exceed {high} ({b})")
    return section


class Buckets(Section):                                  # seed Sec. 2.2 "bucketed resolution scheme"
    scale: PosFloat = 1.0                                # 1.0 = the 4K table
    aspects: Annotated[list[Aspect], Field(min_length=1)] = list(ASPECTS)

    @model_validator(mode="after")
    def _unique(self):
        if len(set(self.aspects)) != len(self.aspects):
            raise ValueError("aspects must not repeat a ratio")
        return self


class Curate(Section):
    engine: Literal["local", "ray"]
    workers: NonNegInt                                   # 0 = every core
    # Defaults below (the seed's values) are what `ultraflux curate-stats` applies outside a repository.
    gray: Literal["luma", "opencv"] = "opencv"           # opencv: the public tool, bit-exact; luma: JPEG's Y (fast)
    flat: Flat = Field(default_factory=Flat)
    entropy_min: Annotated[float, Field(ge=0, le=8)] = 7.0   # seed Sec. 2.1: 7.0 bits (8-bit gray: <= 8); 0 = off
    quality: Quality
    aesthetic: Aesthetic
    buckets: Buckets = Field(default_factory=Buckets)
    max_upscale: Annotated[float, Field(ge=1)] = 1.5
    max_image_pixels: PosInt = 200_000_000
    cache_dir: Path
    holdout_fraction: Annotated[float, Field(ge=0, lt=1)]
    image_format: Literal["jpeg", "png"]                 # shard encoding: JPEG (image_quality) or lossless PNG
    image_quality: Annotated[int, Field(ge=1, le=100)]
    shard_max_mb: PosInt                                 # a shard rolls over at this size
    min_train_images: NonNegInt                          # guard: stop after curation below these counts
    min_holdout_images: NonNegInt


class Tiny(Section):                                     # embedded CPU profile: a tiny Flux transformer and F16 VAE
    num_layers: PosInt
    num_single_layers: NonNegInt
    attention_head_dim: PosInt
    num_attention_heads: PosInt
    joint_attention_dim: PosInt
    pooled_projection_dim: PosInt
    axes_dims_rope: Annotated[list[Annotated[int, Field(ge=2, multiple_of=2)]], Field(min_length=3, max_length=3)]
    guidance_embeds: bool
    vae_block_out_channels: Annotated[list[PosInt], Field(min_length=2)]
    vae_layers_per_block: PosInt = 1
    vae_tile_size: Annotated[int, Field(ge=32)] = 256
    text_max_length: PosInt

    @model_validator(mode="after")
    def _rope_dims(self):
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                             f"({self.attention_head_dim}), as Flux's [16, 56, 56] sums to 128")
        return self


class Model(Section):
    pretrained: Path                                     # local diffusers FLUX.1 directory; "" = tiny
    vae_pretrained: Path
    tiny: Tiny


class Rope(Section):                                     # seed Sec. 3, Table 3 "Resonance 2D RoPE with YaRN"
    kind: Literal["flux", "yarn", "resonance_yarn"]      # seed Fig. 4 (a) / (b) / (c)
    theta: PosFloat                                      # base b = 10,000
    train_len: PosInt                                    # training window L (paper: 64 tokens)
    ntk_factor: NonNegFloat                              # eta = 1.0
    yarn_alpha: PosFloat                                 # (alpha, beta) = (1.25, 0.75)
    yarn_beta: PosFloat
    max_scale: Annotated[float, Field(ge=1)]             # s_a = 2.0 (resolution scale; a warning, never a clamp)
    snap_all_bands: bool                                 # the literal max(1, round(r_k)) for every band
    snap_in_window: bool                                 # snap also inside the window (Fig. 2 reading; release: no)

    @model_validator(mode="after")
    def _ramp(self):
        if self.yarn_alpha <= self.yarn_beta:
            raise ValueError(f"yarn_alpha ({self.yarn_alpha}) must exceed yarn_beta ({self.yarn_beta}): the ramp "
                             "runs from alpha rotations (NTK) down to beta (linear)")
        return self


class Diagnostics(Section):                              # seed Figs. 1-3
    max_latents: PosInt                                  # Fig. 3 statistics over at most this many images (Sec. 4: 400)


class Loss(Section):                                     # seed Table 3 "DiT objective"
    wavelet: Literal["haar"]                             # Haar
    levels: PosInt                                       # J = 1
    c_min: PosFloat                                      # pseudo-Huber thresholds ~0.2 ...
    c_max: PosFloat                                      # ... ~1.0
    min_snr_gamma: Optional[PosFloat]                    # Min-SNR gamma (5.0); null = no weighting

    @model_validator(mode="after")
    def _order(self):
        return _ordered(self, "c_min", "c_max")


class VaeTrain(Section):                                 # seed Sec. 2.2 "VAE Training", Table 3 "F16 VAE post-training"
    steps: Steps
    resolution: Annotated[int, Field(ge=16, multiple_of=16)]   # 512 (F16: multiple of 16)
    batch_size: PosInt                                   # largest micro-batch per process
    global_batch: PosInt                                 # Table 3: 384 images per step
    lr: LearningRate                                     # 1e-4 (Table 3; the text says 1e-5)
    weight_decay: NonNegFloat                            # 1e-2
    lambda_l2: NonNegFloat                               # (lambda_vae, lambda_perc, lambda_L2) = (0.2, 0.1, 1)
    lambda_perc: NonNegFloat
    lambda_vae: NonNegFloat
    flat_top_fraction: Fraction                          # top 50% by flatness score
    eval_every: PosInt
    lpips_weights: Path
    adversarial: bool
    lambda_adv: NonNegFloat
    adv_start: NonNegInt
    checkpoint_every: PosInt
    keep_checkpoints: PosInt
    eval_images: NonNegInt                               # held-out images for PSNR/SSIM/NMSE during training
    num_workers: NonNegInt                               # DataLoader workers decoding the streamed crops


class LatentCache(Section):                              # frozen-encoder outputs (seed Sec. 2.2: VAE, text frozen)
    dir: Path                                            # one filesystem shared by every process
    dtype: Literal["bf16", "fp16", "fp32"]               # as stored
    encode_batch_size: PosInt
    shard_size: PosInt                                   # samples per safetensors shard
    num_workers: NonNegInt                               # DataLoader workers
    prefetch_factor: PosInt


class Validation(Section):                               # DiT validation: MLPerf text-to-image protocol (not the seed)
    images: NonNegInt                                    # held-out images at 8 fixed sigmas with fixed noise
    prompts: list[Text]                                  # validation samples logged as MLflow images
    sample_steps: PosInt
    sample_size: Annotated[int, Field(ge=32, multiple_of=32)]
    guidance_scale: NonNegFloat


class Ema(Section):   # not in the seed (Sec. 2.2 trains the DiT end-to-end without one): EMA of the trained weights
    decay: Annotated[float, Field(gt=0, lt=1)]           # ema <- decay * ema + (1 - decay) * weights
    every: PosInt                                        # training steps between updates
    start: NonNegInt                                     # first update after this step (copies the weights)
    use_for_validation: bool                             # validation loss and samples with the EMA weights


class Lora(Section):  # not in the seed (Sec. 2.2 updates all DiT blocks end-to-end): PEFT LoRA of the DiT
    rank: PosInt
    alpha: PosFloat                                      # scale alpha / rank
    dropout: Annotated[float, Field(ge=0, lt=1)]
    target_modules: Annotated[list[Text], Field(min_length=1)]   # module-name suffixes, e.g. to_q, to_k, to_v


class DitStage(Section):                                 # seed Sec. 2.2 "DiT Training", Table 3 curriculum
    steps: Steps
    batch_size: PosInt                                   # largest micro-batch per process
    global_batch: PosInt                                 # Sec. 2.2: effective batch 64
    lr: LearningRate                                     # 1e-6
    weight_decay: NonNegFloat
    t_min: TimestepIndex                                 # stage 1: 0-999, stage 2: 0-459
    t_max: TimestepIndex
    subset: Literal["all", "aesthetic_top"]
    shift: PosFloat
    checkpoint_every: PosInt
    keep_checkpoints: PosInt
    max_grad_norm: Optional[NonNegFloat]
    gradient_checkpointing: Literal["auto", True, False]   # auto = on when CUDA is present
    val_every: PosInt                                    # steps between validation losses
    ema: Optional[Ema]                                   # null = no EMA (the seed's setting)
    lora: Optional[Lora]                                 # null = full fine-tune (the seed's setting)

    @model_validator(mode="after")
    def _range(self):
        return _ordered(self, "t_min", "t_max")


class Sample(Section):
    prompts: Annotated[list[Text], Field(min_length=1)]
    aspects: Annotated[list[Aspect], Field(min_length=1)]   # seed Table 5 ratios
    num_inference_steps: PosInt                          # seed Sec. 10: 50-60
    guidance_scale: NonNegFloat
    refine_prompts: bool                                 # seed Sec. 12
    vae_tiling: Literal["auto", "on", "off"]             # tiled VAE decode (auto: above vae_tiling_min_pixels)
    vae_tiling_min_pixels: NonNegInt
    vae_tile_size: Annotated[int, Field(ge=32, multiple_of=32)]
    vae_decode: Literal["auto", "plain", "partitioned"]  # partitioned = the public release's decode
    offload: Literal["none", "model", "sequential"]      # diffusers' CPU offload (GPU only)
    dtype: Literal["auto", "float32", "bfloat16"]
    rope_from: Literal["weights", "params"]              # RoPE of trained weights (ultraflux.json) or rope.* as written
    max_pixels: PosInt                                   # bound on a generated image's w x h (4096^2: seed Table 5)
    weights: Literal["raw", "ema"]                       # trained or EMA weights (ema needs dit_stage*.ema)
    memory: Literal["none", "fp8", "group", "group_fp8"]  # transformer low-VRAM mode (pipelines/memory.py)

    @model_validator(mode="after")
    def _one_offload(self):
        if self.memory.startswith("group") and self.offload != "none":
            raise ValueError(f"memory {self.memory!r} offloads the transformer itself: set offload to none "
                             f"(got {self.offload!r})")
        return self


class Evaluate(Section):
    max_images: PosInt                                   # bound on the held-out / reference images read
    fid_inception_weights: Path
    lpips_weights: Path
    hpsv3_weights: Path
    artimuse_weights: Path
    artimuse_code_dir: Path                              # the src/ folder of an ArtiMuse checkout (its scoring code)
    qalign_weights: Path

    @model_validator(mode="after")
    def _artimuse_needs_its_code(self):
        if self.artimuse_weights and not self.artimuse_code_dir:
            raise ValueError("evaluate.artimuse_code_dir must name the src/ folder of an ArtiMuse checkout when "
                             "evaluate.artimuse_weights is set (its InternVLChatModel.score is the published interface)")
        return self


class Backoff(Section):
    max_retries: NonNegInt
    backoff_base_s: NonNegFloat = 1.0
    backoff_max_s: NonNegFloat = 30.0
    backoff_jitter: Annotated[float, Field(ge=0, le=1)] = 0.5
    timeout_s: PosFloat = 120.0

    @model_validator(mode="after")
    def _backoff(self):
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError(f"backoff_max_s ({self.backoff_max_s}) must be >= backoff_base_s ({self.backoff_base_s})")
        return self


class Judge(Backoff):                                    # seed Sec. 11: Gemini-2.5-Flash, reasoning mode, Prompt 11.1
    # Every key has a default: `ultraflux judge` runs outside a repository, or on a file holding only this section.
    model: Text = "gemini-2.5-flash"
    base_url: str = ""                                   # "" = the official endpoint
    api_version: str = "v1beta"
    thinking: bool = True                                # "reasoning mode"
    thinking_budget: Annotated[int, Field(ge=-1)] = -1   # -1 = the model decides
    temperature: Optional[Annotated[float, Field(ge=0, le=2)]] = None
    concurrency: PosInt = 4
    max_retries: NonNegInt = 4
    include_generation_prompt: bool = True
    inline_limit_mb: Annotated[float, Field(gt=0, le=20)] = 19.0   # Gemini's inline request limit is 20 MB


class Refiner(Backoff):                                  # seed Sec. 12: GPT-4o, Prompt 12.1
    model: Text
    base_url: str
    language: Literal["English", "Chinese"]              # Prompt 12.1: "[language] (Chinese/English)"
    batch_size: PosInt
    min_words: PosInt                                    # 55-100 words
    max_words: PosInt
    temperature: Optional[Annotated[float, Field(ge=0, le=2)]] = None
    include_output_format: bool = True

    @model_validator(mode="after")
    def _words(self):
        return _ordered(self, "min_words", "max_words")


class Launch(Section):                                   # how stages start (ultraflux/launch.py); not science
    processes: PosInt                                    # per machine; Sec. 2.2: 8 GPUs
    config: Text                                         # accelerate config of the DiT stages (ZeRO-2 | DDP)
    data_parallel_config: Text                           # accelerate config of vae, sample, evaluate
    prefix: str                                          # cluster launcher, run once per machine
    num_machines: PosInt
    machine_rank_env: Annotated[str, Field(pattern=r"^([A-Za-z_][A-Za-z0-9_]*)?$")]   # an environment variable name
    main_process_ip: str
    main_process_port: Annotated[int, Field(ge=0, le=65535)]
    rdzv_backend: Literal["static", "c10d"]

    @model_validator(mode="after")
    def _multi_machine(self):
        if self.num_machines > 1 and not self.main_process_ip.strip():
            raise ValueError(f"main_process_ip must name the rendezvous host when num_machines is {self.num_machines}")
        if self.num_machines > 1 and self.rdzv_backend == "static" and not self.machine_rank_env:
            raise ValueError("machine_rank_env must name the variable holding each machine's rank (e.g. SLURM_NODEID) "
                             "when num_machines > 1 with rdzv_backend static")
        return self


class Params(Section):
    seed: NonNegInt
    tracking: Tracking
    launch: Launch
    data: Data
    download: Download
    curate: Curate
    model: Model
    rope: Rope
    diagnostics: Diagnostics
    objective: Literal["l2", "ultraflux"]                # seed Table 1: "Flux, latent L2" | UltraFlux
    loss: Loss
    vae_train: VaeTrain
    latent_cache: LatentCache
    validation: Validation
    dit_stage1: DitStage
    dit_stage2: DitStage
    sample: Sample
    evaluate: Evaluate
    judge: Judge
    refiner: Refiner


def known_keys(model: type[BaseModel] = Params, prefix: str = "") -> list[str]:
    """Every dotted key the schema accepts (for did-you-mean and the docs)."""
    out = []
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out += known_keys(sub, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out

