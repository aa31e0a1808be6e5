"""`livr inspect --causal`: each intervention changes exactly what it claims, patching puts the donor's states in
place, an untrained model's flip rate sits at chance, a probe on random labels is at chance (and one on a
decodable label is not), and the suite writes causal.json / causal.md / plots and logs to MLflow."""
import json
import os

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from PIL import Image

from livr.cli import main
from livr.config import load_config
from livr.data.sequence import collate
from livr.data.synthetic import generate_task
from livr.insight import causal
from livr.insight.causal_report import ci, majority_rate, probe
from livr.method.groups import LATENT
from livr.model.build import build_model


def _cfg(backbone_cache, data_cache, tmp_path, **extra):
    return load_config(None, tiny_overrides(backbone_cache, data_cache, tmp_path, **{
        "model.backbone": "tiny-qwen2.5-vl", "data.tasks": "Jigsaw", "lora.dropout": 0.0, **extra}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, backbone_cache, data_cache):
    """A LIVR run and an SFT run (K = 0), a few steps each, with MLflow records."""
    from livr.training.train import train_worker

    tmp = tmp_path_factory.mktemp("causal_runs")
    common = {"optim.lr": 1e-2, "data.train_size": 8, "data.val_size": 12, "data.test_size": 4,
              "tracking.experiment": "causal"}
    livr = _cfg(backbone_cache, data_cache, tmp, name="livr", **{"train.stage1_steps": 2, "train.stage2_steps": 2,
                                                                   **common})
    sft = _cfg(backbone_cache, data_cache, tmp, name="sft", **{"train.mode": "sft", "train.sft_steps": 2,
                                                                 "latents.num_latents": 0, **common})
    train_worker(livr)
    train_worker(sft)
    return livr, sft


@pytest.fixture(scope="module")
def untrained(tmp_path_factory, backbone_cache, data_cache):
    lm = build_model(_cfg(backbone_cache, data_cache, tmp_path_factory.mktemp("untrained")))
    lm.model.eval()
    return lm


def _embedded(lm, batch, hook=None) -> torch.Tensor:
    """The input embeddings the backbone's layers receive (captured after any intervention hook)."""
    got = []
    emb = lm.model.get_input_embeddings()
    handles = [emb.register_forward_hook(hook)] if hook else []
    handles.append(emb.register_forward_hook(lambda m, a, o: got.append(o.detach().clone())))
    try:
        with torch.no_grad():
            lm.forward(batch, bottleneck=False)
    finally:
        for h in handles:
            h.remove()
    return got[0][0]


def test_interventions_change_exactly_what_they_claim(untrained, backbone_cache, data_cache, tmp_path):
    lm = untrained
    row = generate_task("Jigsaw", 1, seed=3, split="val")[0]
    k = len(lm.latent_ids) - 1
    # remove = the K = 0 sequence, built independently by a K = 0 model; markers_only keeps just the delimiter
    k0 = build_model(_cfg(backbone_cache, data_cache, tmp_path, **{"latents.num_latents": 0}))
    assert torch.equal(causal.builder_for(lm, "remove").encode(row)["input_ids"], k0.builder.encode(row)["input_ids"])
    full = lm.builder.encode(row)["input_ids"].tolist()
    markers = causal.builder_for(lm, "markers_only").encode(row)["input_ids"].tolist()
    assert markers == [t for t in full if t not in lm.latent_ids[:-1]] and lm.latent_ids[-1] in markers
    # embedding interventions: only the K latent positions change, to the claimed rows
    batch = collate([lm.builder.encode(row)], lm.tokenizer.pad_token_id)
    ids = batch["input_ids"][0]
    lat = torch.isin(ids, torch.tensor(lm.latent_ids[:-1]))
    assert int(lat.sum()) == k
    plain = _embedded(lm, batch)
    rows = plain[lat]  # the trained latent rows, in order
    for name in ("mean", "random", "repeat"):
        got = _embedded(lm, batch, causal.embedding_hook(lm, causal.replacement_rows(lm, name, seed=1)))
        assert torch.equal(got[~lat], plain[~lat]), name  # the delimiter, the image and the text untouched
        if name == "mean":
            assert torch.allclose(got[lat], rows.mean(0).expand_as(rows), atol=1e-6)
        elif name == "repeat":
            assert torch.equal(got[lat], rows[:1].expand_as(rows))
        else:
            assert torch.allclose(got[lat].norm(dim=-1), rows.norm(dim=-1), rtol=1e-5)
            assert (got[lat] - rows).abs().max() > 1e-3
            again = _embedded(lm, batch, causal.embedding_hook(lm, causal.replacement_rows(lm, name, seed=1)))
            assert torch.equal(again, got)  # seeded


def test_patched_forward_carries_the_donor_latent_states(untrained):
    lm = untrained
    rows = generate_task("Jigsaw", 2, seed=5, split="val")
    a, b = (collate([lm.builder.encode(r)], lm.tokenizer.pad_token_id) for r in rows)
    n_layers = len(causal.decoder_layers(lm))

    layers = causal.decoder_layers(lm)

    def outputs(batch, ctx=None):
        """Every decoder layer's output (observed by hooks registered after any patch) and the logits."""
        got = []
        with torch.no_grad(), (ctx or torch.no_grad()):
            handles = [m.register_forward_hook(lambda mod, a, o: got.append((o[0] if isinstance(o, tuple) else o)[0].clone()))
                       for m in layers]
            try:
                logits = lm.model(**lm.model_inputs(batch, False)).logits[0]
            finally:
                for h in handles:
                    h.remove()
        return got, logits

    pos_a, pos_b = ((x["groups"][0] == LATENT).nonzero().flatten() for x in (a, b))
    (ha, _), (hb, lb) = outputs(a), outputs(b)
    donor = [ha[layer][pos_a] for layer in range(n_layers)]
    hp, lp = outputs(b, causal.patched_layers(lm, pos_b, donor, [0]))
    assert torch.equal(hp[0][pos_b], ha[0][pos_a]), "layer 0's latent outputs are the donor's"
    assert not torch.equal(hp[0][pos_b], hb[0][pos_b])
    first = int(pos_b[0])
    for layer in range(n_layers):
        assert torch.equal(hp[layer][:first], hb[layer][:first])  # positions before the latents: untouched
    assert not torch.equal(lp[first:], lb[first:])  # what follows the latents sees the patch
    rows_ = generate_task("Jigsaw", 6, seed=5, split="val")
    flips = causal.patch_flips(lm, rows_, causal.donor_pairs(rows_, 0), what="latent", bottleneck=True)
    assert flips and all(f["chance"] == 0.5 for f in flips)


def test_untrained_flip_rate_is_at_chance_and_the_interval_covers_it(untrained):
    lm = untrained
    rows = generate_task("Jigsaw", 24, seed=8, split="val")
    pairs = [p for s in range(3) for p in causal.donor_pairs(rows, seed=s)]
    flips = causal.patch_flips(lm, rows, pairs, what="latent", bottleneck=False)
    c, null = ci([f["flip"] for f in flips]), ci([f["before"] for f in flips])
    effect = ci([float(f["flip"]) - float(f["before"]) for f in flips])
    assert c["lo"] <= null["mean"] <= c["hi"] and effect["lo"] <= 0.0 <= effect["hi"], (c, null, effect)


def test_under_the_bottleneck_patched_latents_carry_the_whole_answer(untrained):
    """Stage-1 mask, B = A's text with other images: the answer rows see only the text and the latents, so with
    every layer's latent states patched from A, B's answer logits are A's; patching one layer is not enough."""
    lm = untrained
    rows = generate_task("Jigsaw", 6, seed=2, split="val")
    a = rows[0]
    b = causal.swap_images(a, rows[1])
    both = [a, b]
    batches = [collate([lm.builder.encode(r)], lm.tokenizer.pad_token_id) for r in both]
    labelled = (batches[0]["labels"][0, 1:] != -100).nonzero().flatten()
    with torch.no_grad():
        la, lb = (lm.forward(x, bottleneck=True)[0, labelled] for x in batches)
    assert not torch.allclose(la, lb, atol=1e-6)  # B's own latents differ: its images differ
    n = len(causal.decoder_layers(lm))
    got = causal.patch_flips(lm, both, [(0, 1)], what="latent", bottleneck=True)
    assert got[0]["to_donor"]
    pos = (batches[1]["groups"][0] == LATENT).nonzero().flatten()
    donor, _ = causal.layer_outputs(lm, lm.model_inputs(batches[0], True), batches[0])
    with torch.no_grad(), causal.patched_layers(lm, pos, [d[pos] for d in donor], list(range(n))):
        lp = lm.forward(batches[1], bottleneck=True)[0, labelled]
    assert torch.allclose(lp, la, atol=1e-5), (lp - la).abs().max()
    with torch.no_grad(), causal.patched_layers(lm, pos, [d[pos] for d in donor], [n - 1]):
        one = lm.forward(batches[1], bottleneck=True)[0, labelled]
    assert not torch.allclose(one, la, atol=1e-6)  # the first layers' latent states still carry B's images


def test_bootstrap_interval():
    assert ci([0.25] * 10) == {"mean": 0.25, "lo": 0.25, "hi": 0.25, "n": 10}
    v = np.random.default_rng(0).random(400) < 0.3
    c = ci(v.tolist())
    half = 1.96 * np.sqrt(0.3 * 0.7 / 400)
    assert c["lo"] < c["mean"] < c["hi"] and abs((c["hi"] - c["lo"]) / 2 - half) < 0.01
    assert ci([None, 1.0, 0.0])["n"] == 2


def test_probe_is_at_chance_on_random_labels_and_not_on_a_decodable_one():
    g = np.random.default_rng(1)
    x = g.normal(size=(120, 16))
    tasks = ["t"] * 120
    rand = g.integers(0, 2, 120).tolist()
    c = ci(probe(x, rand, tasks))
    assert c["lo"] <= majority_rate(rand, tasks) <= c["hi"] or c["mean"] <= 0.62, c
    decodable = (x[:, 3] > 0).astype(int).tolist()
    assert ci(probe(x, decodable, tasks))["mean"] > 0.9


@pytest.mark.slow
def test_causal_suite_writes_its_files_and_logs_to_mlflow(runs, capsys):
    from mlflow.tracking import MlflowClient

    livr, sft = runs
    assert main(["inspect", "--run", livr.run_dir, "--causal", "--limit", "8", "--seeds", "2"]) == 0
    assert "B answers A's answer" in capsys.readouterr().out
    out = os.path.join(livr.run_dir, "inspect")
    with open(os.path.join(out, "causal.json")) as f:
        res = json.load(f)
    assert res["n"] == 8 and res["num_latents"] == 4 and res["seeds"] == 2
    for mask in ("causal", "stage1"):
        assert list(res["interventions"][mask]) == list(causal.INTERVENTIONS)
        for r in res["interventions"][mask].values():
            assert 0 <= r["acc"]["lo"] <= r["acc"]["mean"] <= r["acc"]["hi"] <= 1
        assert set(res["patching"][mask]) == {"latent", "image"}
        rep = res["representations"][mask]
        assert len(rep["latent"]["collapse"]) == 3 == len(rep["prompt"]["probe"])  # embeddings + 2 layers
        assert rep["latent"]["collapse"][0] == pytest.approx(1.0)  # layer 0: the same latent rows in every example
    # Stage-1 mask: the prompt is image-blind, so its states do not move when only the images change
    assert all(c["mean"] == 0.0 for c in res["representations"]["stage1"]["prompt"]["sensitivity"])
    assert res["representations"]["causal"]["prompt"]["sensitivity"][-1]["mean"] > 0
    assert res["interventions"]["causal"]["none"]["delta_logp"]["mean"] == 0.0
    for name in res["plots"]:
        with Image.open(os.path.join(out, name)) as im:
            assert im.format == "PNG"
    assert os.path.isfile(os.path.join(out, "causal.md"))
    client = MlflowClient(livr.tracking.uri)
    with open(os.path.join(livr.run_dir, "mlflow_run_id")) as f:
        metrics = client.get_run(f.read().strip()).data.metrics
    assert metrics["causal/stage1/remove/acc"] == pytest.approx(res["interventions"]["stage1"]["remove"]["acc"]["mean"])
    # an SFT run (K = 0): no latent analyses, the image-patching and prompt references still there
    assert main(["inspect", "--run", sft.run_dir, "--causal", "--limit", "6", "--seeds", "1", "--no-mlflow"]) == 0
    with open(os.path.join(sft.run_dir, "inspect", "causal.json")) as f:
        s = json.load(f)
    assert list(s["interventions"]["causal"]) == ["none"] and set(s["patching"]["causal"]) == {"image"}
    assert "latent" not in s["representations"]["causal"]
    # across runs: livr report --causal, from run directories and from the MLflow experiment
    capsys.readouterr()
    assert main(["report", "--causal", livr.run_dir, sft.run_dir]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("| run | mode | K |") and len(table) == 4
    assert table[2].startswith("| livr | livr | 4 |") and table[3].startswith("| sft | sft | 0 |")
    assert table[3].count("n/a") == 9  # no latents: every latent column is n/a
    assert main(["report", "--causal", "--experiment", "causal", "--tracking-uri", livr.tracking.uri]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| livr"]  # the SFT analysis was not logged (--no-mlflow)


def test_forced_choice_reads_the_first_answer_position_of_the_full_logits(untrained):
    """score's prediction and log-probability, against the full [L, V] logits read by hand: the argmax over the
    choice letters' tokens where the first answer token is predicted, and the summed log-probability of the gold
    answer tokens (end-of-turn included)."""
    lm = untrained
    rows = generate_task("Jigsaw", 6, seed=4, split="val")
    got = causal.score(lm, rows, "none", bottleneck=False)
    tok = lm.tokenizer
    for row, g in zip(rows, got):
        batch = collate([lm.builder.encode(row)], tok.pad_token_id)
        with torch.no_grad():
            logits = lm.forward(batch, bottleneck=False)[0].float()
        labels = batch["labels"][0]
        at = (labels[1:] != -100).nonzero().flatten()
        letters = [tok(c, add_special_tokens=False)["input_ids"][0] for c in "AB"]
        pred = letters[int(logits[at[0], letters].argmax())]
        logp = sum(float(torch.log_softmax(logits[t], -1)[labels[t + 1]]) for t in at.tolist())
        assert g["pred"] == pred and g["logp"] == pytest.approx(logp, abs=1e-4)
        assert g["correct"] == (pred == tok(row["answer"].strip("()"), add_special_tokens=False)["input_ids"][0])
        # the prediction is read where the first answer token is predicted, not at a later labelled position
        fake = torch.zeros(len(at), logits.shape[-1])
        fake[0, letters[1]], fake[-1, letters[0]] = 5.0, 9.0
        assert causal.read_answer(lm, batch, fake, row)["pred"] == letters[1]
