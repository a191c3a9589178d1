"""Where every setting of every registered method comes from, and :func:`describe` to print it.

A :class:`Source` is one line: the paper section / equation, the authors' code file, or "our choice,
because ...". ``deviation=True`` marks a setting that departs from what the method's name promises
(the I&S-ViT paper for ``isvit``, the released code for ``isvit-official``, the authors' paper or code
for a baseline). References: ``method.md`` is the I&S-ViT spec (paper "§", official code zysxmu/IaS-ViT);
RepQ-ViT: Li et al. ICCV 2023, code zkkli/RepQ-ViT; PTQ4ViT: Yuan et al. ECCV 2022, code
hahnyuan/PTQ4ViT; QDrop: Wei et al. ICLR 2022, code wimh966/QDrop; BRECQ: Li et al. ICLR 2021, code
yhhhli/BRECQ; AdaRound: Nagel et al. ICML 2020 (``sota-2025.md`` §2-3 summarises the last three).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .methods import Method


@dataclass(frozen=True)
class Source:
    """Provenance of one setting: ``text`` (paper / code / our choice and why) and ``deviation``."""

    text: str
    deviation: bool = False


def _ours(why: str) -> Source:
    return Source(f"our choice, because {why}")


def _dev(text: str) -> Source:
    return Source(text, deviation=True)


# ------------------------------------------------------------------------------------ run settings
# Reconstruction fields left None take the quantize() arguments; the sources say what those default to.
_RUN_ITERS = "run default (None): 1000, 200 at >= 6-bit activations (I&S-ViT paper §5.1; official --iter, per unit and stage)"
_RUN_BATCH = "run default (None): 64 (I&S-ViT paper §5.1 and official code)"
_RUN_LR = "run default (None): 4e-5, Adam, cosine to 0 (I&S-ViT paper §5.1; official block_reconstruction default)"
_ACTS_ON = "activations quantized during reconstruction"
_NO_GRAD_SCALE = "unused: activation step sizes are not learned"
_STE = "official code quant/block_recon.py: latent weights trained through round_ste, no AdaRound (method.md §2.2)"
_MSE = "I&S-ViT paper Eq. 12; official code lp_loss: squared error summed over dim 1, mean over the rest (method.md §2.2)"
_HEAD_SAME = "None (the head units use `loss` too): {}"
_NO_DROP = "official code: no QDrop-style dropping (method.md §2.2)"
_FROZEN_SCALES = "official code: quantizer parameters frozen during reconstruction (method.md §2.2)"


def _isvit_recon(stage: str, inputs: Source, weights: Source) -> dict[str, Source]:
    return {
        f"{stage}.inputs": inputs, f"{stage}.weights": weights,
        f"{stage}.activations": Source(f"I&S-ViT paper §4.3 and official code: {_ACTS_ON} in every stage"),
        f"{stage}.rounding": Source(_STE), f"{stage}.loss": Source(_MSE), f"{stage}.loss_p": Source(_MSE),
        f"{stage}.head_loss": Source(_HEAD_SAME.format("I&S-ViT official code: the head is one more unit with lp_loss")),
        f"{stage}.iters": Source(_RUN_ITERS), f"{stage}.batch_size": Source(_RUN_BATCH),
        f"{stage}.lr": Source(_RUN_LR), f"{stage}.act_drop_prob": Source(_NO_DROP),
        f"{stage}.act_scale_lr": Source(_FROZEN_SCALES), f"{stage}.act_scale_grad_scale": Source(_NO_GRAD_SCALE),
    }  # fmt: skip


def _isvit(softmax_kwargs: Source, images: Source, zero_point: Source) -> dict[str, Source]:
    fp_in = "official code quant/data_utils.py GetLayerInpOut_T: FP-teacher inputs (paper: unstated, method.md §5.8)"
    q_in = "official code quant/data_utils.py GetLayerInpOut on the quantized model: sequential (method.md §2.5, §5.8)"
    return {
        "stages": Source("I&S-ViT paper §4.3 (SOS: three stages); official code test_quant.py::main"),
        "softmax": Source("I&S-ViT paper §4.2 Eq. 13-14 (SULQ); official code quant/quantizer.py LogSqrt2Quantizer"),
        "softmax_kwargs": softmax_kwargs,
        "post_ln": Source("I&S-ViT paper §4.3 (stage one: channel-wise post-LN); official quant/quant_model.py (qkv/fc1 inputs)"),
        "post_gelu": Source("official code quant/quant_model.py: plain uniform fc2 input (paper §5.1: activations layer-wise)"),
        "weight_granularity": Source("I&S-ViT paper §5.1 (channel-wise weights); official code with --w_cw (README example)"),
        "act_init": Source("official code UniformQuantizer.init_quantization_scale: percentiles {0.999, 0.9999, 0.99999} by MSE"),
        "weight_init": Source("official code UniformQuantizer.init_quantization_scale: 9 weight percentiles by MSE"),
        "input_bits": Source("official code QuantConv2d: the input image stays FP (method.md §2.1)"),
        "reduction_post_ln": Source("official code: Swin PatchMerging reduction input per tensor, not folded (method.md §2.1, §4.5)"),
        "weight_percentiles": Source("official code quant/quantizer.py: the 9 weight percentiles 0.97 ... 0.99999"),
        "first_last_bits": Source("official code: the patch embedding and the head are quantized at the common bit-width"),
        "calibrate.weights": Source("I&S-ViT paper §4.3 (stage one: FP weights); official test_quant.py: "
                                    "set_quant_state(input_quant=True, weight_quant=False) before the init forward"),
        "calibrate.images": images,
        **_isvit_recon("stage1", Source(fp_in), Source("I&S-ViT paper §4.3 (stage one: full-precision weights)")),
        "stage2.zero_point": zero_point,
        **_isvit_recon("stage3", Source(q_in), Source("I&S-ViT paper §4.3 (stage three: quantized weights)")),
    }  # fmt: skip


# ------------------------------------------------------------------------------------ baselines
def _calibration_only(stages: Source, images: Source, weights: Source) -> dict[str, Source]:
    return {"stages": stages, "calibrate.weights": weights, "calibrate.images": images}


def _renamed(prov: Mapping[str, Source], what: str) -> dict[str, Source]:
    """A cheaper variant kept under its own name: what differs from ``what`` is recorded, not a deviation."""
    return {k: Source(f"(differs from {what}) {v.text}") if v.deviation else v for k, v in prov.items()}


_OUR_PCT = _ours("it is I&S-ViT's official 9-value weight percentile list, shared by every baseline here")
_SAME_BITS = "the patch embedding and the head at the common bit-width"

_REPQ = {
    **_calibration_only(
        Source("RepQ-ViT code test_quant.py: one calibration forward with weights and activations quantized, "
               "reparameterize, re-initialise the folded weight quantizers; no reconstruction"),
        Source("RepQ-ViT code test_quant.py: one calibration batch of 32 training images"),
        Source("RepQ-ViT code: weight quantizers initialise before their layer's input in the same forward, so every "
               "activation sees quantized weights (isvit_viz.calib.reparam.repq_vit_calibrate)"),
    ),
    "softmax": Source("RepQ-ViT paper §3.3: log-sqrt2 quantizer for post-softmax activations"),
    "softmax_kwargs": Source("RepQ-ViT code quant/quantizer.py LogSqrtQuantizer: scale candidates never include max"),
    "post_ln": Source("RepQ-ViT paper §3.2: channel-wise post-LayerNorm quantizers, then scale reparameterization"),
    "post_gelu": Source("RepQ-ViT code: uniform quantizer for the other activations"),
    "weight_granularity": Source("RepQ-ViT code test_quant.py: channel-wise weights"),
    "act_init": Source("RepQ-ViT code quant/quantizer.py: percentiles {0.999, 0.9999, 0.99999} by MSE"),
    "weight_init": Source("RepQ-ViT code quant/quantizer.py: percentile search by MSE"),
    "input_bits": Source("RepQ-ViT code quant/quant_modules.py: the patch-embedding input image quantized to 8 bits"),
    "reduction_post_ln": Source("RepQ-ViT code test_quant.py lines 95-143: Swin PatchMerging reduction inputs channel-wise, folded"),
    "weight_percentiles": Source("RepQ-ViT code: weights searched over the activation percentiles {0.999, 0.9999, 0.99999}"),
    "first_last_bits": Source(f"RepQ-ViT code: {_SAME_BITS}"),
    "weights.zero_point": Source("RepQ-ViT code test_quant.py: fractional mean zero-point after folding"),
}  # fmt: skip

_REPARAM_LOGSQRT2 = _renamed({
    **_calibration_only(
        Source("RepQ-ViT paper: calibrate, reparameterize, re-initialise weight quantizers; no reconstruction"),
        _dev("I&S-ViT's official init count (64); RepQ-ViT code calibrates on one batch of 32 images"),
        _dev("RepQ-ViT calibrates activations with quantized weights (weights, then one forward with both on); here FP weights"),
    ),
    "softmax": Source("RepQ-ViT paper §3.3: log-sqrt2 quantizer for post-softmax activations"),
    "softmax_kwargs": _dev("LogSqrt2Quantizer defaults (include_max=True); RepQ-ViT's code never selects max (include_max=False)"),
    "post_ln": Source("RepQ-ViT paper §3.2: channel-wise post-LayerNorm quantizers, then scale reparameterization"),
    "post_gelu": Source("RepQ-ViT code: uniform quantizer for the other activations"),
    "weight_granularity": Source("RepQ-ViT code test_quant.py: channel-wise weights"),
    "act_init": Source("RepQ-ViT code quant/quantizer.py: percentiles {0.999, 0.9999, 0.99999} by MSE"),
    "weight_init": Source("RepQ-ViT code quant/quantizer.py: percentile search by MSE"),
    "input_bits": _dev("image kept FP as I&S-ViT; RepQ-ViT quantizes the input image to 8 bits (method.md §2.1)"),
    "reduction_post_ln": _dev("per tensor as I&S-ViT; RepQ-ViT makes Swin reduction inputs channel-wise and folds them (method.md §4.5)"),
    "weight_percentiles": _dev("I&S-ViT's 9 weight percentiles; RepQ-ViT searches weights over the 3 activation percentiles (method.md §2.1)"),
    "first_last_bits": Source(f"RepQ-ViT code: {_SAME_BITS}"),
    "weights.zero_point": Source("RepQ-ViT code test_quant.py: fractional mean zero-point after folding"),
}, "RepQ-ViT")  # fmt: skip

_PTQ4VIT = {
    "stages": Source("PTQ4ViT paper §3.3-3.4 and code: one Hessian-guided search of every quantizer, no reconstruction "
                     "(isvit_viz.calib.hessian.hessian_calibrate)"),
    "softmax": Source("PTQ4ViT paper §3.2: twin uniform quantizer for post-softmax activations (code: its own split and ranges)"),
    "softmax_kwargs": Source("PTQ4ViT code quant_layers/matmul.py: twin-uniform softmax defaults"),
    "post_ln": Source("PTQ4ViT: per-tensor activation quantizers (no post-LN special case)"),
    "post_gelu": Source("PTQ4ViT paper §3.2 and code quant_layers/linear.py: twin uniform quantizer for post-GELU activations"),
    "weight_granularity": Source("PTQ4ViT code: one weight step per tensor (qkv: one per q/k/v row block)"),
    "act_init": Source("unused: the Hessian-guided search sets every activation step"),
    "weight_init": Source("unused: the Hessian-guided search sets every weight step"),
    "input_bits": Source("PTQ4ViT code: the patch-embedding input image stays FP"),
    "reduction_post_ln": Source("PTQ4ViT: per-tensor activation quantizers"),
    "weight_percentiles": Source("unused: the Hessian-guided search sets every weight step"),
    "first_last_bits": Source(f"PTQ4ViT code: {_SAME_BITS}"),
    "hessian.images": Source("PTQ4ViT code example/test_vit.py: calib_size=32"),
    "hessian.candidates": Source("PTQ4ViT code: eq_n=100 candidate steps per search"),
    "hessian.rounds": Source("PTQ4ViT code: search_round=3 alternations of weight and input search"),
}  # fmt: skip

_TWIN_MSE = _renamed({
    **_calibration_only(
        Source("PTQ4ViT paper §3: calibration only, no reconstruction (activations, then weights: our order)"),
        _dev("I&S-ViT's official init count (64); PTQ4ViT's code calibrates on 32 images (calib_size=32)"),
        _ours("calibration-only methods here calibrate activations with FP weights, then weights"),
    ),
    "softmax": Source("PTQ4ViT paper §3.2: twin uniform quantizer for post-softmax activations"),
    "softmax_kwargs": _dev("TwinUniformQuantizer defaults, searched by MSE; PTQ4ViT searches with its Hessian-guided metric (paper §3.3)"),
    "post_ln": Source("PTQ4ViT: per-tensor activation quantizers (no post-LN special case)"),
    "post_gelu": Source("PTQ4ViT paper §3.2: twin uniform quantizer for post-GELU activations"),
    "weight_granularity": _dev("channel-wise as I&S-ViT; PTQ4ViT's code uses one weight step per tensor (qkv: per q/k/v block)"),
    "act_init": _dev("percentile-MSE; PTQ4ViT searches activation scales with the Hessian-guided metric (paper §3.3)"),
    "weight_init": _dev("percentile-MSE; PTQ4ViT searches weight scales with the Hessian-guided metric (paper §3.3)"),
    "input_bits": Source("PTQ4ViT code: the patch-embedding input image stays FP"),
    "reduction_post_ln": Source("PTQ4ViT: per-tensor activation quantizers"),
    "weight_percentiles": _OUR_PCT,
    "first_last_bits": Source(f"PTQ4ViT code: {_SAME_BITS}"),
}, "PTQ4ViT")  # fmt: skip

# BRECQ and QDrop are CNN methods; the ViT adaptations (quantizer placement) follow APHQ-ViT / FIMA-Q's
# reproductions: uniform quantizers everywhere, per-tensor activations, channel-wise weights.
_CNN_PLACEMENT = {
    "softmax": Source("BRECQ/QDrop: uniform quantizers everywhere (CNN methods; sota-2025.md §3)"),
    "softmax_kwargs": Source("UniformQuantizer defaults"),
    "post_ln": Source("BRECQ/QDrop: per-tensor activation quantizers"),
    "post_gelu": Source("BRECQ/QDrop: uniform activation quantizers"),
    "weight_granularity": Source("BRECQ/QDrop code: channel-wise weights"),
    "act_init": Source("BRECQ/QDrop code: activation scales initialised by an error-minimising search before reconstruction"),
    "weight_init": _ours("BRECQ/QDrop's MSE-searched weight scales are closest to the percentile-MSE search used here"),
    "input_bits": Source("BRECQ/QDrop: the input image is not quantized (8-bit data)"),
    "reduction_post_ln": Source("BRECQ/QDrop: per-tensor activation quantizers"),
    "weight_percentiles": _OUR_PCT,
    "first_last_bits": Source("BRECQ/QDrop main_imagenet.py: first and last layers at 8 bits (weights; the head input too)"),
}  # fmt: skip


def _brecq_recon(stage: str, **over: Source) -> dict[str, Source]:
    """BRECQ/QDrop reconstruction settings (their ImageNet scripts), overridable per key."""
    base = {
        "inputs": Source("BRECQ code data_utils.save_inp_oup_data: quantized-model inputs of the block"),
        "weights": Source("BRECQ/QDrop: quantized weights during reconstruction"),
        "activations": Source(f"QDrop: {_ACTS_ON} (weights and activations jointly)"),
        "rounding": Source("BRECQ/QDrop: AdaRound (sota-2025.md §2): regulariser 0.01, beta 20 -> 2 after 20 % warm-up, Adam 1e-3"),
        "loss": Source("BRECQ/QDrop main_imagenet.py: lp_loss with --p 2.4 (no Fisher weighting by default)"),
        "loss_p": Source("BRECQ/QDrop main_imagenet.py: --p 2.4"),
        "head_loss": Source(_HEAD_SAME.format("BRECQ/QDrop: the last layer is reconstructed with the same loss")),
        "iters": Source("BRECQ/QDrop main_imagenet.py: --iters_w 20000 per block"),
        "batch_size": Source("BRECQ/QDrop main_imagenet.py: --batch_size 32"),
        "lr": Source("unused with AdaRound (alpha: Adam 1e-3)"),
        "act_drop_prob": Source("BRECQ: no dropping"),
        "act_scale_lr": Source("BRECQ: activation step sizes fixed during the weight pass"),
        "act_scale_grad_scale": Source(_NO_GRAD_SCALE),
    }  # fmt: skip
    return {f"{stage}.{k}": over.get(k, v) for k, v in base.items()}


_BRECQ = {
    **_CNN_PLACEMENT,
    "stages": Source("BRECQ main_imagenet.py: weight init (64 images), AdaRound block reconstruction with activations FP, "
                     "then activation init (64 images) and a step-size pass (--act_quant)"),
    **_brecq_recon("weight_recon", activations=Source("BRECQ main_imagenet.py: set_quant_state(True, False) for the weight pass")),
    "calibrate.weights": Source("BRECQ: activations initialised with the reconstructed (hard-rounded) weights on"),
    "calibrate.images": Source("BRECQ main_imagenet.py: qnn(cali_data[:64]) initialises the activation quantizers"),
    **_brecq_recon(
        "act_recon",
        rounding=Source("BRECQ: weights fixed (hard AdaRound decisions) in the activation pass"),
        iters=Source("BRECQ main_imagenet.py: --iters_a 5000"),
        lr=Source("unused: no weight is trained in the activation pass"),
        act_scale_lr=Source("BRECQ main_imagenet.py: --lr 4e-4, Adam on the activation step sizes, cosine to 0"),
        act_scale_grad_scale=Source("BRECQ: plain gradient of the step size (no LSQ gradient scale)"),
    ),
}  # fmt: skip

_QDROP = {
    **_CNN_PLACEMENT,
    "stages": Source("QDrop paper §3 / code: calibrate weights then activations, one block-wise reconstruction of both"),
    "calibrate.weights": Source("QDrop code: set_weight_quantize_params before set_act_quantize_params"),
    "calibrate.images": Source("QDrop code set_act_quantize_params: the first batch of 256 calibration images"),
    **_brecq_recon(
        "reconstruct",
        inputs=Source("QDrop paper §3.2: block input mixes quantized and FP inputs element-wise, p = 0.5 (Mix(0.5))"),
        act_drop_prob=Source("QDrop paper §3: drop probability p = 0.5 on every quantized activation, fresh mask every step"),
        act_scale_lr=Source("QDrop code solver/recon.py: LSQ step sizes learned jointly, Adam 4e-5, cosine to 0"),
        act_scale_grad_scale=Source("QDrop code LSQFakeQuantize: gradient scaled by 1 / sqrt(N * Qp)"),
    ),
}  # fmt: skip

_QDROP_STE = _renamed({
    "stages": Source("QDrop paper §3 / BRECQ: calibrate, then one block-wise reconstruction with quantized weights"),
    **{k: v for k, v in _CNN_PLACEMENT.items() if k != "first_last_bits"},
    "first_last_bits": _dev(f"{_SAME_BITS}; QDrop keeps them at 8 bits"),
    "calibrate.weights": Source("BRECQ/QDrop: weight quantizers initialised before the activation calibration"),
    "calibrate.images": Source("QDrop code set_act_quantize_params: the first batch of 256 calibration images"),
    "reconstruct.inputs": _dev("quantized-model inputs; QDrop mixes FP and quantized unit inputs with p = 0.5 (Mix(0.5))"),
    "reconstruct.weights": Source("QDrop/BRECQ: quantized weights during reconstruction"),
    "reconstruct.activations": Source(f"QDrop: {_ACTS_ON}"),
    "reconstruct.rounding": _dev("weights trained through STE; QDrop learns AdaRound rounding (sota-2025.md §2-3)"),
    "reconstruct.loss": _dev("squared error (I&S-ViT's lp_loss, p = 2); QDrop's script uses p = 2.4"),
    "reconstruct.loss_p": _dev("2; QDrop: 2.4"),
    "reconstruct.head_loss": Source(_HEAD_SAME.format("QDrop: the last layer is reconstructed with the same loss")),
    "reconstruct.iters": _dev(_RUN_ITERS + "; QDrop: 20,000 iterations per block"),
    "reconstruct.batch_size": _dev(_RUN_BATCH + "; QDrop: batch 32"),
    "reconstruct.lr": Source(_RUN_LR + " (for the STE weights; QDrop's AdaRound lr 1e-3 does not apply)"),
    "reconstruct.act_drop_prob": Source("QDrop paper §3: drop probability p = 0.5, fresh mask every step"),
    "reconstruct.act_scale_lr": _dev("activation step sizes fixed; QDrop learns them (LSQ, Adam 4e-5; sota-2025.md §2-3)"),
    "reconstruct.act_scale_grad_scale": Source(_NO_GRAD_SCALE),
}, "QDrop")  # fmt: skip

_FQ = "FIMA-Q code (ShiheWang/FIMA-Q HEAD 64c4b00)"
_FIMAQ = {
    "stages": Source(f"{_FQ}: calibrate every quantizer, fold channel-wise post-LN scales RepQ-style, then block "
                     "reconstruction of every unit (patch embedding, blocks, PatchMerging, head)"),
    "softmax": Source(f"{_FQ}: asymmetric uniform post-softmax quantizer (its log2 quantizer is defined but unused)"),
    "softmax_kwargs": Source("UniformQuantizer defaults (asymmetric)"),
    "post_ln": Source(f"{_FQ} wrap_net.py / linear.py: qkv and fc1 inputs calibrated per channel, folded into the LayerNorm"),
    "post_gelu": Source(f"{_FQ}: per-tensor asymmetric uniform fc2 input"),
    "weight_granularity": Source(f"{_FQ}: one scale and zero-point per output channel"),
    "act_init": _dev(f"percentile-MSE search on the quantizer input; {_FQ}: output-MSE grid search, 128 candidates, 3 rounds"),
    "weight_init": _dev(f"percentile-MSE search on the weights; {_FQ}: output-MSE grid search, 128 candidates, 3 rounds"),
    "input_bits": Source(f"{_FQ} conv.py: the patch-embedding input is not quantized"),
    "reduction_post_ln": Source(f"{_FQ}: Swin PatchMerging reduction input per channel, folded like qkv/fc1"),
    "weight_percentiles": _OUR_PCT,
    "first_last_bits": Source(f"{_FQ}: patch-embedding and head weights and the head input at the low bit-width"),
    "matmul_granularity": _dev(f"one scale per head; {_FQ} configs set token_channel_wise=True: per head x token "
                               "scales, equal at initialisation, diverging only through step-size learning (not implemented)"),
    "calibrate.weights": _dev(f"weights FP, but each quantizer sees the quantized outputs of the layers before it; {_FQ} "
                              "utils/calibrator.py calibrates module by module with the whole model FP"),
    "calibrate.images": _dev(f"the first 128 of the run's calibration images; {_FQ}: 128 ImageNet train images with "
                             "training augmentation (seed 3407)"),
    "weights.zero_point": _dev(f"fold with the mean scale and fractional mean zero-point (RepQ-ViT); {_FQ} folds the same "
                               "way, then searches the per-tensor scale and zero-point again"),
    "reconstruct.inputs": Source(f"{_FQ}: QDrop input mixing p = 0.5 (quantized-model vs FP input of the unit)"),
    "reconstruct.weights": Source(f"{_FQ}: quantized weights with AdaRound"),
    "reconstruct.activations": Source(f"{_FQ}: {_ACTS_ON}"),
    "reconstruct.rounding": Source(f"{_FQ}: AdaRound, Adam 1e-3, regulariser 0.01, beta 20 -> 2 after 20 % warm-up"),
    "reconstruct.loss": _dev(f"{_FQ} configs/*bit/best.py: metric 'fisher_dplr', k = 5, p1 = p2 = 1, dis_mode 'q', temp 20 "
                               "(utils/block_recon.py LossFunction, new_fisher_ro); the refresh runs this unit, soft-rounded "
                               "with dropping on, on FP inputs, every other unit FP (as theirs); (D D^T)^-1 in float64 "
                               "(theirs float32, no damping)"),
    "reconstruct.loss_p": Source("unused: the loss squares the error"),
    "reconstruct.head_loss": Source(f"{_FQ} utils/block_recon.py: KL (T = 1, batchmean, not normalised) for the head"),
    "reconstruct.iters": Source(f"{_FQ}: 20,000 iterations per unit"),
    "reconstruct.batch_size": Source(f"{_FQ}: batch 32"),
    "reconstruct.lr": Source("unused with AdaRound (alpha: Adam 1e-3)"),
    "reconstruct.act_drop_prob": Source(f"{_FQ}: QDrop p = 0.5 inside the unit"),
    "reconstruct.act_scale_lr": Source(f"{_FQ}: activation step sizes learned, Adam 4e-5, cosine"),
    "reconstruct.act_scale_grad_scale": Source(f"{_FQ}: plain step-size gradient (no LSQ gradient scale)"),
}  # fmt: skip

_AQ = "APHQ-ViT code (GoatWu/APHQ-ViT HEAD 84c9fde)"
_APHQ = {
    **{k: Source(v.text.replace(_FQ, _AQ), v.deviation) for k, v in _FIMAQ.items()},
    "stages": Source(f"{_AQ} test_quant.py: GELU -> ReLU and MLP reconstruction (FP), calibration (128 images), RepQ-style "
                     "fold, block reconstruction of every unit (patch embedding, blocks, PatchMerging, head)"),
    "post_gelu": Source(f"{_AQ}: per-tensor asymmetric uniform fc2 input (after the ReLU; its post_relu flag is dead code)"),
    "matmul_granularity": Source(f"{_AQ} quant_layers/matmul.py: one scale per head (token_channel_wise=False at 3/4 bits)"),
    "mlp_act": Source(f"{_AQ} test_quant.py: every GELU replaced by nn.ReLU, kept in the evaluated model"),
    "mlp_recon.iters": Source(f"{_AQ} utils/mlp_recon.py: 20,000 iterations per MLP"),
    "mlp_recon.batch_size": Source(f"{_AQ} utils/mlp_recon.py: batch 32 of the 1024 images' FP fc1 inputs"),
    "mlp_recon.lr": Source(f"{_AQ} utils/mlp_recon.py: Adam 4e-5 on fc1 and fc2 (norm2 is in the optimiser but gets no "
                           "gradient), cosine to 0"),
    "mlp_recon.clamp_weight": Source(f"{_AQ} utils/mlp_recon.py: loss = rec + 2.0 x the loss with fc2's input clamped to [0, ub]"),
    "mlp_recon.clamp_pct": Source(f"{_AQ} configs/3bit/best.py 0.99, configs/4bit/best.py 0.98 (None: by bit-width; no "
                                  "6-bit config exists, 0.98 is used there)"),
    "mlp_recon.eps": Source(f"{_AQ} utils/mlp_recon.py: +-1e-6 at the MLP output of the FP GELU model; W averaged over "
                            "samples and RMS-normalised (gradients in float64, as the block loss)"),
    "mlp_recon.temperature": Source(f"{_AQ} configs/3bit/best.py: temp 20"),
    "reconstruct.loss": _dev(f"{_AQ} utils/block_recon.py: 'hessian_perturb', +-1e-6 on the FP model's unit output, KL T = 20, "
                               "W averaged over samples (use_mean_hessian), mean((y^ - y)^2 W) x 2 / first value (commit "
                               "73e78a7); gradients in float64 (theirs float32, where the 1e-6 shift is mostly round-off)"),
    "reconstruct.head_loss": Source(f"{_AQ} utils/block_recon.py: KL (T = 1, batchmean) for the head, also x 2 / first value"),
}  # fmt: skip

_MINMAX_WHY = "min/max per tensor is the textbook baseline every method here should beat"
_MINMAX = {
    **_calibration_only(_ours(_MINMAX_WHY), _ours("it is I&S-ViT's official init count (64)"),
                        _ours("calibration-only methods here calibrate activations with FP weights, then weights")),  # fmt: skip
    **{k: _ours(_MINMAX_WHY) for k in ("softmax", "post_ln", "post_gelu", "weight_granularity", "act_init", "weight_init")},
    "softmax_kwargs": Source("UniformQuantizer defaults"),
    "input_bits": _ours("the image stays FP, as in I&S-ViT"),
    "reduction_post_ln": _ours(_MINMAX_WHY),
    "weight_percentiles": Source("unused: min/max initialisation has no percentile search"),
    "first_last_bits": _ours(_MINMAX_WHY),
}  # fmt: skip

#: Registered method name -> setting key -> source.
PROVENANCE: dict[str, dict[str, Source]] = {
    "isvit": _isvit(
        softmax_kwargs=_dev(
            "I&S-ViT paper Eq. 13-14 (mode 'paper': 2^b codes, rounded zero-point); the eta grid 1e-6 ... 1 "
            "(PAPER_ETA_GRID, 17 values) is our choice, because the paper's worked example (2.38e-5 -> 6.00e-5) "
            "needs eta ~ 1e-6, below the official grid 1e-3 ... 1 (paper: candidates unstated; method.md §5.3-5.4)"
        ),
        images=_dev(
            "our choice (made when the package was written; no measurement recorded), because it gives the percentile "
            "searches 4x the official 64 images at a quarter of the paper's 1024 in memory (README: about 6 GB host memory "
            "for DeiT-B at 256); paper §5.1: 1024 calibration images, official code: calib_data[:64]"
        ),
        zero_point=_dev(
            "our choice, because an integer mean zero-point keeps the channel -> layer transition exact in the "
            "quantized domain (method.md §2.4); paper Eq. 15 and the official code use the fractional mean"
        ),
    ),  # fmt: skip
    "isvit-official": _isvit(
        softmax_kwargs=Source(
            "official code quant/quantizer.py LogSqrt2Quantizer (mode 'official'): 2^b+1 codes, "
            "exact-minv offset, 11-value eta grid 1e-3 ... 1 (method.md §1.4)"
        ),
        images=Source("official code test_quant.py: quantizers initialised on calib_data[:64]"),
        zero_point=Source("I&S-ViT paper Eq. 15 (z~ = mean z) and official code test_quant.py 'Stage Two': fractional mean"),
    ),  # fmt: skip
    "repq-vit": _REPQ,
    "reparam-logsqrt2": _REPARAM_LOGSQRT2,
    "ptq4vit": _PTQ4VIT,
    "twin-uniform-mse": _TWIN_MSE,
    "brecq": _BRECQ,
    "qdrop": _QDROP,
    "qdrop-ste": _QDROP_STE,
    "aphq-vit": _APHQ,
    "fima-q": _FIMAQ,
    "minmax": _MINMAX,
}


_TENSOR_MM = "per-tensor uniform quantizers on the attention-matmul operands"
#: ``matmul_granularity`` of the methods before FIMA-Q (all per tensor).
_MATMUL = {
    "isvit": Source(f"official code quant/quant_model.py: {_TENSOR_MM} (method.md §2.1)"),
    "isvit-official": Source(f"official code quant/quant_model.py: {_TENSOR_MM} (method.md §2.1)"),
    "repq-vit": Source(f"RepQ-ViT code quant/quant_modules.py QuantMatMul: {_TENSOR_MM}"),
    "reparam-logsqrt2": Source(f"I&S-ViT's placement: {_TENSOR_MM}"),
    "ptq4vit": Source("PTQ4ViT code: one (twin) scale per matmul operand"),
    "twin-uniform-mse": Source(f"PTQ4ViT: {_TENSOR_MM}"),
    "brecq": Source("BRECQ/QDrop: per-tensor activation quantizers"),
    "qdrop": Source("BRECQ/QDrop: per-tensor activation quantizers"),
    "qdrop-ste": Source("BRECQ/QDrop: per-tensor activation quantizers"),
    "minmax": _ours(_MINMAX_WHY),
}
for _name, _src in _MATMUL.items():
    PROVENANCE[_name]["matmul_granularity"] = _src
for _name in _MATMUL:  # every method before APHQ-ViT keeps the model's GELU
    PROVENANCE[_name]["mlp_act"] = Source("the model's own GELU (only APHQ-ViT replaces it)")
PROVENANCE["fima-q"]["mlp_act"] = Source(f"{_FQ}: GELU kept (no MLP reconstruction)")


# ------------------------------------------------------------------------------------ isvit+
_PLUS_SOFTMAX = ("our choice, because no single post-softmax quantizer wins at every bit-width: SULQ has the lowest "
                 "attention-output error at 3 bits, log-sqrt2 at 4 and uniform at 6 on both embedded models "
                 "(benchmarks/results/softmax_choice.json); the lowest-error candidate per attention")  # fmt: skip
_PLUS_DROP = ("ablation: QDrop (Wei et al. ICLR 2022) mixing on every quantized activation of the unit; off in isvit+, "
              "because on the embedded ViT (seed 0) it gave no gain (W4/A4 97.23 against 97.36 % agreement, W6/A6 98.80 "
              "against 98.73 %) at about twice stage three's time (benchmarks/results/isvit_plus/)")  # fmt: skip


_PLUS_NO_DROP = ("QDrop's mixing (p = 0.5) in stage three gave no gain on the embedded ViT (seed 0: W4/A4 97.23 against "
                 "97.36 % agreement without it, W6/A6 98.80 against 98.73 %) at about twice stage three's time "
                 "(benchmarks/results/isvit_plus/)")  # fmt: skip


def isvit_plus_provenance(stages: Sequence[Any], *, choose_softmax: bool, sos: bool) -> dict[str, Source]:
    """Sources for ``isvit+`` (:func:`isvit_viz.calib.methods.isvit_plus`) with the given stages: I&S-ViT's
    where it is I&S-ViT's (relabelled, not a deviation: ``isvit+`` promises our combination), our
    reasons where it adds or switches something."""
    base = _renamed(PROVENANCE["isvit"], "the I&S-ViT paper")
    if not sos:
        base = _renamed(ablation_no_sos(base, "stage3"), "the I&S-ViT paper")
    last = stages[-1]
    plus = {
        "stages": Source(
            ("our choice: I&S-ViT's SOS (paper §4.3)" if sos else "ablation: one quantized-weight reconstruction, no SOS")
            + (", the post-softmax choice after calibration" if choose_softmax else "; ablation: SULQ everywhere")
        ),
        "softmax": Source("I&S-ViT paper Eq. 13-14 (SULQ) as the placement"
                          + ("; the choose_softmax stage replaces it where another quantizer has lower error" if choose_softmax else "")),
        "choose_softmax.candidates": Source(_PLUS_SOFTMAX),
        "choose_softmax.images": _ours("it is the calibration stage's image count (the same 256 images)"),
        f"{last.name}.act_drop_prob": Source(_PLUS_DROP) if last.act_drop_prob else _ours(_PLUS_NO_DROP),
    }  # fmt: skip
    if last.rounding != "ste":
        plus[f"{last.name}.rounding"] = Source(f"ablation: {last.rounding} rounding (AdaRound: Nagel et al. ICML 2020)")
    for s in stages:
        if getattr(s, "loss", "mse") != "mse":
            plus[f"{s.name}.loss"] = Source(f"ablation: the {getattr(s.loss, 'name', s.loss)} loss (issue #17's 2025 losses)")
    placement = [k for k in base if "." not in k]
    keys = [*placement, *(f"{s.name}.{k}" for s in stages for k in s.settings())]
    return {k: plus.get(k) or base[k] for k in keys}


# ------------------------------------------------------------------------------------ ablations
def ablation_softmax(prov: Mapping[str, Source], quantizer: str, kept_kwargs: bool) -> dict[str, Source]:
    """Provenance after ``softmax_quantizer=quantizer`` (paper Table 4)."""
    out = dict(prov)
    out["softmax"] = Source(f"ablation softmax_quantizer={quantizer!r} (I&S-ViT paper Table 4)", deviation=True)
    if not kept_kwargs:
        out["softmax_kwargs"] = Source(
            f"ablation softmax_quantizer={quantizer!r}: the quantizer's default options", deviation=True
        )
    return out


def ablation_no_sos(prov: Mapping[str, Source], stage3: str) -> dict[str, Source]:
    """Provenance after ``sos=False``: stage 3's settings become the single ``reconstruct`` stage's."""
    out = {k: v for k, v in prov.items() if not k.startswith(("stage1.", "stage2.", "stage3."))}
    why = "ablation sos=False (I&S-ViT paper Table 3 'without SOS'; our reading, method.md §5.15)"
    out["stages"] = Source(f"{why}: one reconstruction with quantized weights", deviation=True)
    out["post_ln"] = Source(f"{why}: layer-wise post-LN activations", deviation=True)
    out["calibrate.weights"] = Source(f"{why}: weights calibrated first, as a single-stage BRECQ-style run", deviation=True)
    for key, src in prov.items():
        if key.startswith(f"{stage3}."):
            out["reconstruct." + key.split(".", 1)[1]] = src
    return out


# ------------------------------------------------------------------------------------ describe
def _value(v: Any) -> Any:
    from .stages import Mix

    return f"Mix({v.p})" if isinstance(v, Mix) else v


def describe(method: str | Method) -> list[dict[str, Any]]:
    """Every setting of a method with its value and source.

    Args:
        method: a registered name (``isvit``, ...) or a :class:`~isvit_viz.calib.Method`.

    Returns:
        One dict per setting, in order (``stages``, the placement, then each stage's fields):
        ``setting`` (``"post_ln"``, ``"stage1.inputs"``...), ``value``, ``source`` (``None`` where the
        method records none) and ``deviation`` (True where it departs from what the name promises).
    """
    from .methods import resolve_method

    m = resolve_method(method)
    rows = []
    for key, val in m.settings():
        src = m.provenance.get(key)
        rows.append(
            {"setting": key, "value": _value(val), "source": src.text if src else None, "deviation": bool(src and src.deviation)}
        )
    return rows


def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def describe_markdown(method: str | Method) -> str:
    """:func:`describe` as a markdown section: a heading, the description and a setting/value/source table."""
    from .methods import resolve_method

    m = resolve_method(method)
    lines = [f"## {m.name}", "", m.description or "(no description)", "", "| setting | value | source |", "|---|---|---|"]
    for row in describe(m):
        src = row["source"] if row["source"] is not None else "(none recorded)"
        if row["deviation"]:
            src = f"**deviation**: {src}"
        val = row["value"] if row["setting"] == "stages" else repr(row["value"])
        lines.append(f"| {_cell(row['setting'])} | {_cell(val)} | {_cell(src)} |")
    return "\n".join(lines) + "\n"


def provenance_readme() -> str:
    """Every registered method's :func:`describe_markdown` table in a collapsible block (the README's
    "Method provenance" section is exactly this text; a test checks it)."""
    from .methods import METHODS

    parts = []
    for name, m in METHODS.items():
        body = describe_markdown(m).split("\n", 4)[4]  # the table: heading and description are in the summary
        parts.append(f"<details><summary><code>{name}</code>: {m.description}</summary>\n\n{body}\n</details>")
    return "\n\n".join(parts)
