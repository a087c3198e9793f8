"""Dynamic int8 quantization of a reward model for CPU scoring, with an optional bias correction.

torch's dynamic quantization stores each `nn.Linear` weight as int8 (one scale per tensor) and quantizes the
activations on the fly, batch by batch. Its weight rounding error is systematic: for inputs with mean m, a layer's
output drifts by (W - Q(W)) m on average. The correction (Nagel et al., 2019, "data-free quantization"'s bias
correction, here with a few calibration inputs instead of batch-norm statistics) measures m for every linear layer
on calibration batches in full precision and adds (W - Q(W)) m to the layer's bias.

LoRA adapters are merged into their base weights first (and removed), so each projection is one int8 matrix. The
Gaussian head stays in float: it is two small layers whose error would fall straight on the score. Scoring only: a
quantized model cannot be trained.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from spatialscore.errors import SpatialScoreError

KEEP_FLOAT = ("head.",)  # module-name prefixes left in float


def merge_lora(model: torch.nn.Module) -> int:
    """Merge every peft LoRA layer into its base layer and put the base layer in its place (in place: the adapter
    is gone afterwards); the number merged."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no peft: no adapters to merge
        return 0
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    for name, module in layers:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    return len(layers)


def _float_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: module for name, module in model.named_modules()
            if type(module) is torch.nn.Linear and not name.startswith(KEEP_FLOAT)}


@torch.no_grad()
def input_means(model: torch.nn.Module, run: Callable[[], object], names: list[str]) -> dict[str, torch.Tensor]:
    """The mean input vector of each named linear layer while `run()` calls the model (over every token)."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in names]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] / counts[name] for name in sums}


@torch.no_grad()
def quantize_int8(model: torch.nn.Module, calibrate: Callable[[], object] | None = None) -> dict:
    """Quantize `model`'s linear layers to dynamic int8 in place (LoRA merged first; the head kept in float).
    With `calibrate` (a function that runs the model on typical inputs), also correct each layer's bias for its
    weight rounding error. Returns a summary: layers quantized, LoRA layers merged, layers bias-corrected."""
    if torch.backends.quantized.engine == "none":
        raise SpatialScoreError("quantize: int8 needs a quantized engine (fbgemm / x86 / qnnpack); this torch has none")
    model.eval()
    merged = merge_lora(model)
    linears = _float_linears(model)
    if not linears:
        raise SpatialScoreError("quantize: the model has no linear layers to quantize")
    weights = {name: module.weight.detach().clone() for name, module in linears.items()}
    means = input_means(model, calibrate, list(linears)) if calibrate is not None else {}
    with warnings.catch_warnings():  # torch points eager quantization users to torchao, which is not installed here
        warnings.simplefilter("ignore")
        qconfig = torch.ao.quantization.default_dynamic_qconfig
        torch.ao.quantization.quantize_dynamic(model, {name: qconfig for name in linears}, dtype=torch.qint8,
                                               inplace=True)
    modules = dict(model.named_modules())
    corrected = 0
    for name, mean in means.items():
        layer = modules[name]
        qweight = layer.weight()
        drift = (weights[name] - qweight.dequantize()) @ mean
        bias = layer.bias()
        layer.set_weight_bias(qweight, drift if bias is None else bias + drift)
        corrected += 1
    return {"quantized": len(linears), "lora_merged": merged, "bias_corrected": corrected}
