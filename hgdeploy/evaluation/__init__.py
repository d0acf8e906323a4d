"""`hgdeploy eval`. Dataset layouts (`datasets`), task metrics accumulated per image
(`metrics`), the three models scored side by side (`scoring`), eval.json/md/png (`report`), sample datasets
from bundled labelled photos (`samples`), and the command itself (`run`).
"""
