"""What the scripts share and the library does not need: README blocks regenerated from the tool's own output,
and the hgdeploy commands a script runs as child processes. Scripts import it as `from common import ...`
(`python scripts/x.py` puts scripts/ on the path); the library itself is read through `hgdeploy`'s public names.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from hgdeploy import to_json, write_atomic


def replace_block(text: str, name: str, body: str) -> str:
    """`text` with the block between <!-- name:start --> and <!-- name:end --> set to `body` (appended if absent).

    How the scripts regenerate README sections from the tool's own output.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body}\n{end}"
    if start in text:
        return re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    return text + "\n" + block + "\n"


def publish(body: str, block: str, readme: Path, results: Path, data: Any, check: bool = False) -> None:
    """What a scripts/ measurement ends with: print its README block; unless `check`, write its data to
    `results` (JSON) and the block between README's <!-- block:start/end --> markers."""
    print(body)
    if check:
        return
    write_atomic(results, to_json(data))
    write_atomic(readme, replace_block(readme.read_text(), block, body))


# How long an interrupted child gets to end on the Ctrl-C the terminal sent it too, before it is sent one itself.
CHILD_GRACE_S = 60


def run_child(cmd: list[str], **popen: Any) -> subprocess.CompletedProcess:
    """subprocess.run for a script's hgdeploy command, except on Ctrl-C. A terminal's Ctrl-C reaches the child
    too, and it needs time to remove its staging folders; subprocess.run kills it 0.25 s later, leaving them
    behind. Here the child gets CHILD_GRACE_S to end (then a SIGINT of its own, in case only this process was
    interrupted), and the KeyboardInterrupt goes on once it has."""
    with subprocess.Popen(cmd, **popen) as child:
        try:
            out, err = child.communicate()
        except KeyboardInterrupt:
            try:
                child.communicate(timeout=CHILD_GRACE_S)
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGINT)
                child.communicate()
            raise
    return subprocess.CompletedProcess(cmd, child.returncode, out, err)


def tree_rss_gb(pid: int) -> float:
    """The summed resident memory (GB) of `pid` and all its descendants now, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    total_kb, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        found = re.search(r"^VmRSS:\s+(\d+)", status, flags=re.M)
        total_kb += int(found.group(1)) if found else 0
        todo += children.get(current, [])
    return total_kb / 1024 ** 2


def run_sampled(cmd: list[str], every_s: float = 0.5, **popen: Any) -> tuple[int, float]:
    """Run `cmd` to its end: (exit code, the largest summed resident memory of its process tree, in GB, sampled
    every `every_s`). /usr/bin/time's maximum is one process's: a command whose steps run in processes of their
    own (`run` on a big model), or pytest's workers, need the sum."""
    summed = 0.0
    with subprocess.Popen(cmd, **popen) as proc:
        while proc.poll() is None:
            summed = max(summed, tree_rss_gb(proc.pid))
            time.sleep(every_s)
    return proc.returncode, summed
