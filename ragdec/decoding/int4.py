"""The int4 weight configuration: 4-bit weights for the decode step, batch-invariant.

A CPU decode step reads every weight once per token, so its time is the bytes read:
qwen2.5-coder-0.5b in float32 reads about 2 GB a step, llama.cpp's Q4_K_M about 0.4 GB,
which is most of why llama.cpp decodes several times faster on these cores. torch ships
a CPU kernel for 4-bit weights with groupwise scales and zeros
(``aten._weight_int4pack_mm_for_cpu``, bfloat16 activations), which reads a fifth of
float32's bytes and takes a few positions for little more than one, so a verify of a
draft costs far less on top of the step (bench/results/llamacpp_verify.json times each
width in every weight configuration).

What makes it a weight configuration for lossless methods, and fast at both ends:

- **Row invariance**: the kernel computes each output row the same way whatever the
  number of rows (tested: 1 to 16 rows, bitwise), and ragdec's attention for 16-bit
  models is invariant too (``attention.py``); norms, rotary and the embedding work per
  position. So a verify over ``[last, *draft]`` gives each position the bits a one-token
  step gives, and LLMA, the lossless BiLD and FREE modes stay identical to greedy of this
  configuration token for token (what bfloat16 alone could not promise: oneDNN's
  bfloat16 matmul is not row-invariant).
- **Prompts in 8 bits**: a forward over more than ``MAX_INVARIANT_QUERIES`` positions per
  row (reading a prompt) runs on int8: the weights quantized once per output channel from
  the 4-bit ones, the activations per position as they come, multiplied by oneDNN's
  u8 x s8 kernel, whose VNNI instructions do twice the multiply-adds of bfloat16's per
  cycle. That is llama.cpp's own recipe for prompts (its
  dot products quantize the activations to 8 bits too). The projections that read one
  input (q, k, v; gate, up) share its quantization. The elementwise work around the
  products (quantizing an input; in the MLP, applying the steps, the SiLU gating and
  quantizing the down projection's input, all in one pass) runs compiled (``_Fused``),
  which reads a prompt faster than the same passes eagerly. Decode steps and verifies use
  the 4-bit kernel. Every method reads its prompt the same way, so they compare.

Quantization: asymmetric 4 bits per weight in groups of 32 along the input dimension
(min and max of the group set the scale and zero), llama.cpp's Q4 sub-block size. That is
fewer bits than the GGUF the zoo's qwen2.5-coder-0.5b comes from: its "Q4_K_M" tensors are
mostly Q5_0 (32 levels per 32 weights; rows of 896 are no multiple of the 256 that Q4_K
needs), with Q8_0 for half the value projections and the output, Q4_K and Q6_K for the
down projections. So int4's greedy output differs from float32's (which is the GGUF's,
dequantized) more than llama.cpp's does; compare methods within one configuration
(``--dtype int4``).
"""

from __future__ import annotations


import logging
import os
from functools import lru_cache

from .attention import MAX_INVARIANT_QUERIES, use_invariant_attention

logger = logging.getLogger(__name__)

INT4 = "int4"
COMPILE_ENV = "RAGDEC_COMPILE"  # "1" or "0": compile the prompt path's elementwise work or not
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


def quantize_rows_int8(weight):
    """Per-output-channel int8 weights for the prompt kernel: (codes [N, K] int8, scales [N]
    float32), ``weight ~ codes * scales[:, None]``."""
    import torch

    w = weight.detach().float()
    scales = w.abs().amax(1).clamp(min=1e-8) / 127
    return (w / scales[:, None]).round().to(torch.int8), scales


def unpack_int4(packed, scales_and_zeros, group: int = GROUP):
    """The bfloat16 weights [N, K] that ``quantize_weight``'s kernel operands stand for.

    The CPU packing (torch 2.13) holds each block of B output rows as [K, B / 2] bytes, byte
    j of input k carrying row j's code in its low nibble and row B / 2 + j's in its high
    one; the rows after the last whole block follow as [K, rest / 2] bytes of neighbouring
    rows (2j low, 2j + 1 high). B is the kernel's block for this CPU (64 with AVX-512, 32
    with AVX2), read off the packer itself (``_packing``). ``test_int4`` checks this
    against the kernel's own packing."""

    block, halves = _packing()
    n, k = packed.shape[0], packed.shape[1] * 2
    return _dequantize(_codes(packed.reshape(-1), n, k, block, halves), scales_and_zeros, group)


def _codes(flat, n: int, k: int, block: int, halves: bool):
    """The 4-bit codes [N, K] of a packed weight, for a packing of ``block`` rows a block."""
    import torch

    whole = n // block * block
    parts = []
    if whole:
        blocks = flat[: whole * k // 2].reshape(whole // block, k, block // 2)
        if halves:
            codes = torch.cat([blocks & 0xF, blocks >> 4], dim=-1)  # [blocks, K, block]
        else:
            codes = torch.stack([blocks & 0xF, blocks >> 4], dim=-1).reshape(whole // block, k, block)
        parts.append(codes.transpose(1, 2).reshape(whole, k))
    if n > whole:
        pairs = flat[whole * k // 2:].reshape(k, (n - whole) // 2)
        parts.append(torch.stack([pairs & 0xF, pairs >> 4], dim=-1).reshape(k, n - whole).t())
    return torch.cat(parts)  # [N, K], 0..15


def _dequantize(codes, scales_and_zeros, group: int):
    n, k = codes.shape
    scale, zero = scales_and_zeros.float().permute(2, 1, 0)  # [N, K / group] each
    w = (codes.float().reshape(n, k // group, group) - 8) * scale.unsqueeze(-1) + zero.unsqueeze(-1)
    return w.reshape(n, k).bfloat16()


@lru_cache(maxsize=1)
def eight_bit_prompts() -> bool:
    """Whether prompts are read in 8 bits on this CPU: where torch runs AVX-512 kernels.
    Elsewhere (AVX2) oneDNN's u8 x s8 product has no kernel worth using: into bfloat16 it
    runs its reference loop (``ONEDNN_VERBOSE=1`` names it ``ref_int8``), hundreds of
    times slower; into float32 its JIT kernel sums pairs of products in 16 bits, which
    saturate and cost accuracy (``test_int4``'s bound on the error fails); and the 4-bit
    step kernel reads a prompt about as fast. So there a prompt is read like a step, on
    the 4-bit kernel: the same numbers whatever the number of positions."""
    import torch

    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


@lru_cache(maxsize=1)
def _packing() -> tuple[int, bool]:
    """(rows a block, whether a byte pairs row j with row block / 2 + j) of torch's int4
    packing on this CPU: the kernel torch picked for the CPU's instruction sets decides it,
    so it is read off the packer, on random codes of 80 rows (whole blocks and a rest),
    instead of guessed from the CPU's name."""
    import torch

    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (80, 2 * GROUP), dtype=torch.int32, generator=generator)
    flat = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INNER_K_TILES).reshape(-1)
    for block, halves in ((64, True), (32, True), (64, False), (32, False)):
        if torch.equal(_codes(flat, 80, 2 * GROUP, block, halves).to(torch.int32), codes):
            return block, halves
    raise RuntimeError(f"torch {torch.__version__}'s int4 packing on this CPU is not one ragdec can read: "
                       "load the model with --dtype float32, or install torch==2.13.0")


_last_activations: tuple = (None, None, None, None)  # (input, its version, codes, peak)


def _version(x):
    try:
        return x._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


_compile_prompts = True  # see ``compile_prompts``


def compile_prompts(enabled: bool) -> None:
    """Whether this process compiles the prompt path's elementwise work (``_Fused``);
    ``RAGDEC_COMPILE`` (1 or 0), when set, decides instead. Compiling costs a process a
    few seconds once (imports and loading the kept kernels; far longer on a machine's
    first run, when inductor compiles them) and saves a little on every prompt token
    read, so a server or a benchmark that reads many prompts gains, and a one-question
    ``ragdec ask`` turns it off."""
    global _compile_prompts
    _compile_prompts = enabled


def compiling_prompts() -> bool:
    setting = os.environ.get(COMPILE_ENV, "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    return _compile_prompts


class _Fused:
    """A function of a few elementwise passes, run compiled: torch.compile's inductor fuses
    them into one C++ loop over the data, where eagerly each pass reads and writes the
    whole activation. Compiled once per process on first call, with dynamic shapes;
    inductor keeps the kernels on disk, so a later process loads them instead of
    compiling again. ``eager`` computes the same in torch's
    own kernels, used when compiling is off (``compile_prompts``) or fails (no C++
    compiler, say; with a warning)."""

    def __init__(self, fn, eager):
        self.fn, self.eager = fn, eager
        self.compiled = None
        self.failed = False

    def __call__(self, *args):
        if self.failed or not compiling_prompts():
            return self.eager(*args)
        import torch

        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=True)
        try:
            return self.compiled(*args)
        except Exception as exc:  # inductor's failures have no common type
            self.failed = True
            logger.warning("int4: compiling %s failed, running it eagerly (%s: %s)", self.fn.__name__, type(exc).__name__, exc)
            return self.eager(*args)


def quantize_rows(flat):
    """A prompt's activations ``flat`` [rows, K] in 8 bits, each row on 127 levels of its
    largest magnitude: (uint8 codes with zero point 128, bfloat16 steps [rows, 1]).

    Written for both ways it runs: compiled, the passes fuse; eagerly, the in-place ops
    work on a float32 copy (converted before the multiply: a bfloat16 x float32 product
    takes torch's slow mixed-dtype path)."""
    import torch

    top = flat.abs().amax(1, keepdim=True).float().clamp_(min=1e-6)  # [rows, 1]
    codes = flat.to(torch.float32, copy=True).mul_(127 / top).round_().add_(128).to(torch.uint8)
    return codes, (top / 127).bfloat16()


def gated_codes(gate, up, peak):
    """The down projection's input of a SiLU-gated MLP, ``silu(gate) * up``, in 8 bits (as
    ``quantize_rows``): ``gate`` and ``up`` are the raw int8 products [rows, N] (bfloat16)
    and ``peak`` the input's steps [rows, 1], applied in float32."""
    import torch

    step = peak.float()
    return quantize_rows(torch.nn.functional.silu(gate.float() * step) * (up.float() * step))


def _gated_codes_eager(gate, up, peak):
    import torch

    gate, up = gate.mul_(peak), up.mul_(peak)  # bfloat16, in place: each pass is a copy less
    return quantize_rows(torch.nn.functional.silu(gate, inplace=True).mul_(up))


_quantize_rows = _Fused(quantize_rows, quantize_rows)
_gated_codes = _Fused(gated_codes, _gated_codes_eager)


def _prompt_activations(x, features: int):
    """A prompt's activations in 8 bits, each position on 127 levels of its largest one:
    (uint8 codes with zero point 128 [rows, features], bfloat16 steps [rows, 1]).

    The projections that read one input (q, k, v; gate, up) quantize it once: the last
    input is remembered, by identity (and version, outside inference mode). transformers'
    decoder layers never change a projection's input in place between its readers."""
    global _last_activations

    last, version, codes, peak = _last_activations
    if last is x and version == _version(x):
        return codes, peak
    codes, peak = _quantize_rows(x.reshape(-1, features))
    _last_activations = (x, _version(x), codes, peak)
    return codes, peak


@lru_cache(maxsize=1)
def _int4_linear_class():
    """(``Int4Linear``, ``GatedInt4MLP``), made on first use so that importing this module
    stays light."""
    import torch
    from torch import nn

    class Int4Linear(nn.Module):
        """A linear layer on 4-bit weights for decode steps and int8 ones for prompts (see
        the module docstring). ``weight`` is the dense bfloat16 form of the 4-bit weights,
        made on first read, for code that reads a layer's weight."""

        def __init__(self, linear, group: int = GROUP):
            super().__init__()
            self.in_features, self.out_features, self.group = linear.in_features, linear.out_features, group
            packed, scales_and_zeros, dense = quantize_weight(linear.weight, group)
            self.register_buffer("packed", packed)
            self.register_buffer("scales_and_zeros", scales_and_zeros)
            self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().bfloat16(), requires_grad=False)
            codes, scales = quantize_rows_int8(dense)
            # oneDNN's packed form is no state to save: plain attributes, not buffers
            self.prompt_weight = torch.ops.onednn.qlinear_prepack(codes, None)
            self.prompt_scales = scales
            self.prompt_zeros = torch.zeros(self.out_features, dtype=torch.long)
            self._dense = None

        @property
        def weight(self):
            if self._dense is None:
                self._dense = unpack_int4(self.packed, self.scales_and_zeros, self.group)
            return self._dense

        def prompt_product(self, codes):
            """The int8 product of a prompt's 8-bit activations [rows, K], before their
            steps are applied: [rows, N] bfloat16, no bias."""
            return torch.ops.onednn.qlinear_pointwise(
                codes, 1.0, 128, self.prompt_weight, self.prompt_scales, self.prompt_zeros,
                None, 1.0, 0, torch.bfloat16, "none", [], "")

        def forward(self, x):
            if reads_prompt(x):
                codes, peak = _prompt_activations(x, self.in_features)
                out = self.prompt_product(codes).mul_(peak)
            else:
                flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
                out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scales_and_zeros)
            if self.bias is not None:
                out = out + self.bias
            return out.reshape(*x.shape[:-1], self.out_features)

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, bits=4"

    class GatedInt4MLP(nn.Module):
        """A SiLU-gated MLP (``down(silu(gate(x)) * up(x))``, Qwen's and Llama's) on
        ``Int4Linear`` projections. On a prompt, the gate and up products, the gating and
        the 8-bit quantization of the down projection's input run as one fused pass
        (``gated_codes``) instead of six; decode steps run as the original MLP does."""

        def __init__(self, mlp):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
            self.act_fn = mlp.act_fn

        def forward(self, x):
            if not reads_prompt(x):
                return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
            codes, peak = _prompt_activations(x, self.gate_proj.in_features)
            hidden, step = _gated_codes(self.gate_proj.prompt_product(codes), self.up_proj.prompt_product(codes), peak)
            out = self.down_proj.prompt_product(hidden).mul_(step)
            return out.reshape(*x.shape[:-1], self.down_proj.out_features)

    return Int4Linear, GatedInt4MLP


def reads_prompt(x) -> bool:
    """Whether a forward over ``x`` [..., positions, features] reads a prompt (more than
    ``MAX_INVARIANT_QUERIES`` positions a row) rather than a decode step or a verify, on
    a CPU that reads prompts in 8 bits (``eight_bit_prompts``)."""
    return x.dim() >= 2 and x.shape[-2] > MAX_INVARIANT_QUERIES and eight_bit_prompts()


def _gated_mlps(model):
    """(parent, name, module) of the SiLU-gated MLPs whose three projections are
    ``Int4Linear`` without bias."""
    linear = _int4_linear_class()[0]
    if getattr(model.config, "hidden_act", None) != "silu":
        return []
    found = []
    for name, module in model.named_modules():
        projections = [getattr(module, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
        if all(isinstance(p, linear) and p.bias is None for p in projections) and hasattr(module, "act_fn"):
            parent_name, _, child = name.rpartition(".")
            found.append((model.get_submodule(parent_name), child, module))
    return found


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
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") or not torch.backends.mkldnn.is_available():
        raise ValueError(f"torch {torch.__version__} lacks the CPU int4 or oneDNN int8 kernels: install the pinned torch (see pyproject.toml)")
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and module.in_features % group == 0]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")  # "" is the model itself
        setattr(model.get_submodule(parent_name), child, _int4_linear_class()[0](module, group))
    for parent, child, mlp in _gated_mlps(model):
        setattr(parent, child, _int4_linear_class()[1](mlp))
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
