"""Token sampling and log-probabilities from float32 logits."""

from __future__ import annotations

import torch

from s2ft_serve.adapters import native
from s2ft_serve.engine.request import SamplingParams, TokenLogprob


def sample(
    logits: torch.Tensor,  # [B, vocab] float32
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int | None]:
    """Greedy rows in one argmax; sampled rows each with their own (seeded) generator, one draw per
    token. Speculative decoding keeps a draft token when the draw is that token (probability p(draft);
    otherwise the draw is distributed as p without it: speculative sampling with a one-token
    proposal), so a seeded request draws the same tokens whether or not a step drafted for it.
    A sampled row whose logits give no distribution (NaN, or every token at -inf) gets None: the
    caller ends that request alone."""
    greedy = greedy_tokens(logits)
    out: list[int | None] = []
    for i, p in enumerate(params):
        if p.greedy:
            out.append(greedy[i])
            continue
        probs = probabilities(logits[i], p)
        if probs is None:
            out.append(None)
            continue
        gen = generators[i]
        if gen is not None and gen.device != probs.device:
            probs = probs.to(gen.device)
        out.append(int(torch.multinomial(probs, 1, generator=gen)))
    return out


def greedy_tokens(logits: torch.Tensor) -> list[int]:  # [B, vocab] float32
    """Each row's argmax, as torch.argmax answers it (the first largest value; a NaN counts as largest):
    on CPU the compiled call (`adapters/csrc/argmax.cpp`: ~2 ms -> ~0.2 ms for 32 rows of a 49k
    vocabulary), elsewhere torch's."""
    cpu = logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2 and logits.shape[1] > 0
    op = native.argmax_op() if cpu else None
    return (op(logits.contiguous()) if op is not None else logits.argmax(dim=-1)).tolist()


def probabilities(row: torch.Tensor, p: SamplingParams) -> torch.Tensor | None:  # [vocab], not normalised
    """The distribution a sampled row draws from: temperature, then top-k, top-p and min-p; None where
    there is none (NaN logits, or every token at -inf). Logits at +inf (a positive logit divided by a
    tiny repetition penalty) share the draw evenly, the limit of the softmax."""
    def softmax_top_k(row: torch.Tensor) -> torch.Tensor:
        if p.top_k:
            kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        return torch.softmax(row, dim=-1)

    row = row / p.temperature
    probs = softmax_top_k(row)
    if not bool(torch.isfinite(probs).all()):  # rare: checked only then, off the common path
        top = torch.isposinf(row)
        if not bool(top.any()):
            return None
        probs = softmax_top_k(torch.zeros_like(row).masked_fill_(~top, float("-inf")))
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < p.top_p
        keep[0] = True  # the most likely token always stays (a top_p that rounds to 0 keeps it alone)
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    if p.min_p > 0:  # relative to the most likely token, which always stays
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs


def adjust_logits_reference(
    row: torch.Tensor,  # [vocab] float32, the model's logits for one sequence
    params: SamplingParams,
    prompt_ids: list[int],
    output_ids: list[int],
    eos_ids: set[int],
) -> torch.Tensor:
    """`row` after logit bias, min_tokens, repetition, frequency and presence penalties (vLLM's order).
    The plain one-row rules; the engine runs `adjust_logits_batch`, which gives the same results."""
    row = row.clone()
    device = row.device
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=device)
        row[ids] += torch.tensor(list(params.logit_bias.values()), dtype=row.dtype, device=device)
    if len(output_ids) < params.min_tokens:
        banned = [t for t in params.end_ids(eos_ids) if 0 <= t < len(row)]  # as adjust_logits_batch
        if banned:
            row[torch.tensor(sorted(banned), device=device)] = float("-inf")
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), device=device)
        values = row[seen]
        row[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if output_ids and (params.frequency_penalty or params.presence_penalty):
        ids, counts = torch.tensor(output_ids, device=device).unique(return_counts=True)
        row[ids] -= params.frequency_penalty * counts.to(row.dtype) + params.presence_penalty
    return row


def adjust_logits_batch(
    logits: torch.Tensor,  # [B, vocab] float32, one row per sequence
    params: list[SamplingParams],
    prompts: list[list[int]],
    outputs: list[list[int]],
    eos_ids: set[int],
) -> torch.Tensor:  # [B, vocab], a new tensor
    """`adjust_logits_reference` for every row at once, with the same results bit for bit: each rule
    gathers the (row, token) entries it touches across all rows and updates them in one go."""
    out = logits.clone()
    flat = out.view(-1)
    device, vocab = logits.device, logits.shape[1]

    def keys(rows: list[int], ids_of) -> torch.Tensor:
        """Flat indices `row * vocab + id` into `out` for each row and each id of `ids_of(row)`."""
        parts = [torch.tensor(ids_of(i), dtype=torch.int64) + i * vocab for i in rows]
        return torch.cat(parts).to(device)

    def per_key(rows: list[int], value, at: torch.Tensor) -> torch.Tensor:
        """A row's parameter `value(params[row])` at each flat index in `at`."""
        table = torch.zeros(len(params), dtype=out.dtype)
        table[rows] = torch.tensor([value(params[i]) for i in rows], dtype=out.dtype)
        return table.to(device)[at // vocab]

    biased = [i for i, p in enumerate(params) if p.logit_bias]
    if biased:
        at = keys(biased, lambda i: list(params[i].logit_bias))
        flat[at] += torch.tensor([v for i in biased for v in params[i].logit_bias.values()], dtype=out.dtype,
                                 device=device)
    early = [i for i, p in enumerate(params) if len(outputs[i]) < p.min_tokens]
    if early:
        banned = {i: sorted(t for t in params[i].end_ids(eos_ids) if 0 <= t < vocab) for i in early}  # never
        # another row's entries: an id out of range cannot be sampled anyway
        early = [i for i in early if banned[i]]
        if early:
            flat[keys(early, banned.get)] = float("-inf")
    repeating = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if repeating:
        at = keys(repeating, lambda i: prompts[i] + outputs[i]).unique()
        values, penalty = flat[at], per_key(repeating, lambda p: p.repetition_penalty, at)
        flat[at] = torch.where(values > 0, values / penalty, values * penalty)
    counted = [i for i, p in enumerate(params) if outputs[i] and (p.frequency_penalty or p.presence_penalty)]
    if counted:
        at, counts = keys(counted, outputs.__getitem__).unique(return_counts=True)
        frequency = per_key(counted, lambda p: p.frequency_penalty, at)
        presence = per_key(counted, lambda p: p.presence_penalty, at)
        flat[at] -= frequency * counts.to(out.dtype) + presence
    return out


def token_logprobs(
    logits: torch.Tensor,  # [N, vocab] float32
    chosen: list[int],  # [N]
    top: int,
) -> list[TokenLogprob]:
    """The chosen token's log-probability under the model, with the `top` best alternatives."""
    logp = torch.log_softmax(logits, dim=-1)
    chosen_lp = logp.gather(1, torch.tensor(chosen, device=logp.device)[:, None])[:, 0].tolist()
    if top:
        values, ids = logp.topk(top, dim=-1)
        values, ids = values.tolist(), ids.tolist()
    result = []
    for n, tok in enumerate(chosen):
        alts = list(zip(ids[n], values[n])) if top else []
        result.append(TokenLogprob(token_id=tok, logprob=chosen_lp[n], top=alts))
    return result
