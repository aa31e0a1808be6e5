"""model.cache_vision (livr/model/vision_cache.py): every family's cached features give the uncached forward bit for bit and
skip the vision encoder; a changed image, processor setting or vision weight misses; entries beyond the memory budget
go to disk and come back from there; a cached training run is identical to the uncached one."""
import os

import pytest
import torch
from conftest import tiny_overrides
from safetensors.torch import load_file

from livr.backbones import TINY_PRESETS
from livr.config import ConfigError, load_config
from livr.data.sequence import collate
from livr.data.synthetic import generate_task
from livr.model.build import build_model
from livr.model.vision_cache import VisionCache, fingerprint


def _lm(backbone_cache, data_cache, tmp_path, backbone="tiny-qwen2.5-vl", **extra):
    cfg = load_config(None, tiny_overrides(backbone_cache, data_cache, tmp_path, **{
        "model.backbone": backbone, "model.cache_vision": True, "lora.dropout": 0.0, **extra}))
    lm = build_model(cfg)
    lm.model.eval()
    return lm


def _rows():  # 3 images + 3 images + 1 + 1: multi- and single-image examples, padded
    return generate_task("Visual_Similarity", 2, seed=3, split="val") + generate_task("Counting", 2, seed=3, split="val")


def _batch(lm, rows):
    return collate([lm.builder.encode(r) for r in rows], lm.tokenizer.pad_token_id)


def _encoder_calls(lm) -> list:
    """Counts forwards of the vision encoder (the top frozen module: visual / vision_tower)."""
    calls = []
    inner = lm.vision_cache.inner
    tower = getattr(inner, "visual", None) or inner.vision_tower
    tower.register_forward_hook(lambda *a: calls.append(1))
    return calls


def _uncached(lm, fn):
    cache, lm.vision_cache = lm.vision_cache, None
    try:
        with torch.no_grad():
            return fn()
    finally:
        lm.vision_cache = cache


@pytest.mark.parametrize("backbone", TINY_PRESETS)
def test_cached_features_give_the_uncached_forward_and_skip_the_encoder(backbone, backbone_cache, data_cache, tmp_path):
    lm = _lm(backbone_cache, data_cache, tmp_path, backbone)
    batch = _batch(lm, _rows())
    n_images = batch["image_keys"].shape[0]
    assert n_images == 8
    # the loader workers' per-row digests are the batch's own
    mm = {k: batch[k] for k in lm.family.forward_keys if k in batch}
    assert torch.equal(batch["image_keys"], lm.vision_cache.keys(mm))
    calls = _encoder_calls(lm)
    with torch.no_grad():
        first = [lm.forward(batch, bottleneck=b) for b in (True, False)]
        assert len(calls) == 1 and lm.vision_cache.misses == n_images
        second = [lm.forward(batch, bottleneck=b) for b in (True, False)]
        nll = lm.answer_nll(batch, bottleneck=True)[0]
    assert len(calls) == 1, "every image came from the cache: the encoder did not run again"
    assert lm.vision_cache.hits == 4 * n_images  # 5 passes, the first encodes
    with torch.no_grad():  # a batch encoded without the loader's digests finds the same entries
        lm.forward({k: v for k, v in batch.items() if k != "image_keys"}, bottleneck=True)
    assert (lm.vision_cache.hits, lm.vision_cache.misses, len(calls)) == (5 * n_images, n_images, 1)
    want = _uncached(lm, lambda: [lm.forward(batch, bottleneck=b) for b in (True, False)])
    want_nll = _uncached(lm, lambda: lm.answer_nll(batch, bottleneck=True)[0])
    for got in (first, second):
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert torch.equal(nll, want_nll)


def test_a_changed_image_processor_setting_or_vision_weight_misses(backbone_cache, data_cache, tmp_path):
    lm = _lm(backbone_cache, data_cache, tmp_path, "tiny-qwen3-vl")
    cache, rows = lm.vision_cache, _rows()
    with torch.no_grad():
        lm.forward(_batch(lm, rows), bottleneck=True)
        assert (cache.hits, cache.misses) == (0, 8)
        lm.forward(_batch(lm, rows), bottleneck=True)
        assert (cache.hits, cache.misses) == (8, 8)
        changed = [dict(r) for r in rows]
        img = changed[2]["image_1"].copy()
        img.putpixel((0, 0), tuple(255 - c for c in img.getpixel((0, 0))))
        changed[2]["image_1"] = img
        batch = _batch(lm, changed)
        got = lm.forward(batch, bottleneck=True)
        assert cache.misses == 9, "one changed pixel: that image alone misses"
        assert torch.equal(got, _uncached(lm, lambda: lm.forward(batch, bottleneck=True)))
        ip = lm.builder.processor.image_processor
        ip.image_mean = [0.4, 0.5, 0.5]  # a processor setting: every image's pixels change
        lm.forward(_batch(lm, rows), bottleneck=True)
        assert cache.misses == 17
        ip.image_mean = [0.5] * 3
        lm.forward(_batch(lm, rows), bottleneck=True)
        assert cache.misses == 17
    salt = fingerprint(lm.model, lm.family, lm.dtype, lm.device)
    assert salt == cache.salt
    lora = next(p for n, p in lm.model.named_parameters() if "lora_A" in n)
    with torch.no_grad():
        lora.add_(1.0)  # training changes LoRA and the latents, never the features
        assert fingerprint(lm.model, lm.family, lm.dtype, lm.device) == salt
        w = cache.inner.visual.blocks[0].mlp.linear_fc1.weight
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(1.0))  # one ulp of one vision weight
    assert fingerprint(lm.model, lm.family, lm.dtype, lm.device) != salt
    cache.inner.config.vision_config.deepstack_visual_indexes = []  # a vision setting
    w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(-1.0))
    assert fingerprint(lm.model, lm.family, lm.dtype, lm.device) != salt


def test_beyond_the_memory_budget_entries_go_to_disk_and_come_back(backbone_cache, data_cache, tmp_path):
    disk = tmp_path / "vision"
    lm = _lm(backbone_cache, data_cache, tmp_path, **{"model.vision_cache_mib": 0, "model.vision_cache_dir": str(disk)})
    batch = _batch(lm, _rows())
    with torch.no_grad():
        want = lm.forward(batch, bottleneck=True)
    files = sorted(str(p) for p in disk.rglob("*.safetensors"))
    assert len(files) == 8 and not lm.vision_cache.mem, "0 MiB of memory: every entry on disk"
    assert not list(disk.rglob("*.tmp"))
    fresh = _lm(backbone_cache, data_cache, tmp_path, **{"model.vision_cache_mib": 0, "model.vision_cache_dir": str(disk)})
    calls = _encoder_calls(fresh)
    with torch.no_grad():
        got = fresh.forward(batch, bottleneck=True)
    assert (fresh.vision_cache.disk_hits, fresh.vision_cache.misses, len(calls)) == (8, 0, 0)
    assert torch.equal(got, want)
    with open(files[0], "wb") as f:  # a damaged entry is encoded again and rewritten
        f.write(b"\0" * 8)
    again = _lm(backbone_cache, data_cache, tmp_path, **{"model.vision_cache_mib": 0, "model.vision_cache_dir": str(disk)})
    with torch.no_grad():
        assert torch.equal(again.forward(batch, bottleneck=True), want)
    assert again.vision_cache.misses == 1
    load_file(files[0])
    # no directory and no memory: nothing is kept, every pass encodes
    bare = _lm(backbone_cache, data_cache, tmp_path, **{"model.vision_cache_mib": 0})
    with torch.no_grad():
        bare.forward(batch, bottleneck=True)
        bare.forward(batch, bottleneck=True)
    assert (bare.vision_cache.hits, bare.vision_cache.misses, bare.vision_cache.dropped) == (0, 16, 16)


def test_a_vision_tower_with_dropout_and_zero3_are_refused(backbone_cache, data_cache, tmp_path):
    lm = _lm(backbone_cache, data_cache, tmp_path)
    lm.vision_cache.inner.visual.blocks[0].drop = torch.nn.Dropout(0.1)
    with pytest.raises(ConfigError, match="model.cache_vision: .*visual.blocks.0.drop has dropout 0.1"):
        VisionCache(lm.model, lm.family, lm.dtype, lm.device, 64)
    cfg = load_config(None, tiny_overrides(backbone_cache, data_cache, tmp_path, **{"model.cache_vision": True}))
    with pytest.raises(ConfigError, match="model.cache_vision=true under ZeRO-3"):
        build_model(cfg, loading=object())  # (what livr.training.ds_setup.zero3_loading returns for a ZeRO-3 config)


def _metric(cfg, key):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking.uri)
    run = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                             f"tags.mlflow.runName = '{cfg.name}'")[0]
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def test_a_cached_training_run_is_identical_to_the_uncached_one(backbone_cache, data_cache, tmp_path):
    from livr.training.train import train_worker

    runs = {}
    for cached in (False, True):  # 2 epochs per stage: epoch 2 and every evaluation read the cache
        cfg = load_config(None, tiny_overrides(backbone_cache, data_cache, tmp_path, **{
            "name": f"cached_{cached}", "model.backbone": "tiny-qwen3-vl", "model.cache_vision": cached,
            "data.train_size": 8, "train.stage1_steps": 4, "train.stage2_steps": 4, "optim.lr": 1e-2}))
        runs[cached] = (cfg, train_worker(cfg))
    (plain, a), (cached, b) = runs[False], runs[True]
    assert a == b  # accuracies, best validation, steps
    for name in ("adapter/adapter_model.safetensors", "latents.safetensors"):
        x, y = (load_file(os.path.join(c.run_dir, name)) for c in (plain, cached))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    for key in ("stage1/loss", "stage2/loss", "val_accuracy"):
        assert _metric(plain, key) == _metric(cached, key), key
    hit_rate = _metric(cached, "vision_cache/hit_rate")
    assert hit_rate[0] == 0 and hit_rate[-1] > 0.5, hit_rate
