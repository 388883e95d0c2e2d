#!/usr/bin/env bash
# The GPU check, one command on a machine with an NVIDIA GPU and the CUDA build of torch:
#
#     bash benchmarks/gpu_check.sh [OUT]            (default OUT: runs/gpu-check)
#
# 1. the device-generic tests (tests/test_devices.py and every test taking the `device` fixture),
#    which run on the CPU and on cuda and compare with float64 references;
# 2. `projunn bench --device cuda --quick`: the update and layer benchmarks on the GPU;
# 3. benchmarks/gpu_audit.py: synchronising calls per step, drift and CPU agreement over 2,000 steps
#    with TF32 off and on, CNN step and RNN (fused, stepped, bf16) timings, into OUT/audit.md;
# 4. the paper's depth-100 CNN on MNIST (`--preset paper`), 300 steps on the GPU, and its timing.
# Everything is written under OUT, and OUT/report.md gathers the four parts in one file; the script
# stops at the first failure.
set -euo pipefail
out="${1:-runs/gpu-check}"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this check needs a GPU')"
mkdir -p "$out"
python -m pytest -m device -q -p no:cacheprovider | tee "$out/device-tests.txt"
projunn bench --device cuda --quick --out "$out/bench" --overwrite
python benchmarks/gpu_audit.py --out "$out/audit.md"
projunn train mnist --device cuda --preset paper --steps 300 --eval-every 100 --eval-limit 2000 \
    --quiet --out "$out/cnn-depth100" --overwrite
{
    echo "# projunn GPU check"
    python -c "import torch; print(f'\n{torch.cuda.get_device_name()}, torch {torch.__version__}')"
    echo -e "\n## Device-generic tests\n"
    tail -n 1 "$out/device-tests.txt"
    echo -e "\n## projunn bench --quick\n"
    cat "$out/bench/results.md"
    echo -e "\n## Audit\n"
    cat "$out/audit.md"
    echo -e "\n## Depth-100 CNN, 300 steps (summary.json)\n"
    cat "$out/cnn-depth100/summary.json"
} > "$out/report.md"
echo "wrote $out/report.md"
