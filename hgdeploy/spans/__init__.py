"""What an adapter inserts around a model's own blocks. `vit` wraps a plain ViT's blocks
between clustering and reconstruction; `swin` and `sam` do it inside every attention window, with the
windowed attention re-fitted to the clustered window (`window_attention`).
"""
