"""Build-only: the closed-form erasure (UCE) and what a variant file stores (torch only).

- ``uce_edit``: Unified Concept Editing ("Unified Concept Editing in Diffusion Models", Gandikota et al., WACV
  2024). Every cross-attention key and value projection ``W`` (``attn2.to_k`` / ``attn2.to_v``) is replaced, in
  closed form and without a gradient step, by the minimiser of

      sum_i ||W' c_i - W c*_i||^2  +  p * sum_j ||W' c_j - W c_j||^2  +  lam * ||W' - W||_F^2

  over ``W'``: the erased prompt's token vectors ``c_i`` are sent where the guide prompt's ``c*_i`` went (so the
  UNet's cross-attention sees the guide instead of the concept), the kept prompts' token vectors ``c_j`` keep their
  outputs, and ``lam`` keeps ``W'`` near ``W`` elsewhere. Solution: ``W' = (sum_i W c*_i c_i^T + p sum_j W c_j
  c_j^T + lam W) (sum_i c_i c_i^T + p sum_j c_j c_j^T + lam I)^-1``, computed in float64.
- ``stored_names`` / ``partial_state``: the tensors a method changes (and a variant file stores).
"""

from __future__ import annotations

import torch

UCE_TARGETS = ("attn2.to_k.weight", "attn2.to_v.weight")


def uce_names(state: dict) -> list[str]:
    """The tensors UCE edits: every cross-attention key and value projection weight."""
    return sorted(n for n in state if n.endswith(UCE_TARGETS))


def uce_token_sets(contexts: torch.Tensor, uncond: torch.Tensor, erase_idx, guide: str = "kept_mean") -> dict:
    """UCE's token vectors from the prompts' embeddings (contexts [K, 77, C], uncond [77, C]): erase = each erased
    prompt's vectors from the first position where the prompts differ on (the concept word, the end token and the
    padding after it: where the concept lives; the shared 'a photo of a' prefix is left alone), guide = at the same
    positions either the mean of the kept prompts' vectors (``kept_mean``: "a photo of a shape", a generic shape
    that is none of the erased ones) or the empty prompt's (``empty``: the unconditional model, which still draws
    the erased concept at its prior rate); preserve = every position of the kept prompts and of the empty prompt."""
    erase_idx = [int(i) for i in erase_idx]
    differs = (contexts != contexts[:1]).any(dim=-1).any(dim=0)  # [77]
    first = int(differs.nonzero()[0]) if differs.any() else 0
    kept = [i for i in range(contexts.shape[0]) if i not in erase_idx]
    if guide == "kept_mean":
        target = contexts[kept, first:].mean(0)
    elif guide == "empty":
        target = uncond[first:]
    else:
        raise ValueError(f"UCE guide must be 'kept_mean' or 'empty', got {guide!r}")
    return {"erase": torch.cat([contexts[i, first:] for i in erase_idx]),
            "guide": target.repeat(len(erase_idx), 1),
            "preserve": torch.cat([contexts[kept].reshape(-1, contexts.shape[-1]), uncond]),
            "first_position": first}


@torch.no_grad()
def uce_edit(state: dict, erase: torch.Tensor, guide: torch.Tensor, preserve: torch.Tensor, *,
             lam: float = 0.1, preserve_weight: float = 1.0) -> tuple[dict, dict]:
    """UCE on a UNet's state dict (see the module docstring): returns the edited key/value projections (float32;
    what the variant file stores) and a log.

    erase: [N, C] token vectors of the erased prompt(s); guide: [N, C] the guide prompt's vectors at the same
    positions; preserve: [M, C] token vectors whose outputs must not change. The log has, over the edited layers,
    the largest relative change of a projection and the mean relative residual of the erased tokens' outputs
    against their targets."""
    if erase.shape != guide.shape:
        raise ValueError(f"UCE: erase {tuple(erase.shape)} and guide {tuple(guide.shape)} token vectors must pair up")
    ce, cg, cp = (t.to(torch.float64).reshape(-1, t.shape[-1]) for t in (erase, guide, preserve))
    dim = ce.shape[1]
    gram = ce.T @ ce + preserve_weight * (cp.T @ cp) + lam * torch.eye(dim, dtype=torch.float64)
    names = uce_names(state)
    if not names:
        raise ValueError("UCE: the state dict has no cross-attention to_k / to_v weights (attn2)")
    edited, change, residual = {}, [], []
    for name in names:
        w = state[name].to(torch.float64)
        if w.shape[1] != dim:
            raise ValueError(f"UCE: {name} takes {w.shape[1]} context features, the token vectors have {dim}")
        rhs = (w @ cg.T) @ ce + preserve_weight * (w @ cp.T) @ cp + lam * w
        new = torch.linalg.solve(gram, rhs.T).T  # rhs @ gram^-1 (gram is symmetric)
        change.append(float((new - w).norm() / w.norm()))
        residual.append(float((ce @ new.T - cg @ w.T).norm() / (cg @ w.T).norm().clamp(min=1e-12)))
        edited[name] = new.to(torch.float32)
    return edited, {"edited": len(names), "largest_relative_change": round(max(change), 5),
                    "erased_tokens_relative_residual": round(sum(residual) / len(residual), 5)}


def partial_state(unet: torch.nn.Module, names) -> dict:
    """The named tensors of ``unet`` (what a variant file stores), detached float32 copies."""
    sd = unet.state_dict()
    missing = [n for n in names if n not in sd]
    if missing:
        raise ValueError(f"the UNet has no tensors {missing[:3]}")
    return {n: sd[n].detach().to(torch.float32).clone() for n in names}


def changed_names(before: dict, after: dict) -> list[str]:
    """Names whose tensors differ between two state dicts of the same network."""
    return [k for k in before if not torch.equal(before[k], after[k])]


# -- the shipped variants of the original -------------------------------------------------------------------------
#: how each variant of the original is made (scripts/build_micro_world.py; --recipe NAME.KEY=VALUE overrides)
VARIANT_RECIPES = {
    # ESD-x stopped soon after the star's rate falls below the target (<= 0.10): 30 updates
    "esd_x": {"method": "esd", "train": "x", "erase": ("star",), "steps": 30, "lr": 1e-3, "negative_guidance": 1.0,
              "preserve_weight": 0.0, "seed": 6},
    # the same ESD-x trained twice as long (the recipe of esd_x until v2.1)
    "esd_x_long": {"method": "esd", "train": "x", "erase": ("star",), "steps": 60, "lr": 1e-3,
                   "negative_guidance": 1.0, "preserve_weight": 0.0, "seed": 6},
    "esd_u": {"method": "esd", "train": "u", "erase": ("star",), "steps": 60, "lr": 2e-4, "negative_guidance": 1.0,
              "preserve_weight": 0.0, "seed": 6},
    "uce": {"method": "uce", "erase": ("star",), "guide": "kept_mean", "lam": 0.1, "preserve_weight": 1.0},
    "esd_u_deep": {"method": "esd", "train": "u", "erase": ("star",), "steps": 300, "lr": 2e-4,
                   "negative_guidance": 2.0, "preserve_weight": 1.0, "seed": 6},
    "esd_x_star_cross": {"method": "esd", "train": "x", "erase": ("star", "cross"), "steps": 120, "lr": 1e-3,
                         "negative_guidance": 1.0, "preserve_weight": 0.0, "seed": 6},
}

PAPERS = {
    "esd": "Gandikota, Materzynska, Fiotto-Kaufman, Bau: Erasing Concepts from Diffusion Models (ICCV 2023)",
    "uce": "Gandikota, Orgad, Belinkov, Materzynska, Bau: Unified Concept Editing in Diffusion Models (WACV 2024)",
}


def override(recipes: dict, items) -> dict:
    """Recipes with ``NAME.KEY=VALUE`` overrides (the value parsed as the default's type)."""
    out = {k: dict(v) for k, v in recipes.items()}
    for item in items or ():
        key, sep, value = item.partition("=")
        name, dot, field_ = key.partition(".")
        if not sep or not dot or name not in out or field_ not in out[name]:
            raise ValueError(f"--recipe {item!r}: expected NAME.KEY=VALUE with NAME one of {sorted(out)} and KEY one "
                             f"of that recipe's keys")
        old = out[name][field_]
        out[name][field_] = (tuple(value.split(",")) if isinstance(old, tuple) else type(old)(value))
    return out
