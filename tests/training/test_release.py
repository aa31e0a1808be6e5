"""A run releases its model when it ends, however it ends (livr.training.lifecycle.Lifecycle.release).

A DeepSpeed engine is not garbage-collected on its own: its hooks close a cycle through autograd's C++ state, and
ZeRO-3 keeps the root module in `parameter_offload.FWD_MODULE_STACK` and its parameter coordinator in a class-wide
lru_cache. Without the release, the model and its optimizer state outlive `train_worker` in the process; on a GPU
the next run in that process (the demo, a script or notebook that trains twice) starts with the
previous model still in memory. Measured before the fix: the torch engine's model was collected, ZeRO-2's and
ZeRO-3's were not."""
import gc
import json
import weakref
from pathlib import Path

import pytest
from conftest import tiny_overrides
from safetensors.torch import load_file

from livr.config import load_config
from livr.training.nonfinite import NonFiniteError

ENGINES = {"torch": {}, "zero2": {"distributed.deepspeed": "deepspeed_configs/zero2.json"},
           "zero3": {"distributed.deepspeed": "deepspeed_configs/zero3.json"}}


def _run(backbone_cache, data_cache, tmp_path, monkeypatch, engine: str, **extra) -> tuple[list, object]:
    """Train a 1+1-step tiny run; weak references to the model train_worker built, and its result or error."""
    from livr.training import train

    built, build = [], train.build_model

    def spy(*args, **kwargs):
        lm = build(*args, **kwargs)
        built.append(weakref.ref(lm.model))
        return lm

    monkeypatch.setattr(train, "build_model", spy)
    cfg = load_config(None, tiny_overrides(backbone_cache, data_cache, tmp_path, name=engine, **{
        "train.stage1_steps": 1, "train.stage2_steps": 1, "eval.splits": "[val]", "data.num_workers": 0,
        **ENGINES[engine], **extra}))
    try:
        result = train.train_worker(cfg)
    except NonFiniteError as e:
        result = type(e)  # (not the exception itself: its traceback's frames hold the run's locals)
    return built, result


def test_the_model_is_collectable_after_the_run(backbone_cache, data_cache, tmp_path, monkeypatch):
    """The torch engine (ZeRO-2 and ZeRO-3: the run below, stopped, then resumed to its end)."""
    built, result = _run(backbone_cache, data_cache, tmp_path, monkeypatch, "torch")
    assert result["global_step"] == 2 and len(built) == 1
    gc.collect()
    assert built[0]() is None, "torch: the model outlived train_worker"


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_a_run_stopped_at_its_first_step_releases_its_model_and_resumes(engine, backbone_cache, data_cache, tmp_path,
                                                                        monkeypatch):
    """Non-finite at step 1 with train.nonfinite=stop: no AdamW state exists yet (ZeRO skipped the step), and the
    checkpoint is still written (was a KeyError: 'step' from the moments gather) and resumed (AdamW fresh)."""
    monkeypatch.setenv("LIVR_NAN_AT_STEPS", "1")
    built, result = _run(backbone_cache, data_cache, tmp_path, monkeypatch, engine, **{"train.nonfinite": "stop"})
    assert result is NonFiniteError
    gc.collect()
    assert built[0]() is None, f"{engine}: a failed run's model outlived train_worker"
    state = json.loads(Path(tmp_path, "runs", engine, "checkpoints", "last", "state.json").read_text())
    assert (state["global_step"], state["nonfinite_skips"]) == (1, 1)
    assert not load_file(str(Path(tmp_path, "runs", engine, "checkpoints", "last", "optimizer.safetensors")))
    monkeypatch.delenv("LIVR_NAN_AT_STEPS")
    built, final = _run(backbone_cache, data_cache, tmp_path, monkeypatch, engine, **{"train.nonfinite": "stop"})
    assert final["global_step"] == 2 and final["resumed_from"] == [1], final
    gc.collect()
    assert built[0]() is None, f"{engine}: the model outlived train_worker"
