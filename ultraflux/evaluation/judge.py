"""Gemini pairwise preference judge (seed Sec. 11, Prompt 11.1).

Gemini-2.5-Flash "in reasoning mode" judges image pairs on aesthetic appeal and alignment with the prompt. Each
request sends, in this order: Image A (inline bytes), Image B (inline bytes), Prompt 11.1 verbatim, and a short
context line with the generation prompt (our addition: the seed says the judge assesses "alignment with the given
prompt" but Prompt 11.1 itself does not carry the prompt). The JSON contract of Prompt 11.1 is the pydantic model
:class:`JudgeAnswer`, handed to google-genai as the response schema (``response_mime_type=application/json`` +
``response_schema=JudgeAnswer``); the SDK parses the answer into it (``response.parsed``), and when it could not, the
text is validated by the same model to record why (a fenced JSON block is tolerated).

Position bias: every pair is judged in both orders (AB: image_a shown as "Image A"; BA: swapped). A pair's verdict
is a win only when both orders prefer the same underlying image; any disagreement (or a "tie" in either order) is
a tie. Pairs whose two orders did not both yield a valid answer are ``invalid`` (status ``invalid`` = malformed /
off-schema after retries, ``error`` = transport / API failure) and are excluded from the rates.

Rates: ``win_rate_a = wins_a / (wins_a + wins_b + ties)`` over valid pairs, with a Wilson 95 % score interval
(``win_rate_a_ci95``, scipy's ``binomtest(k, n).proportion_ci(method="wilson")``); likewise ``win_rate_b`` /
``tie_rate``. ``pref_rate_a = wins_a / (wins_a + wins_b)`` (ties dropped) is reported too, with its own Wilson
interval.

Cache: each validated answer is stored on disk under a key made of (sha256 of the bytes shown as Image A, sha256 of
the bytes shown as Image B, sha256 of the full prompt text sent, model, order, generation settings that change the
answer: thinking / thinking_budget / temperature / api_version / image encoding). Failures are never cached.

Key: ``GEMINI_API_KEY`` (or ``GOOGLE_API_KEY``); it is handed to the SDK only, never logged, printed or written.
Without a key :func:`judge_pairs` returns ``status: "skipped (no GEMINI_API_KEY)"`` and makes no request.

Run status: ``ok`` (at least one pair judged), ``failed`` (pairs given, none judged: every pair invalid or errored;
``error`` says why), ``error (fatal API error: ...)`` (a non-retryable API error stopped the run after some pairs were
judged), or the skip above. :func:`succeeded` is false for ``failed`` and ``error``: the CLI and the stage exit
non-zero then.
"""
from __future__ import annotations

import io
import json
import logging
import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal

from PIL import Image
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from scipy.stats import binomtest

from ultraflux.io import atomic_write_text, sha256_bytes, sha256_text

from ._llm import (
    DiskCache,
    InvalidAnswer,
    Outcome,
    RetryPolicy,
    call_with_retries,
    env_key,
    parse_answer,
    redact,
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



def _json_number(v: Any) -> Any:
    """Scores must be JSON numbers: no booleans, no numeric strings (pydantic's lax int would take both)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("a JSON number expected")
    return v


def _preferred(v: Any) -> Any:
    """``"a"`` / ``" B "`` / ``"TIE"`` read as ``A`` / ``B`` / ``tie``."""
    return {"a": "A", "b": "B", "tie": "tie"}.get(v.strip().lower(), v) if isinstance(v, str) else v


def _drop_additional_properties(schema: dict) -> None:
    """Extra keys are refused on receipt, but the schema sent says nothing about them: the Gemini Developer API's
    response schema has no ``additionalProperties`` (google-genai refuses it outside Vertex)."""
    schema.pop("additionalProperties", None)


Score = Annotated[int, Field(ge=0, le=100), BeforeValidator(_json_number)]  # 50.0 is 50; 1.5 is refused


class JudgeAnswer(BaseModel):
    """The JSON contract of Prompt 11.1: the response schema sent to Gemini, and the validation of every answer."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_drop_additional_properties)

    preferred: Annotated[Literal["A", "B", "tie"], BeforeValidator(_preferred)]
    a_score: Score
    b_score: Score
    reasons: str


SKIPPED_NO_KEY = "skipped (no GEMINI_API_KEY)"
ORDERS = ("AB", "BA")  # AB: image_a shown as "Image A"; BA: image_b shown as "Image A"


# ---------------------------------------------------------------------------------------------------------- helpers
def wilson_ci(k: int, n: int) -> list[float] | None:
    """Wilson score 95 % interval for a binomial proportion ``k/n`` (None when ``n == 0``)."""
    if n <= 0:
        return None
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


# Pillow format -> MIME type of the images sent inline as they are (MPO is a JPEG with extra frames); any other
# format Pillow reads (TIFF, BMP, ...) is re-encoded losslessly as PNG.
INLINE_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "WEBP": "image/webp"}


def _encode(data: bytes, fmt: str, **save: Any) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        buf = io.BytesIO()
        (im.convert("RGB") if fmt == "JPEG" else im).save(buf, format=fmt, **save)
        return buf.getvalue()


def _inline_image(data: bytes) -> tuple[bytes, str, bool]:
    """Bytes and MIME type to send for one image file's bytes (format detected by Pillow), and whether re-encoded."""
    with Image.open(io.BytesIO(data)) as im:
        mime = INLINE_MIME.get(str(im.format))
    if mime is not None:
        return data, mime, False
    return _encode(data, "PNG"), "image/png", True


def load_pair_images(path_a: str | os.PathLike, path_b: str | os.PathLike, inline_limit_mb: float) -> tuple[tuple[bytes, str], tuple[bytes, str], str]:
    """Bytes + MIME type of both images, and the encoding used (``original`` / ``png`` / ``jpeg95``)."""
    encoding = "original"
    imgs = []
    for path in (path_a, path_b):
        data, mime, converted = _inline_image(Path(path).read_bytes())
        if converted:
            encoding = "png"
        imgs.append((data, mime))
    if inline_limit_mb and sum(len(d) for d, _ in imgs) > inline_limit_mb * 1024 * 1024:
        # both re-encoded the same way so neither side is favoured by the compression
        imgs = [(_encode(d, "JPEG", quality=95), "image/jpeg") for d, _ in imgs]
        encoding = "jpeg95"
    return imgs[0], imgs[1], encoding


def validate_answer(answer: JudgeAnswer | str) -> dict:
    """One judge answer as a dict: the SDK's parsed :class:`JudgeAnswer`, or answer text validated by the same model
    (a fenced JSON block is tolerated; anything else around the JSON is malformed). Raises :class:`InvalidAnswer`."""
    if isinstance(answer, JudgeAnswer):
        return answer.model_dump()
    s = answer.strip() if isinstance(answer, str) else answer
    if isinstance(s, str) and s.startswith("```"):
        s = s.strip("`").strip()
        if s.lower().startswith("json"):
            s = s[4:].strip()
    return parse_answer(JudgeAnswer, s).model_dump()


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

        self.cfg = cfg
        self._types = types
        self._secrets = [api_key]
        http = {"timeout": int(float(self.cfg["timeout_s"]) * 1000)}  # milliseconds
        if self.cfg["base_url"]:
            http["base_url"] = str(self.cfg["base_url"])
        if self.cfg["api_version"]:
            http["api_version"] = str(self.cfg["api_version"])
        # No retry_options: the SDK then never retries; our loop owns the (single, bounded) retry budget.
        self.client = genai.Client(api_key=api_key, vertexai=False, http_options=types.HttpOptions(**http))
        self.cache = DiskCache(cache_dir)
        self.policy = RetryPolicy.from_cfg(self.cfg)
        thinking = bool(self.cfg["thinking"])
        self.thinking_budget = int(self.cfg["thinking_budget"]) if thinking else 0
        gen: dict[str, Any] = {
            "response_mime_type": "application/json",
            "response_schema": JudgeAnswer,
            "thinking_config": types.ThinkingConfig(thinking_budget=self.thinking_budget),
            "automatic_function_calling": types.AutomaticFunctionCallingConfig(disable=True),  # no tools here
        }
        if self.cfg["temperature"] is not None:
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
            "temperature": self.cfg["temperature"],
            "api_version": self.cfg["api_version"],
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
            # parsed is None when the text did not validate: validate_answer then re-reads the text to say why
            return resp.parsed if isinstance(resp.parsed, JudgeAnswer) else text

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
def summarize(records: list[dict], model: str, status: str = "ok", n_requests: int | None = None,
              error: str | None = None) -> dict:
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
    if error is not None:
        summary["error"] = error
    return summary


def run_status(records: list[dict]) -> tuple[str, str | None]:
    """(status, error) of a finished run: ``ok``, ``failed`` (no pair judged) or ``error (fatal API error: ...)``."""
    fatal_errors = [e["error"] for r in records for o in r.get("orders", {}).values() for e in o.get("errors", [])
                    if e.get("kind") == "fatal"]
    # the error that stopped the run, not the "aborted" notes of the requests it cancelled
    fatal = next((m for m in fatal_errors if not m.startswith("aborted")), fatal_errors[0] if fatal_errors else None)
    if records and not any(r.get("status") == "ok" for r in records):
        counts = Counter(str(r.get("status", "error")) for r in records)
        why = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        return "failed", f"no pair could be judged ({why})" + (f"; fatal API error: {fatal}" if fatal else "")
    if fatal is not None:
        return f"error (fatal API error: {fatal})", f"fatal API error: {fatal}"
    return "ok", None


def succeeded(summary: dict) -> bool:
    """True for ``ok`` and for the skip without a key; false when no pair was judged or a fatal error stopped it."""
    status = str(summary.get("status"))
    return not (status == "failed" or status.startswith("error"))


def _write_outputs(out_dir: Path, records: list[dict], summary: dict) -> None:
    atomic_write_text(out_dir / "verdicts.jsonl", "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records))
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def judge_pairs(pairs: list[dict], cfg: dict, cache_dir: Path | None, out_dir: Path | None = None,
                progress: bool = True) -> dict:
    """Judge ``pairs`` (dicts with ``id``, ``image_a``, ``image_b``, ``prompt``) in both orders; return a summary.

    ``cfg`` is params.yaml's complete ``judge`` section (validated: ``ultraflux.config``). With ``out_dir``, writes
    ``verdicts.jsonl`` (one record per pair: both orders' parsed answers, attempts, errors, final verdict, status)
    and ``summary.json`` atomically. Without a GEMINI_API_KEY / GOOGLE_API_KEY: no request, status
    ``"skipped (no GEMINI_API_KEY)"``. The other statuses (``ok`` / ``failed`` / ``error (...)``): :func:`run_status`.
    """
    c = cfg
    model = str(c["model"])
    key = env_key("GEMINI_API_KEY", "GOOGLE_API_KEY")
    if key is None:
        log.info("judge: no GEMINI_API_KEY set; skipping the Gemini preference evaluation (%d pairs)", len(pairs))
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

    t0 = time.monotonic()
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
    status, error = run_status(recs)
    summary = summarize(recs, model, status=status, n_requests=judge.n_requests, error=error)
    summary["seconds"] = round(time.monotonic() - t0, 3)
    summary["base_url"] = str(c["base_url"]) or "official"
    summary = json.loads(redact(json.dumps(summary), [key]))
    if out_dir is not None:
        _write_outputs(Path(out_dir), recs, summary)
    log.info("judge: %s", {k: summary[k] for k in ("status", "pairs", "wins_a", "wins_b", "ties", "invalid")})
    return summary
