"""Command line: ``isvit-viz demo | evaluate | quantize | reproduce | bench``.

Errors in user input print one line on stderr and exit with status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__
from .utils import peak_rss_mb


class CLIError(ValueError):
    """An input error reported as one line (exit status 2)."""


def _peak_rss_mb() -> float:
    return round(peak_rss_mb(), 1)


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _load_model_and_data(args: argparse.Namespace, n_calib: int, n_test: int | None):
    """(fp_model, calib images tensor, test loader) for an embedded model or a timm model + ImageNet."""
    import torch

    from .models import EMBEDDED_MODELS, create

    if args.model in EMBEDDED_MODELS:
        if args.data or args.weights:
            raise CLIError(f"{args.model} uses its packaged data and weights; drop --data/--weights")
        model = create(args.model)
        from .data import EmbeddedSplits

        splits = EmbeddedSplits()
        calib_x, _ = splits.calib_tensors(n_calib, seed=args.seed)
        return model, calib_x, splits.test(n_test)
    if not args.data:
        raise CLIError(f"--data DIR (ImageNet with train/ and val/) is required for {args.model}")
    from .data import imagefolder_loader

    data = Path(args.data)
    for sub in ("train", "val"):
        if not (data / sub).is_dir():
            raise CLIError(f"--data {data}: missing folder {data / sub}")
    model = create(args.model, weights=args.weights)
    calib = imagefolder_loader(data / "train", args.model, n=n_calib, shuffle_seed=args.seed)
    calib_x = torch.cat([x for x, _ in calib])
    return model, calib_x, imagefolder_loader(data / "val", args.model, n=n_test, batch_size=200)


def _print_table(rows: list[dict[str, Any]], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    print("  ".join("-" * widths[c] for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in cols))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def cmd_evaluate(args: argparse.Namespace) -> int:
    import isvit_viz as iv

    rows = []
    for name in args.models:
        model, splits = iv.load_embedded(name)
        res = iv.evaluate(model, splits.test(args.n), progress=not args.quiet)
        rows.append({"model": f"embedded-{name}", "top1": res["top1"], "top5": res["top5"], "n": res["n"]})
    _print_table(rows, ["model", "top1", "top5", "n"])
    return 0


def run_quantize(args: argparse.Namespace) -> dict[str, Any]:
    """Quantize one model with one method and return the results record (also used by ``demo``)."""
    import torch

    import isvit_viz as iv

    from .evaluate import compare_to_fp
    from .utils import atomic_write_json, resolve_device, seed_everything

    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and any(out.iterdir()) and not (args.resume or args.overwrite):
        raise CLIError(f"--out {out} exists and is not empty; choose another folder, or pass --resume / --overwrite")
    device = resolve_device(args.device)
    seed_everything(args.seed)
    torch.set_num_threads(max(1, args.threads))
    model, calib_x, test_loader = _load_model_and_data(args, args.calib, args.test_images)
    t0 = time.perf_counter()
    res = iv.quantize(
        model.to(device), args.method, args.w_bits, args.a_bits, calib_x, iters=args.iters, device=device, seed=args.seed,
        checkpoint_dir=(out / "checkpoint") if out is not None else None, progress=not args.quiet,
        matmul_dtype=getattr(args, "matmul_dtype", "float32"),
    )  # fmt: skip
    wall = time.perf_counter() - t0
    cmp = compare_to_fp(model, res.model, test_loader, device, progress=not args.quiet)
    record = {
        "model": args.model, "method": args.method, "w_bits": args.w_bits, "a_bits": args.a_bits,
        "calib_images": int(len(calib_x)), "iters": res.config["iters"], "fp_top1": cmp["fp_top1"],
        "q_top1": cmp["q_top1"], "agree_top1": cmp["agree_top1"], "kl_to_fp": cmp["kl_to_fp"], "test_images": cmp["n"],
        "wall_s": round(wall, 2), "stage_s": {k: round(v, 2) for k, v in res.timings.items()},
        "peak_rss_mb": _peak_rss_mb(), "device": str(device), "seed": args.seed, "version": __version__,
        "matmul_dtype": getattr(args, "matmul_dtype", "float32"),
    }  # fmt: skip
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "results.json", record)
        if args.save_model:
            iv.save_quantized(res, out / "model.pt")
    return record


TABLE_COLS = ["model", "method", "w_bits", "a_bits", "fp_top1", "q_top1", "agree_top1", "kl_to_fp", "wall_s", "peak_rss_mb"]


def cmd_quantize(args: argparse.Namespace) -> int:
    rec = run_quantize(args)
    _print_table([rec], TABLE_COLS)
    if args.out:
        print(f"wrote {Path(args.out) / 'results.json'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Evaluate the embedded models, then quantize the embedded ViT (I&S-ViT W4/A4, W3/A3, RepQ-ViT)."""
    print(f"isvit_viz {__version__}: embedded models (FP, Fashion-MNIST test set)")
    cmd_evaluate(argparse.Namespace(models=["vit", "swin"], n=None, quiet=args.quiet))
    iters, calib, n_test = (args.iters or 1000, 1024, None) if args.full else (args.iters or 40, 256, 2000)
    print(f"\nPTQ of embedded-vit ({'full' if args.full else 'fast'} mode: {calib} calibration images, "
          f"{iters} iterations per unit and stage, {n_test or 10000} test images)")  # fmt: skip
    rows = []
    for method, wb, ab in (("repq-vit", 4, 4), ("isvit", 4, 4), ("repq-vit", 3, 3), ("isvit", 3, 3)):
        ns = argparse.Namespace(
            model="embedded-vit", method=method, w_bits=wb, a_bits=ab, calib=calib, iters=iters, test_images=n_test,
            device=args.device, seed=0, out=None, resume=False, overwrite=False, save_model=False, data=None,
            weights=None, quiet=args.quiet, threads=args.threads,
        )  # fmt: skip
        rows.append(run_quantize(ns))
    print()
    _print_table(rows, TABLE_COLS)
    if not args.no_notebooks:
        out = Path(args.out)
        print(f"\nexecuting the notebooks (fast mode) into {out} ...")
        cmd_reproduce(argparse.Namespace(out=str(out), full=False, notebooks=None, overwrite=True))
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .reproduce import reproduce

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CLIError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")
    t0 = time.perf_counter()
    results = reproduce(out, fast=not args.full, notebooks=args.notebooks or None)
    print(f"executed notebooks into {out} in {time.perf_counter() - t0:.0f} s; summary: {results}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .calib.methods import METHODS
    from .models import available_models

    p = argparse.ArgumentParser(prog="isvit-viz", description="Post-training quantization of vision transformers (I&S-ViT).")
    p.add_argument("--version", action="version", version=f"isvit_viz {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="evaluate the embedded models and run a small PTQ comparison")
    d.add_argument("--full", action="store_true", help="paper settings (1024 images, 1000 iterations): tens of minutes on a CPU")
    d.add_argument("--iters", type=_positive_int, default=None)
    d.add_argument("--device", default="cpu")
    d.add_argument("--threads", type=_positive_int, default=2)
    d.add_argument("--quiet", action="store_true")
    d.add_argument("--out", default="runs/demo", help="folder for the executed notebooks (default runs/demo)")
    d.add_argument("--no-notebooks", action="store_true", help="skip executing the notebooks")
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser("evaluate", help="FP accuracy of the embedded models")
    e.add_argument("models", nargs="*", default=["vit", "swin"], choices=["vit", "swin"])
    e.add_argument("--n", type=_positive_int, default=None, help="first N test images (default all 10,000)")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("reproduce", help="execute every notebook headless into a run folder (ipynb, HTML, PNG, results.md)")
    r.add_argument("--out", required=True)
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--fast", action="store_true", help="small settings (default)")
    mode.add_argument("--full", action="store_true", help="paper settings: hours on a 2-core CPU")
    r.add_argument("--notebooks", nargs="*", help="subset by name, e.g. 02_loss_landscape")
    r.add_argument("--overwrite", action="store_true")
    r.set_defaults(func=cmd_reproduce)

    q = sub.add_parser("quantize", help="quantize a model and report FP vs quantized accuracy")
    q.add_argument("--model", required=True, choices=available_models())
    q.add_argument("--method", default="isvit", choices=sorted(METHODS))
    q.add_argument("--w-bits", type=int, default=4)
    q.add_argument("--a-bits", type=int, default=4)
    q.add_argument("--calib", type=_positive_int, default=1024, help="calibration images (default 1024)")
    q.add_argument("--iters", type=int, default=None, help="iterations per unit and stage (default 1000; 200 at >= 6 bits)")
    q.add_argument("--test-images", type=_positive_int, default=None, help="evaluate on the first N test images")
    q.add_argument("--data", default=None, help="ImageNet root with train/ and val/ (timm models)")
    q.add_argument("--weights", default=None, help="local weight file for a timm model, or 'timm' to download")
    q.add_argument("--device", default="cpu")
    q.add_argument("--threads", type=_positive_int, default=2)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument(
        "--matmul-dtype", choices=["float32", "bfloat16"], default="float32", help="bfloat16: faster reconstruction matmuls"
    )
    q.add_argument("--out", default=None, help="folder for results.json (and model.pt with --save-model)")
    q.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    q.add_argument("--overwrite", action="store_true", help="allow a non-empty --out folder")
    q.add_argument("--save-model", action="store_true")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=cmd_quantize)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("isvit-viz: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        if args.debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"isvit-viz: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
