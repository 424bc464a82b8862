"""Pure recipe planning on synthetic tensor lists: no GGUF file, no llama.cpp."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
from kquant.quantizer import constants, recipes, units

T = constants.TensorType


def dense_model(width: int = 256, ff: int = 512, layers: int = 4, vocab: int = 1024) -> list[recipes.TensorSpec]:
    tensors = [recipes.TensorSpec("token_embd.weight", (width, vocab), T.F16)]
    for i in range(layers):
        tensors += [
            recipes.TensorSpec(f"blk.{i}.attn_norm.weight", (width,), T.F32),
            recipes.TensorSpec(f"blk.{i}.attn_q.weight", (width, width), T.F16),
            recipes.TensorSpec(f"blk.{i}.attn_k.weight", (width, width // 2), T.F16),
            recipes.TensorSpec(f"blk.{i}.attn_v.weight", (width, width // 2), T.F16),
            recipes.TensorSpec(f"blk.{i}.attn_output.weight", (width, width), T.F16),
            recipes.TensorSpec(f"blk.{i}.ffn_norm.weight", (width,), T.F32),
            recipes.TensorSpec(f"blk.{i}.ffn_gate.weight", (width, ff), T.F16),
            recipes.TensorSpec(f"blk.{i}.ffn_up.weight", (width, ff), T.F16),
            recipes.TensorSpec(f"blk.{i}.ffn_down.weight", (ff, width), T.F16),
        ]
    tensors += [
        recipes.TensorSpec("output_norm.weight", (width,), T.F32),
        recipes.TensorSpec("output.weight", (width, vocab), T.F16),
    ]
    return tensors


def moe_model(width: int = 512, ff: int = 256, layers: int = 4, experts: int = 16) -> list[recipes.TensorSpec]:
    tensors = [recipes.TensorSpec("token_embd.weight", (width, 2048), T.F16)]
    for i in range(layers):
        tensors += [
            recipes.TensorSpec(f"blk.{i}.attn_q.weight", (width, width), T.F16),
            recipes.TensorSpec(f"blk.{i}.attn_v.weight", (width, width), T.F16),
            recipes.TensorSpec(f"blk.{i}.ffn_gate_inp.weight", (width, experts), T.F32),
            recipes.TensorSpec(f"blk.{i}.ffn_gate_exps.weight", (width, ff, experts), T.F16),
            recipes.TensorSpec(f"blk.{i}.ffn_up_exps.weight", (width, ff, experts), T.F16),
            recipes.TensorSpec(f"blk.{i}.ffn_down_exps.weight", (ff, width, experts), T.F16),
        ]
    tensors.append(recipes.TensorSpec("output.weight", (width, 2048), T.F16))
    return tensors


def plan(
    tensors: list[recipes.TensorSpec],
    budget: int,
    *,
    base: constants.TensorType = T.Q4_K,
    importance: dict[str, float] | None = None,
    pinned: dict[str, constants.TensorType] | None = None,
    has_imatrix: bool = True,
) -> recipes.DynamicChoice:
    roles = {t.name: recipes.classify(t.name, len(t.shape)) for t in tensors}
    fixed = {t.name: t.type for t in tensors if roles[t.name] is recipes.Role.KEPT} | (pinned or {})
    return recipes.plan_dynamic(
        tensors,
        base=base,
        budget_bytes=budget,
        pinned=fixed,
        roles=roles,
        importance=importance or {},
        has_imatrix=has_imatrix,
        budget_label="targetSizeGiB 1",
    )


def q4k_m_like(t: recipes.TensorSpec) -> int:
    """Bytes of ``t`` in a Q4_K file whose output matrix is Q6_K, as llama.cpp's Q4_K_M keeps it."""
    if t.type is T.F32:
        return t.nbytes(T.F32)
    return t.nbytes(T.Q6_K if t.name in ("output.weight", "token_embd.weight") else T.Q4_K)


def bits(tensor: recipes.TensorSpec, tensor_type: constants.TensorType) -> float:
    return constants.TENSOR_TYPES[tensor_type].bits_per_weight


@pytest.mark.parametrize(
    ("name", "dims", "role"),
    [
        ("token_embd.weight", 2, recipes.Role.TOKEN_EMBD),
        ("output.weight", 2, recipes.Role.OUTPUT),
        ("output_norm.weight", 1, recipes.Role.KEPT),
        ("blk.3.attn_k.weight", 2, recipes.Role.ATTN_QK),
        ("blk.3.attn_v.weight", 2, recipes.Role.ATTN_V),
        ("blk.3.attn_kv_b.weight", 2, recipes.Role.ATTN_OTHER),
        ("blk.0.ffn_down.weight", 2, recipes.Role.FFN_DOWN),
        ("blk.0.ffn_up.weight", 2, recipes.Role.FFN_GATE_UP),
        ("blk.9.ffn_down_exps.weight", 3, recipes.Role.EXPERT_DOWN),
        ("blk.9.ffn_gate_exps.weight", 3, recipes.Role.EXPERT_GATE_UP),
        ("blk.9.ffn_up_shexp.weight", 2, recipes.Role.SHARED_EXPERT),
        ("blk.9.ffn_gate_inp.weight", 2, recipes.Role.KEPT),
    ],
)
def test_classify(name: str, dims: int, role: recipes.Role) -> None:
    assert recipes.classify(name, dims) is role


def test_leave_output_tensor_keeps_output() -> None:
    assert recipes.classify("output.weight", 2, leave_output_tensor=True) is recipes.Role.KEPT


def test_fallback_matches_llama_cpp_rules() -> None:
    assert constants.fallback_type(T.Q4_K, 576) is T.Q5_0
    assert constants.fallback_type(T.Q6_K, 576) is T.Q8_0
    assert constants.fallback_type(T.IQ2_XS, 576) is T.IQ4_NL
    assert constants.fallback_type(T.Q4_K, 1536) is T.Q4_K
    assert constants.fallback_type(T.Q4_K, 100) is T.F16


def test_576_wide_rows_never_get_256_block_types() -> None:
    tensor = recipes.TensorSpec("blk.0.ffn_up.weight", (576, 1536), T.F16)
    found = recipes.candidates_for(tensor, recipes.Role.FFN_GATE_UP, T.Q4_K, has_imatrix=True)
    assert found, "a 576-wide tensor must still have candidates"
    assert all(constants.TENSOR_TYPES[t].block_size == 32 for t in found)
    assert T.IQ4_NL in found and T.Q8_0 in found


def test_imatrix_types_need_an_imatrix() -> None:
    tensor = recipes.TensorSpec("blk.0.ffn_up_exps.weight", (256, 256, 8), T.F16)
    without = recipes.candidates_for(tensor, recipes.Role.EXPERT_GATE_UP, T.IQ1_S, has_imatrix=False)
    with_ = recipes.candidates_for(tensor, recipes.Role.EXPERT_GATE_UP, T.IQ1_S, has_imatrix=True)
    assert T.IQ1_S in with_
    assert not any(constants.TENSOR_TYPES[t].needs_imatrix for t in without)


def test_plan_fits_budget_and_spends_it() -> None:
    tensors = dense_model()
    uniform_q4k = sum(q4k_m_like(t) for t in tensors)
    choice = plan(tensors, uniform_q4k)
    assert choice.total_bytes <= uniform_q4k
    assert choice.total_bytes > 0.97 * uniform_q4k


def test_sensitive_tensors_keep_more_bits_than_experts() -> None:
    tensors = moe_model()
    by_name = {t.name: t for t in tensors}
    cheapest = plan(tensors, 10**12, base=T.IQ1_S).total_bytes  # everything maxed out
    choice = plan(tensors, int(sum(t.n_elements for t in tensors) * 2.6 / 8), base=T.IQ1_S)
    assert choice.total_bytes <= cheapest
    expert_bits = max(bits(by_name[n], t) for n, t in choice.types.items() if "_exps" in n)
    attention_bits = min(bits(by_name[n], t) for n, t in choice.types.items() if ".attn_" in n)
    assert attention_bits >= 4.0
    assert expert_bits < attention_bits
    assert bits(by_name["output.weight"], choice.types["output.weight"]) >= 6.0
    down = min(bits(by_name[n], t) for n, t in choice.types.items() if "ffn_down_exps" in n)
    assert down >= 2.0


def test_budget_below_the_smallest_mix_names_both() -> None:
    tensors = moe_model()
    with pytest.raises(recipes.RecipeError, match=r"targetSizeGiB 1 is .* smallest mix this recipe allows is"):
        plan(tensors, 1000, base=T.IQ1_S)


def test_more_budget_never_predicts_more_loss() -> None:
    tensors = dense_model()
    total16 = sum(t.nbytes(T.F16) for t in tensors)
    losses = [plan(tensors, int(total16 * f)).predicted_loss for f in (0.30, 0.35, 0.45, 0.6)]
    assert losses == sorted(losses, reverse=True)
    assert losses[-1] < losses[0]


def test_pinned_tensors_keep_their_type() -> None:
    tensors = dense_model()
    choice = plan(tensors, 10**9, pinned={"blk.1.ffn_up.weight": T.Q2_K})
    assert choice.types["blk.1.ffn_up.weight"] is T.Q2_K


def test_imatrix_energy_buys_bits() -> None:
    tensors = dense_model(layers=8)
    importance = {t.name: 1.0 for t in tensors}
    importance["blk.3.ffn_down.weight"] = 50.0
    total16 = sum(t.nbytes(T.F16) for t in tensors)
    pairs = []
    for fraction in (0.29, 0.31, 0.33, 0.36, 0.4, 0.45):
        choice = plan(tensors, int(total16 * fraction), importance=importance)
        hot = bits(tensors[0], choice.types["blk.3.ffn_down.weight"])
        cold = bits(tensors[0], choice.types["blk.4.ffn_down.weight"])
        pairs.append((hot, cold))
    assert all(hot >= cold for hot, cold in pairs), pairs
    assert any(hot > cold for hot, cold in pairs), pairs


def test_generated_rules_reproduce_the_plan() -> None:
    tensors = moe_model()
    choice = plan(tensors, int(sum(t.n_elements for t in tensors) * 2.5 / 8), base=T.IQ1_S)
    kept = {t.name for t in tensors if recipes.classify(t.name, len(t.shape)) is recipes.Role.KEPT}
    rules = recipes.overrides_for(choice.types, kept)
    assert len(rules) < len(choice.types)
    for name, tensor_type in choice.types.items():
        if name in kept:
            assert recipes.first_match(name, rules) is None
        else:
            assert recipes.first_match(name, rules) is tensor_type
    assert all(re.fullmatch(r"\^.*\$", pattern) for pattern, _ in rules)


def test_lower_hull_drops_dominated_and_concave_points() -> None:
    points = [
        (100, 1.0, T.Q2_K),
        (150, 1.5, T.Q3_K),
        (200, 0.2, T.Q4_K),
        (210, 0.195, T.Q5_K),
        (400, 0.0, T.Q8_0),
    ]
    hull = recipes._lower_hull(points)
    assert [p[2] for p in hull] == [T.Q2_K, T.Q4_K, T.Q8_0]


def test_variant_recipe_parses_the_manifest_spelling() -> None:
    variant = recipes.VariantRecipe.model_validate(
        {
            "name": "ud-iq1s",
            "type": "IQ1_S",
            "recipe": "dynamic",
            "overrides": [{"pattern": r"blk\.[0-2]\..*", "type": "Q6_K"}],
            "targetSizeGiB": 131,
            "outputTensorType": "Q6_K",
            "tokenEmbeddingType": "Q8_0",
        }
    )
    assert variant.target_size_gib == 131
    assert variant.overrides[0].type is T.Q6_K
    assert recipes.base_job(variant).overrides == ((r"blk\.[0-2]\..*", T.Q6_K),)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"targetSizeGiB": 1, "targetBitsPerWeight": 2}, "targetSizeGiB"),
        ({"type": "F16", "recipe": "dynamic"}, "dynamic mix needs a quantized base type"),
        ({"overrides": [{"pattern": "blk.(", "type": "Q4_K"}]}, "not a valid regular expression"),
        ({"type": "Q9_K"}, "type"),
        ({"targetSizeGiB": -1}, "targetSizeGiB"),
    ],
)
def test_variant_recipe_rejects(body: dict[str, object], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        recipes.VariantRecipe.model_validate({"name": "v", "type": "Q4_K_M"} | body)


def test_render_lists_every_tensor_and_the_total() -> None:
    tensors = dense_model(layers=1)
    types = {t.name: (t.type if len(t.shape) == 1 else T.Q4_K) for t in tensors}
    plan_ = recipes.RecipePlan(
        variant="v",
        recipe="uniform",
        job=recipes.base_job(recipes.VariantRecipe(name="v", type=constants.FileType.Q4_K_M)),
        rows=recipes.rows_for(tensors, types),
        total_bytes=sum(t.nbytes(types[t.name]) for t in tensors),
        n_elements=sum(t.n_elements for t in tensors),
        predicted_loss=0.5,
    )
    text = plan_.render()
    assert all(t.name in text for t in tensors)
    assert f"{plan_.total_bytes:,} bytes" in text
    assert "bits per weight" in text


def test_tied_embedding_is_planned_as_the_output() -> None:
    tensors = [t for t in dense_model() if t.name != "output.weight"]
    roles = recipes.roles_for(tensors)
    assert roles["token_embd.weight"] is recipes.Role.OUTPUT
    assert recipes.roles_for(dense_model())["token_embd.weight"] is recipes.Role.TOKEN_EMBD
    choice = recipes.plan_dynamic(
        tensors,
        base=T.Q4_K,
        budget_bytes=sum(q4k_m_like(t) for t in tensors),
        pinned={t.name: t.type for t in tensors if roles[t.name] is recipes.Role.KEPT},
        roles=roles,
        importance={},
        has_imatrix=False,
        budget_label="targetSizeGiB 1",
    )
    assert bits(tensors[0], choice.types["token_embd.weight"]) >= 6.0


def test_tensors_missing_from_the_imatrix_get_no_imatrix_types() -> None:
    tensors = moe_model()
    roles = recipes.roles_for(tensors)
    choice = recipes.plan_dynamic(
        tensors,
        base=T.IQ1_S,
        budget_bytes=int(sum(t.n_elements for t in tensors) * 2.6 / 8),
        pinned={t.name: t.type for t in tensors if roles[t.name] is recipes.Role.KEPT},
        roles=roles,
        importance={},
        has_imatrix=True,
        budget_label="targetSizeGiB 1",
        imatrix_names={t.name for t in tensors if t.name != "blk.2.ffn_up_exps.weight"},
    )
    assert not constants.TENSOR_TYPES[choice.types["blk.2.ffn_up_exps.weight"]].needs_imatrix
    assert constants.TENSOR_TYPES[choice.types["blk.1.ffn_up_exps.weight"]].needs_imatrix


def deepseek_r1() -> list[recipes.TensorSpec]:
    """DeepSeek-R1's tensor list as llama.cpp's converter writes it (671B weights, 3 dense layers,
    58 MoE layers of 256 experts plus a shared one, MLA attention)."""
    hidden, vocab, experts, ff, dense_ff = 7168, 129280, 256, 2048, 18432
    tensors = [
        recipes.TensorSpec("token_embd.weight", (hidden, vocab), T.BF16),
        recipes.TensorSpec("output_norm.weight", (hidden,), T.F32),
        recipes.TensorSpec("output.weight", (hidden, vocab), T.BF16),
    ]
    for i in range(61):
        b = f"blk.{i}."
        tensors += [
            recipes.TensorSpec(b + "attn_norm.weight", (hidden,), T.F32),
            recipes.TensorSpec(b + "attn_q_a.weight", (hidden, 1536), T.BF16),
            recipes.TensorSpec(b + "attn_q_a_norm.weight", (1536,), T.F32),
            recipes.TensorSpec(b + "attn_q_b.weight", (1536, 128 * 192), T.BF16),
            recipes.TensorSpec(b + "attn_kv_a_mqa.weight", (hidden, 576), T.BF16),
            recipes.TensorSpec(b + "attn_kv_a_norm.weight", (512,), T.F32),
            recipes.TensorSpec(b + "attn_kv_b.weight", (512, 128 * 256), T.BF16),
            recipes.TensorSpec(b + "attn_output.weight", (128 * 128, hidden), T.BF16),
            recipes.TensorSpec(b + "ffn_norm.weight", (hidden,), T.F32),
        ]
        if i < 3:
            tensors += [
                recipes.TensorSpec(b + "ffn_gate.weight", (hidden, dense_ff), T.BF16),
                recipes.TensorSpec(b + "ffn_up.weight", (hidden, dense_ff), T.BF16),
                recipes.TensorSpec(b + "ffn_down.weight", (dense_ff, hidden), T.BF16),
            ]
            continue
        tensors += [
            recipes.TensorSpec(b + "ffn_gate_inp.weight", (hidden, experts), T.F32),
            recipes.TensorSpec(b + "ffn_gate_exps.weight", (hidden, ff, experts), T.BF16),
            recipes.TensorSpec(b + "ffn_up_exps.weight", (hidden, ff, experts), T.BF16),
            recipes.TensorSpec(b + "ffn_down_exps.weight", (ff, hidden, experts), T.BF16),
            recipes.TensorSpec(b + "ffn_gate_shexp.weight", (hidden, ff), T.BF16),
            recipes.TensorSpec(b + "ffn_up_shexp.weight", (hidden, ff), T.BF16),
            recipes.TensorSpec(b + "ffn_down_shexp.weight", (ff, hidden), T.BF16),
        ]
    return tensors


def test_deepseek_r1_at_131_gib_looks_like_unsloths_mix() -> None:
    tensors = deepseek_r1()
    by_name = {t.name: t for t in tensors}
    choice = plan(tensors, 131 * units.GiB, base=T.IQ1_S)
    assert 130 * units.GiB < choice.total_bytes <= 131 * units.GiB
    roles = recipes.roles_for(tensors)

    def bits_of(role: recipes.Role) -> list[float]:
        return [bits(by_name[n], t) for n, t in choice.types.items() if roles[n] is role]

    assert set(bits_of(recipes.Role.EXPERT_GATE_UP)) == {constants.TENSOR_TYPES[T.IQ1_S].bits_per_weight}
    assert max(bits_of(recipes.Role.EXPERT_DOWN)) > min(bits_of(recipes.Role.EXPERT_DOWN))  # "2.06/1.56 bit"
    for role in (recipes.Role.ATTN_QK, recipes.Role.ATTN_OTHER, recipes.Role.ATTN_OUTPUT, recipes.Role.SHARED_EXPERT):
        assert min(bits_of(role)) >= 4.0, role
    assert min(bits_of(recipes.Role.FFN_DOWN) + bits_of(recipes.Role.FFN_GATE_UP)) >= 4.0  # the 3 dense layers
    assert bits_of(recipes.Role.OUTPUT) == [constants.TENSOR_TYPES[T.Q6_K].bits_per_weight]
    kept = [n for n, r in roles.items() if r is recipes.Role.KEPT]
    assert len(recipes.overrides_for(choice.types, kept)) < 40
    with pytest.raises(recipes.RecipeError, match=r"smallest mix this recipe allows is 127\.\d+ GiB"):
        plan(tensors, 110 * units.GiB, base=T.IQ1_S)


def test_plan_variant_needs_only_llama_cpps_answer() -> None:
    """The dry run's answer is an argument, so a plan is made and checked without llama.cpp."""
    tensors = dense_model(layers=2)
    uniform = {
        t.name: T.F32 if t.type is T.F32 else T.Q6_K if t.name in ("output.weight", "token_embd.weight") else T.Q4_K
        for t in tensors
    }
    source = Path("m.gguf")
    variant = recipes.VariantRecipe(name="v", type=constants.FileType.Q4_K_M)
    uniform_plan = recipes.plan_variant(tensors, variant, None, uniform, source=source)
    assert uniform_plan.recipe == "uniform" and uniform_plan.job == recipes.base_job(variant)
    assert uniform_plan.total_bytes == sum(q4k_m_like(t) for t in tensors)
    dynamic = recipes.VariantRecipe(name="d", type=constants.FileType.Q4_K_M, recipe="dynamic")
    assert recipes.plan_variant(tensors, dynamic, None, uniform, source=source).total_bytes <= uniform_plan.total_bytes
    missing = {name: t for name, t in uniform.items() if name != "output.weight"}
    with pytest.raises(recipes.RecipeError, match=r"dry run of m.gguf did not list tensor output.weight"):
        recipes.plan_variant(tensors, variant, None, missing, source=source)


def test_planning_loads_no_native_library() -> None:
    """``kquant plan`` and the recipes run where llama.cpp and torch are not loaded (nor wanted)."""
    code = (
        "import sys, kquant.operator.commands.plan, kquant.quantizer.recipes\n"
        "loaded = sorted({'llama_cpp', 'torch'} & set(sys.modules))\n"
        "assert not loaded, loaded"
    )
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
