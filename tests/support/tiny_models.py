"""Tiny random-init Hugging Face model folders, built with ``save_pretrained`` (never the hub).

Each builder writes a folder that ``from_pretrained`` loads offline, small enough to build in
well under a second; their answers are meaningless but have the real shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_mobilenet(folder: Path, *, labels: list[str], problem_type: str | None = None) -> Path:
    """A MobileNetV2 classifier (the bundled model's family, so the fast path applies)."""
    import transformers
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    config_cls: Any = MobileNetV2Config
    config = config_cls(
        depth_multiplier=0.35,
        image_size=64,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        problem_type=problem_type,
    )
    model: Any = MobileNetV2ForImageClassification(config)
    model.save_pretrained(folder)
    processor_cls = getattr(transformers, "MobileNetV2ImageProcessorPil", None)
    processor_cls = processor_cls or transformers.MobileNetV2ImageProcessor
    processor_cls(
        size={"shortest_edge": 72}, crop_size={"height": 64, "width": 64}
    ).save_pretrained(folder)
    return folder


def tiny_vit(folder: Path, *, labels: list[str], seed: int = 0) -> Path:
    """A 2-layer ViT classifier on 32x32 inputs."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config_cls: Any = ViTConfig
    config = config_cls(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64,
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
    )
    model: Any = ViTForImageClassification(config)
    model.save_pretrained(folder)
    processor: Any = ViTImageProcessor(size={"height": 32, "width": 32})
    processor.save_pretrained(folder)
    return folder


def tiny_vit_features(folder: Path, *, seed: int = 0) -> Path:
    """A 2-layer ViT backbone with its pooler (``ViTModel``), for ``image-feature-extraction``."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    config_cls: Any = ViTConfig
    config = config_cls(image_size=32, patch_size=8, num_channels=3, hidden_size=24,
                        num_hidden_layers=2, num_attention_heads=2, intermediate_size=48)
    model: Any = ViTModel(config, add_pooling_layer=True)
    model.save_pretrained(folder)
    processor: Any = ViTImageProcessor(size={"height": 32, "width": 32})
    processor.save_pretrained(folder)
    return folder


def tiny_detr(folder: Path, *, labels: list[str], seed: int = 0, short_side: int = 64,
              long_side: int = 96) -> Path:
    """A DETR detector on a tiny transformers ResNet backbone (no timm, nothing pretrained);
    its processor resizes the short side to ``short_side``."""
    import torch
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    torch.manual_seed(seed)
    backbone_cls: Any = ResNetConfig
    backbone = backbone_cls(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                            layer_type="basic", out_features=["stage2"])
    config_cls: Any = DetrConfig
    config = config_cls(
        backbone_config=backbone, num_queries=12, d_model=16, encoder_layers=1,
        decoder_layers=1, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
        decoder_attention_heads=2, id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    model: Any = DetrForObjectDetection(config)
    # DETR's own initialisation is tuned for training: at this size every query would give
    # the same box and score. Wider weights (the backbone's kept) make the answers differ.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "backbone" not in name and "norm" not in name:
                parameter.normal_(0.0, 0.2 if "bbox_predictor" in name else 0.5)
    model.save_pretrained(folder)
    processor: Any = DetrImageProcessor(size={"shortest_edge": short_side,
                                              "longest_edge": long_side})
    processor.save_pretrained(folder)
    return folder


def write_bpe_vocabulary(folder: Path, words: list[str]) -> tuple[Path, Path]:
    """A byte-level-BPE vocabulary by hand (CLIP's format): every lowercase letter, alone and
    word-final, the special tokens, and merges that make each of ``words`` one token."""
    import json

    tokens = ["<|startoftext|>", "<|endoftext|>"]
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens += list(letters) + [f"{letter}</w>" for letter in letters] + list(".,")
    tokens += [f"{mark}</w>" for mark in ".,"]
    merges = []
    for word in words:
        # merge left to right: "c a t</w>" -> "ca t</w>" -> "cat</w>"
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            if pieces[0] not in tokens:
                tokens.append(pieces[0])
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.json"
    vocab.write_text(json.dumps({token: i for i, token in enumerate(tokens)}), encoding="utf-8")
    merges_file = folder / "merges.txt"
    merges_file.write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n",
                           encoding="utf-8")
    return vocab, merges_file


def tiny_clip(folder: Path, *, words: list[str], seed: int = 0) -> Path:
    """A CLIP (2-layer towers) with a handmade BPE tokenizer knowing ``words`` as tokens."""
    import tempfile

    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        vocab, merges = write_bpe_vocabulary(Path(scratch), words)
        tokenizer_cls: Any = CLIPTokenizer
        tokenizer = tokenizer_cls(vocab=str(vocab), merges=str(merges))
        vocab_size = len(tokenizer)
    config_cls: Any = CLIPConfig
    config = config_cls(
        text_config={"vocab_size": vocab_size, "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 32, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 16,
                       "intermediate_size": 32, "num_hidden_layers": 2,
                       "num_attention_heads": 2},
        projection_dim=8,
    )
    model: Any = CLIPModel(config)
    model.save_pretrained(folder)
    image_processor: Any = CLIPImageProcessor(size={"shortest_edge": 32},
                                              crop_size={"height": 32, "width": 32})
    processor: Any = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def tiny_captioner(folder: Path, *, words: list[str], seed: int = 0) -> Path:
    """A VisionEncoderDecoder (a 1-layer ViT encoder, a 1-layer BERT decoder) with a handmade
    WordPiece vocabulary of ``words``."""
    import tempfile

    import torch
    from transformers import (
        BertConfig,
        BertTokenizer,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file = Path(scratch) / "vocab.txt"
        vocab_file.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])
                              + "\n", encoding="utf-8")
        tokenizer_cls: Any = BertTokenizer
        tokenizer = tokenizer_cls(vocab=str(vocab_file))
    encoder: Any = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=32)
    decoder: Any = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                              num_attention_heads=2, intermediate_size=32,
                              max_position_embeddings=64, is_decoder=True,
                              add_cross_attention=True)
    config_cls: Any = VisionEncoderDecoderConfig
    config = config_cls.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = tokenizer.cls_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.sep_token_id
    model: Any = VisionEncoderDecoderModel(config=config)
    model.generation_config.decoder_start_token_id = tokenizer.cls_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.sep_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor: Any = ViTImageProcessor(size={"height": 32, "width": 32})
    processor.save_pretrained(folder)
    return folder


def tiny_yolos(folder: Path, *, labels: list[str], seed: int = 0) -> Path:
    """A 2-layer YOLOS detector (a ViT with detection tokens) on 64-px inputs."""
    import torch
    from transformers import YolosConfig, YolosForObjectDetection, YolosImageProcessor

    torch.manual_seed(seed)
    config_cls: Any = YolosConfig
    config = config_cls(
        image_size=[64, 96], patch_size=16, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_detection_tokens=10,
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
    )
    model: Any = YolosForObjectDetection(config)
    model.save_pretrained(folder)
    processor: Any = YolosImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    processor.save_pretrained(folder)
    return folder
