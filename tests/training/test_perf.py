"""Throughput telemetry (livr/training/perf.py, livr/model/flops.py): FLOPs per token against a hand count, perf/* in a real
tiny run's MLflow store."""
import torch
from conftest import tiny_overrides

from livr.config import load_config
from livr.model import flops


def test_flops_per_token_hand_count_qwen25_vl_3b():
    from livr.backbones.registry import preset_parts

    config = preset_parts("size-qwen2.5-vl-3b")[0]
    shallow = preset_parts("size-qwen2.5-vl-3b", 2)[0]  # 2 decoder layers, 2 vision blocks: built on meta quickly
    # Qwen2.5-VL-3B's LM by hand: hidden 2048, 36 layers, 16 query heads and 2 KV heads of 128, MLP 11008 (gated)
    per_layer = 2048 * 2048 + 2 * 2048 * 256 + 2048 * 2048 + 3 * 2048 * 11008  # q, k+v, o, gate+up+down
    n_lm = 36 * per_layer
    assert n_lm == 2_774_532_096  # the published 3.09B minus the 0.31B embedding: 2.77B non-embedding
    lora = 36 * 16 * ((2048 + 2048) * 2 + (2048 + 256) * 2 + (2048 + 11008) * 3)  # r 16 on q,o; k,v; gate,up,down
    attn = 12 * 36 * 16 * 128 * 1000  # fwd 4*L*H*h*S, bwd twice that; S = 1000
    assert flops.lm_params(config) == n_lm
    assert flops.lora_params(config, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"]) == lora
    assert flops.lm_flops_per_token(config, 1000) == 4 * n_lm + 6 * lora + attn == 12_162_465_792

    # the same N counted from the real module's Linear weights (built on the meta device: no memory)
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(shallow)
    lm = model.model.language_model
    counted = sum(m.weight.numel() for m in lm.layers.modules() if isinstance(m, torch.nn.Linear))
    assert counted == 2 * per_layer == flops.lm_params(shallow)
    # vision: 32 blocks of width 1280, gated MLP 3420, forward only, per patch (+ attention within the image)
    v = 2 * 32 * (4 * 1280 * 1280 + 3 * 1280 * 3420)
    assert flops.vision_flops(config, 1, 1) == v + 4 * 32 * 1280
    blocks = sum(m.weight.numel() for m in model.model.visual.blocks.modules() if isinstance(m, torch.nn.Linear))
    assert 2 * blocks * 16 == v  # 2 of the 32 blocks


def test_device_peak_table_and_config():
    assert flops.device_peak_tflops(torch.device("cpu")) is None
    assert flops.device_peak_tflops(torch.device("cpu"), 2.5) == 2.5
    table = dict(flops.PEAK_TFLOPS)
    assert table["H100"] == table["H200"] == 989.0 and table["A100"] == 312.0 and table["L40S"] == 362.0
    names = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA A100-SXM4-80GB": 312.0,
             "NVIDIA L40S": 362.0, "NVIDIA GeForce RTX 4090": 165.0, "NVIDIA A10G": 70.0}
    for name, peak in names.items():
        assert next(p for k, p in flops.PEAK_TFLOPS if k in name) == peak, name


def test_perf_metrics_in_a_real_runs_mlflow_store(backbone_cache, data_cache, tmp_path):
    from mlflow.tracking import MlflowClient

    from livr.training.train import train_worker

    over = tiny_overrides(backbone_cache, data_cache, tmp_path, name="perf", **{
        "train.stage1_steps": 2, "train.stage2_steps": 2, "train.device_peak_tflops": 0.05,
        "data.val_size": 4, "data.test_size": 4, "eval.batch_size": 4,
        # through the packed loader path too (livr/data/packing.py): 2 micro-batches of 2 examples per step
        "train.micro_batch_size": 2, "train.grad_accum": 2, "data.packing": True, "data.max_tokens": 200,
        "tracking.system_metrics": True, "tracking.system_metrics_interval_s": 0.2})  # MLflow's system/* too
    cfg = load_config(None, over)
    import livr.training.train

    steps = []
    real = livr.training.train.train_step

    def spy(lm, engine, cfg, stage, state, micro, ctx):
        steps.append([(b["input_ids"].shape, b["seq_lens"].tolist()) for b in micro])
        return real(lm, engine, cfg, stage, state, micro, ctx)

    livr.training.train.train_step = spy
    try:
        train_worker(cfg)
    finally:
        livr.training.train.train_step = real
    assert len(steps) == 4 and all(sum(len(n) for _, n in s) == 4 for s in steps)  # every example of the step
    assert all(shape[0] == 1 and shape[1] <= 200 for s in steps for shape, n in s if len(n) > 1)
    assert any(len(n) > 1 for s in steps for _, n in s)  # some micro-batch holds several examples
    client = MlflowClient(cfg.tracking.uri)
    run = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])[0]
    keys = ("perf/tokens_per_s", "perf/samples_per_s", "perf/data_wait_share", "perf/fwd_bwd_share",
            "perf/optimizer_share", "perf/peak_mem_mib", "perf/tflops", "perf/mfu")
    for key in keys:
        hist = client.get_metric_history(run.info.run_id, key)
        assert len(hist) == 4, key  # every logged step (log_every 1) of both stages
        for m in hist:
            assert m.value > 0 or key == "perf/data_wait_share" and m.value >= 0, (key, m.value)
            if key.endswith(("_share", "mfu")):
                assert m.value <= 1, (key, m.value)
    shares = [sum(client.get_metric_history(run.info.run_id, k)[i].value for k in keys[2:5]) for i in range(4)]
    assert all(s <= 1 + 1e-6 for s in shares)
    tokens = client.get_metric_history(run.info.run_id, "perf/tokens_per_s")[0].value
    samples = client.get_metric_history(run.info.run_id, "perf/samples_per_s")[0].value
    assert 20 < tokens / samples < 500  # tokens per example of the tiny synthetic rows
    assert len(client.get_metric_history(run.info.run_id, "perf/eval_s")) >= 1
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    mem = client.get_metric_history(run.info.run_id, "system/system_memory_usage_megabytes")
    assert len(cpu) >= 2 and all(0 <= m.value <= 100 for m in cpu), [m.value for m in cpu]  # sampled through the run
    assert mem and all(m.value > 0 for m in mem)
    assert sorted(m.step for m in cpu) == list(range(len(cpu)))
