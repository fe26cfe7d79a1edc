"""Gemini pairwise preference judge (seed Sec. 11, Prompt 11.1).

Gemini-2.5-Flash "in reasoning mode" judges image pairs on aesthetic appeal and alignment with the prompt. Each
request sends, in this order: Image A (inline bytes), Image B (inline bytes), Prompt 11.1 verbatim, and a short
context line with the generation prompt (our addition: the seed says the judge assesses "alignment with the given
prompt" but Prompt 11.1 itself does not carry the prompt). The JSON contract of Prompt 11.1 is enforced by a
response schema (``response_mime_type=application/json`` + ``response_schema``) and validated again on receipt.

Position bias: every pair is judged in both orders (AB: image_a shown as "Image A"; BA: swapped). A pair's verdict
is a win only when both orders prefer the same underlying image; any disagreement (or a "tie" in either order) is
a tie. Pairs whose two orders did not both yield a valid answer are ``invalid`` (status ``invalid`` = malformed /
off-schema after retries, ``error`` = transport / API failure) and are excluded from the rates.

Rates: ``win_rate_a = wins_a / (wins_a + wins_b + ties)`` over valid pairs, with a Wilson 95 % score interval
(``win_rate_a_ci95``); likewise ``win_rate_b`` / ``tie_rate``. ``pref_rate_a = wins_a / (wins_a + wins_b)`` (ties
dropped) is reported too, with its own Wilson interval.

Cache: each validated answer is stored on disk under a key made of (sha256 of the bytes shown as Image A, sha256 of
the bytes shown as Image B, sha256 of the full prompt text sent, model, order, generation settings that change the
answer: thinking / thinking_budget / temperature / api_version / image encoding). Failures are never cached.

Key: ``GEMINI_API_KEY`` (or ``GOOGLE_API_KEY``); it is handed to the SDK only, never logged, printed or written.
Without a key :func:`judge_pairs` returns ``status: "skipped (no GEMINI_API_KEY)"`` and makes no request.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ._llm import (
    DiskCache,
    InvalidAnswer,
    Outcome,
    RetryPolicy,
    atomic_write_text,
    call_with_retries,
    default_cache_root,
    env_key,
    redact,
    sha256_bytes,
    sha256_text,
)

log = logging.getLogger(__name__)

# Seed Sec. 11, Prompt 11.1 -- verbatim (the markdown emphasis is part of the seed's text).
JUDGE_PROMPT = (
    "You are an impartial image aesthetics judge. Compare Image A and Image B, and decide which one better fits "
    "human aesthetic preferences overall.\n"
    "\n"
    "Evaluate:\n"
    "\n"
    "- Composition\n"
    "- Sharpness / clarity\n"
    "- Lighting / contrast\n"
    "- Color harmony\n"
    "- Noise / compression artifacts\n"
    "- Overall visual appeal\n"
    "\n"
    'Be decisive; only return "tie" if the two images are nearly identical in quality.\n'
    "\n"
    "**Return strictly in the following JSON format (no explanations, no extra text):**\n"
    "\n"
    "```\n"
    "{\n"
    '  "preferred": "A | B | tie",\n'
    '  "a_score": 0-100,\n'
    '  "b_score": 0-100,\n'
    '  "reasons": "short explanation"\n'
    "}\n"
    "```"
)

# Our addition (not seed text): gives the judge the generation prompt for the "alignment with the given prompt" part.
GENERATION_PROMPT_CONTEXT = "Both images were generated from this text prompt: {prompt}"

# The JSON contract of Prompt 11.1 as a Gemini (OpenAPI-subset) response schema.
RESPONSE_SCHEMA: dict[str, Any] = {
    "type": "OBJECT",
    "properties": {
        "preferred": {"type": "STRING", "enum": ["A", "B", "tie"]},
        "a_score": {"type": "INTEGER", "minimum": 0, "maximum": 100},
        "b_score": {"type": "INTEGER", "minimum": 0, "maximum": 100},
        "reasons": {"type": "STRING"},
    },
    "required": ["preferred", "a_score", "b_score", "reasons"],
    "propertyOrdering": ["preferred", "a_score", "b_score", "reasons"],
}

SKIPPED_NO_KEY = "skipped (no GEMINI_API_KEY)"
ORDERS = ("AB", "BA")  # AB: image_a shown as "Image A"; BA: image_b shown as "Image A"

DEFAULTS: dict[str, Any] = {
    "model": "gemini-2.5-flash",
    "base_url": "",
    "api_version": "v1beta",
    "thinking": True,
    "thinking_budget": -1,  # -1 = dynamic thinking (the model decides); ignored when thinking is false (budget 0)
    "temperature": None,  # None = the service default
    "max_retries": 4,
    "backoff_base_s": 1.0,
    "backoff_max_s": 30.0,
    "backoff_jitter": 0.5,
    "timeout_s": 120.0,
    "concurrency": 4,
    "include_generation_prompt": True,
    "inline_limit_mb": 19.0,  # Gemini inline request limit is 20 MB; above this both images are re-encoded JPEG q95
}


# ---------------------------------------------------------------------------------------------------------- helpers
def _cfg(cfg: dict | None) -> dict:
    out = dict(DEFAULTS)
    for k, v in (cfg or {}).items():
        if v is not None or k in ("temperature",):
            out[k] = v
    return out


def wilson_ci(k: int, n: int, z: float = 1.959963984540054) -> list[float] | None:
    """Wilson score interval for a binomial proportion ``k/n`` (None when ``n == 0``)."""
    if n <= 0:
        return None
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]


def _sniff_mime(data: bytes) -> str | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _to_png(data: bytes) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()


def _to_jpeg(data: bytes, quality: int = 95) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=quality)
        return buf.getvalue()


def load_pair_images(path_a: str | os.PathLike, path_b: str | os.PathLike, inline_limit_mb: float) -> tuple[tuple[bytes, str], tuple[bytes, str], str]:
    """Bytes + MIME type of both images, and the encoding used (``original`` / ``png`` / ``jpeg95``)."""
    raw = [Path(path_a).read_bytes(), Path(path_b).read_bytes()]
    encoding = "original"
    imgs = []
    for data in raw:
        mime = _sniff_mime(data)
        if mime is None:  # e.g. TIFF / BMP: convert losslessly
            data, mime, encoding = _to_png(data), "image/png", "png"
        imgs.append((data, mime))
    if inline_limit_mb and sum(len(d) for d, _ in imgs) > inline_limit_mb * 1024 * 1024:
        # both re-encoded the same way so neither side is favoured by the compression
        imgs = [(_to_jpeg(d), "image/jpeg") for d, _ in imgs]
        encoding = "jpeg95"
    return imgs[0], imgs[1], encoding


def validate_answer(text: Any) -> dict:
    """Parse + validate one judge answer against Prompt 11.1's JSON contract; raise :class:`InvalidAnswer`."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidAnswer("empty answer (no text in the response)")
    s = text.strip()
    if s.startswith("```"):  # tolerate a fenced block; anything else around the JSON is malformed
        s = s.strip("`").strip()
        if s.lower().startswith("json"):
            s = s[4:].strip()
    try:
        obj = json.loads(s)
    except ValueError as e:
        raise InvalidAnswer(f"answer is not valid JSON ({e}): {text[:200]!r}") from None
    if not isinstance(obj, dict):
        raise InvalidAnswer(f"answer is not a JSON object: {text[:200]!r}")
    expected = {"preferred", "a_score", "b_score", "reasons"}
    missing, extra = expected - obj.keys(), obj.keys() - expected
    if missing or extra:
        raise InvalidAnswer(f"off-schema answer (missing {sorted(missing)}, unexpected {sorted(extra)})")
    pref = obj["preferred"]
    if not isinstance(pref, str) or pref.strip().lower() not in ("a", "b", "tie"):
        raise InvalidAnswer(f"off-schema 'preferred': {pref!r}")
    pref = {"a": "A", "b": "B", "tie": "tie"}[pref.strip().lower()]
    scores = {}
    for k in ("a_score", "b_score"):
        v = obj[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v) or not 0 <= v <= 100:
            raise InvalidAnswer(f"off-schema {k!r}: {v!r} (integer 0-100 expected)")
        scores[k] = int(v)
    if not isinstance(obj["reasons"], str):
        raise InvalidAnswer("off-schema 'reasons' (string expected)")
    return {"preferred": pref, "a_score": scores["a_score"], "b_score": scores["b_score"], "reasons": obj["reasons"]}


def preferred_image(answer: dict, order: str) -> str:
    """Which of the pair's images an answer prefers: ``A`` (image_a), ``B`` (image_b) or ``tie``.

    In order AB the pair's image_a is shown as "Image A"; in order BA the images are swapped.
    """
    p = answer["preferred"]
    if p == "tie" or order == "AB":
        return p
    return {"A": "B", "B": "A"}[p]


def combine_orders(ab: dict | None, ba: dict | None) -> str | None:
    """Final verdict from the two validated answers: ``A`` / ``B`` (the pair's image_a / image_b) or ``tie``.

    A win counts only when both orders prefer the same underlying image; otherwise (disagreement, or a tie in
    either order) the pair is a tie. None when either answer is missing.
    """
    if ab is None or ba is None:
        return None
    first, second = preferred_image(ab, "AB"), preferred_image(ba, "BA")
    return first if first == second else "tie"


# -------------------------------------------------------------------------------------------------------- the judge
class GeminiJudge:
    def __init__(self, cfg: dict, api_key: str, cache_dir: str | os.PathLike | None):
        from google import genai
        from google.genai import types

        self.cfg = _cfg(cfg)
        self._types = types
        self._secrets = [api_key]
        http = {"timeout": int(float(self.cfg["timeout_s"]) * 1000)}  # milliseconds
        if self.cfg.get("base_url"):
            http["base_url"] = str(self.cfg["base_url"])
        if self.cfg.get("api_version"):
            http["api_version"] = str(self.cfg["api_version"])
        # No retry_options: the SDK then never retries; our loop owns the (single, bounded) retry budget.
        self.client = genai.Client(api_key=api_key, vertexai=False, http_options=types.HttpOptions(**http))
        self.cache = DiskCache(cache_dir)
        self.policy = RetryPolicy.from_cfg(self.cfg, default_retries=4)
        thinking = bool(self.cfg["thinking"])
        self.thinking_budget = int(self.cfg["thinking_budget"]) if thinking else 0
        gen: dict[str, Any] = {
            "response_mime_type": "application/json",
            "response_schema": RESPONSE_SCHEMA,
            "thinking_config": types.ThinkingConfig(thinking_budget=self.thinking_budget),
            "automatic_function_calling": types.AutomaticFunctionCallingConfig(disable=True),  # no tools here
        }
        if self.cfg.get("temperature") is not None:
            gen["temperature"] = float(self.cfg["temperature"])
        self.gen_config = types.GenerateContentConfig(**gen)
        self.fatal = threading.Event()
        self.n_requests = 0
        self._lock = threading.Lock()

    def prompt_text(self, generation_prompt: str) -> list[str]:
        texts = [JUDGE_PROMPT]
        if self.cfg["include_generation_prompt"] and generation_prompt:
            texts.append(GENERATION_PROMPT_CONTEXT.format(prompt=generation_prompt))
        return texts

    def cache_key(self, img1: bytes, img2: bytes, texts: list[str], order: str, encoding: str) -> dict:
        return {
            "v": 1,
            "tool": "gemini-judge",
            "image_A_sha256": sha256_bytes(img1),
            "image_B_sha256": sha256_bytes(img2),
            "prompt_sha256": sha256_text("\n\n".join(texts)),
            "model": str(self.cfg["model"]),
            "order": order,
            "thinking_budget": self.thinking_budget,
            "temperature": self.cfg.get("temperature"),
            "api_version": self.cfg.get("api_version"),
            "encoding": encoding,
        }

    def judge_once(self, img1: tuple[bytes, str], img2: tuple[bytes, str], texts: list[str], order: str,
                   encoding: str, what: str) -> tuple[Outcome, bool]:
        """One order of one pair (``img1`` shown as Image A). Returns (outcome, cache_hit)."""
        key = self.cache_key(img1[0], img2[0], texts, order, encoding)
        hit = self.cache.get(key)
        if hit is not None:
            try:
                return Outcome("ok", validate_answer(json.dumps(hit)), 0, []), True
            except InvalidAnswer:
                pass  # corrupt entry: ask again
        types = self._types
        contents = [
            types.Part.from_bytes(data=img1[0], mime_type=img1[1]),
            types.Part.from_bytes(data=img2[0], mime_type=img2[1]),
            *[types.Part.from_text(text=t) for t in texts],
        ]

        def call():
            with self._lock:
                self.n_requests += 1
            resp = self.client.models.generate_content(model=str(self.cfg["model"]), contents=contents, config=self.gen_config)
            try:
                text = resp.text
            except Exception as e:  # noqa: BLE001 - e.g. no candidates
                raise InvalidAnswer(f"unreadable response: {e}") from None
            if text is None:
                fb = getattr(resp, "prompt_feedback", None)
                reason = getattr(fb, "block_reason", None) if fb is not None else None
                raise InvalidAnswer(f"no answer text (block_reason={reason})")
            if any(sec and sec in text for sec in self._secrets):  # never store an echoed key
                raise InvalidAnswer("answer echoes the API key; discarded")
            return text

        out = call_with_retries(call, validate_answer, self.policy, self._secrets, what=what,
                                should_stop=self.fatal.is_set)
        if out.status == "ok":
            self.cache.put(key, out.value)
        elif out.fatal:
            self.fatal.set()
        return out, False

    def judge_pair(self, pair: dict) -> dict:
        pid = str(pair.get("id"))
        rec: dict[str, Any] = {
            "id": pid, "prompt": pair.get("prompt", ""), "image_a": str(pair.get("image_a")),
            "image_b": str(pair.get("image_b")), "model": str(self.cfg["model"]),
        }
        try:
            a, b, encoding = load_pair_images(pair["image_a"], pair["image_b"], float(self.cfg["inline_limit_mb"] or 0))
        except Exception as e:  # noqa: BLE001 - recorded
            rec.update(status="error", verdict=None, error=redact(f"cannot read images: {type(e).__name__}: {e}", self._secrets), orders={})
            return rec
        rec.update(image_a_sha256=sha256_bytes(a[0]), image_b_sha256=sha256_bytes(b[0]), encoding=encoding)
        texts = self.prompt_text(str(pair.get("prompt") or ""))
        orders: dict[str, dict] = {}
        answers: dict[str, dict | None] = {}
        for order in ORDERS:
            first, second = (a, b) if order == "AB" else (b, a)
            out, hit = self.judge_once(first, second, texts, order, encoding, what=f"judge pair {pid} order {order}")
            answers[order] = out.value if out.status == "ok" else None
            o = out.as_record()
            o.update(cached=hit, answer=out.value)
            o["preferred_image"] = preferred_image(out.value, order) if out.value is not None else None
            orders[order] = o
        rec["orders"] = orders
        verdict = combine_orders(answers["AB"], answers["BA"])
        if verdict is None:
            statuses = [orders[o]["status"] for o in ORDERS]
            rec["status"] = "error" if "error" in statuses else "invalid"
            rec["error"] = "; ".join(f"{o}: {orders[o]['errors'][-1]['error']}" for o in ORDERS if orders[o]["errors"] and orders[o]["status"] != "ok")
        else:
            rec["status"] = "ok"
            rec["error"] = None
            ab, ba = answers["AB"], answers["BA"]
            rec["score_a_mean"] = (ab["a_score"] + ba["b_score"]) / 2.0
            rec["score_b_mean"] = (ab["b_score"] + ba["a_score"]) / 2.0
            rec["orders_agree"] = preferred_image(ab, "AB") == preferred_image(ba, "BA")
        rec["verdict"] = verdict
        return rec


# ----------------------------------------------------------------------------------------------------- aggregation
def summarize(records: list[dict], model: str, status: str = "ok", n_requests: int | None = None) -> dict:
    ok = [r for r in records if r.get("status") == "ok"]
    wins_a = sum(r["verdict"] == "A" for r in ok)
    wins_b = sum(r["verdict"] == "B" for r in ok)
    ties = sum(r["verdict"] == "tie" for r in ok)
    n = wins_a + wins_b + ties
    invalid_by = {}
    for r in records:
        if r.get("status") != "ok":
            invalid_by[r.get("status", "error")] = invalid_by.get(r.get("status", "error"), 0) + 1
    decided = wins_a + wins_b
    summary = {
        "status": status,
        "model": model,
        "pairs": len(records),
        "judged": n,
        "wins_a": wins_a,
        "wins_b": wins_b,
        "ties": ties,
        "invalid": len(records) - n,
        "invalid_by_status": invalid_by,
        "win_rate_a": wins_a / n if n else None,
        "win_rate_a_ci95": wilson_ci(wins_a, n),
        "win_rate_b": wins_b / n if n else None,
        "win_rate_b_ci95": wilson_ci(wins_b, n),
        "tie_rate": ties / n if n else None,
        "pref_rate_a": wins_a / decided if decided else None,
        "pref_rate_a_ci95": wilson_ci(wins_a, decided),
        "mean_score_a": (sum(r["score_a_mean"] for r in ok) / len(ok)) if ok else None,
        "mean_score_b": (sum(r["score_b_mean"] for r in ok) / len(ok)) if ok else None,
        "ci_method": "Wilson score 95% interval; win rates over valid pairs (wins_a + wins_b + ties), "
                     "pref_rate over decided pairs (wins_a + wins_b)",
        "position_bias_control": "each pair judged in both orders; a win counts only if both orders agree, else tie",
    }
    if n_requests is not None:
        summary["requests"] = n_requests
    return summary


def _write_outputs(out_dir: Path, records: list[dict], summary: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "verdicts.jsonl", "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records))
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def judge_pairs(pairs: list[dict], cfg: dict, cache_dir: Path | None, out_dir: Path | None = None,
                progress: bool = True) -> dict:
    """Judge ``pairs`` (dicts with ``id``, ``image_a``, ``image_b``, ``prompt``) in both orders; return a summary.

    ``cfg`` is params.yaml's ``judge`` section (missing keys take :data:`DEFAULTS`). With ``out_dir``, writes
    ``verdicts.jsonl`` (one record per pair: both orders' parsed answers, attempts, errors, final verdict, status)
    and ``summary.json`` atomically. Without a GEMINI_API_KEY / GOOGLE_API_KEY: no request, status
    ``"skipped (no GEMINI_API_KEY)"``.
    """
    c = _cfg(cfg)
    model = str(c["model"])
    key = env_key("GEMINI_API_KEY", "GOOGLE_API_KEY")
    if key is None:
        log.warning("judge: no GEMINI_API_KEY set; skipping the Gemini preference evaluation (%d pairs)", len(pairs))
        summary = summarize([], model, status=SKIPPED_NO_KEY)
        summary["pairs"] = len(pairs)
        if out_dir is not None:
            _write_outputs(Path(out_dir), [], summary)
        return summary

    judge = GeminiJudge(c, key, cache_dir)
    records: list[dict | None] = [None] * len(pairs)
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(pairs), desc="judge", unit="pair", file=sys.stderr)
        except ImportError:  # pragma: no cover
            bar = None

    def work(i: int) -> None:
        records[i] = judge.judge_pair(pairs[i])
        if bar is not None:
            bar.update(1)

    t0 = time.time()
    workers = max(1, int(c["concurrency"] or 1))
    if workers == 1 or len(pairs) <= 1:
        for i in range(len(pairs)):
            work(i)
    else:
        with ThreadPoolExecutor(max_workers=workers) as ex:
            list(ex.map(work, range(len(pairs))))
    if bar is not None:
        bar.close()
    recs = [r for r in records if r is not None]
    status = "ok"
    if judge.fatal.is_set():
        fatal_msgs = [e["error"] for r in recs for o in r.get("orders", {}).values() for e in o.get("errors", [])
                      if e.get("kind") == "fatal"]
        status = "error (fatal API error: " + (fatal_msgs[0] if fatal_msgs else "unknown") + ")"
    summary = summarize(recs, model, status=status, n_requests=judge.n_requests)
    summary["seconds"] = round(time.time() - t0, 3)
    summary["base_url"] = str(c.get("base_url") or "") or "official"
    summary = json.loads(redact(json.dumps(summary), [key]))
    if out_dir is not None:
        _write_outputs(Path(out_dir), recs, summary)
    log.info("judge: %s", {k: summary[k] for k in ("status", "pairs", "wins_a", "wins_b", "ties", "invalid")})
    return summary


# ------------------------------------------------------------------------------------------------------------- CLI
def _load_params_section(path: Path, section: str) -> dict:
    if not path.is_file():
        return {}
    from ultraflux.config import parse_yaml

    data = parse_yaml(path.read_text()) or {}
    sec = data.get(section) or {}
    return dict(sec) if isinstance(sec, dict) else {}


def read_prompts_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not isinstance(obj.get("prompt"), str):
            raise ValueError(f'{path}:{n}: expected {{"image": "<file name>", "prompt": "<text>"}}')
        rows.append(obj)
    return rows


def cli_judge(argv: list[str]) -> int:
    """``ultraflux judge DIR_A DIR_B --prompts PROMPTS.jsonl [--base-url URL] [--model M] [--out DIR] [--cache DIR]``.

    Pairs are matched by file name (``image`` in each PROMPTS.jsonl line) in both folders. Prints the JSON summary on
    stdout; writes ``verdicts.jsonl`` + ``summary.json`` to ``--out`` (default: ``<parent of DIR_A>/judge_<A>_vs_<B>_
    <UTC timestamp>``). ``--cache`` defaults to ``$ULTRAFLUX_CACHE_DIR/judge`` (else ``~/.cache/ultraflux/judge``).
    Settings come from ``--params`` (default ``params.yaml``, section ``judge``), overridden by the flags.
    Exit status: 0 (ok or skipped without a key), 1 (fatal API error), 2 (bad arguments / inputs).
    """
    ap = argparse.ArgumentParser(prog="ultraflux judge", description="Gemini pairwise preference judge (seed Sec. 11).")
    ap.add_argument("dir_a", type=Path, help="folder of images from model A")
    ap.add_argument("dir_b", type=Path, help="folder of images from model B")
    ap.add_argument("--prompts", type=Path, required=True, help='JSONL: {"image": "<file name>", "prompt": "<text>"} per line')
    ap.add_argument("--base-url", default=None, help='endpoint (default: params judge.base_url; "" = official)')
    ap.add_argument("--model", default=None, help="model (default: params judge.model)")
    ap.add_argument("--out", type=Path, default=None, help="output folder for verdicts.jsonl + summary.json")
    ap.add_argument("--cache", type=Path, default=None, help="answer cache folder")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (section: judge)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    for d in (args.dir_a, args.dir_b):
        if not d.is_dir():
            print(f"ultraflux judge: not a folder: {d}", file=sys.stderr)
            return 2
    try:
        rows = read_prompts_jsonl(args.prompts)
        cfg = _load_params_section(args.params, "judge")
    except (OSError, ValueError) as e:
        print(f"ultraflux judge: {e}", file=sys.stderr)
        return 2
    if args.base_url is not None:
        cfg["base_url"] = args.base_url
    if args.model is not None:
        cfg["model"] = args.model
    pairs = [{"id": str(r.get("id", r["image"])), "image_a": args.dir_a / r["image"], "image_b": args.dir_b / r["image"],
              "prompt": r["prompt"]} for r in rows]
    out = args.out
    if out is None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        out = args.dir_a.resolve().parent / f"judge_{args.dir_a.resolve().name}_vs_{args.dir_b.resolve().name}_{stamp}"
    cache = args.cache if args.cache is not None else default_cache_root() / "judge"
    summary = judge_pairs(pairs, cfg, cache, out, progress=not args.no_progress)
    summary["out"] = str(out)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 1 if str(summary["status"]).startswith("error") else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(cli_judge(sys.argv[1:]))
