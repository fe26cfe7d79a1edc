"""GPT-4o prompt refiner (seed Sec. 12) against a local fake OpenAI server, through the real openai client."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_llm_server import Reply, Script, openai_error, openai_message, openai_prompts  # noqa: E402
from conftest import params_section  # noqa: E402
from llm_fixtures import OPENAI_KEY as KEY  # noqa: E402
from llm_fixtures import llm_env, seed_text, serve  # noqa: E402,F401

from ultraflux.evaluation import refiner as R  # noqa: E402

pytestmark = pytest.mark.usefixtures("llm_env")


def words(n: int, tag: str = "word") -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def refined_for(request: dict, n_words: int = 60) -> list[str]:
    """One valid refined prompt per input prompt of the request's user message."""
    user = request["body"]["messages"][1]["content"]
    inputs = json.loads(user.split("Short prompts: ", 1)[1].split("\n", 1)[0])
    return [f"{p} " + words(n_words - len(p.split())) for p in inputs]


def good(request: dict) -> Reply:
    return openai_prompts(refined_for(request))


server = serve(openai=good)


def cfg(server, **kw):
    return params_section("refiner", **{"model": "gpt-4o", "base_url": server.url + "/v1", "language": "English",
                                        "max_retries": 3, "backoff_base_s": 0.001, "backoff_max_s": 0.005,
                                        "timeout_s": 5.0, **kw})


PROMPTS = ["a cat on a sofa", "a lighthouse at dusk", "an old man reading"]


# ------------------------------------------------------------------------------------------------------ prompt text
def test_prompts_are_seed_verbatim():
    seed = seed_text("Prompt 12.1")
    if seed is None:
        pytest.skip("seed supplement not available")
    assert R.SYSTEM_PROMPT in seed and R.SYSTEM_PROMPT.startswith("You are a senior prompt refiner")
    assert R.USER_PROMPT_TEMPLATE in seed and R.EXPECTED_OUTPUT_FORMAT in seed


def test_render_user_prompt():
    u = R.render_user_prompt(["a", 'b "q"'], "English", include_output_format=False)
    assert u == ('Short prompts: ["a", "b \\"q\\""]\n\nLanguage: Write outputs in English; one line per item. For each '
                 "input, produce exactly one refined prompt; avoid lists, bullets, or line breaks inside items.")


def test_count_words():
    assert R.count_words("one two  three\tfour") == 4
    assert R.count_words("一只猫 on a sofa", "Chinese") == 6
    assert R.count_words("一只猫", "English") == 3


# --------------------------------------------------------------------------------------------------------- behaviour
def test_correct_output_accepted_and_request_shape(server, tmp_path):
    out = R.refine_prompts(PROMPTS, cfg(server), tmp_path / "cache")
    assert len(out) == 3 and all(o.startswith(p) for o, p in zip(out, PROMPTS))
    assert server.count("openai") == 1
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["authorization"] == f"Bearer {KEY}"
    body = req["body"]
    assert body["model"] == "gpt-4o"
    assert body["messages"][0] == {"role": "system", "content": R.SYSTEM_PROMPT}
    assert body["messages"][1] == {"role": "user", "content": R.render_user_prompt(PROMPTS, "English")}
    rf = body["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["strict"] is True
    assert rf["json_schema"]["schema"]["type"] == "object"
    assert rf["json_schema"]["schema"]["properties"]["prompts"] == {"items": {"type": "string"}, "title": "Prompts",
                                                                   "type": "array"}
    assert rf["json_schema"]["name"] == "RefinedPrompts"
    assert rf["json_schema"]["schema"]["additionalProperties"] is False


def test_language_is_passed(server, tmp_path):
    R.refine_prompts(PROMPTS[:1], cfg(server, language="Chinese"), None)
    assert "Write outputs in Chinese;" in server.requests[0]["body"]["messages"][1]["content"]


def test_refusal_is_retried(server, tmp_path):
    server.openai = Script([openai_message(None, refusal="I can't help with that.")], default=good)
    out = R.refine_prompts(PROMPTS, cfg(server), None)
    assert len(out) == 3 and server.count("openai") == 2


def test_persistent_refusal_raises(server, tmp_path):
    server.openai = lambda req: openai_message(None, refusal="I can't help with that.")
    with pytest.raises(R.RefinerError, match="refused") as ei:
        R.refine_prompts(PROMPTS, cfg(server, max_retries=2), tmp_path / "cache")
    assert server.count("openai") == 3 and len(ei.value.attempts) == 3
    assert all("refused" in a["error"] for a in ei.value.attempts)


def test_wrong_count_retried_then_error(server, tmp_path):
    server.openai = lambda req: openai_prompts(refined_for(req)[:-1])
    with pytest.raises(R.RefinerError, match="wrong number of refined prompts: got 2, expected 3"):
        R.refine_prompts(PROMPTS, cfg(server, max_retries=3), tmp_path / "cache")
    assert server.count("openai") == 4  # 1 + 3 retries, then a clear error (nothing invented)
    assert not any((tmp_path / "cache").rglob("*.json"))  # failures are not cached


def test_wrong_count_then_correct(server, tmp_path):
    server.openai = Script([openai_prompts(["only one " + words(60)])], default=good)
    assert len(R.refine_prompts(PROMPTS, cfg(server), None)) == 3 and server.count("openai") == 2


@pytest.mark.parametrize("n_words", [20, 54, 101, 150])
def test_word_count_out_of_range_is_retried(server, tmp_path, n_words):
    calls = {"n": 0}

    def handler(req):
        calls["n"] += 1
        return openai_prompts(refined_for(req, n_words)) if calls["n"] == 1 else good(req)

    server.openai = handler
    out = R.refine_prompts(PROMPTS, cfg(server), None)
    assert server.count("openai") == 2 and all(55 <= len(o.split()) <= 100 for o in out)


@pytest.mark.parametrize("n_words", [55, 100])
def test_word_count_bounds_inclusive(server, tmp_path, n_words):
    server.openai = lambda req: openai_prompts(refined_for(req, n_words))
    out = R.refine_prompts(PROMPTS, cfg(server), None)
    assert server.count("openai") == 1 and all(len(o.split()) == n_words for o in out)


def test_newline_or_numbering_retried(server, tmp_path):
    def with_newline(req):
        items = refined_for(req)
        items[0] = items[0].replace(" word3 ", "\nword3 ")
        return openai_prompts(items)

    def numbered(req):
        return openai_prompts([f"{i + 1}. {p}" for i, p in enumerate(refined_for(req, 58))])

    seq = iter([with_newline, numbered])

    def handler(req):
        f = next(seq, good)
        return f(req)

    server.openai = handler
    out = R.refine_prompts(PROMPTS, cfg(server), None)
    assert server.count("openai") == 3 and all("\n" not in o for o in out)


def test_malformed_json_then_valid(server, tmp_path):
    server.openai = Script([openai_message("not json"), openai_message('["a bare list"]')], default=good)
    assert len(R.refine_prompts(PROMPTS, cfg(server), None)) == 3 and server.count("openai") == 3


@pytest.mark.parametrize("content, reason", [
    ("not json", "answer is not valid JSON"),
    ('{"prompts": ["ok", 3]}', "prompts.1: Input should be a valid string (got 3)"),
    ('{"prompts": [], "note": "x"}', "note: Extra inputs are not permitted"),
    ('{"items": []}', "prompts: Field required"),
])
def test_off_schema_answer_is_invalid_with_reason(server, tmp_path, content, reason):
    server.openai = lambda req: openai_message(content)
    with pytest.raises(R.RefinerError, match="after 2 attempt") as ei:
        R.refine_prompts(PROMPTS, cfg(server, max_retries=1), None)
    assert all(a["kind"] == "invalid" and reason in a["error"] for a in ei.value.attempts), ei.value.attempts


@pytest.mark.parametrize("finish", ["length", "content_filter"])
def test_truncated_or_filtered_answer_is_retried(server, tmp_path, finish):
    server.openai = Script([openai_message('{"prompts": ["cut', finish=finish)], default=good)
    assert len(R.refine_prompts(PROMPTS, cfg(server), None)) == 3 and server.count("openai") == 2


@pytest.mark.parametrize("status", [429, 500, 503])
def test_transient_errors_retried(server, tmp_path, status):
    server.openai = Script([openai_error(status, "try later")], default=good)
    assert len(R.refine_prompts(PROMPTS, cfg(server), None)) == 3 and server.count("openai") == 2


def test_fatal_error_not_retried(server, tmp_path):
    server.openai = lambda req: openai_error(401, "bad key")
    with pytest.raises(R.RefinerError, match="401"):
        R.refine_prompts(PROMPTS, cfg(server), None)
    assert server.count("openai") == 1


def test_cached_rerun_makes_no_request(server, tmp_path):
    out1 = R.refine_prompts(PROMPTS, cfg(server), tmp_path / "cache")
    assert server.count("openai") == 1
    out2 = R.refine_prompts(PROMPTS, cfg(server), tmp_path / "cache")
    assert out1 == out2 and server.count("openai") == 1
    R.refine_prompts(PROMPTS, cfg(server, language="Chinese"), tmp_path / "cache")  # another key
    R.refine_prompts(PROMPTS, cfg(server, model="gpt-4o-mini"), tmp_path / "cache")
    R.refine_prompts(PROMPTS[:2], cfg(server), tmp_path / "cache")
    assert server.count("openai") == 4


def test_batches_preserve_order(server, tmp_path):
    prompts = [f"prompt number {i}" for i in range(5)]
    out = R.refine_prompts(prompts, cfg(server, batch_size=2), tmp_path / "cache")
    assert server.count("openai") == 3 and [o.split(" word0")[0] for o in out] == prompts
    assert R.refine_prompts([], cfg(server), None) == []


def test_no_key_raises_clear_error(server, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(R.RefinerError, match="OPENAI_API_KEY"):
        R.refine_prompts(PROMPTS, cfg(server), tmp_path / "cache")
    assert server.requests == []


def test_key_never_leaks(server, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    echo = f"Incorrect API key provided: {KEY}."
    server.openai = Script([openai_error(429, echo), openai_message(f"oops {KEY}"),
                            openai_message(None, refusal=f"no {KEY}")], default=good)
    R.refine_prompts(PROMPTS, cfg(server), tmp_path / "cache")
    server.openai = lambda req: openai_error(401, echo)
    with pytest.raises(R.RefinerError) as ei:
        R.refine_prompts(["another prompt"], cfg(server), tmp_path / "cache")
    print(str(ei.value), ei.value.attempts)
    assert all(r["headers"]["authorization"] == f"Bearer {KEY}" for r in server.requests)
    captured = capsys.readouterr()
    blobs = {"stdout": captured.out, "stderr": captured.err, "logs": caplog.text, "error": str(ei.value) + repr(ei.value.attempts)}
    for f in tmp_path.rglob("*"):
        if f.is_file():
            blobs[str(f)] = f.read_bytes().decode("utf-8", "replace")
    assert "retrying" in caplog.text
    assert [name for name, text in blobs.items() if KEY in text] == []
    assert "***" in str(ei.value)
