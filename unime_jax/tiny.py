"""Tiny, fully offline LLaVA-style fixtures: a word-level tokenizer and config dicts.

Used by the parity tests (together with ``tests/hf_fixtures.py``) and by the offline demo, so it
must not import torch and must never touch the network. Everything here is plain dicts that the
transformers config classes (``LlavaOnevisionConfig`` / ``LlavaNextConfig`` and their
``vision_config`` / ``text_config``) accept verbatim, with the same key names as the real hub
checkpoints, so the JAX loader can be tested on exactly what it will read in production.
"""

from __future__ import annotations

import copy
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
    # Like llava-v1.6-mistral: <unk>=0, <s>=1, </s>=2, words, then <image> and <pad> appended.
    "mistral": dict(
        head=["<unk>", "<s>", "</s>"],
        tail=["<image>", "<pad>"],
        plain=["[INST]", "[/INST]"],
        named=dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"),
        extra=dict(image_token="<image>"),
        template=MISTRAL_CHAT_TEMPLATE,
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

    ``style`` is "qwen2" (llava-onevision) or "mistral" (llava-v1.6-mistral). Unknown words map to
    ``<unk>``; ``tokenizer.image_token`` / ``tokenizer.image_token_id`` resolve to ``<image>``.
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


# ---------------------------------------------------------------------------------------------
# Config dicts. Each carries "model_type": a sub-config dict without one is built with the
# parent's default type *without* the parent's default init kwargs (e.g. vision_use_head=False
# for llava-onevision's SigLIP), so everything that matters is spelled out here.

_VISION_COMMON: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=64, num_attention_heads=4, num_channels=3, image_size=32,
    patch_size=8
)  # fmt: skip
_VISION: dict[str, dict[str, Any]] = {
    # llava-onevision drops SigLIP's attention-pool head (vision_use_head=False).
    "siglip": dict(
        _VISION_COMMON, model_type="siglip_vision_model", num_hidden_layers=2,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False
    ),
    # 3 layers so that vision_feature_layer=-2 is neither the embeddings nor the last layer.
    "clip": dict(
        _VISION_COMMON, model_type="clip_vision_model", num_hidden_layers=3, projection_dim=32,
        hidden_act="quick_gelu", layer_norm_eps=1e-5
    ),
}  # fmt: skip

_TEXT_COMMON: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, hidden_act="silu",
    num_attention_heads=4, num_key_value_heads=2,  # GQA: 2 query heads share each kv head
    max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False
)  # fmt: skip

_TEXT: dict[str, dict[str, Any]] = {
    # q/k/v biases are hard-wired on in Qwen2Attention; no config key exists for them.
    "qwen2": dict(
        model_type="qwen2", use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}
    ),
    # llava-v1.6-mistral uses Mistral-7B-Instruct-v0.2: no sliding window, rope_theta 1e6.
    "mistral": dict(
        model_type="mistral", sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}
    ),
    "llama": dict(
        model_type="llama", attention_bias=False, mlp_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}
    ),
}  # fmt: skip

_FAMILIES: dict[str, dict[str, Any]] = {
    "llava_onevision": dict(
        vision="siglip",
        text="qwen2",
        top=dict(
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64], [64, 96], [96, 64]],
            vision_aspect_ratio="anyres_max_9",
        ),
    ),
    "llava_next": dict(
        vision="clip",
        text="mistral",
        top=dict(
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",  # drop CLIP's CLS token
            image_grid_pinpoints=[[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]],
        ),
    ),
}


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge so callers can override a single nested key (e.g. text_config)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_vision_config(kind: str, **overrides: Any) -> dict[str, Any]:
    """Tiny ``SiglipVisionConfig`` ("siglip") or ``CLIPVisionConfig`` ("clip") kwargs."""
    return _merge(_VISION[kind], overrides)


def _fold_rope_theta(text_cfg: dict[str, Any]) -> dict[str, Any]:
    """Move a legacy top-level ``rope_theta`` into ``rope_parameters``.

    transformers 5 only uses a bare ``rope_theta`` when ``rope_parameters`` lacks one, so without
    this an override like ``text_config={"rope_theta": 5000.0}`` would be silently ignored.
    """
    if "rope_theta" in text_cfg:
        theta = float(text_cfg.pop("rope_theta"))
        text_cfg["rope_parameters"] = {**text_cfg.get("rope_parameters", {}), "rope_theta": theta}
    return text_cfg


def tiny_text_config(kind: str, vocab_size: int, **overrides: Any) -> dict[str, Any]:
    """Tiny "qwen2" / "mistral" / "llama" decoder config kwargs with ``vocab_size``."""
    cfg = _merge({**_TEXT_COMMON, **_TEXT[kind], "vocab_size": vocab_size}, overrides)
    return _fold_rope_theta(cfg)


def tiny_llava_config(
    family: str,
    vocab_size: int,
    image_token_id: int,
    *,
    vision: str | dict[str, Any] | None = None,
    text: str | dict[str, Any] | None = None,
    video_token_id: int | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """``LlavaOnevisionConfig`` ("llava_onevision") or ``LlavaNextConfig`` ("llava_next") kwargs.

    ``vision`` / ``text`` pick the sub-config kind by name or give a full sub-config dict; the
    defaults are SigLIP + Qwen2 and CLIP + Mistral. ``overrides`` are merged recursively, so
    ``text_config={"num_hidden_layers": 3}`` changes only that key.
    """
    spec = _FAMILIES[family]
    vision_cfg = (
        vision if isinstance(vision, dict) else tiny_vision_config(vision or spec["vision"])
    )
    text_cfg = (
        text if isinstance(text, dict) else tiny_text_config(text or spec["text"], vocab_size)
    )
    cfg: dict[str, Any] = dict(
        model_type=family,
        vision_config=vision_cfg,
        text_config=text_cfg,
        # The config field is image_token_index; image_token_id is only an attribute_map alias.
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        # The top-level flag decides whether lm_head is tied; LlavaOnevisionConfig also copies a
        # True from text_config, so keep both in agreement.
        tie_word_embeddings=text_cfg.get("tie_word_embeddings", False),
        **spec["top"],
    )
    if family == "llava_onevision":
        # -1 never matches a real id; pass the tokenizer's <video> id when it has one.
        cfg["video_token_index"] = -1 if video_token_id is None else video_token_id
    else:
        grid = vision_cfg["image_size"] // vision_cfg["patch_size"]
        cfg["image_seq_length"] = grid * grid  # base-tile tokens (CLS dropped by "default")
    if "tie_word_embeddings" in overrides:
        cfg["text_config"]["tie_word_embeddings"] = overrides["tie_word_embeddings"]
    cfg = _merge(cfg, overrides)
    _fold_rope_theta(cfg["text_config"])
    return cfg


_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def image_processor_config(
    family: str,
    vision_config: dict[str, Any],
    *,
    image_grid_pinpoints: list[list[int]] | None = None,
) -> dict[str, Any]:
    """Kwargs for ``LlavaOnevisionImageProcessorPil`` / ``LlavaNextImageProcessorPil``.

    The tile size is the vision tower's ``image_size``; the pinpoints must equal the model
    config's ``image_grid_pinpoints`` (family default unless given).
    """
    size = int(vision_config["image_size"])
    pinpoints = image_grid_pinpoints or copy.deepcopy(
        _FAMILIES[family]["top"]["image_grid_pinpoints"]
    )
    common: dict[str, Any] = dict(
        image_grid_pinpoints=pinpoints,
        do_resize=True,
        resample=3,  # PIL bicubic
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        do_convert_rgb=True,
        do_pad=True,  # pad the num-tiles axis so a batch stacks into one 5-D array
    )
    if family == "llava_onevision":
        # SigLIP: squash each tile to size x size, no crop, mean/std 0.5 (hub preprocessor_config).
        return dict(
            common,
            size={"height": size, "width": size},
            do_center_crop=False,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
    if family == "llava_next":
        # CLIP: shortest-edge resize + centre crop of every tile; the crop height is the tile size.
        return dict(
            common,
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            do_center_crop=True,
            image_mean=list(_CLIP_MEAN),
            image_std=list(_CLIP_STD),
        )
    raise ValueError(f"unknown family {family!r}")
