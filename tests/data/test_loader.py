"""The streaming data path: memory-mapped rows, per-rank micro-batches encoded in loader workers, exactly the
global batches of the eager reference; bad rows stay one-line errors; the pixel budget is configurable."""
import pytest
import torch
from conftest import tiny_overrides

from livr.config import ConfigError, load_config
from livr.data.loader import EncodedRows, Rows, checked, make_loader, micro_batches, shutdown_loaders
from livr.data.sequence import collate
from livr.data.splits import load_splits
from livr.data.synthetic import generate_task
from livr.data.tasks import DataError
from livr.model.build import build_model


def _cfg(backbone_cache, data_cache, tmp_path, **extra):
    return load_config(None, tiny_overrides(backbone_cache, data_cache, tmp_path, **extra))


@pytest.fixture(scope="module")
def lm_rows(tmp_path_factory, backbone_cache, data_cache):
    tmp = tmp_path_factory.mktemp("loader")
    cfg = _cfg(backbone_cache, data_cache, tmp, **{"data.tasks": "[Counting, Jigsaw]", "data.train_size": 10})
    return cfg, build_model(cfg), load_splits(cfg)


def test_splits_stay_in_memory_mapped_arrow(lm_rows):
    _, _, splits = lm_rows
    train = splits["train"]
    assert isinstance(train, Rows) and len(train) == 20 and len(train.parts) == 2
    assert all(p.cache_files for p in train.parts), "rows must be read from Arrow files, not held as Python objects"
    assert train.column("sub_task") == ["Counting"] * 10 + ["Jigsaw"] * 10
    assert train[12]["idx"] == train.parts[1][2]["idx"] and train[-1]["idx"] == train.parts[1][9]["idx"]
    assert [r["idx"] for r in train[8:13]] == [train[i]["idx"] for i in range(8, 13)]
    assert [r["idx"] for r in train[1:18:4]] == [train[i]["idx"] for i in range(1, 18, 4)]


def _expected_micro(n, seed, stage, step, mb, accum, world, rank):
    """The spec of the global batches, written out: epoch e of stage s orders the rows by
    randperm(n, seed*1000 + s*100 + e); global batch k is order[k*G:(k+1)*G] with G = mb*accum*world; micro-batch
    a of rank r is its rows (a*world + r)*mb … +mb."""
    g = mb * accum * world
    per_epoch = n // g
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + stage * 100 + epoch)).tolist()
    chunk = order[k * g : (k + 1) * g]
    return [chunk[(a * world + rank) * mb : (a * world + rank + 1) * mb] for a in range(accum)]


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("start", [0, 3])  # from step 0, and a resume in the middle of epoch 1
def test_loader_batches_equal_the_eager_reference(world, start, lm_rows):
    _, lm, splits = lm_rows
    rows = splits["train"]
    eager = [lm.builder.encode(r) for r in rows]  # the reference: every row encoded up front, in the main process
    pad = lm.tokenizer.pad_token_id
    steps, mb, accum = 6, 2, 2  # 20 rows / (2*2*world) -> 5 (1 rank) or 2 (2 ranks) steps per epoch
    for rank in range(world):
        batches = micro_batches(len(rows), seed=7, stage=1, start_step=start, steps=steps, micro_batch=mb, accum=accum,
                                world=world, rank=rank)
        got = [checked(b) for b in make_loader(EncodedRows(rows, lm.builder), batches, pad, num_workers=2)]
        assert len(got) == (steps - start) * accum
        for step in range(start, steps):
            want = _expected_micro(len(rows), 7, 1, step, mb, accum, world, rank)
            for a, idx in enumerate(want):
                batch = got[(step - start) * accum + a]
                ref = collate([eager[i] for i in idx], pad)
                assert [m["idx"] for m in batch["meta"]] == [rows[i]["idx"] for i in idx]
                assert batch.keys() - {"meta"} == ref.keys()
                for key in ref:
                    assert torch.equal(batch[key], ref[key]), (rank, step, a, key)


@pytest.fixture
def stop_loaders():
    """The test's loader workers stopped when it ends (livr.data.loader.shutdown_loaders): an iterator left
    half-read (in a traceback) is otherwise stopped by the garbage collector inside whatever a later test is doing,
    where torch's shutdown waited out its 5 s join timeouts (10 s a test)."""
    yield
    shutdown_loaders()


def test_a_bad_row_in_a_worker_is_a_one_line_error(lm_rows, stop_loaders):
    _, lm, _ = lm_rows
    rows = [dict(r) for r in generate_task("Counting", 3, seed=0)]
    rows[2] = dict(rows[2], idx="Counting_bad_3", image_1=b"not an image")
    loader = make_loader(EncodedRows(Rows([rows]), lm.builder), [[0, 1], [2]], lm.tokenizer.pad_token_id, num_workers=1)
    it = iter(loader)
    checked(next(it))
    with pytest.raises(DataError) as e:
        checked(next(it))
    assert "Counting_bad_3" in str(e.value) and "\n" not in str(e.value) and "worker" not in str(e.value)


@pytest.mark.slow
def test_a_truncated_image_passes_loading_and_fails_when_encoded_naming_its_row(lm_rows, tmp_path, stop_loaders):
    """Loading checks image headers only (cheap at 6k rows); the full decode happens in a loader worker, and a
    file damaged past its header is then the same one-line error naming task and idx."""
    import io

    from livr.data.blink import load_blink

    _, lm, _ = lm_rows
    rows = [dict(r) for r in generate_task("Counting", 3, seed=0)]
    buf = io.BytesIO()
    rows[1]["image_1"].convert("RGB").save(buf, format="JPEG")
    rows[1]["image_1"] = {"bytes": buf.getvalue()[: len(buf.getvalue()) // 2], "path": None}  # cut in half
    rows[1]["idx"] = "Counting_cut_1"
    import datasets

    from livr.data.synthetic import features

    datasets.Dataset.from_list(rows, features=features()).save_to_disk(str(tmp_path / "Counting" / "val"))
    ds = load_blink("Counting", "val", str(tmp_path))  # the header is fine: accepted
    loader = make_loader(EncodedRows(Rows([ds]), lm.builder), [[0], [1]], lm.tokenizer.pad_token_id, num_workers=1)
    it = iter(loader)
    checked(next(it))
    with pytest.raises(DataError) as e:
        checked(next(it))
    assert str(e.value).startswith("Counting idx=Counting_cut_1") and "\n" not in str(e.value)


@pytest.mark.slow
def test_pixel_budget_caps_image_tokens(backbone_cache, data_cache, tmp_path):
    row = generate_task("Counting", 1, seed=0, image_size=224)[0]
    image_id = None
    counts = {}
    for cap in (0, 112 * 112):
        lm = build_model(_cfg(backbone_cache, data_cache, tmp_path, **{"data.max_pixels": cap}))
        image_id = lm.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        counts[cap] = int((lm.builder.encode(row)["input_ids"] == image_id).sum())
    assert counts[0] == 64 and counts[112 * 112] == 16  # 224 px -> 16x16 patches / merge 2; capped: 112 px
    with pytest.raises(ConfigError, match="data.max_pixels"):
        _cfg(backbone_cache, data_cache, tmp_path, **{"data.max_pixels": 100, "data.min_pixels": 200})
    with pytest.raises(ConfigError, match="LlavaOnevision.*pixel budget"):
        build_model(_cfg(backbone_cache, data_cache, tmp_path, **{"model.backbone": "tiny-llava-onevision",
                                                                  "data.max_pixels": 12544}))


def test_encoded_rows_cache_is_bounded_and_returns_equal_items(lm_rows):
    _, lm, splits = lm_rows
    rows = splits["train"]
    one = EncodedRows(rows, lm.builder)[0]
    size = sum(v.numel() * v.element_size() for v in one.values() if torch.is_tensor(v))
    data = EncodedRows(rows, lm.builder, cache_bytes=int(2.5 * size))
    first = [data[i] for i in range(4)]
    assert sorted(data._cache) == [0, 1]  # the budget holds two rows: the first two are kept, no more
    for i in range(4):
        again = collate_meta(data[i])
        assert again[1] == first[i]["meta"]
        for k, v in again[0].items():
            assert torch.equal(v, first[i][k])
    assert data[0]["meta"] == first[0]["meta"]  # still whole after a consumer popped its copy's meta


def collate_meta(item):
    """What collate_rows does to an item: pop its meta (the cache must not lose it)."""
    meta = item.pop("meta")
    return item, meta


_KEEP_A_LOADER_ALIVE_AT_EXIT = """
import sys
from livr.data.loader import make_loader
class Rows:
    def __len__(self): return 8
    def __getitem__(self, i): return {"_error": f"row {i}"}
loader = make_loader(Rows(), [[0, 1], [2, 3], [4, 5], [6, 7]], 0, num_workers=2, persistent=True)
it = iter(loader)
next(it)
# and one whose iterator livr does not track (what CI hit: its workers outlived the suite)
import torch
from livr.data.loader import _leave_signals_to_main
raw = torch.utils.data.DataLoader(list(range(8)), batch_size=2, num_workers=1, worker_init_fn=_leave_signals_to_main)
raw_it = iter(raw)
next(raw_it)
sys.modules["__main__"].KEPT = (loader, it, raw, raw_it)  # still referenced when the interpreter exits
print("exiting", flush=True)
"""


def test_the_interpreter_exits_with_a_live_loader(tmp_path):
    """The workers ignore SIGTERM (the main process owns shutdown), so multiprocessing's exit hook, which SIGTERMs
    and then joins its daemonic children, would wait forever on a loader still referenced at exit (seen in CI: the
    suite passed, then pytest never exited)."""
    import subprocess
    import sys

    script = tmp_path / "keep.py"
    script.write_text(_KEEP_A_LOADER_ALIVE_AT_EXIT)
    try:
        done = subprocess.run([sys.executable, str(script)], check=False, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("the interpreter did not exit within 90 s with a live DataLoader")
    assert done.returncode == 0 and "exiting" in done.stdout, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
