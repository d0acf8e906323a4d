"""Adapter for Segmenter (Strudel et al.): ViT encoder + mask-transformer or linear decoder."""
