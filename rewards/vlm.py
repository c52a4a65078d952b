"""VLM question reward: how surely a vision-language model answers "Yes".

For questions q_1..q_K with weights w_k, the reward of an image x is

    r(x) = sum_k w_k * a(x, q_k),   a = log P(Yes)            (answer="log_prob", default)
                                        P(Yes)                (answer="prob")
                                        log P(Yes) - log P(No) (answer="log_odds")

where P is the model's next-token distribution right after the assistant prompt of a chat turn
"[reference images...] <image x> question". P(Yes) sums the probabilities of every single-token
spelling of the answer word ("Yes" and " Yes"): chat templates differ on whether the answer starts
with a space (SmolVLM's "Assistant: Yes", Qwen's "assistant\\nYes").

Gradients must reach the pixels of x, so the image side never goes through the HF image processors
(they convert to PIL / numpy). Their tensor-side steps are reimplemented in torch below: resize
(bicubic, antialiased), rescale (inputs are already in [0, 1]), normalise, and the family's packing:

  * Idefics3 / SmolVLM: every image is squared to the encoder side S = max_image_size["longest_edge"]
    (image splitting off, as the processors do with do_image_splitting=False), stacked as
    pixel_values [B, n_images, 3, S, S].
  * Qwen2-VL / Qwen2.5-VL: every image is resized with the processor's `smart_resize` (sides multiple of
    patch * merge, pixel count within [min_pixels, max_pixels]), patchified to
    pixel_values [B * patches, C * temporal * patch * patch] plus image_grid_thw.

The processor and chat template are used only for the text: they expand the image placeholders into
the right number of image tokens. They are run once per prompt and image size on blank stand-in images
of exactly the sizes our tensor path produces, and the result is checked against our own packing.
Reference images go through the same tensor path (without gradient).

Loading is from a local folder only, offline; see `load_vlm_reward` and `check_vlm_folder`.
"""
from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import Reward, check_images
from .local_files import RewardFilesError, check_folder_weights, hub_offline, loading_errors, read_json

ANSWER_MODES = ("log_prob", "prob", "log_odds")

# config.json model_type -> transformers model class
_MODEL_CLASSES = {
    "idefics3": "Idefics3ForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}

EXPECTED_FILES = """\
  config.json                     model config; model_type one of {types}
  model.safetensors               weights (or model.safetensors.index.json plus every shard it lists)
  tokenizer_config.json           tokenizer settings
  tokenizer.json                  tokenizer (or vocab.json + merges.txt, or tokenizer.model)
  preprocessor_config.json        image processor settings (or processor_config.json with "image_processor")
  chat_template.jinja             chat template (or chat_template.json, or a "chat_template" entry in
                                  tokenizer_config.json / processor_config.json)"""


# ---------------------------------------------------------------------------------------------
# Questions and answers


@dataclass(frozen=True)
class Question:
    """One yes/no question, its weight, and optional reference images shown before the scored image.

    references: images [3, H, W] or [N, 3, H, W] in [0, 1]; the prompt is
    "<reference 1> ... <reference N> <scored image> text", so say so in the text
    ("The first image is a reference. Is the second image in the same style?").
    """
    text: str
    weight: float = 1.0
    references: tuple[torch.Tensor, ...] = field(default=())


def as_questions(questions: str | Question | Sequence[str | Question],
                 weights: Sequence[float] | None = None) -> list[Question]:
    """Normalise user input to a non-empty list of Questions (strings get weight 1 or `weights`)."""
    if isinstance(questions, (str, Question)):
        questions = [questions]
    questions = [q if isinstance(q, Question) else Question(str(q)) for q in questions]
    if not questions:
        raise ValueError("No questions given: pass at least one, e.g. "
                         "questions=['Is this a photo of a red apple?'].")
    if weights is not None:
        if len(weights) != len(questions):
            raise ValueError(f"Got {len(weights)} weights for {len(questions)} questions: "
                             "give one weight per question.")
        questions = [Question(q.text, float(w), q.references) for q, w in zip(questions, weights)]
    for q in questions:
        if not q.text.strip():
            raise ValueError("A question is empty: every question needs text, e.g. 'Is there a cat in the image?'.")
        if not math.isfinite(q.weight):
            raise ValueError(f"Question {q.text!r} has weight {q.weight}: weights must be finite numbers.")
    return questions


def answer_token_ids(tokenizer, word: str) -> list[int]:
    """Ids of the single-token spellings of `word` with and without a leading space."""
    ids, pieces = [], {}
    for variant in (word, " " + word):
        encoded = tokenizer.encode(variant, add_special_tokens=False)
        pieces[variant] = tokenizer.convert_ids_to_tokens(encoded)
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(encoded[0])
    if not ids:
        raise ValueError(f"The tokenizer has no single token for {word!r} or {' ' + word!r} (they split into "
                         f"{pieces}); choose answer words that are single tokens, e.g. 'Yes' / 'No'.")
    return ids


# ---------------------------------------------------------------------------------------------
# Tensor-side image processing (what the HF image processors do, kept differentiable)


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    # Antialiased bicubic is PIL's bicubic filter; Idefics3's LANCZOS has no tensor version, and
    # bicubic is its closest smooth stand-in. Half precision resizes in float32 (more accurate, and
    # CPU kernels lack bfloat16).
    work = torch.promote_types(images.dtype, torch.float32)
    resized = F.interpolate(images.to(work), size=size, mode="bicubic", align_corners=False, antialias=True)
    return resized.to(images.dtype)


def _size_entry(size, key: str):
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: sides multiple of `factor`, area in [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"Image aspect ratio {max(height, width) / min(height, width):.0f} is above the 200 "
                         "Qwen2-VL accepts; crop the image first.")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


class _Normalize:
    def __init__(self, image_processor):
        self.enabled = getattr(image_processor, "do_normalize", True)
        self.mean = list(image_processor.image_mean)
        self.std = list(image_processor.image_std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return images
        mean = images.new_tensor(self.mean).view(1, -1, 1, 1)
        std = images.new_tensor(self.std).view(1, -1, 1, 1)
        return (images - mean) / std


class Idefics3Pixels:
    """Idefics3 / SmolVLM packing: images squared to side S, pixel_values [B, n_images, 3, S, S]."""

    processor_kwargs = {"do_image_splitting": False}

    def __init__(self, image_processor, max_pixels: int | None = None):
        if max_pixels is not None:
            raise ValueError("max_pixels applies to the Qwen2-VL family only; Idefics3 / SmolVLM always see "
                             "images at the encoder's fixed size. Leave max_pixels=None.")
        self.side = int(_size_entry(image_processor.max_image_size, "longest_edge"))
        self.normalize = _Normalize(image_processor)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        encoded = self.normalize(_resize(images, (self.side, self.side)))
        # The model treats an image that is exactly 0 everywhere as batch padding and drops it
        # (e.g. a uniform image equal to the mean); nudge such images off exact zero.
        blank = (encoded == 0).flatten(1).all(1)
        if blank.any():
            encoded = encoded + blank.view(-1, 1, 1, 1) * torch.finfo(encoded.dtype).eps
        return encoded

    @staticmethod
    def stand_in_size(encoded: torch.Tensor) -> tuple[int, int]:
        return tuple(encoded.shape[-2:])

    @staticmethod
    def model_inputs(references: list[torch.Tensor], scored: torch.Tensor) -> dict:
        batch = scored.shape[0]
        refs = [r.expand(batch, -1, -1, -1) for r in references]
        return {"pixel_values": torch.stack(refs + [scored], dim=1).contiguous()}

    @staticmethod
    def check_against_processor(ours: dict, processor_out: dict) -> None:
        theirs = tuple(processor_out["pixel_values"].shape[1:])
        if tuple(ours["pixel_values"].shape[1:]) != theirs:
            raise RuntimeError(f"Pixel layout {tuple(ours['pixel_values'].shape[1:])} differs from the processor's "
                               f"{theirs}; this transformers version packs Idefics3 images differently.")


@dataclass
class _QwenImages:
    patches: torch.Tensor  # [N, grid_h * grid_w, C * temporal * patch * patch]
    grid: tuple[int, int, int]  # (t, grid_h, grid_w)


class QwenVLPixels:
    """Qwen2-VL / Qwen2.5-VL packing: smart_resize, normalise, patchify to [patches, C*T*P*P] + image_grid_thw."""

    processor_kwargs: dict = {}

    def __init__(self, image_processor, max_pixels: int | None = None):
        size = getattr(image_processor, "size", None) or {}
        self.min_pixels = int(getattr(image_processor, "min_pixels", None) or _size_entry(size, "shortest_edge"))
        self.max_pixels = int(max_pixels or getattr(image_processor, "max_pixels", None)
                              or _size_entry(size, "longest_edge"))
        self.patch = int(image_processor.patch_size)
        self.merge = int(image_processor.merge_size)
        self.temporal = int(image_processor.temporal_patch_size)
        self.normalize = _Normalize(image_processor)

    def encode(self, images: torch.Tensor) -> _QwenImages:
        h, w = smart_resize(*images.shape[-2:], factor=self.patch * self.merge,
                            min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        x = self.normalize(_resize(images, (h, w)))
        n, c = x.shape[:2]
        p, m, gh, gw = self.patch, self.merge, h // self.patch, w // self.patch
        # Same order as the processor: merge blocks row-major, inside each block (channel, time, y, x);
        # a still image is repeated over the temporal patch.
        x = x.reshape(n, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, self.temporal, -1, -1)
        return _QwenImages(x.reshape(n, gh * gw, c * self.temporal * p * p), (1, gh, gw))

    def stand_in_size(self, encoded: _QwenImages) -> tuple[int, int]:
        return encoded.grid[1] * self.patch, encoded.grid[2] * self.patch

    @staticmethod
    def model_inputs(references: list[_QwenImages], scored: _QwenImages) -> dict:
        batch = scored.patches.shape[0]
        per_sample = [r.patches.expand(batch, -1, -1) for r in references] + [scored.patches]
        pixel_values = torch.cat(per_sample, dim=1).reshape(-1, scored.patches.shape[-1])
        grids = [r.grid for r in references] + [scored.grid]
        return {"pixel_values": pixel_values,
                "image_grid_thw": torch.tensor(grids * batch, dtype=torch.long, device=pixel_values.device)}

    @staticmethod
    def check_against_processor(ours: dict, processor_out: dict) -> None:
        n_images = processor_out["image_grid_thw"].shape[0]
        if not torch.equal(ours["image_grid_thw"][:n_images].cpu(), processor_out["image_grid_thw"].cpu()):
            raise RuntimeError(f"Image grids {ours['image_grid_thw'][:n_images].tolist()} differ from the processor's "
                               f"{processor_out['image_grid_thw'].tolist()}; check min_pixels / max_pixels.")


_PIXELS = {"idefics3": Idefics3Pixels, "smolvlm": Idefics3Pixels,
           "qwen2_vl": QwenVLPixels, "qwen2_5_vl": QwenVLPixels}
_PIXEL_KEYS = ("pixel_values", "pixel_attention_mask", "image_grid_thw", "rows", "cols", "image_sizes")


# ---------------------------------------------------------------------------------------------
# The reward


class VLMQuestionReward(Reward):
    """Weighted sum over questions of the model's confidence that the answer is "Yes".

    model: a transformers Idefics3 / SmolVLM / Qwen2-VL / Qwen2.5-VL ...ForConditionalGeneration;
    processor: its processor (tokenizer + chat template + image processor settings);
    questions: str, Question, or a list of them; weights: optional, one per question (overrides Question.weight);
    answer: "log_prob" (log P(Yes), default), "prob" (P(Yes)) or "log_odds" (log P(Yes) - log P(No));
    yes_word / no_word: the answer words (each must be a single token, with or without leading space);
    max_pixels: Qwen2-VL family only, caps the working resolution (compute and memory grow with it).
    """

    def __init__(self, model, processor, questions, *, weights: Sequence[float] | None = None,
                 answer: str = "log_prob", yes_word: str = "Yes", no_word: str = "No",
                 max_pixels: int | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, chunk_size: int | None = None):
        super().__init__(device=device, dtype=dtype, chunk_size=chunk_size)
        if answer not in ANSWER_MODES:
            raise ValueError(f"answer={answer!r} is not one of {ANSWER_MODES}.")
        model_type = getattr(model.config, "model_type", None)
        if model_type not in _PIXELS:
            raise ValueError(f"Unsupported VLM model_type {model_type!r}; supported: {sorted(_PIXELS)}.")
        self.model = model.to(self.device, self.dtype)
        self.processor = processor
        self.answer = answer
        self.questions = as_questions(questions, weights)
        self.pixels = _PIXELS[model_type](processor.image_processor, max_pixels=max_pixels)
        self.yes_ids = answer_token_ids(processor.tokenizer, yes_word)
        self.no_ids = answer_token_ids(processor.tokenizer, no_word) if answer == "log_odds" else []
        forward_params = inspect.signature(self.model.forward).parameters
        self._text_keys = set(forward_params) - set(_PIXEL_KEYS)
        self._keep_last = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in forward_params), None)
        with torch.no_grad():
            self._references = [self._encode_references(q) for q in self.questions]
        self._prompts: dict[tuple[int, tuple[int, int]], dict] = {}
        self.freeze()

    def _encode_references(self, question: Question) -> list:
        encoded = []
        for ref in question.references:
            ref = ref.unsqueeze(0) if ref.ndim == 3 else ref
            check_images(ref, name=f"reference image of question {question.text!r}")
            encoded += [self.pixels.encode(r.unsqueeze(0).to(self.device, self.dtype)) for r in ref]
        return encoded

    def _prompt(self, index: int, scored_size: tuple[int, int], pixel_inputs: dict) -> dict:
        """Text inputs (batch 1) for question `index` with the scored image at `scored_size`."""
        key = (index, scored_size)
        if key not in self._prompts:
            refs = self._references[index]
            content = [{"type": "image"} for _ in range(len(refs) + 1)]
            content.append({"type": "text", "text": self.questions[index].text})
            text = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True, tokenize=False)
            stand_ins = [torch.zeros(3, *size, dtype=torch.uint8)
                         for size in [self.pixels.stand_in_size(r) for r in refs] + [scored_size]]
            out = self.processor(text=[text], images=stand_ins, return_tensors="pt", do_resize=False,
                                 **self.pixels.processor_kwargs)
            self.pixels.check_against_processor(pixel_inputs, out)
            self._prompts[key] = {k: v.to(self.device) for k, v in out.items() if k in self._text_keys}
        return self._prompts[key]

    def _next_token_logits(self, scored, batch: int, index: int) -> torch.Tensor:
        """Logits [B, vocab] of the first answer token for question `index`."""
        inputs = self.pixels.model_inputs(self._references[index], scored)
        prompt = self._prompt(index, self.pixels.stand_in_size(scored), inputs)
        inputs.update({k: v.repeat(batch, *[1] * (v.ndim - 1)) for k, v in prompt.items()})
        if self._keep_last:
            inputs[self._keep_last] = 1
        return self.model(**inputs, use_cache=False).logits[:, -1]

    def answer_score(self, logits: torch.Tensor) -> torch.Tensor:
        log_p = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
        log_yes = log_p[:, self.yes_ids].logsumexp(-1)
        if self.answer == "prob":
            return log_yes.exp()
        if self.answer == "log_odds":
            return log_yes - log_p[:, self.no_ids].logsumexp(-1)
        return log_yes

    def evaluate(self, images: torch.Tensor) -> torch.Tensor:
        scored = self.pixels.encode(images)
        total = 0.0
        for index, question in enumerate(self.questions):
            logits = self._next_token_logits(scored, images.shape[0], index)
            total = total + question.weight * self.answer_score(logits)
        return total


# ---------------------------------------------------------------------------------------------
# Loading from a local folder


def _missing_files(folder: Path) -> list[str]:
    def has(*names: str) -> bool:
        return any((folder / n).is_file() for n in names)

    def json_has(name: str, key: str) -> bool:
        try:
            return key in json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False

    missing = []
    if not has("config.json"):
        missing.append("config.json")
    if has("model.safetensors.index.json"):
        index = read_json(folder / "model.safetensors.index.json", "VLM")
        missing += sorted({s for s in index.get("weight_map", {}).values() if not (folder / s).is_file()})
    elif not has("model.safetensors"):
        bins = sorted(p.name for p in folder.glob("*.bin"))
        missing.append("model.safetensors" + (f" (found {bins}: pickle weights are not loaded; convert them to "
                                              "safetensors)" if bins else ""))
    if not has("tokenizer_config.json"):
        missing.append("tokenizer_config.json")
    if not (has("tokenizer.json", "tokenizer.model") or has("vocab.json") and has("merges.txt")):
        missing.append("tokenizer.json (or vocab.json + merges.txt, or tokenizer.model)")
    if not (has("preprocessor_config.json") or json_has("processor_config.json", "image_processor")):
        missing.append("preprocessor_config.json")
    if not (has("chat_template.jinja", "chat_template.json") or json_has("tokenizer_config.json", "chat_template")
            or json_has("processor_config.json", "chat_template")):
        missing.append("chat_template.jinja (or chat_template.json)")
    return missing


def check_vlm_folder(path: str | os.PathLike) -> Path:
    """Raise RewardFilesError (a FileNotFoundError) listing exactly what a usable local VLM folder lacks."""
    folder = Path(path).expanduser()
    expected = EXPECTED_FILES.format(types=", ".join(sorted(_MODEL_CLASSES)))
    how = ("Download the complete model repository on a machine with network access, e.g. "
           "`hf download HuggingFaceTB/SmolVLM-256M-Instruct --local-dir <folder>` (older huggingface_hub: "
           "`huggingface-cli download ...`), and copy the folder.")
    if not folder.is_dir():
        raise RewardFilesError(f"VLM folder {str(folder)!r} does not exist. It must contain:\n{expected}\n{how}")
    missing = _missing_files(folder)
    if missing:
        raise RewardFilesError(f"VLM folder {str(folder)!r} is incomplete; missing: {', '.join(missing)}.\n"
                                f"It must contain:\n{expected}\n{how}")
    model_type = read_json(folder / "config.json", "VLM").get("model_type")
    if model_type not in _MODEL_CLASSES:
        raise ValueError(f"{folder / 'config.json'} has model_type {model_type!r}; supported VLM families: "
                         f"{sorted(_MODEL_CLASSES)} (SmolVLM / Idefics3, Qwen2-VL, Qwen2.5-VL).")
    check_folder_weights(folder, "VLM")  # a damaged weights file is named before gigabytes are built
    return folder


def load_vlm(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32):
    """(model, processor) from a local folder, offline (local_files_only plus the HF offline variables while
    loading); see EXPECTED_FILES."""
    folder = check_vlm_folder(path)
    model_type = read_json(folder / "config.json", "VLM")["model_type"]
    with hub_offline():
        import transformers
        from packaging.version import Version

        model_class = getattr(transformers, _MODEL_CLASSES[model_type], None)
        if model_class is None:
            raise ImportError(f"transformers {transformers.__version__} has no {_MODEL_CLASSES[model_type]}; "
                              "upgrade it: pip install -U transformers.")
        dtype_kw = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        with loading_errors("VLM", folder, "processor (tokenizer, image processor, chat template)"):
            processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True,
                                                                   trust_remote_code=False)
        with loading_errors("VLM", folder, "model"):
            model = model_class.from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                                use_safetensors=True, **{dtype_kw: dtype})
    return model.eval(), processor


def load_vlm_reward(path: str | os.PathLike, questions, *, weights: Sequence[float] | None = None,
                    answer: str = "log_prob", yes_word: str = "Yes", no_word: str = "No",
                    max_pixels: int | None = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, chunk_size: int | None = None) -> VLMQuestionReward:
    """A VLMQuestionReward from a local model folder (SmolVLM / Idefics3, Qwen2-VL, Qwen2.5-VL)."""
    questions = as_questions(questions, weights)  # fail on bad questions before loading gigabytes
    model, processor = load_vlm(path, dtype=dtype)
    return VLMQuestionReward(model, processor, questions, answer=answer, yes_word=yes_word, no_word=no_word,
                             max_pixels=max_pixels, device=device, dtype=dtype, chunk_size=chunk_size)
