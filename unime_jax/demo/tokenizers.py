"""Offline word-level tokenizers in the style of Qwen2 (LLaVA-OneVision) and Mistral
(LLaVA-1.6), with their special tokens and chat templates: the demo model's tokenizer and the
parity tests'. No network, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

_WORDS = """
summary above image sentence in one word represent describe shown what this picture photo
a an the that these those some any each every of on at to from with without by for and or but
not no is are was were be been being has have had there here it its they them their he she his
her him who which where when how why very also just only then than as so up down out off into
onto through along across together other another all both same different you your helpful
assistant user system answer question yes please can could would will
zero one two three four five six seven eight nine ten eleven twelve many few several pair group
couple lots number count single double
red green blue yellow orange purple pink brown black white gray grey gold silver dark light bright
colorful color colors colored
circle circles square squares triangle triangles star stars rectangle rectangles oval hexagon
diamond heart cross line lines dot dots shape shapes big small large tiny little tall short long
round
left right above below top bottom under over next near beside behind front middle center between
inside outside around side corner
man men woman women person people boy girl child children kid kids baby player players dog dogs
cat cats horse horses cow cows sheep bird birds elephant elephants giraffe giraffes zebra zebras
bear bears car cars bus buses truck trucks train trains plane airplane bike bicycle motorcycle
boat boats street road city building buildings house room kitchen bathroom table chair chairs couch
bed desk toilet sink window door wall floor field grass tree trees water beach ocean sky snow
mountain park food pizza sandwich plate bowl cake banana bananas apple apples broccoli hot donut
laptop computer phone cell tv television clock sign stop traffic umbrella kite kites frisbee ball
bat tennis racket surfboard skateboard skis board glass cup bottle wine vase book books shirt hat
teddy toy astronaut coffee flag suit helmet space mug saucer
sitting standing walking running riding playing holding eating looking lying laying flying parked
driving carrying wearing sits stands rides holds plays looks flies jumping swinging hitting
throwing catching waiting crossing covered filled made topped posing smiling
old young empty open full wooden metal plastic cute happy busy clean dirty
"""

# Every punctuation character gets its own vocab entry; the pre-tokenizer emits them singly.
_PUNCT = [*".,:;!?'\"()-/[]<>|&*+=_#%$@{}~`^\\", "\n"]
_DIGITS = [str(d) for d in range(10)]

DEFAULT_WORDS: tuple[str, ...] = tuple(dict.fromkeys(_WORDS.split() + _DIGITS + _PUNCT))

# Unicode letter runs stay whole (lowercased first by the normalizer); a newline and any other
# non-space character (digit, punctuation) become single tokens; all other whitespace is dropped.
_SPLIT_PATTERN = r"[^\W\d_]+|\n|\S"

# Qwen2 / LLaVA-OneVision style. Like the hub llava-onevision template, images (then videos) of a
# content list are rendered first and the text items after them, each text preceded by "\n"; unlike
# it (and like plain Qwen2) the role is followed by "\n" and every turn ends with "<|im_end|>\n".
# No default system prompt is injected (llava-onevision does not inject one either).
QWEN2_CHAT_TEMPLATE = (
    r"{%- for message in messages -%}"
    r"{{- '<|im_start|>' + message['role'] + '\n' -}}"
    r"{%- if message['content'] is string -%}{{- message['content'] -}}"
    r"{%- else -%}"
    r"{%- set images = message['content'] | selectattr('type', 'equalto', 'image') | list -%}"
    r"{%- set videos = message['content'] | selectattr('type', 'equalto', 'video') | list -%}"
    r"{%- for item in images -%}{{- '<image>' -}}{%- endfor -%}"
    r"{%- for item in videos -%}{{- '<video>' -}}{%- endfor -%}"
    r"{%- for item in message['content'] | selectattr('type', 'equalto', 'text') -%}"
    r"{%- if images or videos or not loop.first -%}{{- '\n' -}}{%- endif -%}{{- item['text'] -}}"
    r"{%- endfor -%}"
    r"{%- endif -%}"
    r"{{- '<|im_end|>\n' -}}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

# Mistral-Instruct / llava-v1.6-mistral style: "[INST] <image>\ntext [/INST]". There is no BOS in
# the template: as with the real LlamaTokenizerFast, "<s>" comes from the post-processor when the
# rendered text is tokenized with add_special_tokens=True. A system turn is folded into the next
# [INST] block, as the Mistral template does.
MISTRAL_CHAT_TEMPLATE = (
    r"{%- set ns = namespace(system='') -%}"
    r"{%- for message in messages -%}"
    r"{%- if message['content'] is string -%}"
    r"{%- set images = [] -%}{%- set texts = [message['content']] -%}"
    r"{%- else -%}"
    r"{%- set images = message['content'] | selectattr('type', 'equalto', 'image') | list -%}"
    r"{%- set texts = message['content'] | selectattr('type', 'equalto', 'text')"
    r" | map(attribute='text') | list -%}"
    r"{%- endif -%}"
    r"{%- if message['role'] == 'system' -%}{%- set ns.system = texts | join('\n') + '\n\n' -%}"
    r"{%- elif message['role'] == 'user' -%}"
    r"{{- '[INST] ' + ns.system -}}{%- set ns.system = '' -%}"
    r"{%- for item in images -%}{{- '<image>\n' -}}{%- endfor -%}"
    r"{{- texts | join('\n') + ' [/INST]' -}}"
    r"{%- elif message['role'] == 'assistant' -%}{{- ' ' + texts | join('\n') + eos_token -}}"
    r"{%- else -%}{{- raise_exception('Only system, user and assistant roles are supported') -}}"
    r"{%- endif -%}"
    r"{%- endfor -%}"
)

# Qwen2-VL-Instruct's own template (hub chat_template.json): a default system turn when the
# conversation has none, each image as <|vision_start|><|image_pad|><|vision_end|> in place,
# texts verbatim, "<|im_end|>\n" after every turn.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Phi-3 / Phi-3.5 (string contents only): "<|role|>\ncontent<|end|>\n" per turn.
PHI3_CHAT_TEMPLATE = (
    r"{%- for message in messages -%}"
    r"{{- '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' -}}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)

_STYLES: dict[str, dict[str, Any]] = {
    # Specials go after the words, like Qwen2 (<|endoftext|> = 151643 follows the BPE vocab).
    # Qwen2 itself has no unk (byte-level BPE); a word-level model needs one.
    "qwen2": dict(
        head=[],
        tail=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "<image>", "<video>"],
        plain=[],
        named=dict(unk_token="<unk>", pad_token="<|endoftext|>", eos_token="<|im_end|>"),
        extra=dict(image_token="<image>", video_token="<video>"),
        template=QWEN2_CHAT_TEMPLATE,
    ),
    # Qwen2-VL / Qwen2.5-VL: the Qwen2 specials plus the vision ones; the image token is
    # <|image_pad|>, which the processor expands to one token per merged 2x2 patch window.
    "qwen2_vl": dict(
        head=[],
        tail=[
            *("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"),
            *("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
        ],
        plain=[],
        named=dict(unk_token="<unk>", pad_token="<|endoftext|>", eos_token="<|im_end|>"),
        extra=dict(image_token="<|image_pad|>", video_token="<|video_pad|>"),
        template=QWEN2_VL_CHAT_TEMPLATE,
    ),
    # Like llava-v1.6-mistral: <unk>=0, <s>=1, </s>=2, words, then <image> and <pad> appended.
    "mistral": dict(
        head=["<unk>", "<s>", "</s>"],
        tail=["<image>", "<pad>"],
        plain=["[INST]", "[/INST]"],
        named=dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"),
        extra=dict(image_token="<image>"),
        template=MISTRAL_CHAT_TEMPLATE,
    ),
    # Like Phi-3.5-vision-instruct (LlamaTokenizer, BOS on every call): <unk>=0, <s>=1, </s>=2,
    # words, then the chat specials. It has no image token: the Phi-3-V processor splits prompts
    # at "<|image_N|>" tags and writes negative ids for the images.
    "phi3": dict(
        head=["<unk>", "<s>", "</s>"],
        tail=["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"],
        plain=[],
        named=dict(
            unk_token="<unk>", bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
        ),
        extra={},
        template=PHI3_CHAT_TEMPLATE,
    ),
}


def build_tokenizer(
    style: str,
    vocab_words: Sequence[str] = DEFAULT_WORDS,
    *,
    padding_side: str = "right",
    model_max_length: int = 512,
) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer with the special tokens and chat template of ``style``.

    ``style`` is "qwen2" (llava-onevision), "qwen2_vl" (Qwen2-VL / Qwen2.5-VL), "mistral"
    (llava-v1.6-mistral) or "phi3" (Phi-3.5-V). Unknown words map to ``<unk>``;
    ``tokenizer.image_token`` / ``tokenizer.image_token_id`` resolve to the style's image token
    (``<image>``, ``<|image_pad|>``; "phi3" has none).
    """
    if style not in _STYLES:
        raise ValueError(f"unknown tokenizer style {style!r}; expected one of {sorted(_STYLES)}")
    spec = _STYLES[style]
    specials: list[str] = spec["head"] + spec["tail"]
    words = [w.lower() for w in vocab_words if w.lower() not in specials and w not in spec["plain"]]
    ordered = list(dict.fromkeys(spec["head"] + words + spec["plain"] + spec["tail"]))
    vocab = {tok: i for i, tok in enumerate(ordered)}

    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # invert=True keeps only the pattern matches, so plain whitespace never becomes a token.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="removed", invert=True)
    # Added tokens are matched on the raw text before normalisation and pre-tokenisation, so they
    # survive as one id each. "[INST]" stays a non-special (plain-text) token, so decode keeps it.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec["plain"]])
    if "bos_token" in spec["named"]:
        bos = spec["named"]["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        chat_template=spec["template"],
        padding_side=padding_side,
        model_max_length=model_max_length,
        # A dict of named extras becomes attributes (tokenizer.image_token, .image_token_id) that
        # the llava processors read; they are saved as top-level "image_token" / "video_token"
        # keys of tokenizer_config.json and restored by AutoTokenizer.
        extra_special_tokens=dict(spec["extra"]),
        **spec["named"],
    )
