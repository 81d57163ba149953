"""Merging several LoRAs into one (Multi-MemoRa: one recovered concept per LoRA, all brought back at once).

Every method works per layer on the weight deltas dW_i = (alpha_i / r_i) * up_i @ down_i of the inputs:

- ``concat``: exact. Ranks are concatenated, down = cat(down_i), up = cat(w_i * scale_i * up_i), alpha = total rank
  (scale 1), so up @ down = sum_i w_i dW_i: the merged LoRA behaves exactly like the inputs stacked at their weights.
- ``svd``: the weighted sum sum_i w_i dW_i truncated to ``rank`` by SVD (exact, computed from the low-rank factors:
  QR of the concatenated factors, then the SVD of a small core). The report gives, per layer, the energy kept
  (sum of kept s^2 / sum of all s^2 = 1 - relative squared Frobenius error).
- ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: peft's tensor merge functions
  (``peft.utils.merge_utils``) applied to the dense deltas dW_i (not to the A and B factors separately, which is
  what peft's ``add_weighted_adapter`` does and why it needs equal ranks), then re-factorised to ``rank`` by SVD.
  ``density`` is the fraction of entries kept; DARE's random drop is reproducible from ``seed`` (each layer draws
  from its own generator state, seeded from ``seed`` and the layer name; torch's global RNG is left untouched).

Inputs are normalised first: any format ``formats.to_kohya`` reads, any mix of ranks and alphas, any layer sets (a
layer missing from an input counts as a zero delta there). An input with weight 0 is left out entirely (in TIES a
zero-weight input would otherwise still vote in the sign election). Inputs are put in a canonical order (by a hash
of their contents) before merging, so the order of the inputs never changes the result, not even DARE's random
masks. Layers of the same name with different weight shapes raise a ``MergeError`` naming the layer.

Torch and peft only: no ComfyUI import."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch

from . import formats
from .formats import LoraLayer

METHODS = ("concat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
RANDOM_METHODS = ("dare_linear", "dare_ties")
# Keys ``kohya_layers`` does not turn into low-rank layers; they cannot be merged as such.
_UNMERGEABLE_SUFFIXES = (".diff", ".diff_b", ".dora_scale")


class MergeError(ValueError):
    """Inputs that cannot be merged (incompatible shapes, bad parameters, unmergeable keys)."""


@dataclass
class LayerReport:
    name: str
    inputs: int             # how many (non-zero-weight) inputs have this layer
    input_ranks: list       # their ranks
    rank: int               # rank of the merged layer
    energy_kept: float      # fraction of the merged delta's squared Frobenius norm kept (1.0 = exact)
    shape: tuple            # the module weight shape


@dataclass
class MergeResult:
    state_dict: dict                  # kohya SD format (the LORA_MODEL convention)
    method: str
    layers: list = field(default_factory=list)   # LayerReport per output layer, sorted by name
    rank: int = 0
    density: float = 1.0
    seed: int = 0

    @property
    def min_energy(self) -> float:
        return min((r.energy_kept for r in self.layers), default=1.0)

    @property
    def mean_energy(self) -> float:
        return sum(r.energy_kept for r in self.layers) / len(self.layers) if self.layers else 1.0

    def report(self, max_layers: int | None = None) -> str:
        return format_report(self, max_layers)


# ---------------------------------------------------------------------------------------------------------------------
# normalisation

def normalise(sd: Mapping[str, torch.Tensor], ldm_to_diffusers: Mapping[str, str] | None = None,
              what: str = "LoRA") -> dict[str, LoraLayer]:
    """Any supported LoRA state dict -> {kohya layer name: LoraLayer}."""
    if not isinstance(sd, Mapping):
        raise MergeError(f"{what}: expected a LoRA state dict (dict of tensors), got {type(sd).__name__}")
    try:
        formats.check_finite(sd, what)
        kohya = formats.to_kohya(sd, ldm_to_diffusers)
    except formats.NonFiniteTensorError as e:
        raise MergeError(str(e)) from e
    except formats.LoraFormatError as e:
        raise MergeError(f"{what}: {e}") from e
    bad = sorted(k for k in kohya if k.endswith(_UNMERGEABLE_SUFFIXES))
    if bad:
        raise MergeError(f"{what}: has full-weight diff or DoRA keys, which cannot be merged as low-rank layers: "
                         f"{bad[:5]}{' ...' if len(bad) > 5 else ''}")
    layers = formats.kohya_layers(kohya)
    if not layers:
        raise MergeError(f"{what}: contains no LoRA layers (no lora_down/lora_up pairs)")
    return layers


def weight_shape(layer: LoraLayer) -> tuple:
    """The shape of the module weight a layer modifies: Linear (out, in), Conv (out, in, kh, kw)."""
    up, down = layer.up, layer.down
    if up.dim() not in (2, 4) or down.dim() not in (2, 4):
        raise MergeError(f"unsupported LoRA factor shapes up {tuple(up.shape)}, down {tuple(down.shape)}")
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        raise MergeError(f"unsupported conv lora_up of shape {tuple(up.shape)} (expected [out, r, 1, 1])")
    return (int(up.shape[0]), *[int(s) for s in down.shape[1:]])


def _flat(shape: tuple) -> tuple[int, int]:
    n = 1
    for s in shape[1:]:
        n *= s
    return shape[0], n


def fingerprint(layers: Mapping[str, LoraLayer]) -> str:
    """A hash of a LoRA's contents (names, alphas, factor values): the canonical order of merge inputs."""
    h = hashlib.sha256()
    for name in sorted(layers):
        layer = layers[name]
        h.update(name.encode())
        h.update(repr(float(layer.alpha)).encode())
        for t in (layer.down, layer.up):
            t = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
            h.update(repr(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def _layer_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{int(seed)}/{name}".encode()).digest()[:8], "little") & (2 ** 63 - 1)


def _check_params(method: str, weights: Sequence[float], n: int, rank: int, density: float):
    if method not in METHODS:
        raise MergeError(f"method must be one of {list(METHODS)}, got {method!r}")
    if n < 1:
        raise MergeError("nothing to merge: no LoRA given")
    if len(weights) != n:
        raise MergeError(f"{n} LoRAs but {len(weights)} weights: give one weight per LoRA")
    for i, w in enumerate(weights):
        if not torch.isfinite(torch.tensor(float(w))):
            raise MergeError(f"weight {i + 1} is not a finite number ({w})")
    if int(rank) < 0:
        raise MergeError(f"rank must be >= 0 (0 = automatic), got {rank}")
    if method in DENSITY_METHODS and not 0.0 < float(density) <= 1.0:
        raise MergeError(f"density must be in (0, 1] for {method} (the fraction of delta entries kept), got {density}")


# ---------------------------------------------------------------------------------------------------------------------
# per-layer maths

def concat_layer(parts: Sequence[tuple[float, LoraLayer]]) -> LoraLayer:
    """Exact merge: down = cat(down_i), up = cat(w_i * scale_i * up_i), alpha = total rank (scale 1)."""
    shape = _common_conv_shape([p[1] for p in parts])
    downs, ups = [], []
    for w, layer in parts:
        down, up = _as_shape(layer, shape)
        downs.append(down.to(torch.float32))
        ups.append(up.to(torch.float32) * (float(w) * layer.scale))
    down = torch.cat(downs, dim=0).contiguous()
    up = torch.cat(ups, dim=1).contiguous()
    return LoraLayer(down=down, up=up, alpha=float(down.shape[0]))


def _common_conv_shape(layers: Sequence[LoraLayer]) -> tuple:
    shapes = [weight_shape(layer) for layer in layers]
    four = [s for s in shapes if len(s) == 4]
    return four[0] if four else shapes[0]


def _as_shape(layer: LoraLayer, shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's (down, up) reshaped to a conv ``shape`` when it was stored flattened ([r, in*kh*kw])."""
    down, up = layer.down, layer.up
    if len(shape) == 4 and down.dim() == 2:
        down = down.reshape(down.shape[0], *shape[1:])
        up = up.reshape(up.shape[0], up.shape[1], 1, 1)
    return down, up


def _factors(parts: Sequence[tuple[float, LoraLayer]]) -> tuple[torch.Tensor, torch.Tensor]:
    """U [out, R], D [R, in_flat] with U @ D = sum_i w_i dW_i (flattened)."""
    us = [layer.up.flatten(1).to(torch.float32) * (float(w) * layer.scale) for w, layer in parts]
    ds = [layer.down.flatten(1).to(torch.float32) for _, layer in parts]
    return torch.cat(us, dim=1), torch.cat(ds, dim=0)


def _low_rank_svd(u: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of u @ d (u [m, R], d [R, n]) without forming it: QR of both factors, SVD of the R x R core."""
    qu, ru = torch.linalg.qr(u)             # u = qu ru
    qd, rd = torch.linalg.qr(d.T)           # d = rd^T qd^T
    uc, s, vch = torch.linalg.svd(ru @ rd.T)
    return qu @ uc, s, vch @ qd.T


# Randomised SVD (torch.svd_lowrank) for the dense deltas of the peft methods when the kept rank is small next to
# the matrix: O(m n q) instead of O(m n min(m, n)), e.g. minutes -> seconds for SD1.x's 1280-wide layers on a CPU.
_LOWRANK_OVERSAMPLE = 10
_LOWRANK_NITER = 6
_LOWRANK_SEED = 0


def _dense_svd(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top singular triplets of ``delta`` (at least ``k``): exact for small matrices or large k, else randomised.

    Either way the truncation keeps U_k U_k^T delta, whose error energy is exactly the total minus sum(S_k^2), so
    the energy reported from these S values is exact for the factors returned (not an estimate)."""
    m, n = delta.shape
    q = k + _LOWRANK_OVERSAMPLE
    if 2 * q >= min(m, n):
        return torch.linalg.svd(delta, full_matrices=False)
    # svd_lowrank draws a random test matrix from torch's generator: seed a private state so the merge is
    # reproducible and the caller's RNG is untouched.
    if delta.device.type == "cuda":
        idx = delta.device.index if delta.device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[idx]), torch.cuda.device(idx):
            torch.cuda.manual_seed(_LOWRANK_SEED)
            u, s, v = torch.svd_lowrank(delta, q=q, niter=_LOWRANK_NITER)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(_LOWRANK_SEED)
            u, s, v = torch.svd_lowrank(delta, q=q, niter=_LOWRANK_NITER)
    return u, s, v.T


def _truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, total_energy: torch.Tensor,
              shape: tuple) -> tuple[LoraLayer, float]:
    k = max(1, min(int(rank), s.shape[0]))
    root = s[:k].clamp_min(0).sqrt()
    up = (u[:, :k] * root).contiguous()
    down = (root[:, None] * vh[:k]).contiguous()
    if len(shape) == 4:
        down = down.reshape(k, *shape[1:])
        up = up.reshape(shape[0], k, 1, 1)
    total = float(total_energy)
    kept = float((s[:k].double() ** 2).sum())
    energy = 1.0 if total <= 0.0 else min(1.0, kept / total)
    return LoraLayer(down=down.cpu(), up=up.cpu(), alpha=float(k)), energy


def svd_layer(parts: Sequence[tuple[float, LoraLayer]], rank: int, device=None) -> tuple[LoraLayer, float]:
    """sum_i w_i dW_i truncated to ``rank`` (0: keep every component, i.e. min(total rank, out, in))."""
    shape = _common_conv_shape([p[1] for p in parts])
    u, d = _factors(parts)
    if device is not None:
        u, d = u.to(device), d.to(device)
    uu, s, vh = _low_rank_svd(u, d)
    total = (s.double() ** 2).sum()
    full = min(u.shape[1], *_flat(shape))
    return _truncate(uu, s, vh, full if rank == 0 else rank, total, shape)


def _peft_merge(method: str, deltas: list[torch.Tensor], weights: list[float], density: float,
                layer_seed: int) -> torch.Tensor:
    from peft.utils import merge_utils

    w = torch.tensor([float(x) for x in weights], dtype=torch.float32, device=deltas[0].device)
    fn = {"ties": merge_utils.ties, "dare_linear": merge_utils.dare_linear, "dare_ties": merge_utils.dare_ties,
          "magnitude_prune": merge_utils.magnitude_prune}[method]
    with warnings.catch_warnings():
        # peft warns that density >= 1 prunes nothing; that is what density 1 means here.
        warnings.simplefilter("ignore", UserWarning)
        if method in RANDOM_METHODS:
            # DARE draws its masks from torch's default CPU generator: seed it for this layer, restore it after.
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(layer_seed)
                return fn(deltas, w, density)
        return fn(deltas, w, density)


def peft_layer(method: str, parts: Sequence[tuple[float, LoraLayer]], rank: int, density: float, layer_seed: int,
               device=None) -> tuple[LoraLayer, float]:
    """peft merge of the dense deltas, re-factorised to ``rank`` (0: the sum of the input ranks)."""
    shape = _common_conv_shape([p[1] for p in parts])
    m, n = _flat(shape)
    # DARE runs on the CPU, so its random masks come from the (seeded) CPU generator whatever the machine: the same
    # seed gives the same merge everywhere. The deterministic methods run on ``device`` (peft's magnitude pruning is
    # a top-k over every entry: about a minute for two SD1.x LoRAs on one CPU core, well under a second on a GPU).
    where = torch.device("cpu") if method in RANDOM_METHODS or device is None else torch.device(device)
    deltas = [(layer.up.flatten(1).to(where, torch.float32) @ layer.down.flatten(1).to(where, torch.float32))
              * layer.scale for _, layer in parts]
    merged = _peft_merge(method, deltas, [w for w, _ in parts], float(density), layer_seed)
    if device is not None:
        merged = merged.to(device)
    k = min(sum(layer.rank for _, layer in parts) if rank == 0 else rank, m, n)
    u, s, vh = _dense_svd(merged, k)
    total = (merged.double() ** 2).sum()
    return _truncate(u, s, vh, k, total, shape)


# ---------------------------------------------------------------------------------------------------------------------
# the merge

def _architectures(inputs: Sequence[Mapping[str, LoraLayer]]) -> str:
    """' (LoRA 1: made for SD1.x (cross-attention width 768), LoRA 2: ...)' where the factors' shapes tell."""
    from memora import architecture

    found = []
    for i, layers in enumerate(inputs):
        arch = architecture.guess_architecture({f"{n}.lora_down.weight": tuple(x.down.shape) for n, x in layers.items()})
        if arch:
            found.append(f"LoRA {i + 1}: made for {arch}")
    return f" ({', '.join(found)})" if found else ""


def merge_layers(inputs: Sequence[Mapping[str, LoraLayer]], weights: Sequence[float], method: str = "concat",
                 rank: int = 0, density: float = 1.0, seed: int = 0, device=None,
                 progress: Optional[Callable[[int, int], None]] = None) -> MergeResult:
    """Merge normalised inputs ({kohya layer name: LoraLayer} each) with one weight per input.

    ``rank``: the output rank per layer for svd and the peft methods (0 = automatic: every component for svd, the
    sum of the input ranks for the others); ignored by concat (whose rank is the sum of the input ranks).
    ``device``: where the SVDs run (default CPU); the result is always on the CPU in float32. ``progress(done,
    total)`` is called after each layer (a host can raise from it to cancel)."""
    weights = [float(w) for w in weights]
    _check_params(method, weights, len(inputs), rank, density)
    rank = int(rank)

    # Shape consistency and finite values across all inputs (zero-weight ones too: a wrong input is wrong whatever
    # its weight).
    names = sorted(set().union(*[set(x) for x in inputs]))
    shapes: dict[str, tuple] = {}
    for name in names:
        seen = []
        for i, layers in enumerate(inputs):
            if name in layers:
                _check_layer_finite(layers[name], f"LoRA {i + 1}", name)
                s = weight_shape(layers[name])
                seen.append((i, s))
        ref = next((s for _, s in seen if len(s) == 4), seen[0][1])
        for i, s in seen:
            if s != ref and _flat(s) != _flat(ref):
                desc = ", ".join(f"LoRA {j + 1}: {list(t)}" for j, t in seen)
                raise MergeError(f"layer {name!r} has incompatible weight shapes across the inputs ({desc}); "
                                 f"these LoRAs were made for different models or layers{_architectures(inputs)}")
        shapes[name] = ref

    active = [(w, layers) for w, layers in zip(weights, inputs) if w != 0.0]
    if not active:
        raise MergeError("every weight is 0: nothing to merge (give at least one LoRA a non-zero weight)")
    # Canonical order: the result does not depend on the order of the inputs (DARE's masks included).
    active.sort(key=lambda p: (fingerprint(p[1]), p[0]))

    out_layers: dict[str, LoraLayer] = {}
    reports: list[LayerReport] = []
    for done, name in enumerate(names, 1):
        parts = [(w, layers[name]) for w, layers in active if name in layers]
        if not parts:   # only in zero-weight inputs
            if progress is not None:
                progress(done, len(names))
            continue
        merged, energy = _merge_one(method, name, parts, rank, density, seed, device)
        out_layers[name] = merged
        reports.append(LayerReport(name=name, inputs=len(parts), input_ranks=[p[1].rank for p in parts],
                                   rank=merged.rank, energy_kept=energy, shape=shapes[name]))
        if progress is not None:
            progress(done, len(names))
    sd = formats.layers_to_kohya(out_layers)
    return MergeResult(state_dict=sd, method=method, layers=reports, rank=rank, density=float(density),
                       seed=int(seed))


def _check_layer_finite(layer: LoraLayer, what: str, name: str) -> None:
    for part, t in (("lora_down", layer.down), ("lora_up", layer.up)):
        if not bool(torch.isfinite(t).all()):
            raise MergeError(f"{what}: layer {name!r} {part} holds NaN or inf ({int(torch.isnan(t).sum())} NaN of "
                             f"{t.numel()} values): a merge would carry them into every output")
    if not torch.isfinite(torch.tensor(float(layer.alpha))):
        raise MergeError(f"{what}: layer {name!r} has a non-finite alpha ({layer.alpha})")


def _merge_one(method: str, name: str, parts: Sequence[tuple[float, LoraLayer]], rank: int, density: float,
               seed: int, device) -> tuple[LoraLayer, float]:
    """One layer merged by ``method``; a failure of the maths (e.g. an SVD that does not converge) or a non-finite
    result (overflow) is a MergeError naming the layer."""
    try:
        if method == "concat":
            merged, energy = concat_layer(parts), 1.0
        elif method == "svd":
            merged, energy = svd_layer(parts, rank, device)
        else:
            merged, energy = peft_layer(method, parts, rank, density, _layer_seed(seed, name), device)
    except RuntimeError as e:   # torch.linalg.LinAlgError included
        raise MergeError(f"layer {name!r}: the {method} merge failed: {e}") from e
    for part, t in (("lora_down", merged.down), ("lora_up", merged.up)):
        if not bool(torch.isfinite(t).all()):
            raise MergeError(f"layer {name!r}: the {method} merge produced NaN or inf in {part} (the weighted "
                             f"deltas overflow float32); lower the weights")
    return merged, energy


def merge_loras(loras: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], method: str = "concat",
                rank: int = 0, density: float = 1.0, seed: int = 0, ldm_to_diffusers: Mapping[str, str] | None = None,
                device=None, progress: Optional[Callable[[int, int], None]] = None,
                names: Sequence[str] | None = None) -> MergeResult:
    """Merge LoRA state dicts of any supported format; the result's ``state_dict`` is kohya SD format. ``names``
    (e.g. the file names) identify the inputs in errors; default 'LoRA 1', 'LoRA 2', ..."""
    _check_params(method, list(weights), len(loras), rank, density)
    if names is not None and len(names) != len(loras):
        raise MergeError(f"{len(loras)} LoRAs but {len(names)} names")
    names = list(names) if names is not None else [f"LoRA {i + 1}" for i in range(len(loras))]
    inputs = [normalise(sd, ldm_to_diffusers, what=name) for sd, name in zip(loras, names)]
    return merge_layers(inputs, weights, method, rank, density, seed, device, progress)


def format_report(result: MergeResult, max_layers: int | None = None) -> str:
    """A readable summary: method and parameters, then one line per layer (rank, inputs, energy kept)."""
    layers = result.layers
    head = [f"method {result.method}, {len(layers)} layers"]
    if result.method in ("svd",) + DENSITY_METHODS:
        head.append(f"rank {result.rank or 'auto'}")
    if result.method in DENSITY_METHODS:
        head.append(f"density {result.density:g}")
    if result.method in RANDOM_METHODS:
        head.append(f"seed {result.seed}")
    lines = [", ".join(head)]
    if result.method == "concat":
        lines.append("concat is exact: every layer keeps 100% of the weighted sum of the deltas")
    else:
        lines.append(f"energy kept (sum of kept s^2 / total): min {result.min_energy:.6f}, "
                     f"mean {result.mean_energy:.6f}")
    shown = layers if max_layers is None else layers[:max_layers]
    for r in shown:
        lines.append(f"{r.name}: rank {r.rank} from {r.inputs} input(s) of rank {r.input_ranks}, "
                     f"energy kept {r.energy_kept:.6f}")
    if len(shown) < len(layers):
        lines.append(f"... {len(layers) - len(shown)} more layers")
    return "\n".join(lines)
