"""`hgdeploy tune`. What it sweeps and keeps (`space`), the unpatched model's first blocks
replayed into every plan (`replay`), the downscaled-input baseline (`downscale`), tune.json/md/png and
best.toml (`report`), and the sweep (`run`).
"""
