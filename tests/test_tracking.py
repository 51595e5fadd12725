"""W&B tracking: offline runs hold the logged curves (read back with wandb's own reader), failures of
wandb never break a run, and a real pipeline run leaves an offline run inside its run directory."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from wandb.sdk.lib import import_hooks

from prunerep.cli import run_config
from prunerep.registry import compose
from prunerep.report.__main__ import wandb_target
from prunerep.spec import identity
from prunerep.tracking import log_report

from conftest import CACHE_DIR
from helpers import make_cfg, synthetic_probes, tracker

REPO = Path(__file__).resolve().parents[1]
WANDB = str(Path(sys.executable).with_name("wandb"))


def read_runs(path: Path) -> list[dict]:
    """Every offline run under `path`, read back with `wandb leet inspect --json` (wandb's own reader
    of the .wandb transaction log): {"records": [...], "summary": {...}, "dir": Path}."""
    runs = []
    for d in sorted(path.rglob("offline-run-*")):
        out = subprocess.run([WANDB, "leet", "inspect", "--json", str(d)], capture_output=True, text=True,
                             timeout=120, check=True).stdout
        records = [json.loads(line) for line in out.splitlines() if line.strip()]
        summ = subprocess.run([WANDB, "leet", "inspect", "--summary", "--json", str(d)], capture_output=True,
                              text=True, timeout=120, check=True).stdout
        runs.append({"records": records, "summary": json.loads(summ), "dir": d})
    return runs


def history(run: dict) -> list[dict]:
    return [r["history"]["item"] for r in run["records"] if r["type"] == "history"]


def prompt_mean(df: pd.DataFrame, keys: list[str]) -> pd.Series:
    """Mean over positions/steps within a prompt, then over prompts."""
    return df.groupby([*keys, "prompt_id"])["value"].mean().groupby(keys).mean()


def history_curves(hist: list[dict], axis: str) -> dict:
    """{(context, space, metric, x): value} from the W&B history rows logged against `axis`/index."""
    got = {}
    for h in hist:
        if f"{axis}/index" in h:
            for k, v in h.items():
                if k.startswith(f"{axis}/") and k != f"{axis}/index":
                    _, ctx, space, metric = k.split("/")
                    got[(ctx, space, metric, int(h[f"{axis}/index"]))] = v
    return got


def test_offline_run_holds_curves_config_and_scores(tmp_path):
    df = synthetic_probes()
    tr = tracker(tmp_path, group="unit-group", tags=["t1"])
    assert tr.enabled and tr.mode == "offline"
    pruning = {"achieved_sparsity": 0.5, "target": "2:4", "modules": {"layers.0.mlp.up_proj": 0.5,
                                                                       "layers.1.self_attn.q_proj": 0.5},
               "nm_check": {"pattern": "2:4", "holds": True}}
    tr.log_pruning(pruning)
    tr.log_probes(df, {"probability": {"kl": 0.25}})
    evals = {"tasks": {"arith_mc": {"type": "multiple_choice", "metric": "acc", "dense": 0.6, "pruned": 0.45,
                                    "abs_change": -0.15, "rel_change": -0.25}},
             "mc_vs_gen_gap": 0.1}
    tr.log_evals(evals)
    tr.log_summary({"status": "complete", "achieved_sparsity": 0.5, "timings_s": {"total": 1.5}})
    tr.finish(0)

    runs = read_runs(tmp_path / "wandb")
    assert len(runs) == 1
    run = runs[0]
    rec = {r["type"]: r[r["type"]] for r in run["records"] if r["type"] == "run"}["run"]
    assert rec["run_group"] == "unit-group"
    assert rec["display_name"] == "tiny/wanda/2:4"
    assert set(rec["tags"]) >= {"t1", "tiny", "wanda", "sparsity=2:4"}
    config = run["summary"]["config"]
    assert config["model"]["name"] == "tiny" and config["sparsity"] == "2:4" and config["config_hash"]

    hist = history(run)
    steps = [h["_step"] for h in hist]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # explicit, increasing steps
    # curves vs layer: the mean over prompts (and decoding steps) of every (context, space, metric, layer)
    t1 = df[df["temperature"] == 1.0]
    expected = prompt_mean(t1, ["context", "space", "metric", "layer"])
    got = history_curves(hist, "layer")
    assert len(got) == len(expected)
    for key, v in expected.items():
        assert got[key] == pytest.approx(v, rel=1e-9)
    # curves vs decoding step, teacher-forced and free-running
    tf_fr = t1[(t1["step"] >= 0) & (t1["layer"] == 4)]
    exp_step = prompt_mean(tf_fr, ["context", "space", "metric", "step"])
    got_step = history_curves(hist, "step")
    assert {k[0] for k in got_step} == {"teacher_forced", "free_running"}
    for key, v in exp_step.items():
        assert got_step[key] == pytest.approx(v, rel=1e-9)

    # line plots: a vega panel per plot, and its table file with the plotted points
    config_updates = [r["config"]["update"] for r in run["records"] if r["type"] == "config"]
    panels = {k.split("_wandb.visualize.", 1)[1] for u in config_updates for k in u if "visualize" in k}
    for space in ("embedding", "logit", "probability"):
        assert f"plots/{space}/similarity_vs_layer" in panels
        assert f"plots/{space}/divergence_vs_layer" in panels
        assert f"plots/{space}/divergence_vs_step" in panels
    summary = run["summary"]["summary"]
    tbl = summary["plots/probability/divergence_vs_step_table"]
    data = json.loads((run["dir"] / "files" / tbl["path"]).read_text())
    cols = data["columns"]
    assert cols == ["context", "step", "kl"]
    for ctx, step, v in data["data"]:
        assert v == pytest.approx(exp_step[(ctx, "probability", "kl", step)], rel=1e-9)

    # evals, pruning, summary
    assert summary["eval/arith_mc/pruned"] == pytest.approx(0.45)
    assert summary["eval/mc_vs_gen_gap"] == pytest.approx(0.1)
    assert summary["pruning/achieved_sparsity"] == pytest.approx(0.5)
    assert summary["run/status"] == "complete"
    assert summary["probes/probability/kl"] == pytest.approx(0.25)
    assert run["summary"]["exit_code"] == 0


OFFLINE_RUN_IN_A_FRESH_PROCESS = r"""
import atexit, socket, sys
attempts = []
def refuse(*a, **k):
    attempts.append(repr(a[:1]))
    raise OSError("network blocked by the test")
socket.getaddrinfo = refuse
socket.socket.connect = lambda self, address, _real=socket.socket.connect: (
    _real(self, address) if self.family == socket.AF_UNIX else refuse(address))
atexit.register(lambda: print("ATTEMPTS", attempts, flush=True))  # registered first, so it runs last
sys.path.insert(0, sys.argv[2])
from helpers import synthetic_probes, tracker
tr = tracker(sys.argv[1])
tr.log_probes(synthetic_probes(), {"probability": {"kl": 0.25}})  # run.log(): what wandb meters
tr.log_summary({"status": "complete"})
tr.finish(0)
"""


def test_an_offline_run_never_touches_the_network(tmp_path):
    """Not while it runs, and not when the process exits (wandb >= 0.31 exports its own usage metrics
    from a background thread and at exit, whatever the run's mode, unless prunerep turns that off)."""
    out = subprocess.run([sys.executable, "-c", OFFLINE_RUN_IN_A_FRESH_PROCESS, str(tmp_path), str(REPO / "tests")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ATTEMPTS []" in out.stdout, out.stdout[-2000:]
    assert len(read_runs(tmp_path / "wandb")) == 1


def test_disabled_writes_nothing(tmp_path):
    tr = tracker(tmp_path, mode="disabled")
    assert not tr.enabled
    tr.log_probes(synthetic_probes(), {})
    tr.log_summary({"status": "complete"})
    tr.finish(0)
    assert not (tmp_path / "wandb").exists()


def test_group_defaults_to_the_sweep_dir_name(tmp_path):
    """Without wandb.group the group is the multirun's sweep directory's name; a single run has none."""
    sweep = tmp_path / "2026-11-25_10-00-00"
    assert identity(make_cfg(), tmp_path / "run", sweep).group == "2026-11-25_10-00-00"
    assert identity(make_cfg(), tmp_path / "run").group is None
    assert identity(make_cfg(group="g"), tmp_path / "run", sweep).group == "g"
    assert identity(make_cfg(), tmp_path / "run").name == "tiny/wanda/2:4"
    assert identity(make_cfg(name="custom"), tmp_path / "run").name == "custom"
    tr = tracker(tmp_path / "run", sweep)
    assert tr.run.group == "2026-11-25_10-00-00" and tr.run.name == "tiny/wanda/2:4"
    tr.finish(0)


def test_online_without_a_server_falls_back_offline_quickly(tmp_path, monkeypatch, caplog):
    """A server that accepts connections and never answers (worst case: no error, just silence)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{srv.getsockname()[1]}")
    monkeypatch.setenv("WANDB_API_KEY", "bogus" * 8)
    with caplog.at_level(logging.WARNING, logger="prunerep.tracking"):
        tr = tracker(tmp_path, mode="online", init_timeout=5)
        tr.log_summary({"status": "complete"})
        tr.finish(0)
    srv.close()
    assert any("offline" in r.message for r in caplog.records)
    runs = read_runs(tmp_path / "wandb")
    assert len(runs) == 1 and runs[0]["summary"]["summary"]["run/status"] == "complete"


def test_bad_api_key_never_raises(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_API_KEY", "short")  # rejected by wandb before any network
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    with caplog.at_level(logging.WARNING, logger="prunerep.tracking"):
        tr = tracker(tmp_path, mode="online", init_timeout=5)
        tr.log_probes(synthetic_probes(), {})
        tr.finish(0)
    assert not tr.enabled  # no run: every call was a no-op
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and all(w.startswith("wandb: ") for w in warnings)
    assert any("API key" in w or "api_key" in w or "offline" in w for w in warnings), warnings


def test_wandb_crash_mid_run_warns_once_then_noop(tmp_path, caplog):
    tr = tracker(tmp_path)
    assert tr.enabled
    calls = []

    def broken_log(*a, **k):
        calls.append(1)
        raise RuntimeError("wandb service died")

    tr.run.log = broken_log
    with caplog.at_level(logging.WARNING, logger="prunerep.tracking"):
        tr.log_pruning({"achieved_sparsity": 0.5, "modules": {"layers.0.q": 0.5}})
        tr.log_probes(synthetic_probes(), {})
        tr.log_evals({"tasks": {}})
        tr.log_summary({"status": "complete"})
        tr.finish(0)
    assert len(calls) == 1  # the tracker went quiet after the first failure
    assert not import_hooks._post_import_hooks  # torn down: no wandb hook runs on later imports
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "wandb service died" in warnings[0].getMessage()


# --------------------------------------------------------------------------- through the pipeline

def _pipeline_env(tmp_path):
    env = dict(os.environ, PRUNEREP_OUTPUTS=str(tmp_path / "outputs"), HYDRA_FULL_ERROR="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("WANDB_MODE", None)
    return env


def test_pipeline_run_logs_offline(tmp_path):
    """A 2-point multirun: each run dir holds an offline wandb run with its curves, in the sweep's group."""
    sweep = tmp_path / "sweep_wandb"
    cmd = [sys.executable, "-m", "prunerep", "-m", "model=tiny", "task=none", "pruner=magnitude",
           "sparsity=0.3,0.5", "probe.n_prompts=2", "probe.max_new_tokens=4", "probe.max_prompt_tokens=32",
           "probe.transitions=true", "wandb.mode=offline", f"hydra.sweep.dir={sweep}"]
    p = subprocess.run(cmd, cwd=tmp_path, env=_pipeline_env(tmp_path), capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    run_dirs = sorted(d.parent for d in sweep.glob("*/summary.json"))
    assert len(run_dirs) == 2
    for d in run_dirs:
        summary = json.loads((d / "summary.json").read_text())
        assert summary["status"] == "complete", summary.get("error")
        runs = read_runs(d / "wandb")
        assert len(runs) == 1
        run = runs[0]
        rec = next(r["run"] for r in run["records"] if r["type"] == "run")
        assert rec["run_group"] == sweep.name
        assert rec["display_name"] == f"tiny/magnitude/{summary['sparsity']:g}"
        s = run["summary"]["summary"]
        assert s["run/status"] == "complete"
        assert s["pruning/achieved_sparsity"] == pytest.approx(summary["achieved_sparsity"])
        # the probe curves of probes.parquet are in the wandb history, value for value
        df = pd.read_parquet(d / "probes.parquet")
        df = df[(df["sublayer"] == "block") & (df["temperature"].isna() | (df["temperature"] == 1.0))]
        by_layer = prompt_mean(df, ["context", "space", "metric", "layer"])
        tf_fr = df[df["context"].isin(["teacher_forced", "free_running"]) & (df["step"] >= 0)]
        tf_fr = tf_fr[tf_fr["layer"] == tf_fr.groupby(["context", "space"])["layer"].transform("max")]
        by_step = prompt_mean(tf_fr, ["context", "space", "metric", "step"])
        logged = {}
        for h in history(run):
            for axis in ("layer", "step"):
                if f"{axis}/index" in h:
                    for k, v in h.items():
                        if k.startswith(f"{axis}/") and k != f"{axis}/index":
                            _, ctx, space, metric = k.split("/")
                            logged[(axis, ctx, space, metric, int(h[f"{axis}/index"]))] = v
        finite = [(("layer", *k), v) for k, v in by_layer.items() if np.isfinite(v)]
        finite += [(("step", *k), v) for k, v in by_step.items() if np.isfinite(v)]
        assert finite and {k[0] for k, _ in finite} == {"layer", "step"}
        for key, v in finite:
            assert logged[key] == pytest.approx(v, rel=1e-9, abs=1e-12), key
        for space in ("embedding", "logit", "probability"):
            assert f"plots/{space}/divergence_vs_step_table" in s
        # the top-token table and the sublayer transitions (issue #9) are in the run too
        top = pd.read_parquet(d / "top_tokens.parquet")
        assert _logged_table(d, "probes/top_tokens")["p_pruned"].tolist() == pytest.approx(top["p_pruned"].tolist())
        assert set(_logged_table(d, "probes/transitions")["comparison"]) == {"transition_dense", "transition_pruned",
                                                                            "local"}


def _logged_table(run_dir: Path, key: str) -> pd.DataFrame:
    """The last W&B table logged under ``key``, read from the offline run's media files."""
    files = sorted((run_dir / "wandb").rglob(f"media/table/{key}_*.table.json"))
    assert files, f"no table {key} in the offline run"
    t = json.loads(files[-1].read_text())
    return pd.DataFrame(t["data"], columns=t["columns"])


def test_transitions_and_top_tokens_are_logged_as_tables(tmp_path):
    """Issue #9: the transition curves (mean over positions, then prompts) and the top-token table in W&B."""
    rows = []
    for pid, (attn, mlp) in enumerate([(1.0, 10.0), (3.0, 30.0)]):  # two prompts, two positions each
        for pos in range(2):
            for sub, v in (("attn_transition_dense", attn), ("mlp_transition_dense", mlp)):
                rows.append(("prompt", pid, 1, sub, pos, "probability", "kl", 1.0, v + pos))
    rows.append(("prompt", 0, 1, "block", -1, "probability", "kl", 1.0, 0.5))
    df = pd.DataFrame(rows, columns=["context", "prompt_id", "layer", "sublayer", "step", "space", "metric",
                                     "temperature", "value"]).astype({"prompt_id": "int32", "layer": "int16",
                                                                      "step": "int32"})
    top = pd.DataFrame({"prompt_id": [0, 0], "prompt_kind": ["mc", "mc"], "where": ["answer", "answer"],
                        "position": [7, 7], "rank": [0, 1], "token_id": [11, 12], "token": [" A", " B"],
                        "temperature": [1.0, 1.0], "p_dense": [0.6, 0.3], "p_pruned": [0.2, 0.7]})
    tr = tracker(tmp_path)
    tr.log_probes(df, {}, top_tokens=top)
    tr.finish(0)
    curves = _logged_table(tmp_path, "probes/transitions").set_index(["sublayer", "layer"])["value"]
    # attn: prompt 0 mean(1, 2) = 1.5, prompt 1 mean(3, 4) = 3.5 -> 2.5; mlp: mean(10.5, 30.5) = 20.5
    assert curves[("attn_transition_dense", 1)] == pytest.approx(2.5)
    assert curves[("mlp_transition_dense", 1)] == pytest.approx(20.5)
    logged_top = _logged_table(tmp_path, "probes/top_tokens")
    assert logged_top["token"].tolist() == [" A", " B"] and logged_top["p_pruned"].tolist() == [0.2, 0.7]
    summary = read_runs(tmp_path / "wandb")[0]["summary"]["summary"]
    assert "plots/probability/transitions_transition_dense_kl_table" in summary


def test_items_are_logged_as_a_table(tmp_path):
    """Issue #21: items.parquet as the W&B table ``items``, its per-layer list columns left out."""
    items = pd.DataFrame({"task": ["arith_cloze", "arith_gen"], "item": ["0", "0"],
                          "family": ["multiple_choice", "generative"], "dense_score": [1.0, 1.0],
                          "pruned_score": [0.0, 1.0], "lost": [True, False], "options_kl": [0.25, np.nan],
                          "layers": [[0, 1], [0, 1]], "h_one_minus_cos_by_layer": [[0.0, 0.1], [0.0, 0.2]]})
    tr = tracker(tmp_path)
    tr.log_items(items)
    tr.finish(0)
    logged = _logged_table(tmp_path, "items")
    assert list(logged.columns) == ["task", "item", "family", "dense_score", "pruned_score", "lost", "options_kl"]
    assert logged["options_kl"].tolist()[0] == 0.25 and pd.isna(logged["options_kl"].tolist()[1])
    assert logged["lost"].tolist() == [True, False]


# --------------------------------------------------------------------------- sweeps (issue #23)

def _run_ids(path: Path) -> list[str]:
    return [next(r["run"] for r in run["records"] if r["type"] == "run")["run_id"] for run in read_runs(path)]


def test_a_point_run_twice_continues_one_run(tmp_path):
    """A requeued or re-run point (same config, same sweep) opens the same W&B run id, derived from
    its config hash and its group; the same config in another sweep is another run."""
    sweep = tmp_path / "2026-12-07_10-00-00"
    for attempt in range(2):
        tr = tracker(tmp_path / "point", sweep)
        tr.log_summary({"status": "failed" if attempt == 0 else "complete"})
        tr.finish(0)
    ids = _run_ids(tmp_path / "point" / "wandb")
    chash = identity(make_cfg(), tmp_path / "point", sweep).config_hash
    by_hand = hashlib.sha256(json.dumps(["wandb-run", chash, sweep.name]).encode()).hexdigest()[:16]
    assert ids == [by_hand, by_hand]
    other = tracker(tmp_path / "other", tmp_path / "2026-12-08_10-00-00")
    other.finish(0)
    assert _run_ids(tmp_path / "other" / "wandb") != [by_hand]


def test_a_reused_point_is_logged_into_the_new_group(tmp_path, monkeypatch):
    """A point completed in one sweep and reused in another (the completed-points index) gets a W&B
    run in the new group, logged from its files: its summary, curves, eval table and per-item table."""
    monkeypatch.delenv("PRUNEREP_OUTPUTS", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    point = ("model=tiny", "pruner=magnitude", "sparsity=0.5", "task.tasks=[arith_cloze,arith_gen]", "task.limit=2",
             "task.n_arith=4", "task.max_gen_toks=4", "probe.n_prompts=2", "probe.max_new_tokens=2",
             "probe.layers=[-1]", "wandb.mode=offline", "skip_completed=true", f"cache_dir={CACHE_DIR}")
    first = run_config(compose(*point, "wandb.group=sweep-a"), tmp_path / "runs" / "a")
    second = run_config(compose(*point, "wandb.group=sweep-b"), tmp_path / "runs" / "b")
    assert second["reused_from"] == str((tmp_path / "runs" / "a").resolve())
    (a,), (b,) = read_runs(tmp_path / "runs" / "a" / "wandb"), read_runs(tmp_path / "runs" / "b" / "wandb")
    rec_a, rec_b = (next(r["run"] for r in run["records"] if r["type"] == "run") for run in (a, b))
    assert (rec_a["run_group"], rec_b["run_group"]) == ("sweep-a", "sweep-b") and rec_a["run_id"] != rec_b["run_id"]
    s = b["summary"]["summary"]
    assert s["run/reused_from"] == second["reused_from"] and s["run/status"] == "complete"
    assert s["pruning/achieved_sparsity"] == pytest.approx(first["achieved_sparsity"])
    evals = json.loads((tmp_path / "runs" / "b" / "evals.json").read_text())
    assert s["eval/arith_cloze/pruned"] == pytest.approx(evals["tasks"]["arith_cloze"]["pruned"])
    assert history_curves(history(b), "layer") == history_curves(history(a), "layer") != {}
    items = pd.read_parquet(tmp_path / "runs" / "b" / "eval_items.parquet")
    assert set(items["task"]) == {"arith_cloze", "arith_gen"} and len(items) == 4
    for run_dir in ("a", "b"):  # the same per-item table in both runs
        logged = _logged_table(tmp_path / "runs" / run_dir, "eval/items")
        assert logged["dense_answer"].tolist() == items["dense_answer"].tolist()
        assert logged["pruned_correct"].tolist() == items["pruned_correct"].astype(object).tolist()
    # the same sweep run again in place reuses the point where it is: no second run
    run_config(compose(*point, "wandb.group=sweep-b"), tmp_path / "runs" / "b")
    assert len(read_runs(tmp_path / "runs" / "b" / "wandb")) == 1


def test_the_sweep_report_is_a_run_in_the_sweeps_group(tmp_path):
    """The report's figures and tables go to the sweep's W&B group as one run of job type report;
    making the report again continues that run."""
    sweep = tmp_path / "2026-12-07_10-00-00"
    run_dir = sweep / "tiny_wanda_0.5_0"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("wandb:\n  mode: offline\n  project: proj\n  group: my-sweep\n")
    other = tmp_path / "2026-12-08_10-00-00" / "tiny_wanda_0.5_0"
    other.mkdir(parents=True)
    out = sweep / "report"
    out.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(out / "kl_vs_sparsity.png")
    runs = pd.DataFrame({"run": ["tiny_wanda_0.5_0"], "run_dir": [str(run_dir)], "status": ["complete"],
                         "achieved_sparsity": [0.5], "error": [None]})
    table = pd.DataFrame({"run": ["tiny_wanda_0.5_0"] * 2, "metric": ["kl", "cos"], "value": [0.25, float("nan")]})
    report = {"out_dir": out, "files": {"kl_png": out / "kl_vs_sparsity.png", "table_csv": out / "sweep.csv"},
              "table": table, "runs": runs, "counts": {"complete": 1},
              "thresholds": {"tiny": {"wanda": {"mc": {"unstructured": "0.5", "nm": None, "tested": []}}}}}
    settings, group = wandb_target(sweep, runs)
    assert (settings.mode, settings.project, group) == ("offline", "proj", "my-sweep")
    assert wandb_target(other.parent, pd.DataFrame({"run_dir": [str(other)]}))[1] == "2026-12-08_10-00-00"
    assert wandb_target(sweep, runs, "disabled")[0].mode == "disabled"
    ids = [log_report(report, settings, group) for _ in range(2)]
    logged = read_runs(out / "wandb")
    assert len(logged) == 2 and ids[0] == ids[1] == _run_ids(out / "wandb")[0] == _run_ids(out / "wandb")[1]
    rec = next(r["run"] for r in logged[0]["records"] if r["type"] == "run")
    assert (rec["run_group"], rec["job_type"], rec["project"]) == ("my-sweep", "report", "proj")
    s = logged[0]["summary"]["summary"]
    assert s["report/kl_vs_sparsity"]["_type"] == "image-file" and s["report/runs_complete"] == 1
    files = logged[0]["dir"] / "files"
    sweep_rows = json.loads((files / s["report/sweep"]["path"]).read_text())
    assert sweep_rows["columns"] == ["run", "metric", "value"] and sweep_rows["data"][0][2] == 0.25
    th = json.loads((files / s["report/thresholds"]["path"]).read_text())
    assert th["data"] == [["tiny", "wanda", "mc", "0.5", None]]
    assert log_report(report, wandb_target(sweep, runs, "disabled")[0], group) is None
