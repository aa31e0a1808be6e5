"""The mutation catalogue: realistic bugs in the LIVR method modules, each a one-place source edit.

Each `Mutant(name, file, find, replace, tests, why, equivalent=None, stale_ok=False)`:
- `find` must occur exactly once in `file` (else the runner reports the mutant "stale": the code moved on and
  the catalogue must follow); `replace` is the buggy version of that snippet.
- `tests`: the pytest selection (files, node ids, globs like "tests/*/test_spec*.py" expanded at run time),
  most likely killer first (the run stops at the first failure, -x); empty = the module's default
  (`tests_for`).
- `why`: the real-world bug it models. `equivalent`: why no test can kill it (behaviour unchanged), or None.
- `stale_ok`: the code under the mutant was still being rewritten when it was written; a stale report is
  expected there and means "re-target", not "the catalogue is dishonest".

See docs/testing.md for how to run it and how to add a mutant.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    find: str
    replace: str
    tests: list[str] = field(default_factory=list)
    why: str = ""
    equivalent: str | None = None
    stale_ok: bool = False


SPEC = "tests/method/test_spec.py"
SPEC_TRAIN = "tests/training/test_spec_train.py"
SPEC_ALL = "tests/*/test_spec*.py"  # new spec files are picked up when they appear
METHOD = "tests/method/test_method.py"
TRAIN = "tests/training/test_train.py"
SCORING = "tests/training/test_scoring.py"
DATA = "tests/data/test_data.py"
VERIFY = ["tests/insight/test_insight.py::test_verify_passes_on_every_family",
          "tests/insight/test_insight.py::test_verify_fails_on_a_leaking_mask"]
GEN = "tests/method/test_method.py::test_cached_generation_matches_full_recompute"
# test_spec_train's expensive tests (≈ 25 s and 16 s): only for mutants they are about
TWO_RANKS = "tests/training/test_spec_train.py::test_gradient_is_the_global_token_mean_for_any_batching"
RESUME_EQ = "tests/training/test_spec_train.py::test_resume_mid_stage_equals_an_uninterrupted_run"
LOOP = "tests/training/test_spec_train.py::test_train_worker_optimizer_schedule_and_stage_masks"
SELECTION = "tests/training/test_spec_train.py::test_model_selection"
PLAN_STAGES = "tests/training/test_spec_train.py::test_plan_stages_from_epochs"

NOT_SLOW_SPEC = ["-" + TWO_RANKS, "-" + RESUME_EQ]  # a "-node" entry deselects it (from the glob)
SCORING_FAST = [SCORING, "-tests/training/test_scoring.py::test_two_process_eval_gathers_every_prediction",
                "-tests/training/test_scoring.py::test_training_and_cli_write_a_blink_submission"]

DEFAULT_TESTS = {
    "livr/method/latents.py": [SPEC, METHOD, *VERIFY, SPEC_ALL, *NOT_SLOW_SPEC],
    "livr/method/groups.py": [SPEC, METHOD, *VERIFY, SPEC_ALL, *NOT_SLOW_SPEC],
    "livr/data/sequence.py": [SPEC, METHOD, *VERIFY, SPEC_ALL, *NOT_SLOW_SPEC],
    "livr/method/mask.py": [METHOD, SPEC, *VERIFY, SPEC_ALL, *NOT_SLOW_SPEC],
    "livr/model/build.py": [SPEC, METHOD, *VERIFY, SPEC_ALL, *NOT_SLOW_SPEC],
    "livr/training/train.py": [PLAN_STAGES, LOOP, SELECTION, TRAIN, RESUME_EQ, SPEC],
    "livr/training/engine.py": [LOOP, TRAIN, RESUME_EQ, TWO_RANKS],
    "livr/training/checkpoint.py": [TRAIN, RESUME_EQ, LOOP],
    "livr/data/loader.py": ["tests/data/test_loader.py", TWO_RANKS, RESUME_EQ],
    "livr/training/evaluate.py": [GEN, SCORING, TRAIN, "tests/insight/test_insight.py"],
    "livr/data/prompts.py": [*SCORING_FAST, DATA],
    "livr/data/answers.py": SCORING_FAST,
}


def tests_for(file: str) -> list[str]:
    """The default selection of a module: the spec tests plus the suite file that exercises it."""
    return DEFAULT_TESTS.get(file, [METHOD, SPEC_ALL])


M = Mutant
CATALOGUE: list[Mutant] = [
    # ------------------------------------------------------------------ latents.py (LIVR_SPEC §1)
    M("latents_share_one_row", "livr/method/latents.py",
      'return [f"<livr_latent_{i}>" for i in range(k)]',
      'return [f"<livr_latent_0>" for i in range(k)]',
      why="all K latents are the same token, so they share one embedding row (unshared rows: 83.61 vs 81.15)"),
    M("untied_head_rows_not_initialised", "livr/method/latents.py",
      '        _init_rows(head.weight, ids, init, gen, whole)  # untied head: deterministic, never trained',
      '        pass',
      why="untied output head: the latent rows keep resize_token_embeddings' random init (seed-dependent)"),

    # ------------------------------------------------------------------ groups.py, sequence.py (§1–2 layout, labels)
    M("bottleneck_leaks_later_images", "livr/method/groups.py",
      "    groups[is_img] = IMAGE\n",
      "    run = is_img.clone()\n"
      "    run[first_img:] = is_img[first_img:].int().cumprod(0).bool()\n"
      "    groups[run] = IMAGE\n",
      why="multi-image example: only the first image's tokens are IMAGE; images 2.. are PROMPT and visible to "
          "the answer"),
    M("text_group_until_last_image", "livr/method/groups.py",
      "first_img = int(is_img.nonzero()[0]) if is_img.any() else n",
      "first_img = int(is_img.nonzero()[-1]) if is_img.any() else n",
      why="TEXT (image-blind by causality only) runs up to the LAST image: text between images sees image 1"),
    M("text_boundary_one_short", "livr/method/groups.py",
      "groups[pos < first_img] = TEXT",
      "groups[pos < first_img - 1] = TEXT",
      why="TEXT/PROMPT boundary off by one: the vision-start token before the first image is labelled PROMPT"),
    M("text_boundary_one_long", "livr/method/groups.py",
      "groups[pos < first_img] = TEXT",
      "groups[pos <= first_img] = TEXT",
      tests=[SPEC + "::test_groups_labels_and_mask_from_raw_ids", METHOD],
      equivalent="position first_img is an image token, relabelled IMAGE on the next line: groups unchanged",
      why="TEXT/PROMPT boundary off by one in the other direction"),
    M("delimiter_in_latent_group", "livr/method/groups.py",
      "        groups[torch.isin(ids, torch.tensor(latent_ids[:-1]))] = LATENT\n"
      "        ends = (ids == latent_ids[-1]).nonzero()\n"
      "        answer_start = int(ends[0]) if len(ends) else prompt_len\n",
      "        groups[torch.isin(ids, torch.tensor(latent_ids))] = LATENT\n"
      "        ends = (ids == latent_ids[-1]).nonzero()\n"
      "        answer_start = int(ends[0]) + 1 if len(ends) else prompt_len\n",
      why="the delimiter counted as a latent: it sees the image and predicts the first answer token (no bottleneck "
          "for one-token answers)"),
    M("delimiter_in_prompt_group", "livr/method/groups.py",
      "answer_start = int(ends[0]) if len(ends) else prompt_len",
      "answer_start = prompt_len",
      why="the delimiter labelled PROMPT, not ANSWER (same mask under the default block_prompt, wrong groups)"),
    M("delimiter_not_inserted", "livr/data/sequence.py",
      'self.latent_text = "".join(tokenizer.convert_ids_to_tokens(self.latent_ids))',
      'self.latent_text = "".join(tokenizer.convert_ids_to_tokens(self.latent_ids[:-1]))',
      why="no delimiter after the latents: the first answer token is predicted at the last latent, which sees "
          "the image"),
    M("end_of_turn_not_in_labels", "livr/data/sequence.py",
      "text = target_text(row, self.answer_format) + self.family.end_of_turn",
      "text = target_text(row, self.answer_format)",
      why="the end-of-turn token dropped from the target: the model never learns to stop"),
    M("labels_include_delimiter", "livr/data/sequence.py",
      "labels[prompt_len:] = ids[prompt_len:]",
      "labels[prompt_len - 1:] = ids[prompt_len - 1:]",
      why="the delimiter carries loss: it is predicted at the last latent (an image-seeing position)"),
    M("collate_labels_padded_with_pad_id", "livr/data/sequence.py",
      'fill = {"input_ids": pad_id, "labels": IGNORE, "groups": PAD}',
      'fill = {"input_ids": pad_id, "labels": pad_id, "groups": PAD}',
      why="labels padded with the pad id instead of -100: padding carries loss"),
    M("collate_ignores_padding_side", "livr/data/sequence.py",
      'padded.append(torch.cat([v, pad] if padding_side == "right" else [pad, v]))',
      "padded.append(torch.cat([v, pad]))",
      why="always right-padded: batched generation reads the next token at a pad position"),

    # ------------------------------------------------------------------ mask.py (§2 Stage-1 rules)
    M("mask_prompt_rows_see_image", "livr/method/mask.py",
      "blind_row = blind_row | (groups == PROMPT)",
      "blind_row = blind_row | (groups == ANSWER)",
      why="prompt rows not blocked from the image (the 'answer only' ablation, 77.87 vs 83.61)"),
    M("mask_latent_rows_blind", "livr/method/mask.py",
      "blind_row = groups == ANSWER",
      "blind_row = (groups == ANSWER) | (groups == 3)  # LATENT",
      why="latent rows blocked from the image too: nothing carries the pixels to the answer"),
    M("mask_pad_columns_visible", "livr/method/mask.py",
      '    allowed = (k[None, :] <= q[:, None])[None] & valid[:, None, :]',
      '    allowed = (k[None, :] <= q[:, None])[None] & torch.ones_like(valid)[:, None, :]',
      why="pad columns not masked (right padding hides it: pads come after every real token)"),
    M("mask_not_causal", "livr/method/mask.py",
      '    allowed = (k[None, :] <= q[:, None])[None] & valid[:, None, :]',
      '    allowed = torch.ones(len(q), len(k), dtype=torch.bool, device=groups.device)[None] & valid[:, None, :]',
      why="causality dropped from the 4-D mask"),
    M("mask_pad_row_diagonal_removed", "livr/method/mask.py",
      '    return allowed | ((k[None, :] == q[:, None])[None] & ~valid[:, -len(q):, None])',
      '    return allowed',
      why="pad rows fully masked: NaN under some kernels"),
    M("mask_boolean", "livr/method/mask.py",
      "    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]",
      "    return allowed[:, None]",
      why="a boolean 4-D mask instead of the additive float one (silently wrong under eager)"),

    # ------------------------------------------------------------------ model.py (§1–3: forward, loss, trainables)
    M("position_ids_not_passed_4d", "livr/model/build.py",
      '            inputs["position_ids"] = pos if pos is not None else self.family.position_ids(self.model, ids, attn, mm)',
      "            pass",
      why="4-D mask without explicit positions: the model derives (m)RoPE positions from a mask it cannot read"),
    M("loss_no_shift", "livr/model/build.py",  # answer_loss: `livr verify` (d), warm-up bench, tests
      "logits, labels = logits[:, :-1].float(), labels[:, 1:].to(logits.device)",
      "logits, labels = logits.float(), labels.to(logits.device)",
      why="loss without the next-token shift: each answer position 'predicts' itself"),
    M("train_nll_no_shift", "livr/model/build.py",
      "    keep = labels[:, 1:] != IGNORE\n",
      "    keep = labels[:, :-1] != IGNORE\n",
      why="the training loss (answer_nll) without the next-token shift: each answer position 'predicts' itself"),
    M("loss_summed", "livr/model/build.py",
      "    return (nll * mask).sum() / mask.sum().clamp(min=1)",
      "    return (nll * mask).sum()",
      why="loss summed over answer tokens instead of averaged"),
    M("loss_per_example_batch_denominator", "livr/model/build.py",
      "return (nll * mask).sum(1) / mask.sum(1).clamp(min=1)",
      "return (nll * mask).sum(1) / mask.sum().clamp(min=1)",
      why="per-example loss divided by the batch's token count"),
    M("lora_reaches_vision_tower", "livr/model/build.py",
      'return rf"(?=(?:{family_regex})$).*\\.(?:{names})"',
      'return rf".*\\.(?:{names})"',
      why="LoRA target regex without the language-model restriction: the vision tower's projections train"),
    M("frozen_guard_disabled", "livr/model/build.py",
      "    if leaks:\n",
      "    if False:\n",
      why="the 'vision/projector parameters would train' guard never fires"),
    M("vision_not_frozen_before_peft", "livr/model/build.py",
      "    for p in bb.model.parameters():\n        p.requires_grad_(False)\n",
      "    pass\n",
      tests=[METHOD, "tests/training/test_spec_train.py::test_train_worker_optimizer_schedule_and_stage_masks"],
      equivalent="get_peft_model itself marks every non-adapter parameter requires_grad=False "
                 "(_mark_only_adapters_as_trainable), so the explicit freeze is redundant",
      why="vision tower / projector not frozen before PEFT"),
    M("whole_embedding_trains", "livr/model/build.py",
      '    tokens = {"embed_tokens": ids, **({head: ids} if head else {})} if ids else None',
      '    tokens = None',
      why="the whole embedding table trains (optimizer state and updates on the base rows)"),
    M("delimiter_row_frozen", "livr/model/build.py",
      '    tokens = {"embed_tokens": ids, **({head: ids} if head else {})} if ids else None',
      '    tokens = {"embed_tokens": ids[:-1], **({head: ids} if head else {})} if ids else None',
      why="only the K latent rows train; the delimiter's row stays random"),
    M("weight_decay_on_latent_rows", "livr/model/build.py",
      '(no_decay if "trainable_tokens" in name else decay).append(p)',
      '(no_decay if "trainable_token_indices" in name else decay).append(p)',
      why="param_groups matches the wrong name: the latent rows get weight decay"),

    # ------------------------------------------------------------------ train.py (§3 schedule, stages, selection)
    M("stage2_keeps_bottleneck", "livr/training/train.py",
      'Stage("stage2", False,',
      'Stage("stage2", True,',
      why="Stage 2 trains under the bottleneck mask instead of the plain causal one"),
    M("stage1_without_bottleneck", "livr/training/train.py",
      'Stage("stage1", True,',
      'Stage("stage1", False,',
      why="Stage 1 trains with the plain causal mask: no visual bottleneck at all"),
    M("stage1_uses_stage2_epochs", "livr/training/train.py",
      "steps(t.stage1_epochs, t.stage1_steps)",
      "steps(t.stage2_epochs, t.stage1_steps)",
      why="Stage 1's length read from the Stage-2 epochs (4+6 becomes 6+6)"),
    M("no_warmup", "livr/training/train.py",
      "warm = math.ceil(o.warmup_ratio * total)",
      "warm = 0",
      why="no linear warm-up: each stage starts at the peak learning rate"),
    M("warmup_off_by_one", "livr/training/train.py",
      "return o.lr * step / max(1, warm)",
      "return o.lr * (step + 1) / max(1, warm)",
      why="warm-up one step ahead of transformers' get_cosine_schedule_with_warmup"),
    M("lr_not_restarted_per_stage", "livr/training/train.py",
      'lr = lr_at(state["step"], stage.steps, cfg)',
      'lr = lr_at(state["global_step"], stage.steps, cfg)',
      why="the schedule runs on the global step: Stage 2 does not restart warm-up + cosine"),
    M("train_loss_summed", "livr/training/train.py",
      "engine.micro_step(nll / tokens, boundary, lr,",
      "engine.micro_step(nll, boundary, lr,",
      tests=[LOOP, TWO_RANKS, TRAIN],
      why="the training loss is the summed answer NLL, not the per-token mean (lr effectively scaled by length)"),
    M("train_loss_microbatch_mean", "livr/training/train.py",
      "            engine.micro_step(nll / tokens, boundary, lr, total / tokens if boundary else None)\n",
      "            engine.micro_step(nll / max(1, batch['labels'].ne(-100).sum().item()), boundary, lr,\n"
      "                              total / tokens if boundary else None)\n",
      tests=[TWO_RANKS, LOOP, TRAIN],
      why="each micro-batch's own token mean, summed over accumulation and ranks: A x N times the gradient, "
          "micro-batches weighted equally whatever their answer lengths"),
    M("adamw_without_no_decay_group", "livr/training/engine.py",
      "    groups = param_groups(model, o.weight_decay)\n",
      "    groups = [{\"params\": [p for p in model.parameters() if p.requires_grad], \"weight_decay\": o.weight_decay}]\n",
      tests=[LOOP],
      why="train_worker builds AdamW over all trainables with one weight decay: the latent rows decay"),
    M("stage_end_checkpoint_unfinished", "livr/training/train.py",
      "            if done:\n                state[\"stage\"], state[\"step\"] = si + 1, 0\n"
      "            save_last(engine, state, ctx, last, report, metrics)\n",
      "            save_last(engine, state, ctx, last, report, metrics)\n"
      "            if done:\n                state[\"stage\"], state[\"step\"] = si + 1, 0\n",
      why="the end-of-stage checkpoint is written before the stage is marked done"),
    M("best_selection_inverted", "livr/training/train.py",
      'if acc > state["best"]:',
      'if acc < state["best"]:',
      why="best-checkpoint selection keeps the worst validation accuracy"),
    M("select_last_ignored", "livr/training/train.py",
      '    if cfg.train.select == "best":  # verified; an unusable best falls back (one-line warning), see select_best',
      '    if True:  # verified; an unusable best falls back (one-line warning), see select_best',
      why="train.select=last (multi-task) still restores the best checkpoint"),
    M("microbatch_rank_layout", "livr/data/loader.py",
      "j = a * world + rank",
      "j = rank * accum + a",
      tests=["tests/data/test_loader.py", TWO_RANKS],
      why="rank r takes a contiguous block of micro-batches: N ranks no longer equal one rank accumulating N"),

    # ------------------------------------------------------------------ engine.py (TorchEngine)
    M("ddp_average_not_compensated", "livr/training/engine.py",
      "        (loss * self.world).backward()\n",
      "        loss.backward()\n",
      tests=[TWO_RANKS, LOOP],
      why="gradient reduction vs loss normalisation mismatch: DDP averages over ranks while each micro-batch's loss "
          "is a share of the GLOBAL mean, so without x world N ranks get 1/N of the gradient (the class of "
          "'all-reduce sums instead of averaging', the other way round)"),
    M("grad_accum_scaled_twice", "livr/training/engine.py",
      "        (loss * self.world).backward()\n",
      "        (loss * self.world / self.cfg.train.grad_accum).backward()\n",
      tests=[TWO_RANKS, LOOP, TRAIN],
      why="a leftover 1/accumulation scaling on a loss that is already a share of the global-batch mean"),
    M("schedule_not_applied", "livr/training/engine.py",
      '        for g in self.opt.param_groups:\n            g["lr"] = lr\n',
      "",
      why="the scheduled lr never reaches the optimizer: constant lr"),

    # ------------------------------------------------------------------ checkpoint.py (resume)
    M("resume_without_optimizer_state", "livr/training/checkpoint.py",
      '    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})',
      '    pass',
      why="resume restores the weights but not AdamW's moments"),
    M("resume_without_weights", "livr/training/engine.py",
      '        load_trainable_state(self.model, ck["trainable"], path)\n        load_optimizer(',
      '        load_optimizer(',
      why="resume restores the optimizer and counters but not the trained LoRA/latent weights"),
    M("resume_forgets_best", "livr/training/engine.py",
      '        load_optimizer(self.model, self.opt, ck["optimizer"], path)\n        restore_rng(ck["rng"], self.rank, self.world)\n'
      '        return ck["state"]\n',
      '        load_optimizer(self.model, self.opt, ck["optimizer"], path)\n        restore_rng(ck["rng"], self.rank, self.world)\n'
      '        return {**ck["state"], "best": -1.0, "best_at": None}\n',
      why="the best validation accuracy so far is not restored: a worse epoch after resume becomes 'best'"),
    M("optimizer_step_count_not_saved", "livr/training/checkpoint.py",
      '                if k in OPT_KEYS:\n',
      '                if k in OPT_KEYS and k != "step":\n',
      why="the checkpoint misses AdamW's per-parameter `step` (bias correction) field"),
    M("completeness_check_misses_optimizer", "livr/training/checkpoint.py",
      'CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", "rng.json", "state.json")',
      'CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.json", "rng.json", "state.json")',
      why="an incomplete checkpoint (no optimizer tensors) is not reported as incomplete"),

    # ------------------------------------------------------------------ evaluate.py (generation, aggregation)
    M("every_rank_evaluates_every_row", "livr/data/lengths.py",  # (length-grouped evaluation is the default)
      "mine = order[start + rank * batch_size: start + (rank + 1) * batch_size]",
      "mine = order[start: start + chunk]",
      tests=["tests/training/test_scoring.py::test_two_process_eval_gathers_every_prediction", SCORING, TRAIN,
             "tests/training/test_eval_grouping.py"],
      why="evaluation not sharded: every rank scores every row, counts are multiplied by the world size"),
    M("eval_counts_not_reduced", "livr/training/evaluate.py",
      "        dist.all_reduce(t)\n",
      "",
      tests=["tests/training/test_scoring.py::test_two_process_eval_gathers_every_prediction", SCORING, TRAIN],
      stale_ok=True,
      why="sharded evaluation reports rank 0's shard only"),
    M("decode_steps_use_2d_mask", "livr/training/evaluate.py",
      'step_mask = fam.stage1_mask(model, groups, lm.dtype, rows=1) if bottleneck else attn',
      'step_mask = attn',
      why="bottleneck generation: the decode steps use the 2-D mask, so generated tokens see the image"),
    M("eos_not_sticky", "livr/training/evaluate.py",
      "        nxt = torch.where(done, torch.full_like(nxt, eos), nxt)\n",
      "",
      why="a finished row keeps generating: text after end-of-turn is appended to its output"),
    M("eos_filter_removed", "livr/training/evaluate.py",
      "[t for t in row if t != eos]",
      "row",
      tests=[GEN, SCORING],
      equivalent="decode(skip_special_tokens=True) drops the end-of-turn token anyway (it is a special token in "
                 "every family), and after eos a row only holds eos",
      why="end-of-turn tokens not filtered before decoding"),
    M("task_mean_weighted_by_rows", "livr/training/evaluate.py",
      '"mean": None if acc is None else sum(acc.values()) / max(1, len(acc)),',
      '"mean": None if acc is None else sum(acc[k] * counts[k][2] for k in acc) / max(1, sum(counts[k][2] for k in acc)),',
      stale_ok=True,
      tests=[SCORING, TRAIN, "tests/insight/test_insight.py"],
      why="the overall score is the row-weighted (micro) mean, not BLINK's unweighted mean of per-task accuracies"),
    M("table1_mean_counts_missing_tasks", "livr/training/evaluate.py",
      'mean = f"{100 * sum(vals) / len(vals):.2f}" if vals else "–"',
      'mean = f"{100 * sum(vals) / len(tasks):.2f}" if vals else "–"',
      tests=["tests/insight/test_insight.py", SCORING, TRAIN],
      why="Table 1's mean divides by every column, counting a method's missing tasks as 0"),
    M("eval_parser_ignored", "livr/training/evaluate.py",
      "acc = by_parser[parser]",
      'acc = by_parser["blink"]',
      tests=[SCORING, TRAIN],
      stale_ok=True,
      why="eval.parser=lenient still reports BLINK's accuracy"),

    # ------------------------------------------------------------------ data/prompts.py (§4 BLINK scoring)
    M("prompt_choice_format", "livr/data/prompts.py",
      'lines = [f"({l}) {c}" for l, c in zip(choice_letters(len(choices)), choices)]',
      'lines = [f"{l}. {c}" for l, c in zip(choice_letters(len(choices)), choices)]',
      why="choices written 'A. x' instead of BLINK's '(A) x'"),
    M("gold_letter_out_of_range_accepted", "livr/data/prompts.py",
      'if not m or m.group(1) not in choice_letters(len(row["choices"])):',
      "if not m:",
      why="a gold answer outside the choices (e.g. (F) of 4) is accepted as a training target"),
    M("blink_output_stripped", "livr/data/prompts.py",
      "    letters = choice_letters(num_choices)\n    bare = set(_BLINK_BARE) | set(letters)\n",
      "    output = output.strip()\n    letters = choice_letters(num_choices)\n    bare = set(_BLINK_BARE) | set(letters)\n",
      stale_ok=True,
      why="BLINK's rule applied to the stripped output (BLINK does not strip: ' A' goes to its judge)"),
    M("blink_case_insensitive", "livr/data/prompts.py",
      "    if output in bare:\n        return output\n",
      "    if output.upper() in bare:\n        return output.upper()\n",
      stale_ok=True,
      why="a lower-case 'a' accepted as A (BLINK is case-sensitive)"),
    M("blink_paren_glued_accepted", "livr/data/prompts.py",
      "anywhere = valid & set(output.split())",
      'anywhere = valid & {f"({x})" for x in _PAREN.findall(output)}',
      stale_ok=True,
      why="'(X)' accepted inside other text ('**(A)**', '(A),'): BLINK needs a whitespace-separated token"),
    M("blink_last_paragraph_ignored", "livr/data/prompts.py",
      'last = valid & set(output.split("\\n\\n")[-1].split())',
      "last = set()",
      stale_ok=True,
      why="the last-paragraph rule dropped: several (X) overall but one in the last paragraph gives no answer"),
    M("blink_several_letters_pick_one", "livr/data/prompts.py",
      "if (len(anywhere) != 1 and len(last) != 1) or len(anywhere) < 1:",
      "if len(anywhere) < 1:",
      stale_ok=True,
      why="several different (X) in the output: one is picked instead of 'no answer'"),
    M("blink_open_ended_first_integer", "livr/data/prompts.py",
      '    if parser != "lenient":\n        return normalise_number(output)\n',
      "",
      stale_ok=True,
      why="BLINK open-ended scoring takes the first integer anywhere ('3 or 4' scores 3)"),
    M("number_words_not_accepted", "livr/data/prompts.py",
      'return NUMBER_WORDS.get(" ".join(t.split()))',
      "return None",
      stale_ok=True,
      why="an open-ended answer written as a word ('three') is not accepted"),

    # ------------------------------------------------------------------ data/answers.py (eval.parser=match)
    M("match_no_fullwidth", "livr/data/answers.py",
      'text = unicodedata.normalize("NFKC", output)', "text = output", tests=SCORING_FAST,
      why="match: a full-width '（C）' is not read as '(C)'"),
    M("match_shorter_choice_wins", "livr/data/answers.py",
      "key=lambda t: -len(t[0]))", "key=lambda t: len(t[0]))", tests=SCORING_FAST,
      why="match: a shorter choice text is matched first, so 'very dark' also counts as 'dark' (ambiguous)"),
    M("match_before_blink_rule", "livr/data/prompts.py",
      '    letter = _parse_blink(output, num_choices)\n    if letter is None and parser == "match":\n'
      '        letter = parse_match(output, choice_letters(num_choices), choices)\n',
      '    letter = parse_match(output, choice_letters(num_choices), choices) if parser == "match" else None\n'
      '    if letter is None:\n        letter = _parse_blink(output, num_choices)\n', tests=SCORING_FAST,
      why="match: the matcher decides before BLINK's fixed rule (which must win wherever it decides)"),

    # ------------------------------------------------------------------ export.py, console.py (issue 31)
    M("export_keeps_video_processor", "livr/tools/export.py", "    if stock in IMAGE_ONLY:\n", "    if False:\n",
      tests=["tests/backbones/test_adapter_reload.py::test_export_runs_in_stock_transformers_with_livr_eval_answers"],
      why="the Qwen exports name their stock processor, which builds a video processor: AutoProcessor.from_pretrained"
          "(DIR) needs torchvision, which the CPU stack lacks"),
    M("export_no_remote_processor", "livr/tools/export.py",
      '        config["auto_map"] = {"AutoProcessor": f"{REMOTE_MODULE}.ImageOnly{stock}"}\n', "",
      tests=["tests/backbones/test_adapter_reload.py::test_export_runs_in_stock_transformers_with_livr_eval_answers"],
      why="LLaVA-OneVision's export cannot load its processor without torchvision, even with trust_remote_code=True"),
    M("console_noise_unfiltered", "livr/utils/console.py",
      '    """Filter NOISE_WARNINGS and NOISE_LOGS in this process (idempotent)."""\n',
      '    """Filter NOISE_WARNINGS and NOISE_LOGS in this process (idempotent)."""\n    return\n',
      tests=["tests/test_newcomer.py::test_known_third_party_noise_is_filtered_and_nothing_else",
             "tests/training/test_nonfinite.py::test_ray_workers_stop_together_and_the_driver_says_one_line"],
      why="known third-party noise (Ray's controller polling, transformers' FutureWarning) reaches the console"),

    # ------------------------------------------------------------------ training/distributed.py (CI flake, 2026-12-07)
    M("teardown_keeps_deepspeed_groups", "livr/training/distributed.py", "        ds.destroy_process_group()\n",
      "        dist.destroy_process_group()\n", tests=["tests/training/test_process_group.py"],
      why="DeepSpeed keeps its world group: gloo's threads outlive the run and can abort the process at exit"),
    M("teardown_keeps_env", "livr/training/distributed.py", "        os.environ.pop(_SET_HERE.pop(), None)\n",
      "        _SET_HERE.pop()\n", tests=["tests/training/test_process_group.py"],
      why="a second one-process group in the same process reuses the first one's MASTER_PORT"),
    M("cli_no_teardown", "livr/cli.py", "            sys.modules[\"livr.training.distributed\"].teardown_distributed()\n",
      "            pass\n", tests=["tests/training/test_process_group.py"],
      why="`livr train` exits with its process group alive (finalised at interpreter exit)"),
    M("run_keeps_engine", "livr/training/train.py", "    engine = life.engine = make_engine(", "    engine = make_engine(",
      tests=["tests/training/test_release.py"],
      why="a DeepSpeed run's model and optimizer state outlive train_worker (the next in-process run starts beside them)"),
    M("zero3_keeps_module_stack", "livr/training/engine.py",
      "            stack[:] = [m for m in stack if id(m) not in mine]\n", "", tests=["tests/training/test_release.py"],
      why="ZeRO-3's FWD_MODULE_STACK keeps the run's root module alive after destroy()"),
    M("zero3_fresh_checkpoint_unreadable", "livr/training/engine.py",
      "        if not opt:  # written before", "        if False:  # written before",
      tests=["tests/training/test_release.py"],
      why="a ZeRO checkpoint written before the first applied step cannot be resumed"),
]
