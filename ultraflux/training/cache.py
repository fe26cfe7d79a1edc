"""Latent cache for DiT training: frozen-encoder outputs, built by every rank in batches, read back as a stream.

The VAE encoder and both text encoders are frozen during DiT training (seed Sec. 2.2), so each image's latent and each
caption's embeddings are computed once and a training step runs only the transformer.

Keys. A sample's key hashes its image *content*, its caption and the encoder ``version`` (fingerprints of the encoder
weights, the text length, the compute precision and the stored dtype): stage 2 (a subset of stage 1's images) and any
later run find their samples already there; a new VAE, another caption or another dtype gives new keys. Curated images
live in tar shards (``ultraflux.data.shards``); a row's content is the sha256 of its shard file with the member's
offset and length (a loose file of the older layout: the file's sha256). File hashes are memoised under
``<cache_dir>/content`` by path, size and mtime (as DVC's state does), so a run does not re-read the dataset to look up
its keys; the first run splits the hashing over the ranks.

Layout: ``<cache_dir>/<version>/<digest>.safetensors``, each file a shard of up to ``latent_cache.shard_size`` samples
with tensors ``<key>.latents`` [16, h, w], ``<key>.prompt_embeds`` [L, D] and ``<key>.pooled`` [D] in
``latent_cache.dtype`` (bf16 by default: half of fp32's bytes; the DiT trains in bf16 on GPUs anyway), and metadata
naming the rank that wrote it. Images that cannot be read are skipped, with their reason in ``failed/<key>.json``.

Build (:func:`build_cache`, every process): the rows whose key is in no shard are sorted by (bucket, key) and dealt
round-robin to the processes; each process decodes its share through a DataLoader (workers), encodes it on its own
device (GPU when present) in batches of one bucket, and writes its own shards. After a barrier every process reads the
same index. ``latent_cache.dir`` must therefore be shared by all processes (one machine, or a shared filesystem).

Read (:class:`LatentDataset`): a map-style dataset over the index that keeps per sample only its key and shard number
and opens at most ``MAX_OPEN_SHARDS`` shard files at a time with safetensors' lazy ``safe_open``: host memory does not
grow with the dataset. Training wraps it in a ``torch.utils.data.DataLoader`` with the bucket sampler as batch_sampler.
"""
from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ultraflux.io import atomic_path, sha256_file, sha256_json, write_json
from ultraflux.models.vae import encode_latents

FIELDS = ("latents", "prompt_embeds", "pooled")
STORE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MAX_OPEN_SHARDS = 4          # shard files a reader keeps open (memory-mapped) at once
FORMAT = "ultraflux-latents/2"


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over parameter names, shapes and bytes: the 'model version' part of a cache key."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------- frozen encoders
@dataclass
class Encoders:
    """The frozen VAE and text encoders on this process's device, and the ``version`` they give cache keys."""

    vae: torch.nn.Module
    text_pipe: object                # UltraFluxPipeline without transformer: its ``encode_prompt`` runs both encoders
    max_len: int
    device: torch.device
    store_dtype: torch.dtype
    version: str

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds [B, L, D], pooled [B, D]) on the CPU, in the stored dtype."""
        pe, pooled, _ = self.text_pipe.encode_prompt(list(captions), prompt_2=None, max_sequence_length=self.max_len)
        return pe.to("cpu", self.store_dtype), pooled.to("cpu", self.store_dtype)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents of uint8 RGB images [B, 3, H, W] (0..255, scaled to [-1, 1] as ``shards.load_image_tensor``)."""
        x = pixels.to(self.device).float() / 127.5 - 1.0
        return encode_latents(self.vae, x.to(next(self.vae.parameters()).dtype)).to("cpu", self.store_dtype)


def load_encoders(params: dict, vae_dir: str | Path, device: torch.device, store: str = "bf16") -> Encoders:
    """Build the VAE (from ``vae_dir``) and the text encoders of ``params['model']`` on ``device``.

    On a GPU the text encoders run in bf16 (T5-XXL in fp32 alone is ~19 GB) and the VAE in fp32 (Flux's VAE config
    asks for ``force_upcast``); on the CPU everything runs in fp32. The precision is part of the version.
    """
    from ultraflux.models.text import build_text_encoders
    from ultraflux.models.vae import build_vae
    from ultraflux.pipelines.pipeline_ultraflux import UltraFluxPipeline, static_shift_scheduler

    if store not in STORE_DTYPES:
        raise ValueError(f"latent_cache.dtype must be one of {', '.join(STORE_DTYPES)}, got {store!r}")
    tok, te, tok2, te2 = build_text_encoders(params["model"], seed=params["seed"])
    vae = build_vae({**params["model"], "vae_pretrained": str(vae_dir)}).requires_grad_(False).eval()
    max_len = params["model"]["tiny"]["text_max_length"] if not params["model"]["pretrained"] else 512
    text_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    version = sha256_json({"format": FORMAT, "vae": module_fingerprint(vae.encoder),
                           "scale": [vae.config.scaling_factor, vae.config.shift_factor],
                           "clip": module_fingerprint(te), "t5": module_fingerprint(te2), "max_len": max_len,
                           "text_dtype": str(text_dtype), "device": device.type, "store": store})[:16]
    vae.to(device)
    te.to(device, text_dtype)
    te2.to(device, text_dtype)
    pipe = UltraFluxPipeline(static_shift_scheduler(), vae, te, tok, te2, tok2, None)
    return Encoders(vae, pipe, max_len, device, STORE_DTYPES[store], version)


# --------------------------------------------------------------------------------------------- keys
def _text(value) -> str:
    return value if isinstance(value, str) else ""


def file_digest(path: Path, memo_dir: Path) -> str:
    """sha256 of ``path``, memoised by (resolved path, size, mtime): unchanged files are not read again."""
    st = path.stat()
    memo = memo_dir / f"{sha256_json([str(path.resolve()), st.st_size, st.st_mtime_ns])[:32]}.sha256"
    if memo.is_file():
        return memo.read_text()
    digest = sha256_file(path)
    with atomic_path(memo) as tmp:
        tmp.write_text(digest)
    return digest


def _column(rows: pd.DataFrame, name: str, default=None) -> list:
    return rows[name].tolist() if name in rows.columns else [default] * len(rows)


def sample_keys(rows: pd.DataFrame, curated_dir: Path, version: str, memo_dir: Path, rank: int = 0, world: int = 1,
                barrier=lambda: None) -> list[str]:
    """One key per row: sha256(content | caption | version). The file hashing is split over the processes.

    A row's content is (sha256 of its tar shard, member offset, length), or the sha256 of its loose file (older
    layout, ``image`` column). Column-wise: no per-row dict of the manifest is built.
    """
    shards, images = _column(rows, "shard"), _column(rows, "image")
    files = []
    for shard, image, row_id in zip(shards, images, _column(rows, "id")):
        name = shard if _text(shard) else image if _text(image) else None
        if name is None:
            raise ValueError(f"manifest row {row_id!r} names no image (neither 'shard' nor 'image')")
        files.append(name)
    unique = sorted(set(files))
    for name in unique[rank::world]:
        file_digest(curated_dir / name, memo_dir)
    barrier()
    digests = {name: file_digest(curated_dir / name, memo_dir) for name in unique}
    return [hashlib.sha256(f"{digests[f]}:{off if _text(sh) else 0}:{n if _text(sh) else -1}|{_text(caption)}|"
                           f"{version}".encode()).hexdigest()[:32]
            for f, sh, off, n, caption in zip(files, shards, _column(rows, "offset", 0), _column(rows, "nbytes", -1),
                                               _column(rows, "caption", ""))]


# --------------------------------------------------------------------------------------------- shards
def scan(root: Path) -> dict[str, str]:
    """{key: shard file name} of every complete shard under ``root`` (headers only; the first shard wins)."""
    from safetensors import safe_open

    index: dict[str, str] = {}
    for path in sorted(root.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                key, _, part = name.partition(".")
                if part == "latents":
                    index.setdefault(key, path.name)
    return index


class LatentShardWriter:
    """Collects encoded samples and writes them as one safetensors shard per ``shard_size`` samples (atomically)."""

    def __init__(self, root: Path, shard_size: int, rank: int, world: int):
        self.root, self.shard_size, self.meta = root, int(shard_size), {"format": FORMAT, "rank": str(rank),
                                                                         "world": str(world)}
        self.tensors: dict[str, torch.Tensor] = {}
        self.keys: list[str] = []
        self.written: list[Path] = []

    def add(self, key: str, latents: torch.Tensor, prompt_embeds: torch.Tensor, pooled: torch.Tensor) -> None:
        for name, t in zip(FIELDS, (latents, prompt_embeds, pooled)):
            self.tensors[f"{key}.{name}"] = t.contiguous().clone()
        self.keys.append(key)
        if len(self.keys) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.keys:
            return
        from safetensors.torch import save_file

        path = self.root / f"{hashlib.sha256('|'.join(sorted(self.keys)).encode()).hexdigest()[:24]}.safetensors"
        with atomic_path(path) as tmp:
            save_file(self.tensors, str(tmp), metadata=self.meta)
        self.written.append(path)
        self.tensors, self.keys = {}, []


class _ImageRows(Dataset):
    """Curated images of ``rows`` as uint8 [3, H, W] tensors (a quarter of float32's bytes between processes; the
    encoder's device scales them); an unreadable image yields its error instead."""

    def __init__(self, rows: list[dict], curated_dir: Path):
        self.rows, self.curated_dir = rows, curated_dir

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        from ultraflux.data.shards import load_image_array

        try:
            return i, torch.from_numpy(load_image_array(self.curated_dir, self.rows[i]).copy()).permute(2, 0, 1), ""
        except Exception as e:  # one corrupt image never kills the run: it is skipped with its reason
            return i, None, f"{type(e).__name__}: {e}"


def _encode_share(share: list[dict], curated_dir: Path, enc: Encoders, writer: LatentShardWriter, failed_dir: Path,
                  batch_size: int, num_workers: int, progress: bool) -> tuple[int, int]:
    """Encode this process's rows (each with ``_key``, sorted by bucket) in batches of one bucket.

    Returns (encoded, failed)."""
    batches = []
    for _, group in itertools.groupby(range(len(share)), key=lambda i: share[i]["bucket"]):
        positions = list(group)
        batches += [positions[i:i + batch_size] for i in range(0, len(positions), batch_size)]
    loader = DataLoader(_ImageRows(share, curated_dir), batch_sampler=batches, num_workers=num_workers,
                        collate_fn=list)
    encoded = failed = 0
    bar = tqdm(total=len(share), desc="latent cache", disable=not progress)
    for items in loader:
        good = [(i, x) for i, x, err in items if x is not None]
        for i, _, err in items:
            if err:
                failed += 1
                write_json(failed_dir / f"{share[i]['_key']}.json", {"id": share[i].get("id"), "reason": err})
        by_shape: dict[tuple, list] = {}
        for i, x in good:   # a bucket's images share one size; grouping by shape keeps a bad row from breaking a batch
            by_shape.setdefault(tuple(x.shape), []).append((i, x))
        for group in by_shape.values():
            latents = enc.encode_images(torch.stack([x for _, x in group]))
            pe, pooled = enc.encode_prompts([_text(share[i].get("caption")) for i, _ in group])
            for j, (i, _) in enumerate(group):
                writer.add(share[i]["_key"], latents[j], pe[j], pooled[j])
            encoded += len(group)
        bar.update(len(items))
    writer.flush()
    bar.close()
    return encoded, failed


@dataclass
class LatentCache:
    """The cache as seen by one run: each input row's key, the shard index, and what this process did."""

    root: Path
    keys: list[str]
    index: dict[str, str]
    failures: dict[str, str] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)

    def has(self, key: str) -> bool:
        return key in self.index

    def dataset(self, keys: list[str]) -> "LatentDataset":
        names = sorted({self.index[k] for k in keys})
        number = {n: i for i, n in enumerate(names)}
        return LatentDataset([str(self.root / n) for n in names],
                             np.array([number[self.index[k]] for k in keys], dtype=np.int32),
                             np.array(keys, dtype="S32"))


def build_cache(rows: pd.DataFrame, curated_dir: Path, enc: Encoders, cache_dir: Path, batch_size: int = 4,
                shard_size: int = 64, num_workers: int = 0, progress: bool = True) -> LatentCache:
    """Make sure every row (``caption``, ``bucket``, and ``shard``/``offset``/``nbytes`` or ``image``) is cached.

    Collective when launched with several processes (accelerate's ``PartialState``): every process must call it with
    the same rows; each encodes its share of the missing ones; all return the same index.
    """
    from accelerate import PartialState

    state = PartialState()
    rank, world = state.process_index, state.num_processes
    curated_dir, cache_dir = Path(curated_dir), Path(cache_dir)
    root = cache_dir / enc.version
    root.mkdir(parents=True, exist_ok=True)
    keys = sample_keys(rows, curated_dir, enc.version, cache_dir / "content", rank, world, state.wait_for_everyone)
    index = scan(root)
    frame = rows.assign(_key=keys)
    missing = (frame[~frame["_key"].isin(list(index))].drop_duplicates("_key")
               .sort_values(["bucket", "_key"], kind="stable"))
    columns = [c for c in ("id", "caption", "bucket", "shard", "offset", "nbytes", "image", "_key") if c in frame]
    share = missing.iloc[rank::world][columns].to_dict("records")     # only this process's rows become dicts
    state.wait_for_everyone()   # every process has its snapshot of the index before any writes a shard
    writer = LatentShardWriter(root, shard_size, rank, world)
    encoded, failed = _encode_share(share, curated_dir, enc, writer, root / "failed", batch_size, num_workers,
                                    progress and state.is_main_process) if share else (0, 0)
    state.wait_for_everyone()
    index = scan(root)
    failures, lost = {}, []
    for key in missing["_key"]:
        if key in index:
            continue
        note = root / "failed" / f"{key}.json"
        if note.is_file():
            failures[key] = note.read_text()
        else:
            lost.append(key)
    if lost:
        raise RuntimeError(f"latent cache {root}: {len(lost)} samples encoded by other processes are not visible to "
                           f"process {rank}; latent_cache.dir must be on a filesystem shared by all processes")
    stats = {"cache_encoded": encoded, "cache_failed": failed, "cache_reused": frame["_key"].nunique() - len(missing),
             "cache_shards_written": len(writer.written)}
    return LatentCache(root, keys, index, failures, stats)


# --------------------------------------------------------------------------------------------- reading
class LatentDataset(Dataset):
    """Cached samples in a fixed order: item i = {latents, prompt_embeds, pooled, index} read lazily from its shard.

    Holds two compact arrays (int32 shard number and 32-byte key per sample: ~36 bytes a sample, shared with forked
    DataLoader workers without copies) and at most ``MAX_OPEN_SHARDS`` open shard files per
    process (DataLoader workers open their own; handles are never pickled).
    """

    def __init__(self, shard_paths: list[str], shard_of: np.ndarray, keys: np.ndarray):
        self.shard_paths, self.shard_of, self.keys = list(shard_paths), shard_of, keys
        self._open: OrderedDict[int, object] = OrderedDict()

    def __len__(self) -> int:
        return len(self.keys)

    def key(self, i: int) -> str:
        return self.keys[i].decode()

    def _handle(self, shard: int):
        from safetensors import safe_open

        if shard in self._open:
            self._open.move_to_end(shard)
        else:
            self._open[shard] = safe_open(self.shard_paths[shard], framework="pt")
            while len(self._open) > MAX_OPEN_SHARDS:
                self._open.popitem(last=False)
        return self._open[shard]

    def __getitem__(self, i: int) -> dict:
        f, key = self._handle(int(self.shard_of[i])), self.key(i)
        return {**{name: f.get_tensor(f"{key}.{name}") for name in FIELDS}, "index": int(i)}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": OrderedDict()}
