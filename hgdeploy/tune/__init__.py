"""`hgdeploy tune`. What it sweeps and keeps (`space`), the ledger of measured rows and tune.json (`ledger`),
the unpatched model's first blocks replayed into every plan (`replay`), the downscaled-input baseline
(`downscale`), the scoring phases (`score`), the rules it decides by (`select`), the latency phase on the export
road (`latency`), tune.md/png and best.toml (`report`), and the sweep in order (`run`).
"""
