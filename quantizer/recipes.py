"""Recipes: which type each tensor of a model gets.

A variant is built either *uniform* (llama.cpp's own per-tensor rules for the file type, plus the
user's regex overrides) or *dynamic*: per-tensor types chosen by role and sensitivity, in the
spirit of Unsloth's DeepSeek-R1 1.58-bit quants, where the token embedding, the output matrix,
attention, ``ffn_down`` and the first dense layers keep 4-6 bits and the MoE experts, ~88% of the
weights, take 1.5-2 bits.

The module is pure and loads no native library (neither llama.cpp nor torch): ``kquant plan`` and
the operator import it to show plans. The one question planning asks llama.cpp, its own choice of
type for each tensor of the uniform file (a dry run), is asked by ``quantize.plan``, which passes
the answer to :func:`plan_variant`.

How the dynamic mix is chosen (:func:`plan_dynamic`, pure):

* **Error model.** Quantizing a tensor to type ``t`` adds noise of relative power ``e(t)``
  (``RELATIVE_ERROR``, measured by ``bench/type_errors.py`` with llama.cpp's own quantizers on
  Gaussian weights, with and without an importance matrix). For ``y = W x`` the output error
  relative to the output is about ``e(t)`` whatever the size of ``W``, so a tensor's predicted loss
  is ``weight(role) * sensitivity * e(t)`` and does *not* grow with its element count; only its
  bytes do. That is what makes small, sensitive tensors (attention, ``ffn_down``, dense layers of
  an MoE model) cheap to keep at high precision and the huge expert tensors the place to save.
* **Sensitivity.** ``weight(role)`` is a prior: the output matrix writes the logits directly,
  ``attn_v``/``attn_output``/``ffn_down`` write the residual stream, ``attn_q``/``attn_k`` pass
  through a softmax (llama.cpp's own mixes and Unsloth's raise the same tensors). The importance
  matrix scales it: a tensor whose inputs carry more energy than its peers of the same role moves
  the residual stream more, so its ``mean(imatrix)`` over the geometric mean of its role's is a
  factor (clipped to [0.5, 2]). The first and last eighth of the layers count 1.5x, as llama.cpp's
  ``use_more_bits`` does.
* **Floors.** Each role has a lowest precision: the output matrix 6 bits (as llama.cpp's mixes
  keep it), attention, embeddings and shared experts 4, dense ``ffn_down`` 2.5. No tensor goes
  below the variant's base type, except bulk ones (dense FFN and experts), which may go 0.3 bits
  below it. Types that need an imatrix are candidates only for tensors it names, and a type whose
  block does not divide the row length never is (a 576-wide row gets ``IQ4_NL``/``Q5_0``/``Q8_0``
  instead of ``Q4_K``/``Q6_K``), so llama.cpp never falls back.
* **Budget.** ``targetSizeGiB`` or ``targetBitsPerWeight``, else the size of the uniform file of
  the variant's type. Every tensor starts at its cheapest candidate; then the upgrade with the best
  loss saved per byte is taken while it fits (a greedy multiple-choice knapsack over each tensor's
  lower convex hull), and leftover bytes go to the best single upgrades that still fit.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np
from kquant.quantizer import constants, quantize_job, settings, units

if TYPE_CHECKING:
    from kquant.quantizer import imatrix as imatrix_mod

T = constants.TensorType

# Relative error power E[(w - q(w))^2] / E[w^2] per type on Gaussian weights (1024- and 2048-wide
# rows): (quantized without an imatrix, quantized with a log-normal one and measured in the
# imatrix-weighted norm). Types that need an imatrix give the imatrix run's plain error in the
# first column. Measured by bench/type_errors.py with llama-cpp-python 0.3.36's llama.cpp.
RELATIVE_ERROR: dict[T, tuple[float, float]] = {
    T.F32: (0.0, 0.0),
    T.IQ1_S: (2.677e-01, 1.931e-01),
    T.IQ1_M: (2.408e-01, 1.514e-01),
    T.IQ2_XXS: (1.313e-01, 8.797e-02),
    T.IQ2_XS: (1.022e-01, 6.719e-02),
    T.IQ2_S: (6.892e-02, 5.050e-02),
    T.Q2_K: (8.793e-02, 5.544e-02),
    T.IQ3_XXS: (3.933e-02, 2.342e-02),
    T.IQ3_S: (2.755e-02, 1.432e-02),
    T.Q3_K: (2.276e-02, 1.793e-02),
    T.IQ4_XS: (5.887e-03, 5.025e-03),
    T.IQ4_NL: (5.797e-03, 4.918e-03),
    T.Q4_0: (7.382e-03, 5.957e-03),
    T.Q4_K: (5.090e-03, 4.147e-03),
    T.Q5_0: (1.821e-03, 1.465e-03),
    T.Q5_K: (1.304e-03, 1.073e-03),
    T.Q6_K: (3.147e-04, 2.597e-04),
    T.Q8_0: (2.864e-05, 2.862e-05),
    T.TQ1_0: (6.514e-01, 6.509e-01),
    T.TQ2_0: (6.514e-01, 6.509e-01),
    T.MXFP4: (1.325e-02, 1.325e-02),
    T.Q4_1: (6.116e-03, 4.020e-03),
    T.Q5_1: (1.432e-03, 9.435e-04),
    T.F16: (0.000e00, 0.000e00),
    T.BF16: (2.844e-06, 2.845e-06),
}

# The types a dynamic mix picks from (ternary types only suit ternary-trained models; MXFP4 suits
# MXFP4-trained ones).
CANDIDATES: tuple[T, ...] = (
    T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.Q2_K, T.IQ3_XXS, T.IQ3_S, T.Q3_K,
    T.IQ4_XS, T.IQ4_NL, T.Q4_0, T.Q4_K, T.Q5_0, T.Q5_K, T.Q6_K, T.Q8_0,
)  # fmt: skip


class Role(enum.StrEnum):
    """What a tensor does, which sets its sensitivity prior and lowest precision."""

    TOKEN_EMBD = "token_embd"
    OUTPUT = "output"
    ATTN_QK = "attn_qk"
    ATTN_V = "attn_v"
    ATTN_OUTPUT = "attn_output"
    ATTN_OTHER = "attn_other"
    FFN_DOWN = "ffn_down"
    FFN_GATE_UP = "ffn_gate_up"
    SHARED_EXPERT = "shared_expert"
    EXPERT_DOWN = "expert_down"
    EXPERT_GATE_UP = "expert_gate_up"
    OTHER = "other"
    KEPT = "kept"
    """Not quantized by llama.cpp (norms, routers, 1-D tensors)."""


@dataclasses.dataclass(frozen=True)
class RolePolicy:
    weight: float
    """Sensitivity prior: how much of this role's relative error reaches the output."""
    floor_bpw: float
    """Lowest bits per weight a dynamic mix may give it."""
    bulk: bool = False
    """Bulk weights may sit a little below the base type; others never go below it."""


ROLE_POLICIES: dict[Role, RolePolicy] = {
    Role.TOKEN_EMBD: RolePolicy(0.5, 4.0),
    Role.OUTPUT: RolePolicy(4.0, 6.0),
    Role.ATTN_QK: RolePolicy(0.5, 4.0),
    Role.ATTN_V: RolePolicy(1.5, 4.0),
    Role.ATTN_OUTPUT: RolePolicy(1.0, 4.0),
    Role.ATTN_OTHER: RolePolicy(1.0, 4.0),
    Role.FFN_DOWN: RolePolicy(1.5, 2.5, bulk=True),
    Role.FFN_GATE_UP: RolePolicy(0.75, 0.0, bulk=True),
    Role.SHARED_EXPERT: RolePolicy(1.0, 4.0),
    Role.EXPERT_DOWN: RolePolicy(1.5, 0.0, bulk=True),
    Role.EXPERT_GATE_UP: RolePolicy(0.75, 0.0, bulk=True),
    Role.OTHER: RolePolicy(1.0, 4.0),
    Role.KEPT: RolePolicy(0.0, 0.0),
}
BULK_SLACK_BPW = 0.3
"""How far below the base type's bits a bulk tensor may go (lets Q4_K_M's bulk take IQ4_XS)."""
EDGE_LAYER_FACTOR = 1.5
SENSITIVITY_CLIP = (0.5, 2.0)

# Substrings of tensor names llama.cpp never quantizes (tensor_allows_quantization in llama-quant.cpp).
_NEVER_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "time_mix_first.weight",
    "attn_rel_b.weight", ".position_embd", "position_embd.weight", "token_types.weight",
)  # fmt: skip
_BLOCK = re.compile(r"^blk\.(\d+)\.")


class RecipeError(ValueError):
    """A variant's recipe cannot be planned (bad settings, or a budget no mix meets)."""


# ---------------------------------------------------------------------------------------------
# the variant as the user writes it
# ---------------------------------------------------------------------------------------------


VariantRecipe = settings.VariantSpec
"""A variant as the user writes it (``spec.variants[]``): the quantizer has one model of it,
``settings.VariantSpec``; the planner's signatures keep this name for what they read from it."""


# ---------------------------------------------------------------------------------------------
# tensors and plans
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor of the source GGUF: name, ggml shape (row length first) and stored type."""

    name: str
    shape: tuple[int, ...]
    type: constants.TensorType

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def row_length(self) -> int:
        return self.shape[0]

    def nbytes(self, tensor_type: constants.TensorType) -> int:
        """Bytes this tensor takes stored as ``tensor_type`` (``ggml_nbytes``)."""
        return constants.TENSOR_TYPES[tensor_type].row_bytes(self.row_length) * (self.n_elements // self.row_length)

    def fits(self, tensor_type: constants.TensorType) -> bool:
        return self.row_length % constants.TENSOR_TYPES[tensor_type].block_size == 0


class PlanRow(tuple[str, constants.TensorType, int]):
    """(tensor, type, bytes) of one planned tensor."""

    __slots__ = ()

    def __new__(cls, tensor: str, tensor_type: constants.TensorType, nbytes: int) -> PlanRow:
        return super().__new__(cls, (tensor, tensor_type, nbytes))

    @property
    def tensor(self) -> str:
        return self[0]

    @property
    def type(self) -> constants.TensorType:
        return self[1]

    @property
    def bytes(self) -> int:
        return self[2]


@dataclasses.dataclass(frozen=True)
class RecipePlan:
    """What a variant will be: the quantize job, every tensor's type and bytes, and the loss model's
    prediction (comparable between plans of one model, not an absolute quality figure)."""

    variant: str
    recipe: str
    job: quantize_job.QuantizeJob
    rows: tuple[PlanRow, ...]
    total_bytes: int
    n_elements: int
    predicted_loss: float
    budget_bytes: int | None = None

    @property
    def bits_per_weight(self) -> float:
        return self.total_bytes * 8 / self.n_elements if self.n_elements else 0.0

    def type_counts(self) -> dict[constants.TensorType, int]:
        counts: dict[constants.TensorType, int] = {}
        for row in self.rows:
            counts[row.type] = counts.get(row.type, 0) + 1
        return counts

    def render(self) -> str:
        """A table for ``--dry-run`` and logs: every tensor, then per-type and grand totals."""
        width = max([len(row.tensor) for row in self.rows] + [6])
        lines = [f"variant {self.variant}: {self.recipe} {self.job.file_type}", ""]
        lines.append(f"{'tensor':<{width}}  {'type':<8} {'bytes':>14}")
        lines.extend(f"{row.tensor:<{width}}  {row.type:<8} {row.bytes:>14,}" for row in self.rows)
        lines.append("")
        per_type: dict[constants.TensorType, int] = {}
        for row in self.rows:
            per_type[row.type] = per_type.get(row.type, 0) + row.bytes
        for tensor_type, nbytes in sorted(per_type.items(), key=lambda item: -item[1]):
            count = self.type_counts()[tensor_type]
            lines.append(f"{tensor_type:<8} {count:>5} tensors {nbytes:>16,} bytes")
        budget = "" if self.budget_bytes is None else f" (budget {units.gib(self.budget_bytes, 3)})"
        lines.append(
            f"total    {len(self.rows):>5} tensors {self.total_bytes:>16,} bytes = "
            f"{units.gib(self.total_bytes, 3)}, {self.bits_per_weight:.3f} bits per weight{budget}"
        )
        lines.append(f"predicted loss {self.predicted_loss:.5f}; {len(self.job.overrides)} tensor-type rules")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# pure planning
# ---------------------------------------------------------------------------------------------


# Name stems (after "blk.N.") -> role, tried in order; the first prefix that matches wins.
_STEM_ROLES: tuple[tuple[tuple[str, ...], Role], ...] = (
    (("ffn_down_exps",), Role.EXPERT_DOWN),
    (("ffn_gate_exps", "ffn_up_exps", "ffn_gate_up_exps"), Role.EXPERT_GATE_UP),
    (("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"), Role.SHARED_EXPERT),
    (("ffn_down",), Role.FFN_DOWN),
    (("ffn_gate", "ffn_up"), Role.FFN_GATE_UP),
    (("attn_q.", "attn_k.", "attn_q_", "attn_k_"), Role.ATTN_QK),
    (("attn_v.",), Role.ATTN_V),
    (("attn_output",), Role.ATTN_OUTPUT),
    (("attn_",), Role.ATTN_OTHER),
)


def _is_token_embd(name: str) -> bool:
    return name.startswith("token_embd") or name == "per_layer_token_embd.weight"


def classify(name: str, n_dims: int, *, leave_output_tensor: bool = False) -> Role:
    """The role of a tensor, from its GGUF name (llama.cpp's naming) and number of dimensions."""
    if n_dims < 2 or not name.endswith("weight") or any(part in name for part in _NEVER_QUANTIZED):
        return Role.KEPT
    if name == "output.weight":
        return Role.KEPT if leave_output_tensor else Role.OUTPUT
    if _is_token_embd(name):
        return Role.TOKEN_EMBD
    stem = _BLOCK.sub("", name)
    return next((role for prefixes, role in _STEM_ROLES if stem.startswith(prefixes)), Role.OTHER)


def roles_for(tensors: Sequence[TensorSpec], *, leave_output_tensor: bool = False) -> dict[str, Role]:
    """Every tensor's role; with tied embeddings (no ``output.weight``) the token embedding is also
    the output matrix, so it takes the output's role, as llama.cpp's own mixes treat it."""
    roles = {t.name: classify(t.name, len(t.shape), leave_output_tensor=leave_output_tensor) for t in tensors}
    if "output.weight" not in roles and roles.get("token_embd.weight") is Role.TOKEN_EMBD:
        roles["token_embd.weight"] = Role.OUTPUT
    return roles


def relative_error(tensor_type: constants.TensorType, *, with_imatrix: bool) -> float:
    plain, weighted = RELATIVE_ERROR[tensor_type]
    return weighted if with_imatrix else plain


def sensitivities(
    tensors: Sequence[TensorSpec],
    roles: Mapping[str, Role],
    importance: Mapping[str, float],
) -> dict[str, float]:
    """Per-tensor factor on the role prior: imatrix energy relative to the role's geometric mean,
    clipped, times ``EDGE_LAYER_FACTOR`` in the first and last eighth of the layers."""
    blocks = [int(m.group(1)) for t in tensors if (m := _BLOCK.match(t.name))]
    n_layer = max(blocks) + 1 if blocks else 0
    edge = max(1, n_layer // 8)
    by_role: dict[Role, list[float]] = {}
    for t in tensors:
        energy = importance.get(t.name)
        if energy is not None and energy > 0:
            by_role.setdefault(roles[t.name], []).append(math.log(energy))
    centre = {role: sum(logs) / len(logs) for role, logs in by_role.items()}
    low, high = SENSITIVITY_CLIP
    result: dict[str, float] = {}
    for t in tensors:
        factor = 1.0
        energy = importance.get(t.name)
        role = roles[t.name]
        if energy is not None and energy > 0 and role in centre:
            factor = min(high, max(low, math.exp(math.log(energy) - centre[role])))
        match = _BLOCK.match(t.name)
        if match is not None and (int(match.group(1)) < edge or int(match.group(1)) >= n_layer - edge):
            factor *= EDGE_LAYER_FACTOR
        result[t.name] = factor
    return result


def candidates_for(
    tensor: TensorSpec,
    role: Role,
    base: constants.TensorType,
    *,
    has_imatrix: bool,
) -> list[constants.TensorType]:
    """Types a dynamic mix may give ``tensor``: within the role's floor, fitting its rows."""
    policy = ROLE_POLICIES[role]
    base_bpw = constants.TENSOR_TYPES[base].bits_per_weight
    floor = max(policy.floor_bpw, base_bpw - BULK_SLACK_BPW if policy.bulk else base_bpw)
    exempt = role in (Role.TOKEN_EMBD, Role.OUTPUT)  # llama.cpp never asks an imatrix for these
    found = [
        t
        for t in CANDIDATES
        if tensor.fits(t)
        and constants.TENSOR_TYPES[t].bits_per_weight >= floor - 1e-9
        and (has_imatrix or exempt or not constants.TENSOR_TYPES[t].needs_imatrix)
    ]
    if not found:  # nothing at or above the floor fits this row length: take the best that does
        found = [t for t in (T.Q8_0, T.F16) if tensor.fits(t)][:1]
    return found


@dataclasses.dataclass(frozen=True)
class DynamicChoice:
    types: dict[str, constants.TensorType]
    total_bytes: int
    predicted_loss: float


def plan_dynamic(
    tensors: Sequence[TensorSpec],
    *,
    base: constants.TensorType,
    budget_bytes: int,
    pinned: Mapping[str, constants.TensorType],
    roles: Mapping[str, Role],
    importance: Mapping[str, float],
    has_imatrix: bool,
    budget_label: str,
    imatrix_names: Collection[str] | None = None,
) -> DynamicChoice:
    """Choose a type per tensor that fits ``budget_bytes`` with the least predicted loss.

    ``pinned`` tensors (user overrides, tensors llama.cpp keeps) are fixed; every other tensor
    picks from :func:`candidates_for`. With ``imatrix_names``, only those tensors count as having
    imatrix data (llama.cpp refuses IQ1/IQ2 types for a tensor the imatrix does not name).
    Raises :class:`RecipeError` naming the budget and the smallest achievable size when even the
    cheapest mix is too big.
    """
    scale = sensitivities(tensors, roles, importance)
    types: dict[str, constants.TensorType] = {}
    total = 0
    loss = 0.0
    options: dict[str, list[tuple[int, float, constants.TensorType]]] = {}
    for t in tensors:
        weight = ROLE_POLICIES[roles[t.name]].weight * scale[t.name]
        if t.name in pinned:
            types[t.name] = pinned[t.name]
            total += t.nbytes(pinned[t.name])
            loss += weight * relative_error(pinned[t.name], with_imatrix=has_imatrix)
            continue
        covered = has_imatrix and (imatrix_names is None or t.name in imatrix_names)
        points = [
            (t.nbytes(c), weight * relative_error(c, with_imatrix=has_imatrix), c)
            for c in candidates_for(t, roles[t.name], base, has_imatrix=covered)
        ]
        options[t.name] = _lower_hull(points)
        nbytes, cost, cheapest = options[t.name][0]
        types[t.name] = cheapest
        total += nbytes
        loss += cost
    if total > budget_bytes:
        raise RecipeError(
            f"{budget_label} is {_size(budget_bytes)}, but the smallest mix this recipe allows is "
            f"{_size(total)}; raise the budget or pick a lower type"
        )
    total, loss = _greedy_upgrade(options, types, total, loss, budget_bytes)
    total, loss = _fill(
        tensors=tensors,
        roles=roles,
        scale=scale,
        base=base,
        has_imatrix=has_imatrix,
        imatrix_names=imatrix_names,
        types=types,
        total=total,
        loss=loss,
        budget=budget_bytes,
        pinned=pinned,
    )
    return DynamicChoice(types=types, total_bytes=total, predicted_loss=loss)


def _lower_hull(
    points: Iterable[tuple[int, float, constants.TensorType]],
) -> list[tuple[int, float, constants.TensorType]]:
    """The points of the lower convex hull of (bytes, loss), cheapest first, dominated ones dropped."""
    ordered = sorted(points, key=lambda p: (p[0], p[1]))
    frontier: list[tuple[int, float, constants.TensorType]] = []
    for point in ordered:
        if frontier and point[1] >= frontier[-1][1]:
            continue  # costs more bytes without losing less
        while len(frontier) >= 2:
            (b1, l1, _), (b2, l2, _) = frontier[-2], frontier[-1]
            # drop the middle point when it lies on or above the segment from b1 to the new point
            if (l2 - l1) * (point[0] - b1) >= (point[1] - l1) * (b2 - b1):
                frontier.pop()
            else:
                break
        frontier.append(point)
    return frontier


def _greedy_upgrade(
    options: Mapping[str, list[tuple[int, float, constants.TensorType]]],
    types: dict[str, constants.TensorType],
    total: int,
    loss: float,
    budget: int,
) -> tuple[int, float]:
    step = dict.fromkeys(options, 0)
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        hull = options[name]
        i = step[name]
        if i + 1 < len(hull):
            saved = hull[i][1] - hull[i + 1][1]
            extra = hull[i + 1][0] - hull[i][0]
            heapq.heappush(heap, (-saved / max(extra, 1), name))

    for name in options:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        hull = options[name]
        i = step[name]
        extra = hull[i + 1][0] - hull[i][0]
        if total + extra > budget:
            continue  # this tensor's next step does not fit; smaller steps elsewhere may
        total += extra
        loss -= hull[i][1] - hull[i + 1][1]
        step[name] = i + 1
        types[name] = hull[i + 1][2]
        push(name)
    return total, loss


def _fill(
    *,
    tensors: Sequence[TensorSpec],
    roles: Mapping[str, Role],
    scale: Mapping[str, float],
    base: constants.TensorType,
    has_imatrix: bool,
    imatrix_names: Collection[str] | None,
    types: dict[str, constants.TensorType],
    total: int,
    loss: float,
    budget: int,
    pinned: Mapping[str, constants.TensorType],
) -> tuple[int, float]:
    """Spend what the hull walk left on the single upgrades (hull or not) that save the most loss."""
    while True:
        best: tuple[float, str, constants.TensorType, int] | None = None
        for t in tensors:
            if t.name in pinned:
                continue
            weight = ROLE_POLICIES[roles[t.name]].weight * scale[t.name]
            now = weight * relative_error(types[t.name], with_imatrix=has_imatrix)
            covered = has_imatrix and (imatrix_names is None or t.name in imatrix_names)
            for c in candidates_for(t, roles[t.name], base, has_imatrix=covered):
                extra = t.nbytes(c) - t.nbytes(types[t.name])
                saved = now - weight * relative_error(c, with_imatrix=has_imatrix)
                if extra > 0 and saved > 0 and total + extra <= budget and (best is None or saved > best[0]):
                    best = (saved, t.name, c, extra)
        if best is None:
            return total, loss
        saved, name, chosen, extra = best
        types[name] = chosen
        total += extra
        loss -= saved


def overrides_for(
    types: Mapping[str, constants.TensorType], skip: Iterable[str] = ()
) -> tuple[tuple[str, constants.TensorType], ...]:
    """Compact regex rules that give every tensor in ``types`` its type.

    Tensors of one role stem (``ffn_down.weight``) and type share a rule listing their block numbers,
    ``^blk\\.(?:0|5|9)\\.ffn_down\\.weight$``, so a model with hundreds of tensors needs a few dozen
    rules rather than one per tensor (llama.cpp tries every rule on every tensor).
    """
    skipped = set(skip)
    groups: dict[tuple[str, constants.TensorType], list[str]] = {}
    singles: list[tuple[str, constants.TensorType]] = []
    for name, tensor_type in types.items():
        if name in skipped:
            continue
        match = _BLOCK.match(name)
        if match is None:
            singles.append((f"^{re.escape(name)}$", tensor_type))
        else:
            groups.setdefault((name[match.end() :], tensor_type), []).append(match.group(1))
    rules = list(singles)
    for (stem, tensor_type), blocks in sorted(groups.items()):
        ordered = sorted(set(blocks), key=int)
        rules.append((rf"^blk\.(?:{'|'.join(ordered)})\.{re.escape(stem)}$", tensor_type))
    return tuple(rules)


def first_match(name: str, overrides: Sequence[tuple[str, constants.TensorType]]) -> constants.TensorType | None:
    """The type the first rule matching ``name`` gives, as llama.cpp's ``regex_search`` loop does."""
    for pattern, tensor_type in overrides:
        if re.search(pattern, name):
            return tensor_type
    return None


def base_job(variant: VariantRecipe, nthread: int = 0) -> quantize_job.QuantizeJob:
    """The job for a uniform variant: its file type, settings and overrides, as given."""
    return quantize_job.QuantizeJob(
        file_type=variant.gguf_type,
        overrides=tuple((o.pattern, o.type) for o in variant.overrides),
        output_tensor_type=variant.output_tensor_type,
        token_embedding_type=variant.token_embedding_type,
        leave_output_tensor=variant.leave_output_tensor,
        pure=variant.pure,
        allow_requantize=variant.allow_requantize,
        keep_split=variant.keep_split,
        nthread=nthread,
    )


def pinned_types(
    tensors: Sequence[TensorSpec], roles: Mapping[str, Role], variant: VariantRecipe
) -> dict[str, constants.TensorType]:
    """Tensors a dynamic mix may not choose for: kept ones, explicit embedding/output types, overrides."""
    user = [(o.pattern, o.type) for o in variant.overrides]
    pinned: dict[str, constants.TensorType] = {}
    for t in tensors:
        role = roles[t.name]
        wanted: constants.TensorType | None = None
        if role is Role.KEPT:
            pinned[t.name] = t.type
            continue
        # llama.cpp applies these two parameters by tensor name, whatever role a tied embedding plays
        if _is_token_embd(t.name) and variant.token_embedding_type is not None:
            pinned[t.name] = variant.token_embedding_type  # llama.cpp applies it without fallback
            continue
        if t.name == "output.weight" and variant.output_tensor_type is not None:
            pinned[t.name] = variant.output_tensor_type
            continue
        wanted = first_match(t.name, user)
        if wanted is not None:
            pinned[t.name] = constants.fallback_type(wanted, t.row_length)
    return pinned


def predicted_loss(
    tensors: Sequence[TensorSpec],
    types: Mapping[str, constants.TensorType],
    roles: Mapping[str, Role],
    importance: Mapping[str, float],
    *,
    has_imatrix: bool,
) -> float:
    """The loss model's figure for any assignment (uniform plans are scored the same way)."""
    scale = sensitivities(tensors, roles, importance)
    return sum(
        ROLE_POLICIES[roles[t.name]].weight * scale[t.name] * relative_error(types[t.name], with_imatrix=has_imatrix)
        for t in tensors
    )


def rows_for(tensors: Sequence[TensorSpec], types: Mapping[str, constants.TensorType]) -> tuple[PlanRow, ...]:
    return tuple(PlanRow(t.name, types[t.name], t.nbytes(types[t.name])) for t in tensors)


def budget_for(variant: VariantRecipe, n_elements: int, default_bytes: int) -> tuple[int, str]:
    """The byte budget and how to name it in errors."""
    if variant.target_size_gib is not None:
        return (
            int(variant.target_size_gib * units.GiB),
            f"variant {variant.name}: targetSizeGiB {variant.target_size_gib}",
        )
    if variant.target_bits_per_weight is not None:
        return (
            int(variant.target_bits_per_weight * n_elements / 8),
            f"variant {variant.name}: targetBitsPerWeight {variant.target_bits_per_weight}",
        )
    return default_bytes, f"variant {variant.name}: the size of a uniform {variant.type} file"


def _size(nbytes: int) -> str:
    return f"{units.gib(nbytes, 3)} ({nbytes:,} bytes)"


def importance_of(imatrix: imatrix_mod.ImatrixData | None) -> dict[str, float]:
    """Mean input energy per tensor, the imatrix's contribution to sensitivity."""
    if imatrix is None:
        return {}
    return {name: float(np.mean(imatrix.column_importance(name))) for name in imatrix}


# ---------------------------------------------------------------------------------------------
# planning against a GGUF file
# ---------------------------------------------------------------------------------------------


def read_tensors(src_gguf: Path) -> list[TensorSpec]:
    """Names, shapes and types of every tensor, from the header (memory-mapped, no data read)."""
    try:
        reader = gguf.GGUFReader(src_gguf)
    except (OSError, ValueError) as err:
        raise RecipeError(f"cannot read tensors of {src_gguf}: {err}") from err
    tensors = []
    for tensor in reader.tensors:
        code = int(tensor.tensor_type)
        if code not in constants.TENSOR_TYPE_BY_CODE:
            raise RecipeError(f"{src_gguf}: tensor {tensor.name} has ggml type {code}, unknown to kquant")
        shape = tuple(int(n) for n in tensor.shape)
        tensors.append(TensorSpec(tensor.name, shape, constants.TENSOR_TYPE_BY_CODE[code]))
    return tensors


def plan_variant(
    tensors: Sequence[TensorSpec],
    variant: VariantRecipe,
    imatrix: imatrix_mod.ImatrixData | None,
    uniform_types: Mapping[str, constants.TensorType],
    *,
    source: Path,
    nthread: int = 0,
) -> RecipePlan:
    """Plan ``variant`` against the converted model: per-tensor types, bytes and the job to run.

    ``tensors`` are :func:`read_tensors` of ``source``, and ``uniform_types`` is llama.cpp's choice
    for each of them under :func:`base_job` (a dry run, which ``quantize.plan`` makes: this module
    loads no llama.cpp). Uniform plans are those choices; dynamic ones come from
    :func:`plan_dynamic` and are turned into one regex rule per (tensor stem, type).
    """
    roles = roles_for(tensors, leave_output_tensor=variant.leave_output_tensor)
    importance = importance_of(imatrix)
    has_imatrix = imatrix is not None
    n_elements = sum(t.n_elements for t in tensors)
    job = base_job(variant, nthread)
    missing = [t.name for t in tensors if t.name not in uniform_types]
    if missing:
        raise RecipeError(f"llama.cpp's dry run of {source} did not list tensor {missing[0]}")
    uniform_bytes = sum(t.nbytes(uniform_types[t.name]) for t in tensors)
    budget, label = budget_for(variant, n_elements, uniform_bytes)

    if variant.recipe == "uniform":
        if budget < uniform_bytes:
            raise RecipeError(
                f"{label} is {_size(budget)}, but the uniform {variant.type} file is {_size(uniform_bytes)}; "
                "use recipe: dynamic or a lower type"
            )
        loss = predicted_loss(tensors, uniform_types, roles, importance, has_imatrix=has_imatrix)
        return RecipePlan(
            variant=variant.name,
            recipe="uniform",
            job=job,
            rows=rows_for(tensors, uniform_types),
            total_bytes=uniform_bytes,
            n_elements=n_elements,
            predicted_loss=loss,
            budget_bytes=budget if (variant.target_size_gib or variant.target_bits_per_weight) else None,
        )

    pinned = pinned_types(tensors, roles, variant)
    choice = plan_dynamic(
        tensors,
        base=constants.FILE_TYPES[variant.gguf_type].base,
        budget_bytes=budget,
        pinned=pinned,
        roles=roles,
        importance=importance,
        has_imatrix=has_imatrix,
        budget_label=label,
        imatrix_names=None if imatrix is None else frozenset(imatrix),
    )
    kept = [t.name for t in tensors if roles[t.name] is Role.KEPT]
    # Explicit embedding/output types travel as llama.cpp parameters; the user's rules go first
    # so llama.cpp resolves them exactly as the plan did.
    skip = set(kept)
    if variant.token_embedding_type is not None:
        skip |= {t.name for t in tensors if _is_token_embd(t.name)}
    if variant.output_tensor_type is not None:
        skip.add("output.weight")
    generated = overrides_for(choice.types, skip)
    dynamic_job = dataclasses.replace(job, overrides=job.overrides + generated)
    return RecipePlan(
        variant=variant.name,
        recipe="dynamic",
        job=dynamic_job,
        rows=rows_for(tensors, choice.types),
        total_bytes=choice.total_bytes,
        n_elements=n_elements,
        predicted_loss=choice.predicted_loss,
        budget_bytes=budget,
    )
