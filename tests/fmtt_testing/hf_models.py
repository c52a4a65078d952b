"""Tiny random Hugging Face model folders of the real architectures, written with save_pretrained (safetensors),
with real (small) tokenizers, as a user has them on disk. Needs torch, transformers and tokenizers only, so the
real-ComfyUI suite runs it with ComfyUI's python too."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Random init leaves LayerNorms at (1, 0) and some biases at 0; perturb every tensor so that
    a swapped or dropped weight changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


# ---------------------------------------------------------------- CLIP

def register_open_clip_archs(folder: Path, archs: dict[str, dict]) -> None:
    """Make tiny open_clip architectures known by name (open_clip reads model configs from JSON files)."""
    import open_clip
    for name, cfg in archs.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(folder / f"{name}.json")


def bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte-level alphabet (the published mapping), to write a real vocab.json."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_clip_tokenizer(folder: Path) -> int:
    """A small but real CLIP BPE tokenizer (vocab.json + merges.txt); returns the vocabulary size."""
    chars = bytes_to_unicode()
    merges = ["c a", "ca t</w>", "r e", "re d</w>", "p h", "o t", "ph ot", "phot o</w>", "o n</w>", "t h", "th e</w>"]
    vocab = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def write_hf_clip_folder(folder: Path):
    """A transformers CLIP folder: config.json, model.safetensors, tokenizer files, and a
    preprocessor_config.json with non-default statistics and a resize-then-crop geometry. Returns the model."""
    import transformers
    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_clip_tokenizer(folder)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=24, bos_token_id=vocab - 2,
                         eos_token_id=vocab - 1, pad_token_id=vocab - 1),
        vision_config=dict(image_size=32, patch_size=16, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=16)
    torch.manual_seed(2)
    model = perturb_(transformers.CLIPModel(config), seed=3).eval()
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 36},
        "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.4, 0.3],
        "image_std": [0.2, 0.25, 0.3], "resample": 3}))
    return model


# ---------------------------------------------------------------- vision-language models

VLM_QUESTION = "Is this a photo of a cat?"
VLM_OTHER_QUESTION = "Does it match the style of the reference?"
CORPUS = ["Yes No Yes No", "Yes, No.", "Yes\nNo\n", VLM_QUESTION, VLM_OTHER_QUESTION,
          "User: Assistant: system user assistant You are a helpful assistant."] * 4

IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer(specials: list[str], **special_kwargs):
    """A byte-level BPE tokenizer trained here on CORPUS (so "Yes" and "No" are single tokens)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **special_kwargs)


def save_idefics3(folder: Path, family: str = "idefics3") -> None:
    """Idefics3 (SmolVLM v1) or SmolVLM2 (`smolvlm`, same layout plus a video processor)."""
    import transformers
    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                "<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tok = tiny_tokenizer(specials, bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|endoftext|>")
    smol = family == "smolvlm"
    config = (transformers.SmolVLMConfig if smol else transformers.Idefics3Config)(
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=256, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = (transformers.SmolVLMForConditionalGeneration if smol
             else transformers.Idefics3ForConditionalGeneration)(config)
    image_processor = (transformers.SmolVLMImageProcessor if smol else transformers.Idefics3ImageProcessor)(
        size={"longest_edge": 32}, max_image_size={"longest_edge": 32}, do_image_splitting=False)
    kwargs = dict(image_processor=image_processor, tokenizer=tok, image_seq_len=model.model.image_seq_len,
                  chat_template=IDEFICS3_TEMPLATE)
    if smol:
        kwargs["video_processor"] = transformers.SmolVLMVideoProcessor()
    processor = (transformers.SmolVLMProcessor if smol else transformers.Idefics3Processor)(**kwargs)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)


def save_qwen(folder: Path, family: str) -> None:
    """Qwen2-VL (`qwen2_vl`) or Qwen2.5-VL (`qwen2_5_vl`)."""
    import transformers
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tok = tiny_tokenizer(specials, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    vision = dict(depth=1, hidden_size=32, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if family == "qwen2_vl":
        config = transformers.Qwen2VLConfig(text_config=text, vision_config=dict(vision, embed_dim=32, mlp_ratio=2),
                                            **tokens)
        model_class, processor_class = transformers.Qwen2VLForConditionalGeneration, transformers.Qwen2VLProcessor
    else:
        vision.update(intermediate_size=64, out_hidden_size=32, window_size=16, fullatt_block_indexes=[0])
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
        model_class, processor_class = transformers.Qwen2_5_VLForConditionalGeneration, transformers.Qwen2_5_VLProcessor
    torch.manual_seed(0)
    model = model_class(config)
    image_processor = transformers.Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                                         min_pixels=8 * 8, max_pixels=32 * 32)
    kwargs = dict(image_processor=image_processor, tokenizer=tok, chat_template=QWEN_TEMPLATE)
    if "video_processor" in inspect.signature(processor_class.__init__).parameters:
        kwargs["video_processor"] = transformers.Qwen2VLVideoProcessor()
    model.save_pretrained(folder, safe_serialization=True)
    processor_class(**kwargs).save_pretrained(folder)


def save_vlm(folder: Path, family: str) -> None:
    """Any of the supported VLM families: idefics3, smolvlm, qwen2_vl, qwen2_5_vl."""
    if family.startswith("qwen"):
        save_qwen(folder, family)
    else:
        save_idefics3(folder, family)
