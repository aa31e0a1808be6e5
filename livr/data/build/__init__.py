"""Builders of the paper's training sets (arXiv 2512.21218, Appendix A) from local copies of their public
sources, in the layout their authors distribute: `livr data build TASK --source DIR --out DIR`.

REGISTRY names, for each task, its source, the layout expected under --source, where to obtain it, what is
assumed where public material does not say, and the builder (module:attribute, imported only when used, so
`livr data build --list` reads no source and imports no image code)."""

from __future__ import annotations

import importlib

from livr.data.tasks import PAPER_TASKS, DataError

REGISTRY: dict[str, dict] = {
    "Counting": {
        "source": "PixMo-Count (allenai/pixmo-count)",
        "layout": "SRC/data/{train,validation,test}-*.parquet (columns image_url, image_sha256, count, label; the "
                  "hub's files) and SRC/images/<image_sha256>[.ext] (the images, downloaded by you from image_url)",
        "obtain": "https://huggingface.co/datasets/allenai/pixmo-count (parquet); images from each row's image_url",
        "construction": "counts 2-10, open-ended ('How many {label} are there in the image?' + 'Answer with a "
                        "number.'), counts balanced; train/val/test from PixMo's train/validation/test (paper: "
                        "1,000 / 534 / 528, what remains of PixMo's 540 / 540 after dead URLs)",
        "assumed": "images are named by their sha256 (the file's sha256 is checked; a missing image, i.e. a dead "
                   "URL, is skipped and counted)",
        "builder": "livr.data.build.pixmo:COUNTING",
        "val": 534,
        "test": 528,
    },
    "Jigsaw": {
        "source": "COCO 2017 images",
        "layout": "SRC/train2017/*.jpg and SRC/val2017/*.jpg (the official zips, unpacked)",
        "obtain": "https://cocodataset.org/#download (train2017.zip, val2017.zip)",
        "construction": "a 400 x U[170,230] px crop; its bottom-right quadrant blacked out; candidates: that "
                        "quadrant and a same-size distractor patch of the same image that touches the crop, does "
                        "not overlap the quadrant and starts >= 0.3 crop diagonals from it; 2-way; train from "
                        "train2017, val/test from val2017",
        "assumed": "images narrower than 400 px use a canvas as wide as the image (the paper does not say)",
        "builder": "livr.data.build.coco:JIGSAW",
    },
    "Object_Localization": {
        "source": "COCO 2017 detection",
        "layout": "SRC/annotations/instances_{train,val}2017.json and SRC/{train,val}2017/*.jpg",
        "obtain": "https://cocodataset.org/#download (2017 train/val images, 2017 train/val annotations)",
        "construction": "a non-crowd instance whose box covers 15-50% of the image and whose mask fills >= 60% "
                        "of the box; a distractor by jittering the corners to IoU in [0.2, 0.5]; both drawn "
                        "and labelled A/B; 2-way; train from train2017, val/test from val2017",
        "assumed": "mask fill is COCO's segmentation 'area' / box area; box A is red, box B blue (BLINK's "
                   "colours are not documented); every qualifying instance is a candidate (an image may give "
                   "several rows, all in one split)",
        "builder": "livr.data.build.coco:LOCALIZATION",
    },
    "Visual_Correspondence": {
        "source": "HPatches sequences (hpatches-sequences-release)",
        "layout": "SRC/<v_*|i_*>/{1..6}.ppm and SRC/<seq>/H_1_{2..6} (3x3 homography, text)",
        "obtain": "https://github.com/hpatches/hpatches-dataset (hpatches-sequences-release.tar.gz)",
        "construction": "pairs (i, j), j - i >= 2, H_i_j = H_1_j H_1_i^-1; REF marked on image i; 4 labelled "
                        "candidates on image j, one the homography image; 4-way; sequences split 80/10/10 "
                        "(viewpoint and illumination separately)",
        "assumed": "distractors are >= 1/8 of the long side from the truth and each other",
        "builder": "livr.data.build.hpatches:CORRESPONDENCE",
        "val": 500,
        "test": 700,
    },
    "Art_Style": {
        "source": "ArtBench-10 (256x256 ImageFolder)",
        "layout": "SRC/{train,test}/<style>/*.jpg (or SRC/artbench-10-imagefolder-split/...)",
        "obtain": "https://github.com/liaopeiyuan/artbench (artbench-10-imagefolder-split.tar)",
        "construction": "reference + same-style positive + other-style negative, 2-way; images split "
                        "train/val (from ArtBench train) and test (from ArtBench test)",
        "assumed": "-",
        "builder": "livr.data.build.artbench:ART_STYLE",
    },
    "Semantic_Correspondence": {
        "source": "SPair-71k",
        "layout": "SRC/PairAnnotation/{trn,test}/*.json and SRC/JPEGImages/<category>/*.jpg (or SRC/SPair-71k/...)",
        "obtain": "https://cvlab.postech.ac.kr/research/SPair-71k/ (SPair-71k.tar.gz)",
        "construction": "a pair with >= 4 keypoints; REF at one source keypoint; 4 labelled target candidates "
                        "(its match + 3 other annotated keypoints); 4-way; train and val from trn (as the paper), "
                        "test from test",
        "assumed": "trn images go to val with probability 1/3 (a hash of the name), a pair to its images' split; "
                   "pairs across the two are unused (so train and val share no image)",
        "builder": "livr.data.build.spair:SEMANTIC",
    },
    "Functional_Correspondence": {
        "source": "FunKPoint (Lai et al., ICCV 2021)",
        "layout": "SRC/labels.csv or SRC/FunKPoint/labels.csv (p1_x..p5_y normalised to [0, 1], difficulty, "
                  "image_path relative to the csv's folder, action, wnid, object_category) + images/<wnid>/*.jpg",
        "obtain": "https://agi-labs.github.io/FuncCorr (FunKPoint)",
        "construction": "images split 80/10/10 per action; within a split and action, images shuffled and paired "
                        "(each used once); REF at keypoint k on the first, candidates k + 3 other keypoints "
                        "on the second; 4-way",
        "assumed": "keypoints scaled by (width - 1, height - 1); an image with several actions is split as one "
                   "unit; BLINK's prompt reconstructed from published fragments (3 characters off BLINK's)",
        "builder": "livr.data.build.funkpoint:FUNCTIONAL",
        "val": 144,
        "test": 146,
    },
    "Relative_Reflectance": {
        "source": "MID (Multi-Illumination Dataset) + MIDIntrinsics albedo",
        "layout": "SRC/{train,test}/<scene>/ (or SRC/multi_illumination_{train,test}_mip2_{jpg,exr}/<scene>/) "
                  "with dir_<k>_mip2.jpg (k = 0..24) and albedo.png or albedo.exr (MIDIntrinsics, unzipped "
                  "into the scene folders)",
        "obtain": "https://projects.csail.mit.edu/illumination/ (images) and "
                  "https://github.com/compphoto/MIDIntrinsics (albedo)",
        "construction": "two points (>= 1/6 of the long side apart) circled and labelled A, B; Y = disk-mean "
                        "(radius 1% of the long side) linear Rec. 709 luminance of the albedo; 'About the same' "
                        "if |Y_A - Y_B| / max(Y_A, Y_B, 1e-8) <= 0.10, else the lower Y is darker; 3-way; "
                        "scenes are the groups: train/val from MID train, test from MID test",
        "assumed": "albedo.png is linear (as MIDIntrinsics writes it; the ratio ignores its min-max scaling); "
                   "answers A, B, C in the ratio 3 : 3 : 2 ('About the same' a quarter, as the paper)",
        "builder": "livr.data.build.mid:REFLECTANCE",
    },
    "Visual_Similarity": {
        "source": "NIGHTS (DreamSim)",
        "layout": "SRC/data.csv or SRC/nights/data.csv (ref_path, left_path, right_path, split, votes and the preference column) "
                  "and SRC/ref/<xxx>/<yyy>.png, SRC/distort/<xxx>/<yyy>_{0,1}.png",
        "obtain": "https://github.com/ssundaram21/dreamsim (dataset/download_dataset.sh: nights.zip)",
        "construction": "reference + the two distortions, the human-preferred one correct; 2-way; "
                        "train/val/test from the csv's split column",
        "assumed": "column names: split and votes as DreamSim's loader uses them; ref/left/right_path by name, "
                   "else columns 5-7, and the preference 'right_vote', else column 3 (DreamSim reads these by "
                   "position; p = the share of votes for right_path); votes < 6 and ties dropped, as DreamSim",
        "builder": "livr.data.build.nights:SIMILARITY",
    },
}
assert tuple(REGISTRY) == PAPER_TASKS


def get_spec(task: str) -> dict:
    """The builder's functions and settings; a DataError for an unknown task or one not built yet."""
    if task not in REGISTRY:
        raise DataError(f"unknown task {task!r} (builders: {', '.join(REGISTRY)})")
    ref = REGISTRY[task]["builder"]
    if not ref:
        raise DataError(f"{task}: no builder yet ({REGISTRY[task]['source']}); see `livr data build --list`")
    mod, attr = ref.split(":")
    return getattr(importlib.import_module(mod), attr)


def default_sizes(task: str) -> dict:
    """The paper's split sizes (Appendix A): 1,000 train; val 250 (Counting 534, Visual_Correspondence 500,
    Functional_Correspondence 144); test only where the paper tests on its own split (BLINK val otherwise)."""
    r = REGISTRY[task]
    return {"train": 1000, "val": r.get("val", 250), "test": r.get("test", 0)}


def describe() -> str:
    """The text of `livr data build --list`."""
    lines = []
    for task, r in REGISTRY.items():
        state = "ready" if r["builder"] else "NOT BUILT YET"
        lines += [f"{task} [{state}] - {r['source']}", f"  layout:       {r['layout']}",
                  f"  obtain:       {r['obtain']}", f"  construction: {r['construction']}",
                  f"  assumed:      {r['assumed']}",
                  "  default rows: train {train}, val {val}, test {test}".format(**default_sizes(task)), ""]
    return "\n".join(lines).rstrip() + "\n"


def build(task: str, source: str, out: str, *, train: int | None = None, val: int | None = None,
          test: int | None = None, seed: int = 42, exclude=(), clip: str | None = None, workers: int = 1,
          progress: bool = True) -> dict:
    """Build `task` from `source` into out/<task>/ (see livr.data.build.driver.run_build)."""
    from livr.data.build.driver import run_build

    spec = get_spec(task)
    sizes = default_sizes(task)
    for k, v in (("train", train), ("val", val), ("test", test)):
        if v is not None:
            if v < 0:
                raise DataError(f"{task}: --{k} must be >= 0, got {v}")
            sizes[k] = v
    if workers < 1:
        raise DataError(f"{task}: --workers must be >= 1, got {workers}")
    return run_build(task, spec, source, out, sizes, seed=seed, exclude=exclude, clip=clip, workers=workers,
                     progress=progress)
