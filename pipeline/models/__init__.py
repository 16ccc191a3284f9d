"""The dual Transformer for text-based person search: towers, tokenizers, preprocessing, mixup."""

from .dual_encoder import CONFIG_NAME, WEIGHTS_NAME, DualEncoder, NoTrainedModel, build_model, minilm_path, trained_model
from .mixup import FeatureMix, feature_mixing
from .preprocessing import CLIP_MEAN, CLIP_STD, VIT_MEAN, VIT_STD, ImagePreprocessor
from .tokenization import tokenize, train_caption_tokenizer
from .towers import BertTower, CLIPTextTower, CLIPVisionTower, Tower, ViTTower

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CONFIG_NAME",
    "VIT_MEAN",
    "VIT_STD",
    "WEIGHTS_NAME",
    "BertTower",
    "CLIPTextTower",
    "CLIPVisionTower",
    "DualEncoder",
    "NoTrainedModel",
    "FeatureMix",
    "ImagePreprocessor",
    "Tower",
    "ViTTower",
    "build_model",
    "feature_mixing",
    "minilm_path",
    "tokenize",
    "trained_model",
    "train_caption_tokenizer",
]
