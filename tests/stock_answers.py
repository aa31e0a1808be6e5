"""An exported directory's greedy answers through stock transformers alone, in a process that never imports livr
(tests/backbones/test_adapter_reload.py runs it).

`python stock_answers.py SPEC.json` answers one spec. `python stock_answers.py --serve` (what the tests run, once per
session) imports torch and transformers once, then for each SPEC.json path read on stdin forks a fresh child that
answers it (so no request sees another's models, remote code or state) and prints `stock done: RC` when the child has
ended; the child's stderr goes to SPEC.json's directory (stderr.txt). SPEC: {"dir", "trust_remote_code" (the model),
"processor_trust_remote_code", "expect_prompt_end", "max_new_tokens", "rows": [{"prompt", "images": [png paths]}]}.
Prints a JSON list of answers; fails if livr was imported. A SPEC {"code": "..."} runs that code instead."""
import json
import os
import sys
import traceback

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor


def _no_livr() -> None:
    assert not any(m == "livr" or m.startswith("livr.") for m in sys.modules), "livr was imported"


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    if "code" in spec:  # {"code": "..."}: run as `python -c` would (tests/test_newcomer.py)
        exec(compile(spec["code"], "<stock code>", "exec"), {"__name__": "__main__"})  # noqa: S102 - a test's own code
        sys.stdout.flush()
        return
    out_dir = spec["dir"]
    model = AutoModelForImageTextToText.from_pretrained(out_dir, trust_remote_code=spec["trust_remote_code"]).eval()
    if spec["processor_trust_remote_code"] or spec["trust_remote_code"]:  # (a remote-code model: everything trusted)
        processor = AutoProcessor.from_pretrained(out_dir, trust_remote_code=True)
    else:
        processor = AutoProcessor.from_pretrained(out_dir)  # as the README writes it
    answers = []
    for row in spec["rows"]:
        images = [Image.open(p).convert("RGB") for p in row["images"]]
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": row["prompt"]}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        assert text.endswith(spec["expect_prompt_end"]), text[-80:]  # the latents right after the assistant header
        inputs = processor(text=[text], images=[images], return_tensors="pt")
        with torch.no_grad():
            seq = model.generate(**inputs, max_new_tokens=spec["max_new_tokens"], do_sample=False)
        answers.append(processor.tokenizer.decode(seq[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    _no_livr()
    print("stock answers:", json.dumps({"processor": type(processor).__name__, "answers": answers}), flush=True)


def serve() -> None:
    """One spec path per stdin line, each answered by a forked child of this (torch and transformers imported, no
    model loaded, no parallel region run) process; `stock done: RC` after each."""
    _no_livr()
    for line in sys.stdin:
        spec_path = line.strip()
        if not spec_path:
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: answer, then leave without running the parent's clean-up
            rc = 1
            try:
                err = os.open(os.path.join(os.path.dirname(spec_path), "stderr.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(err, 2)
                main(spec_path)
                rc = 0
            except BaseException:  # noqa: BLE001 - any failure: its traceback in stderr.txt, exit code 1
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
        _, status = os.waitpid(pid, 0)
        print(f"stock done: {os.waitstatus_to_exitcode(status)}", flush=True)
        _no_livr()


if __name__ == "__main__":
    serve() if sys.argv[1:] == ["--serve"] else main(sys.argv[1])
