"""The serving forward pass over a Hugging Face Llama-family model, with a row-per-request KV cache.

We reuse the model's own modules (projections, norms, MLP, rotary embedding), so every
supported architecture (Llama, Mistral, Qwen2 with q/k/v biases, Qwen3 with q/k norms) computes
exactly what transformers computes; only attention and caching are ours:

- The KV cache holds one *row* per running request; running requests always occupy rows
  `0..B-1` (a finished request's row is refilled by moving the last one), so decode attends over
  a view `cache[:B, :, :L]` with a length mask and never copies the cache.
- Prefill runs several new requests in one pass: their prompts, right-padded to the longest, take
  consecutive cache rows; causal attention keeps every real token off the padding behind it, and
  decode masks the padding's cache entries until its own tokens overwrite them.
- A prompt may also continue a prefix already in its cache row (`cached=True`): a later chunk of a
  chunked prefill, or the rest of a prompt after a prefix-cache hit. Its tokens are written at their
  own positions and attend over the row's cache up to themselves, exactly as a decode step does
  for one token; each row may start at a different position.
- Dense projections go through `gemm.DenseGemm`: the model's own Linears (`gemm="exact"`; each through
  `gemm.ExactLinear`, the same bits, faster where verified), or with
  `gemm="onednn"` one GEMM for q/k/v and one for gate/up, prepacked for oneDNN on CPU float32 (and
  bfloat16 where the CPU has native bfloat16 arithmetic). The
  engine then owns the model it serves: the original q/k/v, gate/up (and an untied LM head) modules
  are released.
- On CPU float32 the rotary embedding of a layer's q and k is one compiled call
  (`adapters/csrc/rotary.cpp`) with transformers' bits, in place of ~14 small ops; so is each residual
  add with the RMSNorm after it (`adapters/csrc/rms_norm.cpp`, ~7 ops), where a probe shows its bits.
  On CPU a pass's keys and values go into the cache in one call (`adapters/csrc/kv_write.cpp`), and
  the attention mask is made additive once per pass (SDPA would convert a boolean one in every layer).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from s2ft_serve.adapters import native
from s2ft_serve.errors import InsufficientMemoryError
from s2ft_serve.model.gemm import DenseGemm, ExactLinear, Released, release
from s2ft_serve.model.loading import head_dim_of, sliding_windows


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.where(allowed, 0.0, float("-inf")).to(dtype)


def _band(window: int | None, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """The [L, L] mask of a fresh prompt under a sliding window; None (plain causal) where it sees it whole."""
    if window is None or window >= length:
        return None
    keys, at = torch.arange(length, device=device)[None, :], torch.arange(length, device=device)[:, None]
    return _additive((keys <= at) & (keys > at - window), dtype)


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can take on `device`, or None where unknown. CPU: the kernel's
    MemAvailable, or less if the process's cgroup (a container's memory limit) allows less; CUDA: the
    device's free memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = None
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):  # cgroup v1
        try:
            with open(limit_file) as f, open(usage_file) as g:
                limit, used = f.read().strip(), int(g.read())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or a huge number: no limit
            room = max(int(limit) - used, 0)
            free = room if free is None else min(free, room)
        break
    return free


class KVCache(nn.Module):
    """Preallocated keys and values: [layers, rows, kv_heads, max_len, head_dim] each.

    Refused up front (InsufficientMemoryError, with the figures and what to lower) when it cannot fit
    in the device's free memory; otherwise the allocation would fail with an allocator error that
    names neither setting, or, zeroing memory the kernel overcommitted, get the process OOM-killed."""

    def __init__(self, layers: int, rows: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (layers, rows, kv_heads, max_len, head_dim)
        self.nbytes = 2 * math.prod(shape) * dtype.itemsize
        free = available_memory(torch.device(device))
        if free is not None and self.nbytes > free:
            raise InsufficientMemoryError(
                f"the KV cache needs {self.nbytes / 2**30:.1f} GiB ({rows} rows of {max_len} tokens, {layers} layers, "
                f"{str(dtype).replace('torch.', '')}) but {torch.device(device)} has {free / 2**30:.1f} GiB free; "
                "lower --max-model-len or --max-batch-size")
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy a request's cache from row `src` to row `dst` (when compacting the batch)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


class Transformer(nn.Module):
    """Runs a transformers *ForCausalLM with our attention and KV cache."""

    def __init__(self, hf_model: nn.Module, max_rows: int, max_len: int, gemm: str = "exact",
                 verdicts: dict | None = None):  # gemm.ExactLinear's probe results, shared with the adapted modules
        super().__init__()
        verdicts = verdicts if verdicts is not None else {}
        self.hf = hf_model
        cfg = hf_model.config
        self.layers = hf_model.model.layers
        self.head_dim = head_dim_of(cfg)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.max_len = max_len
        self.windows = sliding_windows(cfg, len(self.layers))  # per layer: None, or the sliding window
        self.window_sizes = sorted({w for w in self.windows if w})  # each needs its own mask per pass
        w = hf_model.model.embed_tokens.weight
        # the rotary embedding as one compiled call where it can run (CPU float32), else transformers' ops
        self.rotary = native.rotary_op() if w.device.type == "cpu" and w.dtype == torch.float32 else None
        # each residual add and the RMSNorm after it as one compiled call where a probe shows transformers'
        # bits (CPU float32), else the model's own modules
        self.norm_lanes = self._norm_lanes()
        self.add_rms_norm = native.add_rms_norm_op() if self.norm_lanes is not None else None
        # a pass's keys and values into a layer's cache in one compiled call (CPU), else two index_copy_
        self.kv_write = native.kv_write_op() if w.device.type == "cpu" else None
        # decode attention with each KV head's query heads folded into its queries (see _attention): on a
        # GPU, where SDPA's fast kernels take no grouped heads with a mask; the CPU keeps its own bits
        self.fold_groups = w.device.type == "cuda"
        self.cache = KVCache(len(self.layers), max_rows, self.num_kv_heads, max_len, self.head_dim, w.dtype, w.device)
        self.qkv, self.gate_up = nn.ModuleList(), nn.ModuleList()
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if isinstance(attn.q_proj, Released):
                raise ValueError("this model already serves another engine (its weights were packed for it); "
                                 "load the model again for a second engine")
            self.qkv.append(DenseGemm([attn.q_proj, attn.k_proj, attn.v_proj], max_rows, gemm == "onednn", verdicts))
            self.gate_up.append(DenseGemm([mlp.gate_proj, mlp.up_proj], max_rows, gemm == "onednn", verdicts))
            if self.qkv[-1].packed:
                release(attn, ["q_proj", "k_proj", "v_proj"])
                release(mlp, ["gate_proj", "up_proj"])
        tied = hf_model.lm_head.weight is w
        head = DenseGemm([hf_model.lm_head], max_rows, onednn=True) if gemm == "onednn" else None
        if head is not None and head.packed:
            self.lm_head = head
            if not tied:
                release(hf_model, ["lm_head"])
        else:  # the same bits, faster where verified (a plain object, not a submodule)
            self.lm_head = ExactLinear(hf_model.lm_head, wide=True, verdicts=verdicts)

    @property
    def device(self) -> torch.device:
        return self.hf.model.embed_tokens.weight.device

    def forward(
        self,
        tokens: torch.Tensor,  # [B, L]
        positions: torch.Tensor,  # [B, L]
        rows: slice,  # the cache rows of the B sequences
        cached: bool,  # True: the tokens continue what each row's cache holds (decode, a later chunk,
        # a prefix-cache hit) and go in at `positions`; False: fresh prompts from position 0 (right-padded)
        keep: torch.Tensor | None = None,  # flat indices into the B * L positions to return logits for
        span: int | None = None,  # cached: the cache positions attended over (default: up to the furthest
        # position; a CUDA graph's step gives its own, as reading positions.max() would wait for the GPU)
        write_slots: torch.Tensor | None = None,  # cached: where the keys and values go, flat as `cache_slots`
        # gives them (default: each row's own, at `positions`)
    ) -> torch.Tensor:  # [len(keep) or B * L, vocab] float32
        h = self.hf.model.embed_tokens(tokens)  # [B, L, H]
        cos, sin = self.hf.model.rotary_emb(h, positions)
        # q/k rotation for every layer of this pass: the compiled call where it serves ([B, L, D] rows,
        # outside autograd), else transformers' function
        rotate = apply_rotary_pos_emb
        if self.rotary is not None and cos.dim() == 3 and not torch.is_grad_enabled():
            rotate, cos, sin = self.rotary, cos.contiguous(), sin.contiguous()  # a no-op when so made
        # the attention masks of this pass, by window (None: full attention), additive: what
        # scaled_dot_product_attention makes of a boolean mask (0 where True, -inf elsewhere, in the
        # query's dtype), built once per pass instead of once per layer
        slots = None
        if cached:  # each token attends over its row's cache up to its own position
            span = int(positions.max()) + 1 if span is None else span
            keys, at = torch.arange(span, device=h.device)[None, None, :], positions[:, :, None]
            seen = keys <= at  # [B, L, span]
            masks = {w: _additive(seen if w is None else seen & (keys > at - w), h.dtype)[:, None]  # [B, 1, L, span]
                     for w in (None, *self.window_sizes)}
            slots = self.cache_slots(rows, positions) if write_slots is None else write_slots
        else:  # fresh prompts from position 0: causal, banded for a window shorter than the prompt
            masks = {w: _band(w, tokens.shape[1], h.device, h.dtype) for w in (None, *self.window_sizes)}
        # the compiled norm and cache write where they serve (outside autograd), decided once per pass
        grad = torch.is_grad_enabled()
        add_norm = self._add_norm_compiled if self.add_rms_norm is not None and not grad else self._add_norm
        write = self.kv_write if self.kv_write is not None and not grad else self._write_kv
        out = None  # the last block's output, added to h by the next norm's call
        for i, layer in enumerate(self.layers):
            h, r = add_norm(h, out, layer.input_layernorm)
            h, r = add_norm(h, self._attention(i, layer.self_attn, r, rotate, write, cos, sin, rows,
                                               masks[self.windows[i]], slots), layer.post_attention_layernorm)
            out = self._mlp(i, layer.mlp, r)
        h = (h + out).reshape(-1, h.shape[-1])
        if keep is not None:
            h = h.index_select(0, keep)
        _, h = add_norm(h, None, self.hf.model.norm)
        return self.lm_head(h).float()

    @staticmethod
    def _add_norm(h: torch.Tensor, out: torch.Tensor | None, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + out, its norm); `out` None: (h, its norm)."""
        if out is not None:
            h = h + out
        return h, norm(h)

    def _add_norm_compiled(self, h, out, norm):
        """`_add_norm` as one compiled call, with its bits (see `_norm_lanes`)."""
        return self.add_rms_norm(h.contiguous(), None if out is None else out.contiguous(), norm.weight,
                                 norm.variance_epsilon, self.norm_lanes)

    def _norm_lanes(self) -> int | None:
        """How the compiled add + RMSNorm (`adapters/csrc/rms_norm.cpp`) sums a row so that every norm of
        this model gets transformers' very bits: ATen's order for vectors of 8 lanes (torch 2.13's on x86,
        under every CPU capability), else (0) ATen's own `mean` called from it (another CPU or torch); None
        where neither does, or the call cannot serve (not CPU float32, no kernel, norms of another kind)."""
        norms = [n for layer in self.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        norms.append(self.hf.model.norm)
        if any(type(n) is not type(norms[0]) or not isinstance(getattr(n, "variance_epsilon", None), float) or
               getattr(n, "weight", None) is None or n.weight.shape != norms[0].weight.shape for n in norms):
            return None
        w = norms[0].weight
        if w.device.type != "cpu" or w.dtype != torch.float32:
            return None
        op = native.add_rms_norm_op()
        if op is None:
            return None
        g = torch.Generator().manual_seed(0)
        # a decode step's rows, a prefill, one long enough to run in parallel; every norm on a small one
        shapes = [(norms[0], (32, 1)), (norms[0], (3, 37)), (norms[0], (1, 300))] + [(n, (2, 3)) for n in norms]
        probes = [(n, torch.randn(*shape, w.shape[0], generator=g, dtype=w.dtype) * 4,
                   torch.randn(*shape, w.shape[0], generator=g, dtype=w.dtype))
                  for n, shape in shapes]
        with torch.inference_mode():
            for lanes in (8, 0):
                if all(torch.equal(got, want) for n, h, d in probes
                       for got, want in zip(op(h, d, n.weight, n.variance_epsilon, lanes), (h + d, n(h + d)))):
                    return lanes
        return None

    def _mlp(self, i, mlp, x):
        gate, up = self.gate_up[i](x)
        return mlp.down_proj(mlp.act_fn(gate) * up)

    def cache_slots(self, rows: slice, pos: torch.Tensor) -> torch.Tensor:
        """Flat [B * kv_heads * L] indices of (row, head, position) in one layer's cache viewed as
        [-1, D], for positions `pos` [B, L]: one index_copy_ writes the new keys, far faster than
        advanced-index assignment."""
        row_ids = torch.arange(rows.start, rows.stop, device=pos.device)
        heads = torch.arange(self.num_kv_heads, device=pos.device)
        flat = (row_ids[:, None, None] * self.num_kv_heads + heads[None, :, None]) * self.max_len + pos[:, None, :]
        return flat.reshape(-1)

    @staticmethod
    def _write_kv(ck: torch.Tensor, cv: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """`kv_write` as eager ops: the rows of k and v [B, H, L, D] into the caches viewed as [-1, D]."""
        ck.view(-1, k.shape[-1]).index_copy_(0, slots, k.reshape(-1, k.shape[-1]))
        cv.view(-1, v.shape[-1]).index_copy_(0, slots, v.reshape(-1, v.shape[-1]))

    def _attention(self, i, attn, x, rotate, write, cos, sin, rows, mask, slots):
        B, L, _ = x.shape
        shape = (B, L, -1, self.head_dim)
        q, k, v = (t.reshape(shape) for t in self.qkv[i](x))
        if hasattr(attn, "q_norm"):  # Qwen3
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, L, D]
        q, k = rotate(q, k, cos, sin)
        ck, cv = self.cache.k[i], self.cache.v[i]  # [rows, kv_heads, max_len, D]
        if slots is not None:  # continuing the cache (decode, ...): write at the positions, attend over it
            write(ck, cv, slots, k, v)
            span = mask.shape[-1]
            keys, values = ck[rows, :, :span], cv[rows, :, :span]
            if L == 1 and self.fold_groups and self.num_heads != self.num_kv_heads:
                # a decode step: each KV head's query heads as one head's L queries, the same sums without
                # `enable_gqa`, which with a mask sends CUDA's SDPA to its math kernel (K and V copied per
                # query head in every layer)
                groups = self.num_heads // self.num_kv_heads
                out = F.scaled_dot_product_attention(q.reshape(B, self.num_kv_heads, groups, -1), keys, values,
                                                     attn_mask=mask, scale=attn.scaling)
                out = out.reshape(B, self.num_heads, 1, -1)
            else:
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling,
                                                     enable_gqa=True)
        else:  # fresh prompts: the new requests' rows from position 0, padding included
            ck[rows, :, :L] = k
            cv[rows, :, :L] = v
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=attn.scaling,
                                                 enable_gqa=True)  # mask: a sliding window shorter than L
        out = out.transpose(1, 2).reshape(B, L, -1)  # [B, L, heads * D]
        return attn.o_proj(out)
