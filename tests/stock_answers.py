"""`python stock_answers.py SPEC.json`: an exported directory's greedy answers through stock transformers alone, in a
process that never imports livr (tests/backbones/test_adapter_reload.py runs it). SPEC: {"dir", "trust_remote_code" (the
model), "processor_trust_remote_code", "expect_prompt_end", "max_new_tokens", "rows": [{"prompt", "images": [png
paths]}]}. Prints a JSON list of answers; fails if livr was imported."""
import json
import sys

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
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
    assert not any(m == "livr" or m.startswith("livr.") for m in sys.modules), "livr was imported"
    print("stock answers:", json.dumps({"processor": type(processor).__name__, "answers": answers}))


if __name__ == "__main__":
    main(sys.argv[1])
