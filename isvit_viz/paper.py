"""Numbers reported in the I&S-ViT paper (arXiv 2311.10126), for side-by-side printing.

ImageNet top-1 (%) of Table 1 (a subset of rows: the methods this toolkit implements), Tables 3-4
(DeiT-S, W3/A3) and Fig. 5 / Appendix A. Source: method.md section 3.
"""

from __future__ import annotations

MODELS = ("ViT-S", "ViT-B", "DeiT-T", "DeiT-S", "DeiT-B", "Swin-S", "Swin-B")

TABLE1: dict[tuple[str, str], tuple[float, ...]] = {
    ("Full-Precision", "32/32"): (81.39, 84.54, 72.21, 79.85, 81.80, 83.23, 85.27),
    ("PTQ4ViT", "3/3"): (0.01, 0.01, 0.04, 0.01, 0.27, 0.35, 0.29),
    ("QDrop", "3/3"): (4.44, 8.00, 30.73, 22.67, 24.37, 60.89, 54.76),
    ("RepQ-ViT", "3/3"): (0.43, 0.14, 0.97, 4.37, 4.84, 8.84, 1.34),
    ("I&S-ViT", "3/3"): (45.16, 63.77, 41.52, 55.78, 73.30, 74.20, 69.30),
    ("PTQ4ViT", "4/4"): (42.57, 30.69, 36.96, 34.08, 64.39, 76.09, 74.02),
    ("QDrop", "4/4"): (21.24, 47.30, 61.93, 68.27, 72.60, 79.58, 80.93),
    ("RepQ-ViT", "4/4"): (65.05, 68.48, 57.43, 69.03, 75.61, 79.45, 78.32),
    ("I&S-ViT", "4/4"): (74.87, 80.07, 65.21, 75.81, 79.97, 81.17, 82.60),
    ("PTQ4ViT", "6/6"): (78.63, 81.65, 69.68, 76.28, 80.25, 82.38, 84.01),
    ("QDrop", "6/6"): (70.25, 75.76, 70.64, 77.95, 80.87, 82.60, 84.33),
    ("RepQ-ViT", "6/6"): (80.43, 83.62, 70.76, 78.90, 81.27, 82.79, 84.57),
    ("I&S-ViT", "6/6"): (80.43, 83.82, 70.85, 79.15, 81.68, 82.89, 84.94),
}

#: our method name -> the paper's row label
METHOD_LABELS = {"isvit": "I&S-ViT", "isvit-official": "I&S-ViT", "repq-vit": "RepQ-ViT", "ptq4vit": "PTQ4ViT", "qdrop": "QDrop"}

#: Table 3 (DeiT-S W3/A3): (SULQ, SOS) -> top-1
TABLE3 = {(False, False): 3.36, (True, False): 20.70, (False, True): 45.19, (True, True): 55.78}
#: Table 4 (DeiT-S W3/A3, with SOS): softmax quantizer -> top-1
TABLE4 = {"log2": 52.60, "uniform": 44.79, "sulq": 55.78}
#: Fig. 5 / Appendix A (3-bit DeiT-S): calibration images -> top-1
FIG5 = {32: 39.70, 512: 54.13, 1024: 55.78, 2048: 55.89}
FP_DEIT_S = 79.85


def paper_top1(method: str, w_bits: int, a_bits: int, model: str = "DeiT-S") -> float | None:
    """The paper's ImageNet top-1 for ``method`` at ``w_bits/a_bits`` on ``model`` (None if not reported)."""
    label = METHOD_LABELS.get(method)
    row = TABLE1.get((label, f"{w_bits}/{a_bits}")) if label else None
    return None if row is None else row[MODELS.index(model)]
