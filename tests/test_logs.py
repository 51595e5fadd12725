"""Logging: prunerep's format on the console for the whole run, third-party INFO in the log file
only (unless verbose), and no deprecation warning from the KV-cache API."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import CACHE_DIR, REPO, make_tiny
from prunerep import logs

HYDRA_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


@pytest.fixture
def hydra_like_logging(tmp_path):
    """Returns a function that sets the root logger up as Hydra's job_logging/default.yaml
    leaves it: INFO, a console handler on stdout and a file handler, both in Hydra's format
    (call it in the test body: pytest swaps sys.stdout between phases). Every logger touched is
    put back afterwards."""
    root, lm = logging.getLogger(), logging.getLogger("lm_eval")
    third = {n: logging.getLogger(n) for n in logs.THIRD_PARTY}
    saved = (list(root.handlers), root.level, list(lm.handlers), lm.level, lm.propagate,
             {n: (list(g.handlers), g.level, g.propagate) for n, g in third.items()})
    log_file = tmp_path / "job.log"
    made = []

    def setup():
        fmt = logging.Formatter(HYDRA_FORMAT)
        console = logging.StreamHandler(sys.stdout)  # what ext://sys.stdout resolves to
        file = logging.FileHandler(log_file)
        for h in (console, file):
            h.setFormatter(fmt)
        made.extend([console, file])
        root.handlers[:] = [console, file]
        root.setLevel(logging.INFO)
        return log_file

    try:
        yield setup
    finally:
        logs.reset()
        for h in made:
            h.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        lm.handlers[:] = saved[2]
        lm.setLevel(saved[3])
        lm.propagate = saved[4]
        for n, (handlers, level, propagate) in saved[5].items():
            third[n].handlers[:] = handlers
            third[n].setLevel(level)
            third[n].propagate = propagate


def _like_lm_eval():
    """What lm-eval does to logging during simple_evaluate: INFO lines, its own handler and
    format without propagation (lm_eval.utils.setup_logging), a task's basicConfig(force=True)."""
    logging.getLogger("lm_eval.evaluator").info("Setting verbosity through simple_evaluate is deprecated.")
    lm = logging.getLogger("lm_eval")
    h = logging.StreamHandler()
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)-8s [%(name)s] %(message)s"))
    lm.addHandler(h)
    lm.propagate = False
    lm.setLevel(logging.INFO)
    logging.basicConfig(force=True, format="%(levelname)s:%(name)s:%(message)s")
    logging.getLogger("lm_eval.api.task").info("Building contexts for mmlu_dev on rank 0...")


def _emit_after():
    logging.getLogger("prunerep").info("stage eval_pruned done")
    logging.getLogger("lm_eval.api.task").info("Building contexts for arith_mc on rank 0...")
    logging.getLogger("datasets.builder").info("Generating test split")
    logging.getLogger("lm_eval.evaluator").warning("a real lm-eval warning")


def test_console_keeps_format_and_drops_third_party_info(hydra_like_logging, capsys):
    log_file = hydra_like_logging()
    logs.configure(log_file.parent, verbose=False)
    logging.getLogger("prunerep").info("stage eval_dense ...")
    with logs.quiet_third_party():
        _like_lm_eval()
    _emit_after()
    out = capsys.readouterr().out
    assert "[prunerep][INFO] - stage eval_dense ..." in out
    assert "[prunerep][INFO] - stage eval_pruned done" in out  # the format survived lm-eval
    assert "[lm_eval.evaluator][WARNING] - a real lm-eval warning" in out  # warnings still show, same format
    for noise in ("Building contexts", "Generating test split", "Setting verbosity through simple_evaluate"):
        assert noise not in out
    text = log_file.read_text()
    assert "[lm_eval.api.task][INFO] - Building contexts for arith_mc" in text  # third-party INFO in the file
    assert "[datasets.builder][INFO] - Generating test split" in text
    assert "[prunerep][INFO] - stage eval_pruned done" in text
    assert logging.getLogger().handlers[0].formatter._fmt == HYDRA_FORMAT
    assert logging.getLogger("lm_eval").propagate and not logging.getLogger("lm_eval").handlers
    assert not (log_file.parent / logs.LOG_FILE).exists()  # Hydra's file is the run's log


def test_verbose_shows_third_party_info_in_prunerep_format(hydra_like_logging, capsys):
    logs.configure(hydra_like_logging().parent, verbose=True)
    with logs.quiet_third_party():
        _like_lm_eval()
    _emit_after()
    out = capsys.readouterr().out
    assert "[lm_eval.api.task][INFO] - Building contexts for arith_mc on rank 0..." in out
    assert "[datasets.builder][INFO] - Generating test split" in out
    assert "[prunerep][INFO] - stage eval_pruned done" in out


def test_libraries_with_their_own_handler_are_routed_to_the_file(hydra_like_logging, capsys):
    """transformers / datasets keep a stderr handler of their own and do not propagate."""
    lib = logging.getLogger("transformers")
    saved = (list(lib.handlers), lib.level, lib.propagate)
    own = logging.StreamHandler(sys.stderr)
    lib.handlers[:] = [own]
    lib.setLevel(logging.WARNING)
    lib.propagate = False
    try:
        log_file = hydra_like_logging()
        logs.configure(log_file.parent, verbose=False)
        logging.getLogger("transformers.modeling_utils").info("loading weights file")
        logging.getLogger("transformers.modeling_utils").warning("some weights were not used")
    finally:
        lib.handlers[:], lib.propagate = saved[0], saved[2]
        lib.setLevel(saved[1])
    cap = capsys.readouterr()
    assert "[transformers.modeling_utils][WARNING] - some weights were not used" in cap.out
    assert "loading weights file" not in cap.out + cap.err and "some weights" not in cap.err
    assert "[transformers.modeling_utils][INFO] - loading weights file" in log_file.read_text()


def test_outside_hydra_a_log_file_is_added_once(tmp_path):
    root = logging.getLogger()
    saved = list(root.handlers)
    root.handlers[:] = [h for h in saved if not isinstance(h, logging.FileHandler)]
    try:
        logs.configure(tmp_path, verbose=False)
        logs.configure(tmp_path, verbose=False)
        added = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
        assert len(added) == 1 and added[0].baseFilename == str(tmp_path / logs.LOG_FILE)
        logging.getLogger("lm_eval").info("to the file")
        added[0].flush()
        assert "to the file" in (tmp_path / logs.LOG_FILE).read_text()
    finally:
        logs.reset()
        root.handlers[:] = saved
    assert not any(getattr(h, "baseFilename", "") == str(tmp_path / logs.LOG_FILE) for h in root.handlers)


def test_real_lm_eval_calls_keep_the_console_clean(hydra_like_logging, capsys, tmp_path, cache_dir):
    """Two real in-process lm-eval evaluations (the dense and the pruned call of a run)."""
    from omegaconf import OmegaConf

    from prunerep.config import TaskConfig
    from prunerep.evals import evaluate_model
    from prunerep.model.load import load_model
    from prunerep.registry import compose

    model, tok = load_model(OmegaConf.to_object(compose("model=tiny", "model.device=cpu").model), cache_dir)
    cfg = OmegaConf.structured(TaskConfig(name="offline", tasks=["arith_mc", "arith_gen"], offline=True, limit=2,
                                          batch_size=4, max_gen_toks=4))
    log_file = hydra_like_logging()
    logs.configure(tmp_path, verbose=False)
    capsys.readouterr()
    for i in range(2):
        logging.getLogger("prunerep").info("evaluation %d ...", i)
        evaluate_model(model, tok, cfg, tmp_path / f"work{i}")
        logging.getLogger("prunerep").info("evaluation %d done", i)
    cap = capsys.readouterr()
    console = cap.out + cap.err
    for i in range(2):
        assert f"[prunerep][INFO] - evaluation {i} done" in cap.out
    for noise in ("Building contexts", "Generating test split", "Setting verbosity", "Selected tasks",
                  "Setting random seed", "lm_eval.api.task"):
        assert noise not in console, noise
    text = log_file.read_text()
    assert text.count("Building contexts for arith_mc") == 2  # both calls, in the file, in Hydra's format
    assert "[lm_eval.evaluator][INFO] - Setting random seed" in text


def test_greedy_decode_emits_no_cache_deprecation(caplog):
    """The KV cache is passed under the name the installed transformers expects: no
    FutureWarning, no deprecation log line, and the same tokens as decoding without a cache."""
    from prunerep.probes.contexts import greedy_decode

    model = make_tiny("llama")
    ids = torch.randint(0, 256, (7,), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        traj = greedy_decode(model, ids, 6)
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
                and "cache" in str(w.message)], [str(w.message) for w in caught]
    assert "deprecated" not in caplog.text
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(6):  # the same greedy tokens from full forwards without a cache
            nxt = model(input_ids=seq[None], use_cache=False).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1)])
    assert torch.equal(traj.tokens, seq[len(ids):])
    assert traj.h_last.shape == (6, model.config.hidden_size)


def test_default_run_console_has_no_warning_noise(tmp_path):
    """The real CLI, default settings (needs logs.configure wired into the run)."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, PRUNEREP_CACHE=CACHE_DIR, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "prunerep", "model=tiny", "task=offline", "task.limit=2", "task.seed=4242",
         "probe.n_prompts=2", "probe.max_new_tokens=4", "wandb.mode=disabled", f"hydra.run.dir={run_dir}"],
        cwd=REPO, env=env, text=True, capture_output=True, timeout=600)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    for noise in ("FutureWarning", "Setting verbosity through simple_evaluate", "Building contexts",
                  "Generating test split", "deprecated"):
        assert noise not in console, (noise, console[-3000:])
    assert "[prunerep][INFO] - stage eval_pruned done" in proc.stdout
    assert "representation hierarchy (" in proc.stdout  # the story closes the run
    log_text = (run_dir / "prunerep.log").read_text()
    assert "Building contexts" in log_text  # lm-eval's INFO went to the run's log file
