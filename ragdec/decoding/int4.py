"""The int4 engine configuration: 4-bit weights for the decode step, batch-invariant.

A CPU decode step reads every weight once per token, so its time is the bytes read:
qwen2.5-coder-0.5b in float32 reads about 2 GB a step, llama.cpp's Q4_K_M about 0.4 GB,
which is most of why llama.cpp decodes 4-7x faster on these cores. torch ships a CPU
kernel for 4-bit weights with groupwise scales and zeros
(``aten._weight_int4pack_mm_for_cpu``, bfloat16 activations): on 2 cores a 896 x 4864
projection of one token takes 0.27 ms against float32's 1.7 ms, and 4 tokens 0.50 ms
against 6.1 ms, so a verify of a draft costs far less on top of the step.

Two properties make it an engine configuration for lossless methods:

- **Row invariance**: the kernel computes each output row the same way whatever the
  number of rows (tested: 1 to 16 rows, bitwise), and ragdec's attention for 16-bit
  models is invariant too (``attention.py``); norms, rotary and the embedding work per
  position. So a verify over ``[last, *draft]`` gives each position the bits a one-token
  step gives, and LLMA, the lossless BiLD and FREE modes stay identical to greedy of this
  configuration token for token (what bfloat16 alone could not promise: oneDNN's
  bfloat16 matmul is not row-invariant).
- **One set of weights**: each linear layer keeps the 4-bit weights and their exact
  bfloat16 dequantization. A forward over more than ``MAX_INVARIANT_QUERIES`` positions
  per row (reading a prompt) multiplies by the dequantized weights with the dense bfloat16
  kernel, 2.2x faster there than the 4-bit kernel; decode steps and verifies use the
  4-bit kernel. Every method reads its prompt the same way, so they compare.

Quantization: asymmetric 4 bits per weight in groups of 32 along the input dimension
(min and max of the group set the scale and zero), llama.cpp's Q4 sub-block size. The
zoo's Qwen weights were themselves dequantized from a Q4_K_M GGUF, whose Q4_K tensors
hold 32-weight groups on a 16-level grid already. Greedy output may differ from float32's;
compare methods within one configuration (``--dtype int4``).
"""

from __future__ import annotations

from functools import lru_cache

from .attention import MAX_INVARIANT_QUERIES, use_invariant_attention

INT4 = "int4"
GROUP = 32  # weights per scale and zero, along the input dimension
INNER_K_TILES = 1  # the CPU kernel's packing argument (the CPU kernel takes 1)


def quantize_weight(weight, group: int = GROUP):
    """4-bit codes and bfloat16 scales/zeros of ``weight`` [N, K], and the bfloat16 weights
    they stand for: (packed for the kernel, scales_and_zeros [K / group, N, 2], dense [N, K]).

    The kernel computes ``(q - 8) * scale + zero`` per weight, with q in 0..15 and
    ``zero = min + 8 * scale``; ``dense`` is exactly that, from the bfloat16 scale and zero.
    """
    import torch

    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // group, group)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-8)
    codes = ((w - low) / scale).round().clamp(0, 15)
    scale_b = scale.bfloat16()
    zero_b = (low + 8 * scale).bfloat16()
    dense = ((codes - 8) * scale_b.float() + zero_b.float()).reshape(n, k).bfloat16()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.reshape(n, k).to(torch.int32), INNER_K_TILES)
    scales_and_zeros = torch.cat([scale_b, zero_b], dim=-1).transpose(0, 1).contiguous()  # [K / group, N, 2]
    return packed, scales_and_zeros, dense


@lru_cache(maxsize=1)
def _int4_linear_class():
    """``Int4Linear``, made on first use so that importing this module stays light."""
    import torch
    from torch import nn

    class Int4Linear(nn.Module):
        """A linear layer on 4-bit weights (see the module docstring); ``weight`` is the
        dense bfloat16 dequantization, for code that reads a layer's weight."""

        def __init__(self, linear, group: int = GROUP):
            super().__init__()
            self.in_features, self.out_features, self.group = linear.in_features, linear.out_features, group
            packed, scales_and_zeros, dense = quantize_weight(linear.weight, group)
            self.register_buffer("packed", packed)
            self.register_buffer("scales_and_zeros", scales_and_zeros)
            self.weight = nn.Parameter(dense, requires_grad=False)
            self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().bfloat16(), requires_grad=False)

        def forward(self, x):
            if x.dim() >= 2 and x.shape[-2] > MAX_INVARIANT_QUERIES:  # reading a prompt
                return nn.functional.linear(x, self.weight, self.bias)
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scales_and_zeros)
            if self.bias is not None:
                out = out + self.bias
            return out.reshape(*x.shape[:-1], self.out_features)

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, bits=4"

    return Int4Linear


def quantize_model(model, group: int = GROUP):
    """Turn a bfloat16 causal LM into the int4 configuration in place: every linear layer
    of its decoder layers and its LM head on 4-bit weights (the input embedding, tied to
    the head in Qwen, stays bfloat16), attention batch-invariant. Returns the model.

    Raises:
        ValueError: a model not in bfloat16, or without the CPU int4 kernel (torch too old).
    """
    import torch
    from torch import nn

    if next(model.parameters()).dtype != torch.bfloat16:
        raise ValueError("the int4 configuration starts from a bfloat16 model: load it with dtype=torch.bfloat16")
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        raise ValueError(f"torch {torch.__version__} has no CPU int4 kernel: install the pinned torch (see pyproject.toml)")
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and module.in_features % group == 0]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")  # "" is the model itself
        setattr(model.get_submodule(parent_name), child, _int4_linear_class()(module, group))
    model.config.tie_word_embeddings = False  # the head has its own (4-bit) weights now
    model.config.ragdec_weights = INT4
    use_invariant_attention(model)
    return model


def weights_name(model) -> str:
    """What a model's weights are, for keys that must tell configurations apart (a cost
    curve): "int4", or the torch dtype's name ("float32", "bfloat16")."""
    name = getattr(model.config, "ragdec_weights", None)
    if name:
        return name
    return str(next(model.parameters()).dtype).removeprefix("torch.")
