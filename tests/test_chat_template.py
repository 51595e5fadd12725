"""Chat templates (issue #23): task.apply_chat_template and probe.chat_template are auto (on
exactly when the tokenizer has a chat template), switchable, and part of the dense caches' keys;
with the template off, the keys are the ones the settings had before they existed."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib.metadata import version

import pytest

from prunerep import spec
from prunerep.config import TaskConfig
from prunerep.errors import ConfigError
from prunerep.evals import EVAL_FORMAT_VERSION, dense_key, dense_scores, harness
from prunerep.model import chat
from prunerep.probes import dense_reference
from prunerep.registry import compose

from conftest import make_tiny
from helpers import probe_plan

PROMPTS = [{"prompt": "Which city is the capital of France?\nA. Paris\nB. Rome\nAnswer:", "options": ["A", "B"]},
           {"prompt": "Question: Tom has 3 apples and buys 4 more. How many?\nAnswer:"}]
#: the embedded SmolLM2-135M-Instruct's template, written out by hand
SMOLLM2_TURN = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")


def _plan(prompts_file, chat_template):
    return probe_plan(prompts_file, chat_template=chat_template, contexts=["prompt", "teacher_forced"],
                      max_new_tokens=2, layers=[-1])


def test_the_settings_are_checked():
    for good in ("auto", True, False):
        assert chat.check(good, "probe.chat_template") == good
    with pytest.raises(ConfigError, match="probe.chat_template='yes'; choose auto, true or false"):
        chat.check("yes", "probe.chat_template")


@pytest.mark.parametrize("override", ["task.apply_chat_template=yes", "probe.chat_template=1"])
def test_a_bad_setting_is_one_line_before_the_model_loads(override, tmp_path):
    with pytest.raises(ConfigError, match=r"chat_template=.*; choose auto, true or false$"):
        spec.build(compose("model=tiny", override), tmp_path / "run")


def test_auto_follows_the_tokenizer_and_true_needs_a_template(smollm2_tok, char_tok):
    assert chat.resolve("auto", smollm2_tok, "x") is True
    assert chat.resolve("auto", char_tok, "x") is False
    assert chat.resolve(False, smollm2_tok, "x") is False
    with pytest.raises(ConfigError, match="task.apply_chat_template=true but the tokenizer has no chat template"):
        chat.resolve(True, char_tok, "task.apply_chat_template")


def test_probe_prompts_in_the_template_are_another_cache_entry(smollm2_tok, prompts_file, tmp_path):
    model = make_tiny("llama", vocab_size=len(smollm2_tok), num_hidden_layers=2)
    refs = {s: dense_reference(model, smollm2_tok, _plan(prompts_file, s), tmp_path, model_key="tiny")
            for s in ("auto", True, False)}
    assert refs["auto"].key == refs[True].key != refs[False].key
    assert len(list((tmp_path / "probes").glob("*/manifest.json"))) == 2
    templated, plain = refs[True].prompts, refs[False].prompts
    for item, t, p in zip(PROMPTS, templated, plain):
        assert p.text == item["prompt"] and t.text == SMOLLM2_TURN.format(item["prompt"])
        assert list(t.ids) == smollm2_tok(SMOLLM2_TURN.format(item["prompt"]), add_special_tokens=False)["input_ids"]
        assert t.options == p.options and t.option_ids == p.option_ids
    # the dense states are those of the templated ids
    assert refs[True].load(0)["prompt_ids"].tolist() == list(templated[0].ids)


def test_probe_prompts_without_a_template_are_unchanged(char_tok, prompts_file, tmp_path):
    model = make_tiny("llama", vocab_size=len(char_tok), num_hidden_layers=2)
    auto = dense_reference(model, char_tok, _plan(prompts_file, "auto"), tmp_path, model_key="tiny")
    off = dense_reference(model, char_tok, _plan(prompts_file, False), tmp_path, model_key="tiny")
    assert auto.key == off.key and off.from_cache
    assert [p.text for p in auto.prompts] == [p["prompt"] for p in PROMPTS]
    assert [list(p.ids) for p in auto.prompts] == [char_tok(p["prompt"])["input_ids"] for p in PROMPTS]


def _old_key(task: TaskConfig, model_key: str) -> str:
    """The dense scores' key as it was before the chat settings: every other task setting."""
    settings = {k: v for k, v in dataclasses.asdict(task).items()
                if k not in ("apply_chat_template", "fewshot_as_multiturn")}
    payload = json.dumps([model_key, settings, version("lm_eval"), EVAL_FORMAT_VERSION], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def test_the_dense_scores_key(smollm2_tok, char_tok):
    task = TaskConfig(tasks=["arith_cloze"])
    assert dense_key(task, char_tok, "m") == _old_key(task, "m")  # no template: the key of before
    assert dense_key(dataclasses.replace(task, apply_chat_template=False), smollm2_tok, "m") == _old_key(task, "m")
    on = dense_key(task, smollm2_tok, "m")
    assert on != _old_key(task, "m") and on == dense_key(dataclasses.replace(task, apply_chat_template=True),
                                                           smollm2_tok, "m")
    assert dense_key(dataclasses.replace(task, fewshot_as_multiturn=False), smollm2_tok, "m") != on
    # without a template fewshot_as_multiturn does nothing, and is not in the key
    assert dense_key(dataclasses.replace(task, fewshot_as_multiturn=False), char_tok, "m") == _old_key(task, "m")


def test_lm_eval_gets_the_template_and_the_scores_are_cached_apart(smollm2_tok, tmp_path, monkeypatch):
    model = make_tiny("llama", vocab_size=len(smollm2_tok), num_hidden_layers=2)
    seen = []
    real = harness.simple_evaluate

    def recording(*a, **k):
        res = real(*a, **k)
        seen.append((k["apply_chat_template"], k["fewshot_as_multiturn"],
                     res["samples"]["arith_cloze"][0]["arguments"][0][0]))
        return res

    monkeypatch.setattr(harness, "simple_evaluate", recording)
    base = TaskConfig(name="offline", tasks=["arith_cloze"], limit=1, num_fewshot=0, batch_size=4, n_arith=2)
    on = dense_scores(model, smollm2_tok, base, tmp_path, model_key="tiny")
    off = dense_scores(model, smollm2_tok, dataclasses.replace(base, apply_chat_template=False), tmp_path,
                       model_key="tiny")
    assert len(list((tmp_path / "evals").glob("*.json"))) == 2
    (t_on, m_on, ctx_on), (t_off, m_off, ctx_off) = seen
    assert (t_on, m_on, t_off, m_off) == (True, True, False, False)
    assert ctx_on == SMOLLM2_TURN.format(ctx_off)  # the zero-shot context as the user turn
    assert not ctx_off.startswith("<|im_start|>")
    assert on["arith_cloze"]["n"] == off["arith_cloze"]["n"] == 1
