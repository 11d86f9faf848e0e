"""Token sampling and log-probabilities from float32 logits."""

from __future__ import annotations

import torch

from s2ft_serve.engine.request import SamplingParams, TokenLogprob


def sample(
    logits: torch.Tensor,  # [B, vocab] float32
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    drafts: list[int | None] | None = None,  # a proposed token per row (speculative decoding), or None
) -> list[int]:
    """Greedy rows in one argmax; sampled rows each with their own (seeded) generator. A sampled row
    with a draft token keeps it with its probability p(draft), else samples from p without it: the
    token is still distributed exactly as p (speculative sampling with a one-token proposal)."""
    greedy = logits.argmax(dim=-1).tolist()
    out = []
    for i, p in enumerate(params):
        if p.temperature == 0:
            out.append(greedy[i])
            continue
        probs = probabilities(logits[i], p)
        gen = generators[i]
        if gen is not None and gen.device != probs.device:
            probs = probs.to(gen.device)
        draft = drafts[i] if drafts is not None else None
        if draft is not None:
            if float(torch.rand(1, generator=gen, device=probs.device)) * float(probs.sum()) < float(probs[draft]):
                out.append(draft)
                continue
            probs = probs.clone()
            probs[draft] = 0.0  # the rest of p (p(draft) < 1 here, so something remains)
        out.append(int(torch.multinomial(probs, 1, generator=gen)))
    return out


def probabilities(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:  # [vocab], not normalised after top-p
    """The distribution a sampled row draws from: temperature, then top-k, top-p and min-p."""
    row = row / p.temperature
    if p.top_k:
        kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < p.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    if p.min_p > 0:  # relative to the most likely token, which always stays
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs


def adjust_logits(
    row: torch.Tensor,  # [vocab] float32, the model's logits for one sequence
    params: SamplingParams,
    prompt_ids: list[int],
    output_ids: list[int],
    eos_ids: set[int],
) -> torch.Tensor:
    """`row` after logit bias, min_tokens, repetition, frequency and presence penalties (vLLM's order)."""
    row = row.clone()
    device = row.device
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=device)
        row[ids] += torch.tensor(list(params.logit_bias.values()), dtype=row.dtype, device=device)
    if len(output_ids) < params.min_tokens:
        banned = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_ids)
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
