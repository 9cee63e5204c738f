"""Convert a released-layout STAMP checkpoint at the REAL sizes; time, peak memory, equivalence.

The released file is not redistributable (and gated), so this builds the independent reference
(tests/reference_stamp.py) at the released sizes - 20,340 gene ids (+5 rows), width 512,
12 layers, context 1,500; UNI's ViT-L/16 - with random weights, saves its state dict exactly as
``pytorch_model.bin`` (514 tensors, ~1.4 GB), then:

1. ``stamp.zoo.convert.convert_released`` in a fresh process (memory-mapped input, streamed output);
2. the same-run baseline in a fresh process: what one would write without it - ``torch.load``
   the whole file, build the model, ``load_state_dict``, ``save_pretrained``;
3. both peak RSS (above the process's RSS after imports) are printed as multiples of the file size;
4. the converted StampModel against the reference: gene embedding (one padded spot) and
   image embedding (one image), float32 CPU, max |difference| (must be <= 1e-5).

    python benchmarks/convert_real_size.py [--workdir DIR] [--keep]

Takes ~1-2 min and ~6 GB RAM on 2 CPU cores. Prints ratios, asserts nothing about time.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, sys, time
import torch, stamp.zoo.convert, stamp.models.aligned_model  # noqa: F401  (imports before the peak is reset)
mode, src, out = sys.argv[1:4]


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024**2  # kB -> GiB


before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
t0 = time.perf_counter()
if mode == "convert":
    from stamp.zoo.convert import convert_released
    report = convert_released(src, out, name="stamp-v1")
    extra = {"mapped": len(report.mapped), "unused": len(report.unused), "n_source": report.n_source}
elif mode == "naive":
    import torch
    from stamp.zoo.convert import full_target, map_state_dict
    from stamp.models.aligned_model import StampModel
    from stamp.zoo.catalogue import get_pretrained
    sd = torch.load(src, map_location="cpu", weights_only=True)          # the whole file in memory
    entry = get_pretrained("stamp-v1")
    meta, rules = full_target(entry)
    producers, _ = map_state_dict(sd, {k: tuple(v.shape) for k, v in meta.state_dict().items()}, rules)
    model = StampModel(meta.config)                                       # a second full copy
    model.load_state_dict({k: p() for k, p in producers.items()}, strict=True)
    model.save_pretrained(out)
    extra = {}
else:
    extra = {}
print(json.dumps({"seconds": time.perf_counter() - t0, "rss_before_gb": before,
                  "peak_above_gb": status("VmHWM") - before, **extra}))
"""


def child(mode: str, src: Path, out: Path) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(out)], capture_output=True, text=True,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if res.returncode:
        raise SystemExit(f"{mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    args = ap.parse_args()
    import torch

    from tests.reference_stamp import ReferenceStamp, uni_vit_kwargs

    work = Path(tempfile.mkdtemp(prefix="stamp-convert-", dir=args.workdir))
    try:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        ref = ReferenceStamp(n_tokens=20340, dim=512, heads=16, ffn=1024, layers=12, context=1500,
                             vit=uni_vit_kwargs()).eval()
        with torch.no_grad():  # non-trivial LayerScale / norms so that every tensor matters
            for name, p in ref.named_parameters():
                if name.endswith(("ls1.gamma", "ls2.gamma")):
                    p.uniform_(0.05, 0.2)
        src = work / "pytorch_model.bin"
        torch.save(ref.state_dict(), src)
        size_gb = src.stat().st_size / 1024**3
        n_tensors = len(ref.state_dict())
        print(f"released-layout file: {n_tensors} tensors, {size_gb:.2f} GiB (built in {time.perf_counter() - t0:.0f} s)")

        conv = child("convert", src, work / "converted")
        naive = child("naive", src, work / "naive")
        print(f"stamp convert      : {conv['seconds']:6.1f} s, peak RSS above the imports {conv['peak_above_gb']:.2f} GiB"
              f" = {conv['peak_above_gb'] / size_gb:.2f} x the file ({conv['n_source']} tensors: {conv['mapped']} "
              f"mapped, {conv['unused']} unused; input memory-mapped, so its pages count but are file-backed)")
        print(f"naive load+save    : {naive['seconds']:6.1f} s, peak RSS above the imports {naive['peak_above_gb']:.2f} "
              f"GiB = {naive['peak_above_gb'] / size_gb:.2f} x the file")
        print(f"ratios naive / convert: time {naive['seconds'] / conv['seconds']:.2f}x, "
              f"peak memory {naive['peak_above_gb'] / max(conv['peak_above_gb'], 1e-3):.2f}x")

        from stamp.models.aligned_model import StampModel

        model = StampModel.from_pretrained(str(work / "converted")).eval()
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(30, 20340, (1, 1500), generator=gen)
        ids[0, 700:] = 0  # the released tokenizer pads with 0; the model reads PAD = 1
        pixels = torch.randn(1, 3, 224, 224, generator=gen)
        t1 = time.perf_counter()
        with torch.no_grad():
            dg = (model.encode_gene(torch.where(ids == 0, 1, ids)) - ref.encode_gene(ids)).abs().max().item()
            di = (model.encode_image(pixels) - ref.encode_image(pixels)).abs().max().item()
        print(f"equivalence (fp32 CPU, {time.perf_counter() - t1:.0f} s): gene max|diff| {dg:.2e}, "
              f"image max|diff| {di:.2e}  -> {'OK' if max(dg, di) <= 1e-5 else 'MISMATCH'}")
        if max(dg, di) > 1e-5:
            raise SystemExit(1)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    main()
