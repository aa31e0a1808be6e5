"""Offline tokenizer for the tiny presets: a byte-level BPE trained on the fly on a small built-in corpus,
with the family's special tokens and chat template, wrapped in PreTrainedTokenizerFast.

Deterministic: the corpus is fixed and BPE training is deterministic, so the same preset gets the same vocab.
"""
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

_WORDS_TEXT = """the a an of to in on at by for with from and or not is are was be this that these those which what
where how many much more less most least same different left right top bottom upper lower middle center image
images picture pictures photo first second third fourth point points object objects box boxes square squares circle
red green blue yellow black white gray dark bright brighter darker color colour shape count number answer question
choice choices option options select correct best describe closer farther similar similarity style art painting
reflectance surface jigsaw piece missing fits localization correspondence semantic functional visual reference
patch region marked shown near far above below between inside outside there here one two three four five six seven
eight nine ten zero yes no true false user assistant system you are helpful please think step look carefully"""

_SENTENCES = [
    "You are a helpful assistant.",
    "Which image is brighter? Answer with the letter of the correct choice.",
    "How many squares are there in the image? Answer with a number.",
    "Which point on the second image corresponds to the reference point on the first image?",
    "Select from the following choices. (A) left (B) right (C) about the same (D) none of these",
    "Is the left half or the right half of the picture darker?",
    "Which of the two images is more similar to the reference image in style?",
    "The answer is (A). The answer is (B). The answer is (C). The answer is (D).",
    "Count the objects: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10.",
    "Q: What color is the box? A: It is red, green, blue or yellow!",
    "Options: A, B, C, D; E. F? G! H: I - J _ K / L \\ M * N + O = P % Q # R @ S & T ' U \" V ` W ~ X ^ Y | Z",
]


def _corpus():
    words = _WORDS_TEXT.split()
    out = list(_SENTENCES)
    out += [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    out += [w.capitalize() + " " + w.upper() for w in words]
    out += [" ".join(str(n) for n in range(i, i + 25)) for i in range(0, 1000, 25)]
    out += [f"({c}) {c}. {c}) {c}:" for c in "ABCDEFGHIJ"]
    out += ["0.5 1.25 3.14 -7 +8 10% 1/2 2x3 (1, 2) [3, 4] {5: 6} <7> a_b c-d e.f g,h"]
    return out * 3  # repetition makes the frequent merges win deterministically


def qwen_template(default_system: bool) -> str:
    """Qwen-VL chat template; Qwen2.5-VL adds a default system prompt, Qwen3-VL does not."""
    system = ("{% if loop.first and message['role'] != 'system' %}"
              "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}") if default_system else ""
    return "{% for message in messages %}" + system + _QWEN_BODY


_QWEN_BODY = (
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image>\n"
    "{% elif content['type'] == 'video' %}<video>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(special_tokens, chat_template, vocab_size=1024, **named):
    """Train a byte-level BPE (Qwen2-style pre-tokenisation) with `special_tokens` appended after the BPE vocab.
    By default `special_tokens` must contain PAD, IM_START, IM_END: eos = <|im_end|>, pad = <|endoftext|>, no bos;
    `named` overrides them (eos_token=, pad_token=, bos_token=, extra_special_tokens=...)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens(list(special_tokens))
    kw = {"eos_token": IM_END, "pad_token": PAD, "bos_token": None, **named}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=None, chat_template=chat_template,
                                   model_max_length=32768, padding_side="right", clean_up_tokenization_spaces=False,
                                   **kw)

# Gemma 3's turn format (BOS, then "user" / "model" turns; an image is <start_of_image>, which the processor expands
# into <start_of_image> + mm_tokens_per_image x <image_soft_token> + <end_of_image>)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<start_of_image>"
    "{% elif 'text' in content %}{{ content['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
