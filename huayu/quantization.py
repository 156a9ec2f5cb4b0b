"""Weight-only int8 and group-wise int4 quantization of a model's Linear layers, for the CPU.

torch ships the matmul kernels (`torch._weight_int8pack_mm`, `torch._weight_int4pack_mm_for_cpu`,
the ones torchao and gpt-fast run on a CPU) but no module, file format or loader around them; this
is that part. Activations stay in the model's dtype (fp32 or bf16); only weights are stored small:

- int8: one symmetric scale per output row, w = q * scale, q in [-127, 127];
- int4: per group of `group_size` input columns, w = (q - 8) * scale + zero, q in [0, 15] (the
  kernel's convention), two values packed per byte.

A quantized model directory is a normal one (config.json, model.safetensors, tokenizer) whose
config carries `huayu_quantization` (bits, group size, the quantized modules); `load_quantized`
rebuilds the model from it, so huayu.load, chat, eval and serve take it like any other model.
Embeddings, norms and biases keep their precision. Quantized models are for inference only.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from huayu.errors import HuayuError

RECORD = "huayu_quantization"
BITS = (8, 4)
GROUP_SIZES = (32, 64, 128, 256)   # what the int4 kernel takes


class QuantizedLinear(torch.nn.Module):
    """y = x W^T + b with W stored as int8 rows or int4 groups."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None, bias: bool,
                 dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        if bits == 8:
            self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        else:
            groups = in_features // group_size
            self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.empty(groups, out_features, dtype=dtype, device=device))
            self.register_buffer("zeros", torch.empty(groups, out_features, dtype=dtype, device=device))
            self.register_load_state_dict_post_hook(lambda module, _: module.pack_for_kernel())
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    def pack_for_kernel(self) -> None:
        """The int4 kernel's own (machine-specific) layout of the portable nibbles; its rows padded to
        the multiple of 16 it needs."""
        if self.bits != 4 or self.qweight.is_meta:
            return
        q = unpack_nibbles(self.qweight)
        rows = -self.out_features % 16
        q = torch.nn.functional.pad(q, (0, 0, 0, rows))
        sz = torch.stack([self.scales, self.zeros], dim=-1)
        self.register_buffer("kernel_weight", torch._convert_weight_to_int4pack_for_cpu(q, 1), persistent=False)
        self.register_buffer("kernel_scales", torch.nn.functional.pad(sz, (0, 0, 0, rows)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).contiguous()  # the kernels take no strides
        if self.bits == 8:
            y = torch._weight_int8pack_mm(flat, self.qweight, self.scales.to(flat.dtype))
        else:
            y = torch._weight_int4pack_mm_for_cpu(flat, self.kernel_weight, self.group_size,
                                                  self.kernel_scales.to(flat.dtype))[:, :self.out_features]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}"


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values in [0, 15] -> [N, K/2] bytes, column 2j in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_nibbles, as the int32 the kernel's packer takes."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1).to(torch.int32)


def _dense_weight(module) -> torch.Tensor:
    """The [out, in] weight of a Linear, or of a GPT-2 Conv1D (which stores it transposed)."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


def quantize_linear(module, bits: int, group_size: int | None) -> QuantizedLinear:
    weight = _dense_weight(module).detach().float()
    out_features, in_features = weight.shape
    dtype = module.weight.dtype
    q = QuantizedLinear(in_features, out_features, bits, group_size, module.bias is not None, dtype=dtype)
    if bits == 8:
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        q.qweight.copy_(torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8))
        q.scales.copy_(scales)
    else:
        groups = weight.reshape(out_features, -1, group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scales = ((high - low) / 15).clamp(min=1e-8)
        values = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15)
        q.qweight.copy_(pack_nibbles(values.reshape(out_features, in_features)))
        q.scales.copy_(scales.t())
        q.zeros.copy_((low + 8 * scales).t())
        q.pack_for_kernel()
    if module.bias is not None:
        q.bias.copy_(module.bias.detach())
    return q


def _linear_modules(model) -> list[tuple[str, torch.nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]


def _replace(model, name: str, new: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def check_quantization(bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise HuayuError(f"--bits must be 8 or 4, got {bits}")
    if bits == 4 and group_size not in GROUP_SIZES:
        raise HuayuError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))} for int4, got {group_size}")


def quantize_model(model, bits: int, group_size: int = 32) -> dict:
    """Replace the Linear layers of `model` (in place) by quantized ones; the record saved in its
    config. A layer whose input width is not a multiple of `group_size` (int4) gets int8 instead;
    the layers the architecture keeps in fp32 keep their precision."""
    check_quantization(bits, group_size)
    if getattr(model.config, RECORD, None):
        raise HuayuError("the model is already quantized")
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])  # e.g. T5's `wo`, which it reads as a weight
    layers = {}
    with torch.no_grad():
        for name, module in _linear_modules(model):
            if name.rpartition(".")[2] in keep:
                continue
            layer_bits = 4 if bits == 4 and _dense_weight(module).shape[1] % group_size == 0 else 8
            _replace(model, name, quantize_linear(module, layer_bits, group_size if layer_bits == 4 else None))
            layers[name] = layer_bits
    if not layers:
        raise HuayuError(f"{model.config.model_type} has no Linear layers to quantize")
    if "lm_head" in layers or any(n.endswith(".lm_head") for n in layers):
        model.config.tie_word_embeddings = False  # the output layer now has its own (quantized) weights
    record = {"bits": bits, "group_size": group_size if bits == 4 else None, "layers": layers,
              "tied": _tied_names(model)}
    setattr(model.config, RECORD, record)
    return record


def _tied_names(model) -> list[list[str]]:
    """Groups of parameter names sharing one tensor (e.g. T5's embeddings), which the weights file
    holds once: the loader puts the tensor back under every name."""
    groups = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def is_quantized(config) -> bool:
    return bool(getattr(config, RECORD, None))


def load_quantized(path: str, config, auto, dtype=None):
    """The quantized model saved in `path`: its architecture built without weights, the Linear
    layers the record names swapped for quantized ones, then every tensor taken from the file."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    from huayu.models.loading import remote_code_trusted

    record = getattr(config, RECORD)
    with init_empty_weights(include_buffers=False):  # computed buffers (RoPE's) stay real
        model = auto.from_config(config, trust_remote_code=remote_code_trusted())
    for name, bits in record["layers"].items():
        old = model.get_submodule(name)
        out_features, in_features = _dense_weight(old).shape
        _replace(model, name, QuantizedLinear(in_features, out_features, bits,
                                              record["group_size"] if bits == 4 else None,
                                              old.bias is not None, device="meta"))
    files = sorted(Path(path).glob("model*.safetensors"))
    if not files:
        raise HuayuError(f"'{path}' has no model*.safetensors weights")
    state = {}
    for file in files:
        state.update(load_file(file))
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    for names in record["tied"]:
        saved = next((n for n in names if n in state), None)
        for name in names if saved else []:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, model.get_parameter(saved))
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta or unexpected:
        raise HuayuError(f"'{path}' does not match its quantization record: missing {still_meta[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.pack_for_kernel()
    model = model.to(dtype) if isinstance(dtype, torch.dtype) else model
    return model.eval()


def save_quantized(model, directory: Path) -> None:
    """config.json (with the record), generation_config.json and model.safetensors; tensors shared
    by several names are written once."""
    from safetensors.torch import save_model

    model.config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_model(model, str(directory / "model.safetensors"), metadata={"format": "pt"})
