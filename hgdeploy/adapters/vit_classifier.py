"""Adapters for plain ViT classifiers: timm `VisionTransformer` and torchvision `VisionTransformer`."""
