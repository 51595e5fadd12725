"""validate_tasks: one-line errors, before any heavy work."""
from __future__ import annotations

import time

import pytest
from omegaconf import OmegaConf

from conftest import network_blocked
from prunerep.config import ConfigError, TaskConfig
from prunerep.evals import evaluate_model, validate_tasks

REPO_CONF = __import__("pathlib").Path(__file__).resolve().parents[1] / "conf" / "task"


def _cfg(name: str, **over):
    node = OmegaConf.merge(OmegaConf.structured(TaskConfig), OmegaConf.load(REPO_CONF / f"{name}.yaml"))
    for k, v in over.items():
        OmegaConf.update(node, k, v)
    return node


@pytest.fixture
def no_network():
    """Any non-loopback connection or name lookup raises (and is recorded)."""
    with network_blocked() as attempts:
        yield attempts


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_conf_files_compose_and_validate():
    validate_tasks(_cfg("offline"))
    validate_tasks(_cfg("none"))
    assert _cfg("paper").offline is False


def test_unknown_offline_task_lists_close_matches():
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        validate_tasks(_cfg("offline", **{"tasks": ["mmlu_dev", "arith_gne"]}))
    msg = _one_line(err)
    assert "arith_gne" in msg and "arith_gen" in msg
    with pytest.raises(ConfigError) as err:
        validate_tasks(_cfg("offline", **{"tasks": ["hellaswg"]}))
    assert "hellaswag" in _one_line(err)  # close matches come from lm-eval's registry too
    assert time.perf_counter() - t0 < 10


def test_hub_task_with_offline_true_points_at_offline_false():
    with pytest.raises(ConfigError) as err:
        validate_tasks(_cfg("offline", **{"tasks": ["gsm8k"]}))
    assert "task.offline=false" in _one_line(err)


def test_paper_without_network_fails_fast_naming_the_dataset(no_network):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        validate_tasks(_cfg("paper"))
    msg = _one_line(err)
    assert "cais/mmlu" in msg and "task=offline" in msg
    assert time.perf_counter() - t0 < 5


def test_bad_settings_are_one_line_errors():
    for over, word in [({"limit": 0}, "task.limit"), ({"batch_size": 0}, "task.batch_size"),
                       ({"arith_kinds": ["div"]}, "arith_kinds"),
                       ({"code_timeout_s": 0}, "code_timeout_s")]:
        with pytest.raises(ConfigError) as err:
            validate_tasks(_cfg("offline", **over))
        assert word in _one_line(err)


def test_task_none_evaluates_nothing_fast(tmp_path):
    t0 = time.perf_counter()
    assert evaluate_model(None, None, _cfg("none"), tmp_path) == {}
    assert evaluate_model(None, None, _cfg("offline", **{"tasks": []}), tmp_path) == {}
    assert time.perf_counter() - t0 < 1
