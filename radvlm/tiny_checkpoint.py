"""A tiny LLaVA-OneVision checkpoint with random weights, built here, for tests on CPU.

The same classes, processor and configuration keys as RadVLM (anyres_max_9 over the 36
pinpoints of 384 px, 729 tokens a crop, "full" feature strategy, Qwen2 chat tokens), but a
2-layer SigLIP and a 2-layer Qwen2 of width 64 and a byte-level BPE tokenizer trained on
RadVLM's own phrasing. About a megabyte; loads in well under a second.
"""

from __future__ import annotations

from pathlib import Path

from radvlm import prompts

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]

_CORPUS = [
    prompts.REPORT, prompts.ABNORMALITIES, prompts.DETECTION,
    prompts.grounding_question("pleural effusion"), prompts.phrase_question("small left effusion"),
    "The following abnormalities are identified: atelectasis, cardiomegaly, consolidation, edema, "
    "enlarged cardiomediastinum, fracture, lung lesion, lung opacity, pleural effusion, pleural other, "
    "pneumonia, pneumothorax and support devices.",
    "Yes, there is one abnormality identified: pneumothorax.",
    "No abnormalities or lesions are detected on this Chest X-ray.",
    "The cardiomegaly is located at the coordinates [0.33, 0.45, 0.78, 0.79] on the image.",
    "The bounding box for this observation is [0.1, 0.23, 0.5, 0.6] and [0.62, 0.2, 0.91, 0.58].",
    "Findings: The lungs are clear. The cardiomediastinal silhouette is within normal limits. "
    "No pleural effusion or pneumothorax. Impression: No acute cardiopulmonary process.",
    "user assistant system 0123456789 .,;:[]()-",
]


def _shape(shape: str, vocab_size: int):  # type: ignore[no-untyped-def]
    """Vision and text configurations: ``tiny``, LLaVA-OneVision-0.5B's, or RadVLM's published 7B shape
    (LLaVA-OneVision-7B)."""
    from transformers import Qwen2Config, SiglipVisionConfig

    if shape == "tiny":
        return (SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   image_size=384, patch_size=14),
                # weights larger than the default 0.02: greedy answers then depend on the question, so
                # equality tests between decoding paths can tell the questions apart
                Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=32768,
                            initializer_range=0.3, tie_word_embeddings=False))
    if shape == "radvlm-7b":  # SigLIP so400m (26 layers kept) + Qwen2-7B, as in radvlm.md
        return (SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                   num_attention_heads=16, image_size=384, patch_size=14),
                Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                            num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                            rope_theta=1000000.0, tie_word_embeddings=False))
    if shape == "onevision-0.5b":  # SigLIP so400m + Qwen2-0.5B (LLaVA-OneVision-0.5B): a mid-size fine-tuning run
        return (SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                   num_attention_heads=16, image_size=384, patch_size=14),
                Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                            num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                            rope_theta=1000000.0, tie_word_embeddings=False))
    raise ValueError(f"shape must be 'tiny', 'onevision-0.5b' or 'radvlm-7b', not {shape!r}")


def make_test_model(folder: Path, seed: int = 0, shape: str = "tiny", device: str = "cpu") -> Path:
    """Write the checkpoint (model, processor, tokenizer, chat template) to ``folder``.

    ``shape="radvlm-7b"`` gives RadVLM's full size with random weights (16 GB in bf16), built on
    ``device`` for GPU benchmarks: compute and memory traffic do not depend on the weight values.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        PreTrainedTokenizerFast,
    )

    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )

    image_token = tokenizer.convert_tokens_to_ids("<image>")
    video_token = tokenizer.convert_tokens_to_ids("<video>")
    vision_config, text_config = _shape(shape, len(tokenizer))
    config = LlavaOnevisionConfig(
        vision_config=vision_config, text_config=text_config,
        image_token_index=image_token, video_token_index=video_token,
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9", image_grid_pinpoints=PINPOINTS, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if shape != "tiny" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaOnevisionForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")

    image_processor = LlavaOnevisionImageProcessor(
        size={"height": 384, "width": 384}, image_grid_pinpoints=PINPOINTS,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=LlavaOnevisionVideoProcessor(),
        num_image_tokens=729, vision_feature_select_strategy="full", chat_template=prompts.CHAT_TEMPLATE,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder

