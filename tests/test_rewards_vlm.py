"""VLM question reward on tiny random models of the real architectures, saved and loaded as a user has them.

Each family (Idefics3 / SmolVLM, Qwen2-VL, Qwen2.5-VL) gets a tiny model, a byte-level BPE tokenizer
trained on a few sentences (fmtt_testing.hf_models), a processor with a chat template, all written with save_pretrained
(safetensors) and loaded back through the public loader. The reward is checked against the stock HF
pipeline (processor on uint8 images -> model -> next-token softmax), against finite differences, and for
the batching / weighting / reference-image behaviour.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from fmtt_rewards.base import RewardInputError  # noqa: E402
from fmtt_rewards.vlm import Question, VLMQuestionReward, answer_token_ids, check_vlm_folder, load_vlm, load_vlm_reward  # noqa: E402
from fmtt_testing.hf_models import VLM_OTHER_QUESTION as OTHER_QUESTION  # noqa: E402
from fmtt_testing.hf_models import VLM_QUESTION as QUESTION  # noqa: E402
from fmtt_testing.hf_models import save_vlm  # noqa: E402

try:  # transformers' SmolVLM (v2) processor needs num2words; test_smolvlm_needs_num2words reports its absence
    import num2words  # noqa: F401
    FAMILIES = ["idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl"]
except ImportError:
    FAMILIES = ["idefics3", "qwen2_vl", "qwen2_5_vl"]
NATIVE_SIZE = {"idefics3": (32, 32), "smolvlm": (32, 32), "qwen2_vl": (16, 24), "qwen2_5_vl": (16, 24)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(family)
        save_vlm(folder, family)
        out[family] = folder
    return out


@pytest.fixture(scope="module")
def loaded(folders):
    """(model, processor) per family, float64 so finite differences are meaningful."""
    return {f: load_vlm(folders[f], dtype=torch.float64) for f in FAMILIES}


def reward_for(loaded, family, questions=QUESTION, **kwargs):
    model, processor = loaded[family]
    kwargs.setdefault("dtype", torch.float64)
    return VLMQuestionReward(model, processor, questions, **kwargs)


def images(batch, size, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return 0.2 + 0.6 * torch.rand(batch, 3, *size, generator=g, dtype=dtype)


def hf_reference_log_probs(model, processor, pixels_uint8, question, words):
    """The stock HF pipeline: processor on uint8 images, model, softmax; log P summed over `words` ids."""
    content = [{"type": "image"} for _ in pixels_uint8] + [{"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    kwargs = {} if model.config.model_type.startswith("qwen") else {"do_image_splitting": False}
    inputs = processor(text=[text], images=list(pixels_uint8), return_tensors="pt", **kwargs)
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1].double()
    ids = [i for w in words for i in answer_token_ids(processor.tokenizer, w)]
    return logits.log_softmax(-1)[:, sorted(set(ids))].logsumexp(-1)


def test_smolvlm_needs_num2words():
    pytest.importorskip("num2words", reason="SmolVLM2 (model_type smolvlm) is untested: pip install num2words")
    assert "smolvlm" in FAMILIES


# --- loading -----------------------------------------------------------------------------------


def test_public_loader_builds_a_working_reward(folders):
    reward = load_vlm_reward(folders["qwen2_vl"], [QUESTION], chunk_size=2)
    out = reward(images(3, (16, 24), dtype=torch.float32))
    assert out.shape == (3,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out < 0).all()  # log-probabilities


def test_half_precision_model_returns_float32_and_gradients(folders):
    reward = load_vlm_reward(folders["idefics3"], QUESTION, dtype=torch.bfloat16, answer="log_odds")
    assert next(reward.model.parameters()).dtype == torch.bfloat16
    x = images(2, (40, 40), dtype=torch.float32).requires_grad_()
    out = reward(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.sum().backward()
    assert x.grad.dtype == torch.float32 and x.grad.abs().sum() > 0


def test_loader_does_not_leave_offline_variables_changed(folders):
    before = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    load_vlm(folders["idefics3"])
    assert {k: os.environ.get(k) for k in before} == before


def test_missing_folder_and_files_are_listed(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="(?s)does not exist.*config.json.*model.safetensors"):
        check_vlm_folder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as err:
        check_vlm_folder(tmp_path)
    msg = str(err.value)
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "tokenizer.json",
                 "preprocessor_config.json", "chat_template.jinja", "hf download"):
        assert name in msg
    # A copy without weights names exactly that file as missing.
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in folders["idefics3"].iterdir():
        if f.name != "model.safetensors":
            (partial / f.name).write_bytes(f.read_bytes())
    (partial / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"missing: model.safetensors \(found \['pytorch_model.bin'\]"):
        load_vlm_reward(partial, QUESTION)


def test_hub_style_folder_loads(folders, tmp_path):
    """Folders downloaded from the Hub keep the image processor in preprocessor_config.json and the chat
    template in chat_template.json; that layout loads too."""
    src, dst = folders["qwen2_vl"], tmp_path / "hub"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    processor_config = json.loads((dst / "processor_config.json").read_text())
    (dst / "preprocessor_config.json").write_text(json.dumps(processor_config.pop("image_processor")))
    (dst / "processor_config.json").write_text(json.dumps(processor_config))
    (dst / "chat_template.json").write_text(json.dumps({"chat_template": (dst / "chat_template.jinja").read_text()}))
    (dst / "chat_template.jinja").unlink()
    check_vlm_folder(dst)
    reward = load_vlm_reward(dst, QUESTION)
    assert torch.isfinite(reward(images(1, (16, 24), dtype=torch.float32))).all()


def test_unsupported_model_type_is_named(folders, tmp_path):
    dst = tmp_path / "other"
    dst.mkdir()
    for f in folders["idefics3"].iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((dst / "config.json").read_text())
    config["model_type"] = "llava"
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type 'llava'.*qwen2_vl"):
        check_vlm_folder(dst)


# --- agreement with the stock HF pipeline ------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_hf_processor_pipeline(loaded, family):
    """On images already at the encoder's size (no resize) our tensor path reproduces the HF pipeline."""
    model, processor = loaded[family]
    g = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (2, 3, *NATIVE_SIZE[family]), generator=g, dtype=torch.uint8)
    expected_yes = torch.cat([hf_reference_log_probs(model, processor, [p], QUESTION, ["Yes"]) for p in pixels])
    expected_no = torch.cat([hf_reference_log_probs(model, processor, [p], QUESTION, ["No"]) for p in pixels])
    x = pixels.double() / 255
    log_prob = reward_for(loaded, family)(x).double()
    torch.testing.assert_close(log_prob, expected_yes, rtol=0, atol=1e-5)
    prob = reward_for(loaded, family, answer="prob")(x).double()
    torch.testing.assert_close(prob, expected_yes.exp(), rtol=1e-5, atol=1e-7)
    log_odds = reward_for(loaded, family, answer="log_odds")(x).double()
    torch.testing.assert_close(log_odds, expected_yes - expected_no, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["idefics3", "qwen2_vl"])
def test_reference_image_matches_hf_pipeline(loaded, family):
    model, processor = loaded[family]
    g = torch.Generator().manual_seed(2)
    ref, scored = torch.randint(0, 256, (2, 3, *NATIVE_SIZE[family]), generator=g, dtype=torch.uint8)
    expected = hf_reference_log_probs(model, processor, [ref, scored], OTHER_QUESTION, ["Yes"])
    reward = reward_for(loaded, family, questions=Question(OTHER_QUESTION, references=(ref.double() / 255,)))
    torch.testing.assert_close(reward(scored[None].double() / 255).double(), expected, rtol=0, atol=1e-5)


def test_qwen_resize_follows_smart_resize_and_stays_close_to_hf(loaded):
    """An odd-sized image is resized like the processor does (same grid); values differ only by the
    processor's uint8 rounding after resizing."""
    model, processor = loaded["qwen2_vl"]
    g = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (3, 21, 30), generator=g, dtype=torch.uint8)
    expected = hf_reference_log_probs(model, processor, [pixels], QUESTION, ["Yes"])
    ours = reward_for(loaded, "qwen2_vl")(pixels[None].double() / 255).double()
    inputs = processor(images=[pixels], text=["<|vision_start|><|image_pad|><|vision_end|>"], return_tensors="pt")
    assert reward_for(loaded, "qwen2_vl").pixels.encode(pixels[None].double() / 255).grid == \
        tuple(inputs["image_grid_thw"][0].tolist())
    # Scores of different random images spread by ~5e-3 with this tiny model; rounding costs ~1e-4.
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-3)


# --- the reward contract -----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_shape_finite_deterministic_and_chunking(loaded, family):
    x = images(5, (20, 28))
    whole = reward_for(loaded, family)(x)
    assert whole.shape == (5,) and whole.dtype == torch.float32 and torch.isfinite(whole).all()
    assert torch.equal(whole, reward_for(loaded, family)(x))
    chunked = reward_for(loaded, family, chunk_size=2)(x)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    assert whole.std() > 0  # different images, different scores


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_matches_finite_difference(loaded, family):
    reward = reward_for(loaded, family)
    x = images(2, (20, 28), seed=4).requires_grad_()
    reward.evaluate(x).sum().backward()
    assert x.grad.abs().sum() > 0
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    # The models' RMSNorms compute in float32 even for float64 weights, so the forward carries ~1e-7
    # noise: a larger step keeps it below the tolerance (central-difference error is O(eps^2)).
    eps = 1e-3
    with torch.no_grad():
        fd = (reward.evaluate(x + eps * v) - reward.evaluate(x - eps * v)).sum() / (2 * eps)
    torch.testing.assert_close((x.grad * v).sum(), fd, rtol=2e-3, atol=1e-6)


def test_weighted_questions_are_the_weighted_sum(loaded):
    x = images(3, (16, 24), seed=6)
    single = [reward_for(loaded, "qwen2_vl", questions=q)(x) for q in (QUESTION, OTHER_QUESTION)]
    both = reward_for(loaded, "qwen2_vl", questions=[QUESTION, OTHER_QUESTION], weights=[0.7, -1.3])(x)
    torch.testing.assert_close(both, 0.7 * single[0] - 1.3 * single[1], rtol=0, atol=1e-6)
    as_objects = reward_for(loaded, "qwen2_vl", questions=[Question(QUESTION, 0.7), Question(OTHER_QUESTION, -1.3)])
    torch.testing.assert_close(as_objects(x), both, rtol=0, atol=1e-6)
    assert not torch.allclose(single[0], single[1])


@pytest.mark.parametrize("family", ["idefics3", "qwen2_5_vl"])
def test_reference_image_changes_the_score_and_gets_no_gradient(loaded, family):
    x = images(2, (20, 28), seed=7)
    ref_a = images(1, (24, 24), seed=8)[0]
    ref_b = images(1, (24, 24), seed=9)[0].requires_grad_()
    plain = reward_for(loaded, family, questions=OTHER_QUESTION)(x)
    with_a = reward_for(loaded, family, questions=Question(OTHER_QUESTION, references=(ref_a,)))(x)
    with_b = reward_for(loaded, family, questions=Question(OTHER_QUESTION, references=(ref_b,)))
    x_grad = x.clone().requires_grad_()
    scores_b = with_b(x_grad)
    assert (with_a - plain).abs().min() > 1e-6
    assert (with_a - scores_b).abs().min() > 1e-6
    scores_b.sum().backward()
    assert ref_b.grad is None and x_grad.grad.abs().sum() > 0
    two_refs = reward_for(loaded, family, questions=Question(OTHER_QUESTION, references=(torch.stack([ref_a, ref_b]),)))
    assert torch.isfinite(two_refs(x)).all()


def test_both_spellings_of_yes_count(loaded):
    _, processor = loaded["idefics3"]
    ids = answer_token_ids(processor.tokenizer, "Yes")
    spelled = {processor.tokenizer.decode([i]) for i in ids}
    assert spelled == {"Yes", " Yes"}
    with pytest.raises(ValueError, match="no single token for 'Absolutely'"):
        reward_for(loaded, "idefics3", yes_word="Absolutely")


def test_uniform_mean_grey_image_is_not_dropped_as_padding(loaded):
    """Idefics3 drops images that are exactly 0 after normalisation (its batch padding); a uniform grey
    equal to the mean must still be scored."""
    out = reward_for(loaded, "idefics3")(torch.full((2, 3, 32, 32), 0.5, dtype=torch.float64))
    assert torch.isfinite(out).all()


# --- bad input ---------------------------------------------------------------------------------


def test_bad_inputs_name_the_fix(loaded):
    reward = reward_for(loaded, "qwen2_vl")
    with pytest.raises(RewardInputError, match="3 \\(RGB\\) channels"):
        reward(torch.rand(1, 4, 16, 16, dtype=torch.float64))
    with pytest.raises(RewardInputError, match="\\(x \\+ 1\\) / 2"):
        reward(torch.rand(1, 3, 16, 16, dtype=torch.float64) * 2 - 1)
    with pytest.raises(ValueError, match="No questions given"):
        reward_for(loaded, "qwen2_vl", questions=[])
    with pytest.raises(ValueError, match="one weight per question"):
        reward_for(loaded, "qwen2_vl", questions=[QUESTION], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="answer='logit'"):
        reward_for(loaded, "qwen2_vl", answer="logit")
    with pytest.raises(ValueError, match="max_pixels applies to the Qwen2-VL family only"):
        reward_for(loaded, "idefics3", max_pixels=1024)
    with pytest.raises(RewardInputError, match="reference image"):
        reward_for(loaded, "qwen2_vl", questions=Question(QUESTION, references=(torch.rand(1, 16, 16),)))
