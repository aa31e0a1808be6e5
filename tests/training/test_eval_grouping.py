"""Length-grouped evaluation (livr/data/lengths.py): lengths estimated without encoding equal the encoded ones;
grouped batches give the same predictions, in row order, with less padding; every rank runs as many batches."""
import datasets
import pytest
from conftest import tiny_overrides

from livr.config import load_config
from livr.data.lengths import grouped_batches, pad_fraction, prompt_lengths
from livr.data.loader import Rows
from livr.data.synthetic import generate_task
from livr.model.build import build_model


def _rows():
    # prompts of different lengths: 1 or 3 images of 56 to 168 px, long and short questions
    return (generate_task("Counting", 3, seed=1, image_size=56) + generate_task("Jigsaw", 2, seed=2, image_size=112)
            + generate_task("Counting", 2, seed=3, image_size=168) + generate_task("Visual_Similarity", 2, seed=4,
                                                                                   image_size=56)
            + generate_task("Relative_Reflectance", 3, seed=5, image_size=112))


@pytest.fixture(scope="module", params=["tiny-qwen2.5-vl", "tiny-llava-onevision"])
def lm(request, tmp_path_factory, backbone_cache, data_cache):
    tmp = tmp_path_factory.mktemp("grouping")
    return build_model(load_config(None, tiny_overrides(backbone_cache, data_cache, tmp,
                                                        **{"model.backbone": request.param})))


def test_estimated_lengths_equal_the_encoded_ones_without_decoding(lm):
    rows = _rows()
    encoded = [lm.builder.encode(r, with_answer=False)["input_ids"].shape[0] for r in rows]
    config = lm.model.get_base_model().config
    assert prompt_lengths(rows, lm.builder, config) == encoded
    assert len(set(encoded)) >= 3
    # the same rows in an Arrow table: its images are read as bytes, never decoded
    from livr.data.synthetic import features  # BLINK's schema

    table = Rows([datasets.Dataset.from_list(rows, features=features())])
    assert prompt_lengths(table, lm.builder, config) == encoded


@pytest.mark.parametrize("world", [1, 2, 3])
def test_grouped_batches_cover_every_row_once_with_equal_batch_counts(world):
    lengths = [5, 40, 7, 41, 6, 39, 8, 42, 5, 38, 9]
    plans = [grouped_batches(lengths, 2, r, world) for r in range(world)]
    assert len({len(b) for b, _ in plans}) == 1  # every rank runs the same number of batches (collectives)
    rows = sorted(i for b, s in plans for batch, n in zip(b, s) for i in batch[:n])
    assert rows == list(range(len(lengths)))
    if world == 1:
        ungrouped = [list(range(i, min(i + 2, 11))) for i in range(0, 11, 2)]
        grouped, scored = plans[0]
        assert pad_fraction(grouped, scored, lengths) < 0.15
        assert pad_fraction(ungrouped, [len(b) for b in ungrouped], lengths) > 0.4


def test_grouped_evaluation_equals_ungrouped_in_row_order(lm):
    from livr.training.evaluate import eval_loader, evaluate_rows

    if lm.family.name != "qwen2_5_vl":  # one family suffices here (the lengths are checked for both above)
        pytest.skip("run for tiny-qwen2.5-vl")

    rows = _rows()
    lm.model.eval()
    runs = {g: evaluate_rows(lm, rows, batch_size=4, max_new_tokens=1, parser="lenient", group_by_length=g)
            for g in (False, True)}
    assert runs[True]["predictions"] == runs[False]["predictions"]
    assert [p["idx"] for p in runs[True]["predictions"]] == [r["idx"] for r in rows]
    assert runs[True]["accuracy"] == runs[False]["accuracy"]
    lengths = [lm.builder.encode(r, with_answer=False)["input_ids"].shape[0] for r in rows]
    frac = {}
    for g in (False, True):
        _, batches, scored = eval_loader(lm, rows, 4, group_by_length=g)
        frac[g] = pad_fraction(batches, scored, lengths)
    assert frac[True] < frac[False] / 2, frac
