"""Command line: ``isvit-viz demo | evaluate | quantize | reproduce | sweep | methods``.

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


def _non_negative_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}")
    return v


def _workers(args: argparse.Namespace) -> int:
    from .data.imagenet import default_workers

    w = getattr(args, "workers", None)
    return default_workers() if w is None else w


def _eval_dtype(args: argparse.Namespace, device: Any) -> str:
    """``--eval-dtype``: autocast for the FP reference, CUDA only (CPU autocast would change what is measured)."""
    dtype = getattr(args, "eval_dtype", None) or "float32"
    if dtype != "float32" and device.type != "cuda":
        raise CLIError(f"--eval-dtype {dtype} applies to CUDA evaluation; pass --device cuda or drop it")
    return dtype


def _imagenet_folders(data_arg: str | None, model_name: str, need_train: bool) -> tuple[Path, Path]:
    if not data_arg:
        raise CLIError(f"--data DIR (ImageNet with train/ and val/) is required for {model_name}")
    data = Path(data_arg)
    for sub in ("train", "val") if need_train else ("val",):
        if not (data / sub).is_dir():
            raise CLIError(f"--data {data}: missing folder {data / sub}")
    return data / "train", data / "val"


def _load_model_and_data(args: argparse.Namespace, n_calib: int, n_test: int | None):
    """(fp_model, calib images tensor, test loader) for an embedded model or a timm model + ImageNet.

    ImageNet: the calibration set is ``n_calib`` random train images (seeded: the official rule), the
    test set all of val or a seeded class-stratified subset of ``n_test`` images. Every input check
    (folders, image counts, class count against the model's head) runs before any image is decoded.
    """
    from .models import EMBEDDED_MODELS, create

    if args.model in EMBEDDED_MODELS:
        if args.data or args.weights:
            raise CLIError(f"{args.model} uses its packaged data and weights; drop --data/--weights")
        model = create(args.model)
        from .data import EmbeddedSplits

        splits = EmbeddedSplits()
        calib_x, _ = splits.calib_tensors(n_calib, seed=args.seed)
        return model, calib_x, splits.test(n_test)
    from .data.imagenet import imagenet_data

    _imagenet_folders(args.data, args.model, need_train=True)
    model = create(args.model, weights=args.weights)
    pin = str(getattr(args, "device", "cpu")).startswith("cuda")
    calib_x, test_loader = imagenet_data(args.data, model, n_calib, n_test, seed=args.seed, num_workers=_workers(args),
                                         pin_memory=pin)  # fmt: skip
    return model, calib_x, test_loader


def _print_table(rows: list[dict[str, Any]], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    print("  ".join("-" * widths[c] for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in cols))


def _bars(args: argparse.Namespace) -> bool:
    """Progress bars on a terminal only: redirected to a file or a CI log, tqdm's carriage-return
    redraws are noise (``--quiet`` turns them off on a terminal too). Library calls keep their own
    ``progress`` default, so Jupyter still shows its widgets."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


EMBEDDED_DEFAULT = ("vit", "swin")
#: Warn when the measured FP top-1 differs from the paper's by more than this (percentage points).
PAPER_FP_TOLERANCE = 0.3


def cmd_evaluate(args: argparse.Namespace) -> int:
    import isvit_viz as iv

    from .utils import resolve_device

    device = resolve_device(getattr(args, "device", "cpu"))
    if getattr(args, "model", None):
        if args.models:
            raise CLIError("give either embedded model names (vit, swin) or --model NAME, not both")
        if not args.model.startswith("embedded-"):
            return _evaluate_timm(args, device)
        names = [args.model.split("-", 1)[1]]
    else:
        if getattr(args, "data", None) or getattr(args, "weights", None):
            raise CLIError("--data/--weights need --model NAME (a timm model)")
        names = args.models or list(EMBEDDED_DEFAULT)
        bad = [n for n in names if n not in EMBEDDED_DEFAULT]
        if bad:
            raise CLIError(f"unknown embedded model {bad[0]!r}; choose from {list(EMBEDDED_DEFAULT)} or pass --model NAME")
    dtype = _eval_dtype(args, device)
    rows = []
    for name in names:
        model, splits = iv.load_embedded(name)
        res = iv.evaluate(model.to(device), splits.test(args.n), device, progress=_bars(args), dtype=dtype)
        rows.append({"model": f"embedded-{name}", "top1": res["top1"], "top5": res["top5"], "n": res["n"]})
    _print_table(rows, ["model", "top1", "top5", "n"])
    return 0


def _evaluate_timm(args: argparse.Namespace, device: Any) -> int:
    """FP top-1/top-5 of a timm model on ``--data``/val (all, or a stratified subset), beside the paper's FP number."""
    import isvit_viz as iv

    from .data.imagenet import check_classes, dataset_classes, imagefolder_loader
    from .models import PAPER_MODELS, create
    from .models.weights import weights_record

    _, val = _imagenet_folders(args.data, args.model, need_train=False)
    dtype = _eval_dtype(args, device)
    model = create(args.model, weights=args.weights)
    loader = imagefolder_loader(val, model, n=args.n, batch_size=args.batch_size, num_workers=_workers(args), seed=args.seed,
                                pin_memory=device.type == "cuda")  # fmt: skip
    check_classes(dataset_classes(loader), model, val)
    res = iv.evaluate(model.to(device), loader, device, progress=_bars(args), dtype=dtype)
    paper = PAPER_MODELS.get(args.model.split(".", 1)[0])
    top1 = 100 * res["top1"]
    row = {"model": args.model, "top1_%": round(top1, 2), "top5_%": round(100 * res["top5"], 2), "n": res["n"],
           "paper_fp_top1_%": paper, "diff_points": None if paper is None else round(top1 - paper, 2)}  # fmt: skip
    _print_table([row], list(row))
    w = weights_record(model)
    print(f"weights: {w['weights']} {w['weights_file'] or ''} sha256={w['weights_sha256']} timm tag={w['timm_pretrained_tag']}")
    if paper is not None and abs(top1 - paper) > PAPER_FP_TOLERANCE:
        subset = f" (on {res['n']} images; the paper uses all 50,000)" if args.n else ""
        print(f"warning: measured FP top-1 {top1:.2f} % differs from the paper's {paper:.2f} % by {abs(top1 - paper):.2f} "
              f"points (> {PAPER_FP_TOLERANCE}){subset}: papers compare against different checkpoints of the same "
              "name; check the weights file", file=sys.stderr)  # fmt: skip
    return 0


#: What ``quantize --out`` writes; ``--overwrite`` removes exactly these (never other files in the folder).
RUN_OUTPUTS = ("checkpoint", "results.json", "model.pt")


def _prepare_out(args: argparse.Namespace) -> Path | None:
    import shutil

    out = Path(args.out) if args.out else None
    if out is None:
        return None
    if args.resume and args.overwrite:
        raise CLIError("--resume continues the run in --out, --overwrite discards it: pass one of them")
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file, not a folder")
    if out.exists() and any(out.iterdir()) and not (args.resume or args.overwrite):
        raise CLIError(f"--out {out} exists and is not empty; choose another folder, or pass --resume / --overwrite")
    if args.overwrite and out.exists():
        for name in RUN_OUTPUTS:  # a stale checkpoint would otherwise be resumed as if it were this run
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    return out


def run_quantize(args: argparse.Namespace) -> dict[str, Any]:
    """Quantize one model with one method and return the results record (also used by ``demo``)."""
    import torch

    import isvit_viz as iv

    from .evaluate import compare_to_fp
    from .models.weights import weights_record
    from .utils import atomic_write_json, resolve_device, seed_everything

    out = _prepare_out(args)
    device = resolve_device(args.device)
    eval_dtype = _eval_dtype(args, device)
    seed_everything(args.seed)
    torch.set_num_threads(max(1, args.threads))
    model, calib_x, test_loader = _load_model_and_data(args, args.calib, args.test_images)
    model = model.to(device)
    t0 = time.perf_counter()
    res = iv.quantize(
        model, args.method, args.w_bits, args.a_bits, calib_x, iters=args.iters, device=device, seed=args.seed,
        checkpoint_dir=(out / "checkpoint") if out is not None else None, progress=_bars(args),
        matmul_dtype=getattr(args, "matmul_dtype", "float32"), batch_size=getattr(args, "batch_size", None),
        compile=getattr(args, "compile", False),
    )  # fmt: skip
    wall = time.perf_counter() - t0
    del calib_x  # evaluation needs only the test loader
    cmp = compare_to_fp(model, res.model, test_loader, device, progress=_bars(args), fp_dtype=eval_dtype)
    record = {
        "model": args.model, "method": args.method, "w_bits": args.w_bits, "a_bits": args.a_bits,
        "calib_images": int(res.config["calib_images"]), "iters": res.config["iters"], "fp_top1": cmp["fp_top1"],
        "q_top1": cmp["q_top1"], "agree_top1": cmp["agree_top1"], "kl_to_fp": cmp["kl_to_fp"], "test_images": cmp["n"],
        "test_subset": "all" if args.test_images is None else ("stratified" if args.data else "first"),
        "wall_s": round(wall, 2), "stage_s": {k: round(v, 2) for k, v in res.timings.items()},
        "peak_rss_mb": _peak_rss_mb(), "device": str(device), "seed": args.seed, "version": __version__,
        "matmul_dtype": getattr(args, "matmul_dtype", "float32"), "compile": getattr(args, "compile", False), "eval_dtype": eval_dtype,
        "batch_size": res.config["batch_size"], "workers": _workers(args) if args.data else 0, **weights_record(model),
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


#: The demo's first comparison: calibration only (no reconstruction), seconds per method.
DEMO_QUICK = (("minmax", 4, 4), ("repq-vit", 4, 4), ("isvit", 4, 4))
#: The demo's second comparison: I&S-ViT with reconstruction against RepQ-ViT.
DEMO_RECON = (("repq-vit", 4, 4), ("isvit", 4, 4), ("repq-vit", 3, 3), ("isvit", 3, 3))


def _demo_runs(args: argparse.Namespace, specs, iters: int, calib: int, n_test: int | None, t0: float) -> list[dict]:  # noqa: ANN001
    """Quantize the embedded ViT once per (method, w_bits, a_bits); print each result as it arrives."""
    rows = []
    for method, wb, ab in specs:
        ns = argparse.Namespace(
            model="embedded-vit", method=method, w_bits=wb, a_bits=ab, calib=calib, iters=iters, test_images=n_test,
            device=args.device, seed=0, out=None, resume=False, overwrite=False, save_model=False, data=None,
            weights=None, quiet=args.quiet, threads=args.threads,
        )  # fmt: skip
        rows.append(run_quantize(ns))
        r = rows[-1]
        print(f"  [{time.perf_counter() - t0:5.0f} s] {method:9s} W{wb}/A{ab}: top-1 {r['q_top1']:.4f}, "
              f"agreement with FP {r['agree_top1']:.4f}, KL {r['kl_to_fp']:.4f}", flush=True)  # fmt: skip
    return rows


def cmd_demo(args: argparse.Namespace) -> int:
    """Evaluate the embedded models; a calibration-only PTQ comparison (first result in about two
    minutes on a 2-core CPU); then I&S-ViT with reconstruction against RepQ-ViT; then the notebooks."""
    t0 = time.perf_counter()
    print(f"isvit_viz {__version__}: embedded models (FP, Fashion-MNIST test set)", flush=True)
    cmd_evaluate(argparse.Namespace(models=["vit", "swin"], n=None, quiet=args.quiet))
    n_quick = 2000
    print(f"\n[{time.perf_counter() - t0:.0f} s] PTQ of embedded-vit, calibration only (256 images, no reconstruction; "
          f"{n_quick} test images):", flush=True)  # fmt: skip
    rows = _demo_runs(args, DEMO_QUICK, 0, 256, n_quick, t0)
    print()
    _print_table(rows, TABLE_COLS)
    iters, calib, n_test = (args.iters or 1000, 1024, None) if args.full else (args.iters or 40, 256, 2000)
    print(f"\n[{time.perf_counter() - t0:.0f} s] PTQ of embedded-vit with reconstruction ({'full' if args.full else 'fast'} mode: "
          f"{calib} calibration images, {iters} iterations per unit and stage, {n_test or 10000} test images):", flush=True)  # fmt: skip
    rows = _demo_runs(args, DEMO_RECON, iters, calib, n_test, t0)
    print()
    _print_table(rows, TABLE_COLS)
    print(f"[{time.perf_counter() - t0:.0f} s] PTQ tables done", flush=True)
    if not args.no_notebooks:
        out = Path(args.out)
        print(f"\nexecuting the notebooks (fast mode) into {out} ...", flush=True)
        cmd_reproduce(argparse.Namespace(out=str(out), full=False, notebooks=None, overwrite=True))
    print(f"[{time.perf_counter() - t0:.0f} s] demo done", flush=True)
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


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run a method x bits x model x seed grid as Ray tasks (or serially), or print a sweep's report."""
    from .sweep.command import run_command

    return run_command(args)


def cmd_methods(args: argparse.Namespace) -> int:
    """Print every setting of one or all registered methods with its source (a markdown table each)."""
    from .calib.methods import METHODS
    from .calib.provenance import describe_markdown

    names = [args.name] if args.name else list(METHODS)
    print("\n".join(describe_markdown(n) for n in names), end="")
    return 0


def _add_demo(sub: Any) -> None:
    """The ``demo`` subcommand: FP tables, a small PTQ comparison, the notebooks."""
    d = sub.add_parser("demo", help="evaluate the embedded models and run a small PTQ comparison")
    d.add_argument("--full", action="store_true", help="paper settings (1024 images, 1000 iterations): tens of minutes on a CPU")
    d.add_argument("--iters", type=_positive_int, default=None)
    d.add_argument("--device", default="cpu")
    d.add_argument("--threads", type=_positive_int, default=2)
    d.add_argument("--quiet", action="store_true")
    d.add_argument("--out", default="runs/demo", help="folder for the executed notebooks (default runs/demo)")
    d.add_argument("--no-notebooks", action="store_true", help="skip executing the notebooks")
    d.set_defaults(func=cmd_demo)


def _add_evaluate(sub: Any) -> None:
    """The ``evaluate`` subcommand: FP accuracy of embedded or timm models."""
    e = sub.add_parser(
        "evaluate", help="FP accuracy: the embedded models, or a timm model on ImageNet val beside the paper's FP number"
    )
    e.add_argument("models", nargs="*", metavar="{vit,swin}", help="embedded models (default both)")
    e.add_argument("--model", default=None, help="a timm model name (with --weights and --data), or embedded-vit/-swin")
    e.add_argument("--weights", default=None, help="local weight file (.safetensors/.pth/.bin), or 'timm' to download")
    e.add_argument("--data", default=None, help="ImageNet root with val/ (timm models)")
    e.add_argument("--n", type=_positive_int, default=None,
                   help="subset: first N embedded test images; for ImageNet a seeded class-stratified subset of val")  # fmt: skip
    e.add_argument("--seed", type=int, default=0, help="seed of the stratified subset")
    e.add_argument("--batch-size", type=_positive_int, default=200)
    e.add_argument("--workers", type=_non_negative_int, default=None, help="JPEG decoding processes (default min(8, CPUs))")
    e.add_argument("--device", default="cpu")
    e.add_argument("--eval-dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="autocast on CUDA")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_evaluate)


def _add_reproduce(sub: Any) -> None:
    """The ``reproduce`` subcommand: every notebook headless into a run folder."""
    r = sub.add_parser("reproduce", help="execute every notebook headless into a run folder (ipynb, HTML, PNG, results.md)")
    r.add_argument("--out", required=True)
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--fast", action="store_true", help="small settings (default)")
    mode.add_argument("--full", action="store_true", help="paper settings: hours on a 2-core CPU")
    r.add_argument("--notebooks", nargs="*", help="subset by name, e.g. 02_loss_landscape")
    r.add_argument("--overwrite", action="store_true")
    r.set_defaults(func=cmd_reproduce)


def _add_quantize(sub: Any) -> None:
    """The ``quantize`` subcommand: quantize one model and report FP vs quantized accuracy."""
    from .calib.methods import METHODS
    from .models import available_models

    q = sub.add_parser("quantize", help="quantize a model and report FP vs quantized accuracy")
    q.add_argument("--model", required=True, help=f"one of {available_models()} or any timm ViT/DeiT/Swin name")
    q.add_argument("--method", default="isvit", choices=sorted(METHODS))
    q.add_argument("--w-bits", type=int, default=4)
    q.add_argument("--a-bits", type=int, default=4)
    q.add_argument(
        "--calib", type=_positive_int, default=1024, help="calibration images: random train images, seeded (default 1024)"
    )
    q.add_argument(
        "--iters",
        type=int,
        default=None,
        help="iterations per unit and stage for every stage (default: the method's own; I&S-ViT 1000, 200 at >= 6 bits)",
    )
    q.add_argument("--batch-size", type=_positive_int, default=None,
                   help="reconstruction mini-batch for every stage (default: the method's own; I&S-ViT 64, QDrop/BRECQ 32)")  # fmt: skip
    q.add_argument("--test-images", type=_positive_int, default=None,
                   help="evaluate on N test images: a seeded class-stratified subset of ImageNet val (embedded: the first N)")  # fmt: skip
    q.add_argument("--data", default=None, help="ImageNet root with train/ and val/ (timm models)")
    q.add_argument("--weights", default=None, help="local weight file (.safetensors/.pth/.bin), or 'timm' to download")
    q.add_argument("--device", default="cpu")
    q.add_argument("--threads", type=_positive_int, default=2)
    q.add_argument("--workers", type=_non_negative_int, default=None, help="JPEG decoding processes (default min(8, CPUs))")
    q.add_argument("--seed", type=int, default=0, help="seeds calibration draw, test subset and reconstruction")
    q.add_argument(
        "--matmul-dtype", choices=["float32", "bfloat16"], default="float32", help="bfloat16: faster reconstruction matmuls"
    )
    q.add_argument(
        "--compile", action="store_true", help="torch.compile each reconstruction step (faster long runs; needs a C++ compiler)"
    )
    q.add_argument("--eval-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="autocast dtype of the FP reference evaluation (CUDA only)")  # fmt: skip
    q.add_argument("--out", default=None, help="folder for results.json (and model.pt with --save-model)")
    q.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    q.add_argument("--overwrite", action="store_true", help="discard a previous run in --out (checkpoint, results, model)")
    q.add_argument("--save-model", action="store_true")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=cmd_quantize)


def build_parser() -> argparse.ArgumentParser:
    from .calib.methods import METHODS
    from .sweep.command import add_arguments as add_sweep_arguments

    p = argparse.ArgumentParser(prog="isvit-viz", description="Post-training quantization of vision transformers (I&S-ViT).")
    p.add_argument("--version", action="version", version=f"isvit_viz {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_evaluate, _add_reproduce, _add_quantize):
        add(sub)

    sw = sub.add_parser("sweep", help="run a model x method x bits x seed grid as Ray tasks (resumable), or report it")
    add_sweep_arguments(sw)
    sw.set_defaults(func=cmd_sweep)

    me = sub.add_parser("methods", help="print each registered method's settings with their sources (markdown)")
    me.add_argument("name", nargs="?", choices=sorted(METHODS), help="one method (default: all)")
    me.set_defaults(func=cmd_methods)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # piped (make demo | tee, CI logs): each line as it is printed
        sys.stdout.reconfigure(line_buffering=True)
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
