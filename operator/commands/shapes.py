"""Model facts for well-known models, estimated from their published ``config.json``.

``kquant plan`` answers "does this manifest fit my GPU?" before anything is downloaded. The exact
answer needs the GGUF header (``--gguf``) or the facts a build wrote into its report
(``--facts``); neither exists before the first build. For a few well-known models this module
rebuilds the GGUF's tensor list from the model's published hyperparameters (the same names and
shapes llama.cpp's ``convert_hf_to_gguf.py`` writes), gives every tensor the type the variant
would give it, and hands the records to ``gguf_facts.facts_from_header``, the code that reads a
real header. The planner then works on the same kind of ``ModelFacts`` as in the operator.

How types are estimated:

* ``recipe: dynamic`` runs the quantizer's own pure mix planner (``recipes.plan_dynamic``) over the
  estimated tensors, with the variant's overrides, output/embedding types and budget, so the sizes
  are what the build would plan (without the importance matrix's per-tensor factors).
* ``recipe: uniform`` approximates llama.cpp's per-tensor rules: the file type's base type for
  every matrix, ``Q6_K`` for ``output.weight`` (as llama.cpp does for the K- and IQ-types), and the
  variant's own output, embedding and override types; rows that the type's block does not divide
  fall back as llama.cpp falls back. llama.cpp raises a few more tensors for ``_M`` types, so a
  uniform estimate is a few percent low.
* ``recipe: passthrough`` of a published file uses the file's published size as a dynamic budget.

Pure code: no files, no network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from kquant.operator import builds
from kquant.operator.api import v1alpha1 as api
from kquant.quantizer import constants, gguf_facts, recipes, settings

T = constants.TensorType
GIB = 1 << 30
HEADER_BYTES_PER_TOKEN = 24
"""GGUF metadata per vocabulary entry (token text, score, type): only the seed formula reads it."""


@dataclasses.dataclass(frozen=True)
class Shape:
    """A model's hyperparameters, as its ``config.json`` publishes them (Hugging Face names in comments)."""

    name: str
    repos: tuple[str, ...]
    """Hub repositories (``owner/name``, lower case) whose weights have this shape."""
    config_url: str
    """Where the numbers come from."""
    architecture: str
    """llama.cpp's architecture name (``general.architecture``)."""
    n_layer: int  # num_hidden_layers
    n_embd: int  # hidden_size
    n_head: int  # num_attention_heads
    n_head_kv: int  # num_key_value_heads
    n_ff: int  # intermediate_size
    n_vocab: int  # vocab_size
    n_ctx_train: int  # max_position_embeddings
    tied: bool  # tie_word_embeddings
    n_expert: int = 0  # n_routed_experts
    n_expert_used: int = 0  # num_experts_per_tok
    n_expert_shared: int = 0  # n_shared_experts
    n_ff_exp: int = 0  # moe_intermediate_size
    n_dense_lead: int = 0  # first_k_dense_replace
    q_lora_rank: int = 0
    kv_lora_rank: int = 0  # MLA when > 0
    qk_rope: int = 0  # qk_rope_head_dim
    qk_nope: int = 0  # qk_nope_head_dim
    v_head: int = 0  # v_head_dim
    published_sizes_gib: tuple[tuple[str, float], ...] = ()
    """Published GGUF files of this model: (a substring of the file name, size in GiB)."""

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0


SHAPES: tuple[Shape, ...] = (
    Shape(
        name="DeepSeek-R1 (671B, MLA, 256 experts)",
        repos=("deepseek-ai/deepseek-r1", "deepseek-ai/deepseek-v3", "unsloth/deepseek-r1-gguf"),
        config_url="https://huggingface.co/deepseek-ai/DeepSeek-R1/blob/main/config.json",
        architecture="deepseek2",
        n_layer=61, n_embd=7168, n_head=128, n_head_kv=128, n_ff=18432, n_vocab=129280,
        n_ctx_train=163840, tied=False,
        n_expert=256, n_expert_used=8, n_expert_shared=1, n_ff_exp=2048, n_dense_lead=3,
        q_lora_rank=1536, kv_lora_rank=512, qk_rope=64, qk_nope=128, v_head=128,
        # Unsloth's dynamic 1.58-bit file: three shards, 131 GiB in all.
        published_sizes_gib=(("UD-IQ1_S", 131.0), ("UD-IQ1_M", 158.0), ("UD-IQ2_XXS", 183.0)),
    ),
    Shape(
        name="SmolLM2-135M-Instruct",
        repos=("huggingfacetb/smollm2-135m-instruct", "huggingfacetb/smollm2-135m"),
        config_url="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct/blob/main/config.json",
        architecture="llama",
        n_layer=30, n_embd=576, n_head=9, n_head_kv=3, n_ff=1536, n_vocab=49152, n_ctx_train=8192, tied=True,
    ),
    Shape(
        name="Llama-3.1-8B-Instruct",
        repos=("meta-llama/llama-3.1-8b-instruct", "meta-llama/llama-3.1-8b"),
        config_url="https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct/blob/main/config.json",
        architecture="llama",
        n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256, n_ctx_train=131072,
        tied=False,
    ),
)


class UnknownModelError(LookupError):
    """No builtin shape for a repository."""


def find(repo: str) -> Shape:
    """The builtin shape for a hub repository, or ``UnknownModelError`` listing the known ones."""
    for shape in SHAPES:
        if repo.lower() in shape.repos:
            return shape
    known = ", ".join(r for s in SHAPES for r in s.repos)
    raise UnknownModelError(
        f"spec.source repo {repo!r} has no builtin shape (known: {known}); pass --gguf FILE or --facts REPORT.json"
    )


# --------------------------------------------------------------------------------------------
# tensors


def _matrix(name: str, rows: int, cols: int, *experts: int) -> recipes.TensorSpec:
    """A weight matrix in ggml order (row length first): ``cols`` weights per row, ``rows`` rows."""
    return recipes.TensorSpec(name, (cols, rows, *experts), T.BF16)


def _vector(name: str, n: int) -> recipes.TensorSpec:
    return recipes.TensorSpec(name, (n,), T.F32)


def _attention(s: Shape, b: str) -> list[recipes.TensorSpec]:
    e = s.n_embd
    if not s.is_mla:
        q, kv = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
        return [_matrix(f"{b}.attn_q.weight", q, e), _matrix(f"{b}.attn_k.weight", kv, e),
                _matrix(f"{b}.attn_v.weight", kv, e), _matrix(f"{b}.attn_output.weight", e, q)]  # fmt: skip
    h = s.n_head
    # convert_hf_to_gguf splits kv_b into per-head k_b and v_b for llama.cpp's MLA kernels.
    return [
        _vector(f"{b}.attn_q_a_norm.weight", s.q_lora_rank),
        _vector(f"{b}.attn_kv_a_norm.weight", s.kv_lora_rank),
        _matrix(f"{b}.attn_q_a.weight", s.q_lora_rank, e),
        _matrix(f"{b}.attn_q_b.weight", h * (s.qk_nope + s.qk_rope), s.q_lora_rank),
        _matrix(f"{b}.attn_kv_a_mqa.weight", s.kv_lora_rank + s.qk_rope, e),
        recipes.TensorSpec(f"{b}.attn_k_b.weight", (s.qk_nope, s.kv_lora_rank, h), T.BF16),
        recipes.TensorSpec(f"{b}.attn_v_b.weight", (s.kv_lora_rank, s.v_head, h), T.BF16),
        _matrix(f"{b}.attn_output.weight", e, h * s.v_head),
    ]


def _ffn(s: Shape, b: str, il: int) -> list[recipes.TensorSpec]:
    e = s.n_embd
    if not s.n_expert or il < s.n_dense_lead:
        return [_matrix(f"{b}.ffn_gate.weight", s.n_ff, e), _matrix(f"{b}.ffn_up.weight", s.n_ff, e),
                _matrix(f"{b}.ffn_down.weight", e, s.n_ff)]  # fmt: skip
    x, f = s.n_expert, s.n_ff_exp
    shared = f * s.n_expert_shared
    return [
        recipes.TensorSpec(f"{b}.ffn_gate_inp.weight", (e, x), T.F32),
        _vector(f"{b}.exp_probs_b.bias", x),
        _matrix(f"{b}.ffn_gate_exps.weight", f, e, x),
        _matrix(f"{b}.ffn_up_exps.weight", f, e, x),
        _matrix(f"{b}.ffn_down_exps.weight", e, f, x),
        _matrix(f"{b}.ffn_gate_shexp.weight", shared, e),
        _matrix(f"{b}.ffn_up_shexp.weight", shared, e),
        _matrix(f"{b}.ffn_down_shexp.weight", e, shared),
    ]


def tensors(s: Shape) -> list[recipes.TensorSpec]:
    """The tensors of the 16-bit GGUF that ``convert_hf_to_gguf.py`` writes for ``s``."""
    out = [_matrix("token_embd.weight", s.n_vocab, s.n_embd), _vector("output_norm.weight", s.n_embd)]
    if not s.tied:
        out.append(_matrix("output.weight", s.n_vocab, s.n_embd))
    for il in range(s.n_layer):
        b = f"blk.{il}"
        out += [_vector(f"{b}.attn_norm.weight", s.n_embd), *_attention(s, b),
                _vector(f"{b}.ffn_norm.weight", s.n_embd), *_ffn(s, b, il)]  # fmt: skip
    return out


def metadata(s: Shape) -> dict[str, Any]:
    """The GGUF metadata keys ``gguf_facts`` reads, as ``convert_hf_to_gguf.py`` writes them."""
    a = s.architecture
    meta: dict[str, Any] = {
        "general.architecture": a, "general.name": s.name,
        f"{a}.block_count": s.n_layer, f"{a}.context_length": s.n_ctx_train,
        f"{a}.embedding_length": s.n_embd, f"{a}.feed_forward_length": s.n_ff,
        f"{a}.attention.head_count": s.n_head, f"{a}.vocab_size": s.n_vocab,
    }  # fmt: skip
    if s.is_mla:
        # MLA caches the compressed latent: one "KV head" of kv_lora_rank + rope dims, no V.
        meta |= {
            f"{a}.attention.head_count_kv": 1,
            f"{a}.attention.key_length": s.kv_lora_rank + s.qk_rope,
            f"{a}.attention.value_length": s.kv_lora_rank,
            f"{a}.attention.key_length_mla": s.qk_nope + s.qk_rope,
            f"{a}.attention.value_length_mla": s.v_head,
            f"{a}.attention.kv_lora_rank": s.kv_lora_rank,
        }
    else:
        meta[f"{a}.attention.head_count_kv"] = s.n_head_kv
    if s.n_expert:
        meta |= {f"{a}.expert_count": s.n_expert, f"{a}.expert_used_count": s.n_expert_used,
                 f"{a}.expert_shared_count": s.n_expert_shared,
                 f"{a}.expert_feed_forward_length": s.n_ff_exp}  # fmt: skip
    return meta


def facts(s: Shape, types: Mapping[str, constants.TensorType], file_type: int | None = None) -> gguf_facts.ModelFacts:
    """``ModelFacts`` of ``s`` with every tensor stored as ``types`` says."""
    records = [
        # gguf_facts' own record type: the same path a real header takes.
        gguf_facts._Tensor(t.name, str(types[t.name]), t.nbytes(types[t.name]), t.shape)
        for t in tensors(s)
    ]
    meta = metadata(s) | ({"general.file_type": file_type} if file_type is not None else {})
    total = sum(r.n_bytes for r in records)
    return gguf_facts.facts_from_header(
        meta, records, file_bytes=total + s.n_vocab * HEADER_BYTES_PER_TOKEN, source=f"builtin shape {s.name}"
    )


# --------------------------------------------------------------------------------------------
# types per variant


def _recipe(variant: api.Variant, file_type: constants.FileType) -> recipes.VariantRecipe:
    """The quantizer's model of ``variant`` (the operator's one mapping), of ``file_type``."""
    return builds.variant_spec(variant).model_copy(update={"type": file_type})


def uniform_types(
    specs: Sequence[recipes.TensorSpec], recipe: recipes.VariantRecipe
) -> dict[str, constants.TensorType]:
    """An estimate of llama.cpp's own choices for a uniform file type (see the module docstring)."""
    base = constants.FILE_TYPES[recipe.gguf_type].base
    roles = recipes.roles_for(specs, leave_output_tensor=recipe.leave_output_tensor)
    user = [(o.pattern, o.type) for o in recipe.overrides]
    out_type = T.Q6_K if constants.TENSOR_TYPES[base].bits_per_weight < 6.5 else base
    types: dict[str, constants.TensorType] = {}
    for t in specs:
        role = roles[t.name]
        wanted: constants.TensorType = base
        if role is recipes.Role.KEPT:
            types[t.name] = t.type
            continue
        if t.name.startswith("token_embd") and recipe.token_embedding_type is not None:
            types[t.name] = recipe.token_embedding_type
            continue
        if t.name == "output.weight" and recipe.output_tensor_type is not None:
            types[t.name] = recipe.output_tensor_type
            continue
        if not recipe.pure:
            matched = recipes.first_match(t.name, user)
            if matched is not None:
                wanted = matched
            elif role is recipes.Role.OUTPUT:
                wanted = out_type
        types[t.name] = constants.fallback_type(wanted, t.row_length)
    return types


def published_types(
    s: Shape, file_type: constants.FileType, size_gib: float
) -> tuple[dict[str, constants.TensorType], str]:
    """The layout of a published dynamic file, as its makers describe it (Unsloth's 1.58-bit
    DeepSeek-R1): routed experts at the file type, dense layers, attention and shared experts at
    Q4_K, the output at Q6_K, the embedding at Q4_K, and expert ``ffn_down`` of the first MoE layers
    raised to IQ2_XXS until the published size is reached."""
    specs = tensors(s)
    base = constants.FILE_TYPES[file_type].base
    keep = [(rf"^blk\.({'|'.join(str(i) for i in range(s.n_dense_lead))})\.", T.Q4_K)] if s.n_dense_lead else []
    recipe = recipes.VariantRecipe(
        name="published", type=file_type, pure=False, output_tensor_type=T.Q6_K, token_embedding_type=T.Q4_K,
        overrides=tuple(settings.TensorOverride(pattern=p, type=t) for p, t in
                        [*keep, (r"attn_", T.Q4_K), (r"_shexp\.", T.Q4_K), (r"_exps\.", base)]),
    )  # fmt: skip
    types = uniform_types(specs, recipe)
    by_name = {t.name: t for t in specs}
    total = sum(by_name[n].nbytes(ty) for n, ty in types.items())
    budget = int(size_gib * GIB)
    for t in specs:
        if not t.name.endswith("ffn_down_exps.weight"):
            continue
        extra = t.nbytes(T.IQ2_XXS) - t.nbytes(types[t.name])
        if total + extra > budget:
            break
        types[t.name] = T.IQ2_XXS
        total += extra
    return types, f"published {size_gib:g} GiB {file_type} layout (experts {base}, ffn_down_exps up to IQ2_XXS)"


def variant_types(
    s: Shape, variant: api.Variant, *, has_imatrix: bool, published_file: str | None = None
) -> tuple[dict[str, constants.TensorType], str]:
    """Every tensor's type for ``variant`` of ``s``, and one line saying how it was estimated.

    Raises ``recipes.RecipeError`` when a dynamic variant's budget cannot be met: its build would
    fail the same way."""
    if variant.type is None:
        raise ValueError(f"variant {variant.name}: type is unset; the builtin shapes need it to estimate sizes")
    file_type = constants.FileType(variant.type)
    if variant.recipe is api.Recipe.PASSTHROUGH:
        size = next((gib for part, gib in s.published_sizes_gib if published_file and part in published_file), None)
        if size is not None:
            return published_types(s, file_type, size)
    recipe = _recipe(variant, file_type)
    specs = tensors(s)
    uniform = uniform_types(specs, recipe)
    if recipe.recipe == "uniform":
        return uniform, f"uniform {file_type}: llama.cpp's rules estimated from {s.config_url}"
    roles = recipes.roles_for(specs, leave_output_tensor=recipe.leave_output_tensor)
    n_elements = sum(t.n_elements for t in specs)
    uniform_bytes = sum(t.nbytes(uniform[t.name]) for t in specs)
    budget, label = recipes.budget_for(recipe, n_elements, uniform_bytes)
    choice = recipes.plan_dynamic(
        specs, base=constants.FILE_TYPES[file_type].base, budget_bytes=budget,
        pinned=recipes.pinned_types(specs, roles, recipe), roles=roles, importance={},
        has_imatrix=has_imatrix, budget_label=label,
    )  # fmt: skip
    return choice.types, f"dynamic {file_type} mix planned by the quantizer's recipe, from {s.config_url}"


def published_file(spec: api.QuantizedModelSpec) -> str | None:
    """The GGUF source's file name or patterns, to look up a published size."""
    gguf = spec.source.gguf
    if gguf is None:
        return None
    return " ".join([gguf.file or "", *(gguf.allow_patterns or [])])


def estimate(qm: api.QuantizedModel, variant: api.Variant) -> tuple[gguf_facts.ModelFacts, str]:
    """Facts of ``variant`` of ``qm``'s source model from the builtin table, and how they were estimated."""
    shape = find(qm.spec.source.hub.repo)
    types, how = variant_types(
        shape, variant, has_imatrix=qm.spec.source.gguf is None, published_file=published_file(qm.spec)
    )
    code = constants.FILE_TYPES[constants.FileType(variant.type)].code if variant.type else None
    return facts(shape, types, code), how
