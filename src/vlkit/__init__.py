"""vlkit: pretrain, fine-tune, evaluate and serve vision-language models (CLIP, ViT, NeVA) with PyTorch."""

__version__ = "0.1.0"
