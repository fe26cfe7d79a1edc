"""GPT-4o prompt refiner (seed Sec. 12, Prompt 12.1).

Short prompts are expanded into rich, high-aesthetic prompts with the seed's system prompt and user prompt template
(verbatim). The answer is requested as strict structured output with the pydantic model :class:`RefinedPrompts`
(``client.chat.completions.parse(response_format=RefinedPrompts)``, read from ``message.parsed``); since strict
schemas need an object at the root, the seed's JSON list is wrapped as ``{"prompts": [...]}``. Each answer is then
checked against what the schema cannot say -- exactly one refined prompt per input, each a single line (no newline,
no list numbering / bullet) of ``min_words``-``max_words`` words (55-100 per the seed) -- and retried (bounded, with
exponential back-off + jitter) otherwise; an answer the model does not validate, and a refusal (``message.refusal``),
are recorded and retried too. When the budget is spent :class:`RefinerError` is raised with every
attempt's failure: prompts are never invented or padded.

Prompts are sent in batches of ``batch_size``; each validated batch is cached on disk under (the batch's prompts,
model, language, sha256 of the system prompt + rendered user prompt, temperature), so a re-run makes no request.

Key: ``OPENAI_API_KEY`` only, handed to the SDK and never logged, printed or stored.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from ultraflux.io import sha256_text

from ._llm import DiskCache, InvalidAnswer, RetryPolicy, call_with_retries, env_key, parse_answer

log = logging.getLogger(__name__)

# Seed Sec. 12, Prompt 12.1 -- system prompt, verbatim.
SYSTEM_PROMPT = (
    "You are a senior prompt refiner for AI image generation. Expand each short prompt into a single rich, "
    "high-aesthetic prompt.\n"
    "\n"
    "Requirements:\n"
    "\n"
    "- Length: 55\u2013100 words; one line per item; no new-lines, numbering, or quotes.\n"
    "- Preserve the original subject and intent; do not invent brands, copyrighted IP, or named people.\n"
    "- Composition: camera angle, shot size/framing, focal length or lens type, foreground/midground/background, "
    "environment context.\n"
    "- Subject attributes: age range, gender expression where implied, appearance details (hair/eyes/skin or "
    "material), clothing/fabric, pose, expression/action.\n"
    "- Lighting and color: key light quality/direction, color temperature, time of day/season/weather, palette or "
    "dominant hues.\n"
    "- Style/medium: photographic or cinematic unless the input implies another medium; mention film look or "
    "post-processing if appropriate.\n"
    "- Quality: tasteful, coherent, non-repetitive language; avoid keyword stuffing."
)

# Seed Sec. 12, Prompt 12.1 -- user prompt, verbatim; ``{list of input prompts}`` and ``[language] (Chinese/English)``
# are the placeholders filled by :func:`render_user_prompt`.
USER_PROMPT_TEMPLATE = (
    "Short prompts: {list of input prompts}\n"
    "\n"
    "Language: Write outputs in [language] (Chinese/English); one line per item. For each input, produce exactly one "
    "refined prompt; avoid lists, bullets, or line breaks inside items."
)

# Seed Sec. 12, Prompt 12.1 -- expected output format, verbatim (appended to the user prompt).
EXPECTED_OUTPUT_FORMAT = (
    "**Expected output format:**\n"
    "\n"
    " \n"  # (sic: the seed's text has this whitespace-only line)
    "```\n"
    "[\n"
    '  "Refined prompt 1",\n'
    '  "Refined prompt 2",\n'
    "  ...\n"
    "]\n"
    "```"
)


class RefinedPrompts(BaseModel):
    """Strict structured output: an object root wrapping the seed's list of refined prompts."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[str]


_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")
_LIST_MARKER = re.compile(r"^\s*(?:[-*\u2022]\s|\d+[.)]\s)")


class RefinerError(RuntimeError):
    """The refiner could not produce valid prompts (no key, refusals, wrong count/length after retries, API error)."""

    def __init__(self, message: str, attempts: list[dict] | None = None):
        super().__init__(message)
        self.attempts = attempts or []


def count_words(text: str, language: str = "English") -> int:
    """Whitespace-separated words; for Chinese (or any text with CJK characters) each CJK character counts as a word."""
    cjk = len(_CJK.findall(text))
    if cjk or str(language).strip().lower().startswith(("chinese", "zh")):
        rest = _CJK.sub(" ", text)
        return cjk + len([w for w in rest.split() if re.search(r"\w", w)])
    return len(text.split())


def render_user_prompt(prompts: list[str], language: str, include_output_format: bool = True) -> str:
    text = USER_PROMPT_TEMPLATE.replace("{list of input prompts}", json.dumps(list(prompts), ensure_ascii=False))
    text = text.replace("[language] (Chinese/English)", str(language))
    if include_output_format:
        text = text + "\n\n" + EXPECTED_OUTPUT_FORMAT
    return text


def validate_refined(answer: RefinedPrompts | str, n_expected: int, min_words: int, max_words: int,
                     language: str) -> list[str]:
    """The refined prompts of an answer (the SDK's parsed :class:`RefinedPrompts`, or JSON text validated by it),
    checked for count, single-line items and word counts; raises :class:`InvalidAnswer`."""
    items = (answer if isinstance(answer, RefinedPrompts) else parse_answer(RefinedPrompts, answer)).prompts
    if len(items) != n_expected:
        raise InvalidAnswer(f"wrong number of refined prompts: got {len(items)}, expected {n_expected} (one per input)")
    problems = []
    for i, p in enumerate(items):
        s = p.strip()
        if "\n" in s or "\r" in s:
            problems.append(f"item {i}: contains a line break")
        if _LIST_MARKER.match(s):
            problems.append(f"item {i}: starts with list numbering or a bullet")
        w = count_words(s, language)
        if not min_words <= w <= max_words:
            problems.append(f"item {i}: {w} words (expected {min_words}-{max_words})")
    if problems:
        raise InvalidAnswer("invalid refined prompts: " + "; ".join(problems))
    return [p.strip() for p in items]


def refine_prompts(prompts: list[str], cfg: dict, cache_dir: Path | None) -> list[str]:
    """Refine ``prompts`` with GPT-4o (seed Prompt 12.1); one refined prompt per input, same order.

    ``cfg`` is params.yaml's complete ``refiner`` section (validated: ``ultraflux.config``). Raises
    :class:`RefinerError` when ``OPENAI_API_KEY`` is not set, or when a batch cannot be refined validly within the
    retry budget.
    """
    prompts = [str(p) for p in prompts]
    if not prompts:
        return []
    c = cfg
    model, language = str(c["model"]), str(c["language"])
    min_w, max_w = int(c["min_words"]), int(c["max_words"])
    batch_size = max(1, int(c["batch_size"]))
    cache = DiskCache(cache_dir)
    results: list[str] = []
    client = None
    key: str | None = None
    policy = RetryPolicy.from_cfg(c)

    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        user = render_user_prompt(batch, language, bool(c["include_output_format"]))
        ckey = {
            "v": 1, "tool": "gpt-refiner", "prompts": batch, "model": model, "language": language,
            "messages_sha256": sha256_text(SYSTEM_PROMPT + "\x00" + user), "temperature": c["temperature"],
            "words": [min_w, max_w],
        }
        hit = cache.get(ckey)
        if isinstance(hit, list) and len(hit) == len(batch) and all(isinstance(x, str) for x in hit):
            results.extend(hit)
            continue

        if client is None:
            key = env_key("OPENAI_API_KEY")
            if key is None:
                raise RefinerError("prompt refiner: OPENAI_API_KEY is not set (needed to call "
                                   f"{model}); set it, or disable the refiner")
            from openai import OpenAI

            kwargs: dict[str, Any] = {"api_key": key, "max_retries": 0, "timeout": float(c["timeout_s"])}
            if c["base_url"]:
                kwargs["base_url"] = str(c["base_url"])
            client = OpenAI(**kwargs)  # SDK retries off: our loop owns the single, bounded budget

        req: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}],
            "response_format": RefinedPrompts,
        }
        if c["temperature"] is not None:
            req["temperature"] = float(c["temperature"])

        def call(req=req):
            # parse() raises LengthFinishReasonError / ContentFilterFinishReasonError (a truncated or filtered
            # answer) and pydantic's ValidationError (an answer RefinedPrompts does not validate): all "invalid".
            resp = client.chat.completions.parse(**req)
            if not resp.choices:
                raise InvalidAnswer("response has no choices")
            msg = resp.choices[0].message
            if msg.refusal:
                raise InvalidAnswer(f"model refused: {msg.refusal}")
            if key and msg.content and key in msg.content:  # never store or return an echoed key
                raise InvalidAnswer("answer echoes the API key; discarded")
            return msg.parsed if msg.parsed is not None else msg.content  # no parsed answer: re-read to say why

        n = len(batch)
        out = call_with_retries(
            call, lambda content, n=n: validate_refined(content, n, min_w, max_w, language), policy, [key],
            what=f"refine prompts {start}..{start + n - 1}",
        )
        if out.status != "ok":
            last = out.errors[-1]["error"] if out.errors else "unknown error"
            raise RefinerError(
                f"prompt refiner ({model}) failed for prompts {start}..{start + n - 1} after {out.attempts} attempt(s): "
                f"{last}", out.errors)
        cache.put(ckey, out.value)
        results.extend(out.value)
    return results
