"""Training throughput of the model zoo, CPU vs GPU (tf32, bf16), at the reference-figures sizes; plain torch.

    python scripts/gpu_hardware_bench.py --out "$OUT/gpu_hardware.json"      # what scripts/gpu_check.sh runs
    python scripts/gpu_hardware_bench.py --devices cpu --tiny --cpu-seconds 0.2 --out /tmp/hw.json  # smoke

Needs only torch (and numpy, which torch uses): no MPI, no h5py, no datasets; the models are the zoo's own
(hpcai/models.py, imported from this checkout). Inputs are random tensors made once on the device, so the
numbers are the model's training step alone: forward, cross-entropy, backward, SGD step.

Cases (the sizes of /work/shared/notes/reference-figures.md "Hardware"):
  mlp          64-512-512-10, batch 256
  cnn          3x32x32, channels [32, 64, 128] (pooled after each), batch 128
  transformer  d_model 256, 4 layers, 4 heads, seq 128, vocab 1024, batch 32 (logits (B, V, T))
  resnet       ResNet-18-style (basic blocks [2, 2, 2, 2], widths 64-512, GroupNorm), 224x224, batch 64
Modes: cpu fp32 (all cores), cuda tf32 (fp32 tensors, TF32 matmuls and convolutions), cuda bf16 (autocast).
Each case: 2 warm-up steps (cuDNN autotuning, allocator), then steps until --seconds have passed (at least 3),
synchronised before the clock is read. --tiny shrinks every case (smoke test on a laptop).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's hpcai, not an installed one
from hpcai.models import cnn, mlp, resnet, transformer  # noqa: E402  (plain torch modules)

# reference-figures.md, "Hardware" (one H100 vs the same host's 16 cores): CPU, GPU fp32/tf32, GPU bf16
REFERENCE = {
    "mlp": (130_331, 178_179, 163_615),
    "cnn": (2_026, 74_726, 55_291),
    "transformer": (49, 2_809, 2_545),
    "resnet": (13.6, 1_723, 2_059),  # ResNet-50 there; ours is ResNet-18-style: expect more samples/s
}


def cases(tiny: bool) -> dict[str, dict[str, Any]]:
    """name -> builder, input maker, batch, and the description written to the JSON."""
    if tiny:
        return {
            "mlp": {"build": lambda: mlp((64,), 10, [64]), "x": ("float", (64,)), "batch": 32, "classes": 10},
            "cnn": {"build": lambda: cnn((3, 16, 16), 10, [8, 16]), "x": ("float", (3, 16, 16)), "batch": 8},
            "transformer": {
                "build": lambda: transformer((16,), 64, 32, 2, 4),
                "x": ("tokens", (16,)),
                "batch": 4,
                "classes": 64,
            },
            "resnet": {
                "build": lambda: resnet((3, 64, 64), 10, [8, 16], 1),
                "x": ("float", (3, 64, 64)),
                "batch": 4,
            },
        }
    return {
        "mlp": {"build": lambda: mlp((64,), 10, [512, 512]), "x": ("float", (64,)), "batch": 256},
        "cnn": {
            "build": lambda: cnn((3, 32, 32), 10, [32, 64, 128]),
            "x": ("float", (3, 32, 32)),
            "batch": 128,
        },
        "transformer": {
            "build": lambda: transformer((128,), 1024, 256, 4, 4),
            "x": ("tokens", (128,)),
            "batch": 32,
            "classes": 1024,
        },
        "resnet": {
            "build": lambda: resnet((3, 224, 224), 1000, [64, 128, 256, 512], 2),
            "x": ("float", (3, 224, 224)),
            "batch": 64,
            "classes": 1000,
        },
    }


def measure(case: dict[str, Any], device: str, mode: str, seconds: float) -> dict[str, Any]:
    """Samples/s of training steps of ``case`` on ``device`` in ``mode`` (fp32, tf32 or bf16)."""
    torch.manual_seed(0)
    model = case["build"]().to(device)
    classes = case.get("classes", 10)
    kind, shape = case["x"]
    b = case["batch"]
    if kind == "tokens":
        x = torch.randint(0, classes, (b, *shape), device=device)
        y = torch.randint(0, classes, (b, *shape), device=device)  # next-token targets (B, T)
    else:
        x = torch.randn(b, *shape, device=device)
        y = torch.randint(0, classes, (b,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    is_cuda = device.startswith("cuda")
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    torch.backends.cudnn.allow_tf32 = mode == "tf32"
    torch.backends.cudnn.benchmark = is_cuda  # pick the fastest conv algorithms during warm-up

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "bf16"):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    def sync() -> None:
        if is_cuda:
            torch.cuda.synchronize()

    for _ in range(2):
        step()
    sync()
    steps, t0 = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - t0 < seconds:
        step()
        steps += 1
        if steps % 10 == 0 or steps < 10:
            sync()  # the loop condition must see the device's real progress, not queued kernels
    sync()
    dt = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    return {"samples_per_s": steps * b / dt, "steps": steps, "seconds": dt, "batch": b, "parameters": params}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_out = Path(os.environ.get("OUT", ".")) / "gpu_hardware.json"
    ap.add_argument("--out", type=Path, default=default_out, help=f"JSON report (default {default_out})")
    ap.add_argument("--devices", default="cpu,cuda", help="cpu, cuda or both (default both)")
    ap.add_argument("--models", default="mlp,cnn,transformer,resnet", help="which cases")
    ap.add_argument("--seconds", type=float, default=8.0, help="timed seconds per GPU case (default 8)")
    ap.add_argument("--cpu-seconds", type=float, default=15.0, help="timed seconds per CPU case (default 15)")
    ap.add_argument("--tiny", action="store_true", help="shrink every case (smoke test)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: every core)")
    args = ap.parse_args(argv)
    devices = [d for d in args.devices.split(",") if d]
    if "cuda" in devices and not torch.cuda.is_available():
        print("cuda: torch sees no GPU; measuring the CPU only", flush=True)
        devices.remove("cuda")
    torch.set_num_threads(
        args.threads or os.cpu_count() or 1
    )  # the whole host by default, like the reference
    table = cases(args.tiny)
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if "cuda" in devices else None,
        "cpu_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "host": platform.node(),
        "tiny": args.tiny,
        "results": {},
    }
    modes = [("cpu", "fp32")] if "cpu" in devices else []
    modes += [("cuda", "tf32"), ("cuda", "bf16")] if "cuda" in devices else []
    for name in args.models.split(","):
        row: dict[str, Any] = {}
        for device, mode in modes:
            secs = args.cpu_seconds if device == "cpu" else args.seconds
            try:
                row[f"{device}_{mode}"] = measure(table[name], device, mode, secs)
            except Exception as e:  # noqa: BLE001 - one failing case (e.g. out of memory) must not end the rest
                row[f"{device}_{mode}"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name} {device} {mode}: {row[f'{device}_{mode}']}", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
        cpu = row.get("cpu_fp32", {}).get("samples_per_s")
        for key in ("cuda_tf32", "cuda_bf16"):
            gpu = row.get(key, {}).get("samples_per_s")
            row[f"{key}_vs_cpu"] = gpu / cpu if gpu and cpu else None
        row["reference_cpu_tf32_bf16"] = REFERENCE[name]
        report["results"][name] = row
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")  # after every case: a timeout keeps the rest
    print(
        "| model | CPU samples/s | GPU tf32 | GPU bf16 | GPU/CPU (tf32, bf16) | reference CPU, tf32, bf16 |"
    )
    print("|---|---|---|---|---|---|")
    for name, row in report["results"].items():

        def rate(key: str, r: dict[str, Any] = row) -> str:
            v = r.get(key, {}).get("samples_per_s")
            return "-" if v is None else f"{v:,.1f}"

        ratios = ", ".join(
            "-" if row[k] is None else f"{row[k]:.1f}x" for k in ("cuda_tf32_vs_cpu", "cuda_bf16_vs_cpu")
        )
        ref = ", ".join(f"{v:,}" for v in REFERENCE[name])
        print(
            f"| {name} | {rate('cpu_fp32')} | {rate('cuda_tf32')} | {rate('cuda_bf16')} | {ratios} | {ref} |"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
