"""One file per model family, each a `Family` record (load, facts, patch, tiny,
write_checkpoint; `registry`), listed explicitly in `catalogue`; `dinov2` and `vit_common` are what
several families share.
"""
