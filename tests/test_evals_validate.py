"""validate_tasks: one-line errors, before any heavy work."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import network_blocked
from prunerep.config import TaskConfig
from prunerep.errors import ConfigError
from prunerep.evals import evaluate_model, harness, validate_tasks
from prunerep.evals import validate as V

REPO_CONF = __import__("pathlib").Path(__file__).resolve().parents[1] / "conf" / "task"


def _cfg(name: str, **over) -> TaskConfig:
    node = OmegaConf.merge(OmegaConf.structured(TaskConfig), OmegaConf.load(REPO_CONF / f"{name}.yaml"))
    for k, v in over.items():
        OmegaConf.update(node, k, v)
    return OmegaConf.to_object(node)


@pytest.fixture
def no_network():
    """Any non-loopback connection or name lookup raises (and is recorded)."""
    with network_blocked() as attempts:
        yield attempts


@pytest.fixture
def no_full_index(monkeypatch):
    """lm-eval's full TaskManager index (~15 s) must not be built: a call is recorded and fails."""
    calls: list = []

    def refuse():
        calls.append(1)
        raise AssertionError("validate_tasks built lm-eval's full task index")

    monkeypatch.setattr(V, "_full_index_names", refuse)
    return calls


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_conf_files_compose_and_validate():
    validate_tasks(_cfg("offline"))
    validate_tasks(_cfg("none"))
    assert _cfg("paper").offline is False


def test_unknown_offline_task_lists_close_matches(no_full_index, no_network):
    """With task.offline=true an unknown name is answered from the cheap registry scan: no
    full lm-eval index, no network."""
    with pytest.raises(ConfigError) as err:
        validate_tasks(_cfg("offline", **{"tasks": ["mmlu_dev", "arith_gne"]}))
    msg = _one_line(err)
    assert "arith_gne" in msg and "arith_gen" in msg
    with pytest.raises(ConfigError) as err:
        validate_tasks(_cfg("offline", **{"tasks": ["hellaswg"]}))
    assert "hellaswag" in _one_line(err)  # close matches come from lm-eval's registry too
    assert no_full_index == [] and no_network == []


def test_hub_task_with_offline_true_points_at_offline_false():
    with pytest.raises(ConfigError) as err:
        validate_tasks(_cfg("offline", **{"tasks": ["gsm8k"]}))
    assert "task.offline=false" in _one_line(err)


def test_paper_without_network_fails_fast_naming_the_dataset(no_network, no_full_index, monkeypatch):
    """No network: one refused look-up of huggingface.co at most (none with HF_HUB_OFFLINE=1),
    no full lm-eval index, and a one-line error naming the dataset."""
    with pytest.raises(ConfigError) as err:
        validate_tasks(_cfg("paper"))  # HF_HUB_OFFLINE=1 (set by network_blocked): nothing is tried
    msg = _one_line(err)
    assert "cais/mmlu" in msg and "task=offline" in msg
    assert no_network == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ConfigError) as err:
        validate_tasks(_cfg("paper"))
    assert "cais/mmlu" in _one_line(err)
    assert no_network == ["huggingface.co"]  # a single name look-up, refused at once: no retries, no wait
    assert no_full_index == []


def test_bad_settings_are_one_line_errors():
    for over, word in [({"limit": 0}, "task.limit"), ({"batch_size": 0}, "task.batch_size"),
                       ({"arith_kinds": ["div"]}, "arith_kinds"),
                       ({"code_timeout_s": 0}, "code_timeout_s")]:
        with pytest.raises(ConfigError) as err:
            validate_tasks(_cfg("offline", **over))
        assert word in _one_line(err)


def test_task_none_evaluates_nothing(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("task=none reached lm-eval")

    for name in ("plan_tasks", "make_task_manager", "run_lm_eval"):
        monkeypatch.setattr(harness, name, refuse)
    assert evaluate_model(None, None, _cfg("none"), tmp_path) == {}
    assert evaluate_model(None, None, _cfg("offline", **{"tasks": []}), tmp_path) == {}
    assert list(tmp_path.iterdir()) == []  # no task files, no data written
