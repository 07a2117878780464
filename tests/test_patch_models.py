"""gk.patch on real transformers models, each built tiny from its config (nothing
downloaded): what the report says, outputs and gradients against the unpatched
model (fp32 and fp64), a few AdamW steps, state_dicts, unpatch, the causal-LM
loss in both modes and torch.compile.

``python tests/test_patch_models.py`` prints the table of what patch swaps and
leaves in each model."""

import ast
import contextlib
import copy
import importlib
import linecache
import pickle
import re
import subprocess
import sys
import tempfile
import textwrap
import types
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gpukernels as gk
from helpers import LOWP_FACTOR, LoRA, assert_matches, record_calls, rel_err

transformers = pytest.importorskip("transformers")
activations = pytest.importorskip("transformers.activations")
gk_patch = importlib.import_module("gpukernels.patch")  # the module: gk.patch is the function

VOCAB, HIDDEN, SEQ, BATCH = 96, 16, 7, 2  # no hidden width equals VOCAB: the logits stand out
_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=32,
    max_position_embeddings=32,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)


def _gpt2():
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=2,
            n_head=2,
            n_positions=32,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
    )


def _bert():
    return transformers.BertLMHeadModel(
        transformers.BertConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            is_decoder=True,
        )
    )


def _vit():
    return transformers.ViTForImageClassification(
        transformers.ViTConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=8,
            patch_size=4,
            num_labels=3,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )


def _opt():
    return transformers.OPTForCausalLM(
        transformers.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=2,
            ffn_dim=32,
            word_embed_proj_dim=HIDDEN,
            max_position_embeddings=32,
            dropout=0.0,
            attention_dropout=0.0,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
    )


# the experts as a loop of matmuls, not torch._grouped_mm, which has no fp64 (the fp64 reference)
_EAGER_EXPERTS = dict(experts_implementation="eager")
# Granite's MoE models (no shared MLP: shared_intermediate_size is 0 by default)
_GRANITE_MOE = dict(num_local_experts=4, num_experts_per_tok=2, logits_scaling=4.0, **_EAGER_EXPERTS)


_GEMMA4 = dict(
    head_dim=8,
    global_head_dim=8,
    hidden_size_per_layer_input=8,
    vocab_size_per_layer_input=VOCAB,
    layer_types=["sliding_attention", "full_attention"],
    final_logit_softcapping=0.5,
)


_MAMBA = dict(mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_expand=2, mamba_chunk_size=4)
_HYBRID = dict(
    head_dim=8,
    layer_types=["linear_attention", "full_attention"],
    linear_num_value_heads=2,
    linear_num_key_heads=1,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
)


def _scaled_layers(build):
    """Gemma 4's layers scale their output by a buffer of ones until a checkpoint sets it: another
    scale, which a layer computing without it would show."""

    def scaled():
        model = build()
        for module in model.modules():
            if "layer_scalar" in module._buffers:
                module.layer_scalar.fill_(0.75)
        return model

    return scaled


def _decoder(model: str, config: str, **options):
    return lambda: getattr(transformers, model)(getattr(transformers, config)(**_DECODER | options))


def _vision_language(kind: str):
    """A tiny vision-language model: the decoder's text config, a one-layer vision tower."""
    text = _DECODER | dict(max_position_embeddings=64)
    images = dict(image_token_id=VOCAB - 1, video_token_id=VOCAB - 2)
    mrope = dict(mrope_section=[1, 1, 2])  # of a head's 4 frequencies: time, height, width
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)  # Gemma's
    if kind == "gemma3":
        return lambda: transformers.Gemma3ForConditionalGeneration(
            transformers.Gemma3Config(
                text_config=text | dict(head_dim=8),
                vision_config=tower | dict(image_size=16, patch_size=4),
                mm_tokens_per_image=4,
                image_token_index=VOCAB - 1,
            )
        )
    if kind == "gemma4":
        return lambda: transformers.Gemma4ForConditionalGeneration(
            transformers.Gemma4Config(
                text_config=text | _GEMMA4,
                vision_config=tower | dict(num_key_value_heads=2, head_dim=8),
                audio_config=None,
                **images,
                audio_token_id=VOCAB - 3,
                boi_token_id=VOCAB - 4,
                eoi_token_id=VOCAB - 5,
            )
        )
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=HIDDEN)
    if kind == "qwen2_vl":
        config = transformers.Qwen2VLConfig(
            text_config=text | dict(rope_scaling=dict(type="mrope", **mrope)),
            vision_config=dict(depth=1, embed_dim=16, hidden_size=HIDDEN, num_heads=2, mlp_ratio=2),
            **images,
        )
        return lambda: transformers.Qwen2VLForConditionalGeneration(config)
    if kind == "qwen2_5_vl":
        config = transformers.Qwen2_5_VLConfig(
            text_config=text | dict(rope_scaling=dict(type="mrope", **mrope)),
            vision_config=vision | dict(fullatt_block_indexes=[0]),
            **images,
        )
        return lambda: transformers.Qwen2_5_VLForConditionalGeneration(config)
    config = transformers.Qwen3VLConfig(
        text_config=text | dict(head_dim=8, rope_scaling=dict(rope_type="default", mrope_interleaved=True, **mrope)),
        vision_config=vision | dict(deepstack_visual_indexes=[0]),
        **images,
    )
    return lambda: transformers.Qwen3VLForConditionalGeneration(config)


# name -> (builder, what each MLP activation becomes: one kind, or either of several)
MODELS = {
    "gpt2": (_gpt2, "LinearAct"),
    "bert": (_bert, "LinearAct"),
    "vit": (_vit, "LinearAct"),
    "opt": (_opt, "LinearAct"),
    "llama": (_decoder("LlamaForCausalLM", "LlamaConfig"), "GatedMLP"),
    "mistral": (_decoder("MistralForCausalLM", "MistralConfig"), "GatedMLP"),
    "qwen2": (_decoder("Qwen2ForCausalLM", "Qwen2Config"), "GatedMLP"),
    "qwen3": (_decoder("Qwen3ForCausalLM", "Qwen3Config", head_dim=8), "GatedMLP"),
    "gemma": (_decoder("GemmaForCausalLM", "GemmaConfig", head_dim=8), "GatedMLP"),
    "phi3": (_decoder("Phi3ForCausalLM", "Phi3Config"), "GatedMLP"),
    # MoE: the experts' batched products are left; Qwen's shared expert and dense layers are gated MLPs
    "mixtral": (
        _decoder("MixtralForCausalLM", "MixtralConfig", num_local_experts=4, num_experts_per_tok=2, **_EAGER_EXPERTS),
        None,
    ),
    "qwen2_moe": (
        _decoder(
            "Qwen2MoeForCausalLM",
            "Qwen2MoeConfig",
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            mlp_only_layers=[1],
            **_EAGER_EXPERTS,
        ),
        "GatedMLP",
    ),
    "qwen3_moe": (
        _decoder(
            "Qwen3MoeForCausalLM",
            "Qwen3MoeConfig",
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            mlp_only_layers=[1],
            **_EAGER_EXPERTS,
        ),
        "GatedMLP",
    ),
    # their logits soft-capped (a cap that bites the tiny model's logits) or scaled before the loss
    "gemma2": (_decoder("Gemma2ForCausalLM", "Gemma2Config", head_dim=8, final_logit_softcapping=0.5), "GatedMLP"),
    "gemma3": (
        _decoder("Gemma3ForCausalLM", "Gemma3TextConfig", head_dim=8, final_logit_softcapping=0.5),
        "GatedMLP",
    ),
    # Gemma 4: weightless value norms, an input of its own to each layer; the MoE form with an MLP beside
    "gemma4": (_scaled_layers(_decoder("Gemma4ForCausalLM", "Gemma4TextConfig", **_GEMMA4)), ("GatedMLP", "LinearAct")),
    "gemma4_moe": (
        _scaled_layers(
            _decoder(
                "Gemma4ForCausalLM",
                "Gemma4TextConfig",
                **_GEMMA4 | dict(hidden_size_per_layer_input=0),
                enable_moe_block=True,
                num_experts=4,
                top_k_experts=2,
                moe_intermediate_size=16,
                **_EAGER_EXPERTS,
            )
        ),
        "GatedMLP",
    ),
    # hybrid layers: a linear attention (Gated DeltaNet) in the first, attention in the second
    "qwen3_5": (_decoder("Qwen3_5ForCausalLM", "Qwen3_5TextConfig", **_HYBRID), "GatedMLP"),
    "qwen3_next": (
        _decoder(
            "Qwen3NextForCausalLM",
            "Qwen3NextConfig",
            **_HYBRID,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            **_EAGER_EXPERTS,
        ),
        "GatedMLP",
    ),
    "granite": (
        _decoder("GraniteForCausalLM", "GraniteConfig", logits_scaling=4.0, residual_multiplier=0.5),
        "GatedMLP",
    ),
    # Granite's MoE forms: the MLP an MoE, a shared MLP beside; Granite 4's Mamba layers (the first)
    # (not output_router_logits: transformers 5.17's own forward fails with it)
    "granitemoe": (_decoder("GraniteMoeForCausalLM", "GraniteMoeConfig", **_GRANITE_MOE), None),
    "granitemoeshared": (
        _decoder("GraniteMoeSharedForCausalLM", "GraniteMoeSharedConfig", **_GRANITE_MOE, shared_intermediate_size=16),
        "GatedMLP",
    ),
    "granitemoehybrid": (
        _decoder(
            "GraniteMoeHybridForCausalLM",
            "GraniteMoeHybridConfig",
            **_GRANITE_MOE,
            shared_intermediate_size=16,
            layer_types=["mamba", "attention"],
            **_MAMBA,
        ),
        "GatedMLP",
    ),
    # Llama 4: MoE layers (a shared expert beside), qk norms without a weight; NanoChat: norms without a weight
    "llama4": (
        _decoder("Llama4ForCausalLM", "Llama4TextConfig", head_dim=8, num_local_experts=4, **_EAGER_EXPERTS),
        "GatedMLP",
    ),
    "nanochat": (_decoder("NanoChatForCausalLM", "NanoChatConfig"), "LinearAct"),
    # Llama's form, its norms named otherwise: Apertus's (its xIELU no activation of ours), VaultGemma's
    "apertus": (_decoder("ApertusForCausalLM", "ApertusConfig"), None),
    "vaultgemma": (_decoder("VaultGemmaForCausalLM", "VaultGemmaConfig", head_dim=8), "GatedMLP"),
    "smollm3": (_decoder("SmolLM3ForCausalLM", "SmolLM3Config"), "GatedMLP"),
    "olmo": (_decoder("OlmoForCausalLM", "OlmoConfig", clip_qkv=1.0), "GatedMLP"),  # parameterless LayerNorms
    "olmo2": (_decoder("Olmo2ForCausalLM", "Olmo2Config"), "GatedMLP"),
    "glm": (_decoder("GlmForCausalLM", "GlmConfig", head_dim=8), "GatedMLP"),
    "glm4": (_decoder("Glm4ForCausalLM", "Glm4Config", head_dim=8), "GatedMLP"),
    "stablelm": (_decoder("StableLmForCausalLM", "StableLmConfig"), "GatedMLP"),
    # partial rotary embeddings (theirs kept), LayerNorms, GELU MLPs
    "gpt_neox": (_decoder("GPTNeoXForCausalLM", "GPTNeoXConfig"), "LinearAct"),
    "phi": (_decoder("PhiForCausalLM", "PhiConfig"), "LinearAct"),
    # more MoE models: DeepSeek-V3's first layer dense, GLM-4-MoE's too; gpt-oss has no dense MLP
    "deepseek_v3": (
        _decoder(
            "DeepseekV3ForCausalLM",
            "DeepseekV3Config",
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            first_k_dense_replace=1,
            kv_lora_rank=8,
            q_lora_rank=8,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
            n_group=1,
            topk_group=1,
            **_EAGER_EXPERTS,
        ),
        "GatedMLP",
    ),
    "glm4_moe": (
        _decoder(
            "Glm4MoeForCausalLM",
            "Glm4MoeConfig",
            head_dim=8,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            **_EAGER_EXPERTS,
        ),
        "GatedMLP",
    ),
    "gpt_oss": (
        _decoder(
            "GptOssForCausalLM",
            "GptOssConfig",
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            layer_types=["full_attention", "sliding_attention"],
            **_EAGER_EXPERTS,
        ),
        None,
    ),
    # vision-language models, given text alone: the language model and the vision tower's MLPs
    "qwen2_vl": (_vision_language("qwen2_vl"), ("GatedMLP", "LinearAct")),
    "qwen2_5_vl": (_vision_language("qwen2_5_vl"), ("GatedMLP", "LinearAct")),
    "qwen3_vl": (_vision_language("qwen3_vl"), ("GatedMLP", "LinearAct")),
    "gemma3_vl": (_vision_language("gemma3"), ("GatedMLP", "LinearAct")),
    "gemma4_vl": (_scaled_layers(_vision_language("gemma4")), ("GatedMLP", "LinearAct")),
    # models patch has no entry of its own for: their classes' code is that of classes read (transformers' copies)
    "olmo3": (_decoder("Olmo3ForCausalLM", "Olmo3Config", head_dim=8), "GatedMLP"),
    "exaone4": (_decoder("Exaone4ForCausalLM", "Exaone4Config", head_dim=8), "GatedMLP"),
    "helium": (_decoder("HeliumForCausalLM", "HeliumConfig", head_dim=8), "GatedMLP"),  # OLMo 2's norm
    # short convolutions and attention; its MLP calls F.silu (no activation module: its gating apart)
    "lfm2": (_decoder("Lfm2ForCausalLM", "Lfm2Config", head_dim=8, layer_types=["conv", "full_attention"]), None),
    "hunyuan_v1_dense": (_decoder("HunYuanDenseV1ForCausalLM", "HunYuanDenseV1Config", head_dim=8), "GatedMLP"),
    # its MLP's dropout after down_proj: not Llama's MLP (gate_proj fused with its activation)
    "seed_oss": (
        _decoder("SeedOssForCausalLM", "SeedOssConfig", head_dim=8, residual_dropout=0.0, attention_dropout=0.0),
        "LinearAct",
    ),
    "starcoder2": (_decoder("Starcoder2ForCausalLM", "Starcoder2Config", head_dim=8), "LinearAct"),
    # layer norms without a bias, attention and MLP in parallel, interleaved rotary pairs, scaled logits (Command R)
    "cohere": (_decoder("CohereForCausalLM", "CohereConfig"), "GatedMLP"),
    "cohere2": (_decoder("Cohere2ForCausalLM", "Cohere2Config", head_dim=8), "GatedMLP"),  # Command R7B, Command A
    # other activations in the same classes: geglu's erf form; relu, which has no gated op (fused with gate_proj)
    "llama-gelu": (_decoder("LlamaForCausalLM", "LlamaConfig", hidden_act="gelu"), "GatedMLP"),
    "llama-relu": (_decoder("LlamaForCausalLM", "LlamaConfig", hidden_act="relu"), "LinearAct"),
}
CAUSAL = [name for name in MODELS if name != "vit"]
# their attention reads no apply_rotary_pos_emb (GPT-2, BERT, ViT, OPT; Llama 4 rotates by complex products of
# its own), or one that computes none of ours (NanoChat's, left with the probe's error). The others' attentions call
# ours: Llama's halves, GLM's and GLM-4's interleaved pairs of cos's first half, gpt-oss's halves of a half's cos; a
# partial rotation (GPT-NeoX's, GLM's, GLM-4-MoE's inside theirs; Phi's and StableLM's rotary parts apart)
# too. DeepSeek-V3's interleaved path calls its own.
NO_ROPE = ("gpt2", "bert", "vit", "opt", "llama4", "nanochat")
ROPE = [name for name in MODELS if name not in NO_ROPE]


def _build(name: str, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name][0]().to(dtype)


def _batch(name: str, dtype=torch.float32) -> dict:
    generator = torch.Generator().manual_seed(1)
    if name == "vit":
        return dict(
            pixel_values=torch.randn(BATCH, 3, 8, 8, generator=generator, dtype=dtype),
            labels=torch.randint(0, 3, (BATCH,), generator=generator),
        )
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    labels = ids.clone()
    labels[0, :2] = -100
    return dict(input_ids=ids, labels=labels)


def _without_labels(batch: dict) -> dict:
    return {key: value for key, value in batch.items() if key != "labels"}


def _reference_loss(name: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss each model computes, in the logits' dtype (transformers' own is fp32)."""
    if name == "vit":
        return F.cross_entropy(logits, labels)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def _step(model: nn.Module, batch: dict, objective=None):
    """(loss, logits, {parameter name: gradient}) of one forward and backward."""
    model.zero_grad()
    out = model(**batch) if objective is None else model(**_without_labels(batch))
    loss = out.loss if objective is None else objective(out.logits)
    loss.backward()
    return loss.detach(), out.logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _is_norm(module: nn.Module) -> bool:
    return type(module) is nn.LayerNorm or type(module).__name__.endswith(
        ("RMSNorm", "L2Norm", "CohereLayerNorm", "Cohere2LayerNorm", "OlmoLayerNorm")  # L2Norm: Llama 4's in 5.17
    )


def _is_activation(module: nn.Module) -> bool:
    return type(module).__module__ == activations.__name__ or type(module) in (nn.ReLU, nn.GELU, nn.SiLU)


@pytest.mark.parametrize("name", MODELS)
def test_report_lists_every_norm_mlp_activation_and_the_loss(name):
    original = _build(name)
    model = copy.deepcopy(original)
    report = gk.patch(model)
    swapped = {row[0]: row for row in report.swapped}
    norms = [n for n, m in original.named_modules() if _is_norm(m)]
    assert norms and all(n in swapped for n in norms)
    acts = [n for n, m in original.named_modules() if _is_activation(m)]
    experts = [n for n in acts if ".experts." in n]  # batched products per expert: nothing of ours to fuse with
    not_ours = [n for n in acts if gk_patch._activation(original.get_submodule(n))[0] is None]
    mamba = [n for n in acts if ".mamba." in n]  # Granite 4's Mamba layer's, which its forward calls as a function
    acts = [n for n in acts if n not in experts + not_ours + mamba]
    expected = MODELS[name][1]
    assert acts or expected is None
    kinds = expected if isinstance(expected, tuple) else (expected,)
    for act in acts:
        parent = act.rpartition(".")[0]
        if "GatedMLP" in kinds and swapped.get(parent, (None,) * 3)[2] == "GatedMLP":
            # the activation now runs inside the MLP's gated op
            assert type(model.get_submodule(act)) is type(original.get_submodule(act))
        else:  # the Linear feeding it became a LinearAct; the activation a FusedActivation
            assert "LinearAct" in kinds
            assert type(model.get_submodule(act)) is gk.nn.FusedActivation
            assert any(row[2] == "LinearAct" and row[0].startswith(parent) for row in report.swapped)
    counts = report.counts
    assert sum(counts.get(kind, 0) for kind in kinds) == len(acts)
    # the language model's attentions (not a vision tower's)
    attentions = [
        n
        for n, m in original.named_modules()
        if type(m).__name__.endswith("Attention") and "Vision" not in type(m).__name__ and "vision_tower" not in n
    ]
    if name in ROPE:  # each attention's rotary embedding; its norms (Qwen3's q_norm, k_norm) swapped as any
        assert attentions and all(swapped[n][2] == "RoPE" for n in attentions)
        assert counts["RoPE"] == len(attentions)
    else:
        assert "RoPE" not in counts
    assert counts.get("LayerNorm", 0) + counts.get("RMSNorm", 0) == len(norms)
    if name in CAUSAL:
        assert swapped["loss_function"] == ("loss_function", "ForCausalLMLoss", "CrossEntropyLoss")
    else:
        assert (
            "loss_function",
            type(original).__name__,
            "not one of the causal LMs whose loss patch swaps",
        ) in report.left
    if name == "llama-relu":  # no gated op for relu: the MLP stays and its gate_proj fuses with the ReLU
        assert [why for n, _, why in report.left if n == "model.layers.0.mlp"] == ["act_fn is relu: no gated op for it"]
        assert swapped["model.layers.0.mlp.gate_proj"][1:] == ("Linear+ReLU", "LinearAct")
    # every module left has its reason; those inside an attention block, that its forward did not trace
    left = {n: why for n, _, why in report.left}
    assert all(left.values()) and all(left.get(n) for n in experts + not_ours + mamba)
    attention_maps = [
        n for n in left if n.endswith(("q_proj", "q_a_proj", "qkv_proj", "query", "c_attn", "query_key_value"))
    ]
    assert attention_maps and all("did not trace (" in left[n] for n in attention_maps)
    assert f"swapped {len(report.swapped)} module(s) ({', '.join(f'{k} {v}' for k, v in counts.items())})" in str(
        report
    )


@pytest.mark.parametrize("name", MODELS)
def test_outputs_and_gradients_match_the_unpatched_model_fp32(name):
    original = _build(name)
    reference = copy.deepcopy(original).double()
    model = copy.deepcopy(original)
    gk.patch(model)
    batch = _batch(name)
    loss, logits, grads = _step(model, batch)
    loss_theirs, logits_theirs, grads_theirs = _step(original, batch)
    loss_ref, logits_ref, grads_ref = _step(
        reference, _batch(name, torch.float64), lambda out: _reference_loss(name, out, batch["labels"])
    )
    assert loss.dtype == loss_theirs.dtype == torch.float32
    assert_matches(loss, loss_theirs, loss_ref)
    assert_matches(logits, logits_theirs, logits_ref)
    assert grads.keys() == grads_theirs.keys()
    for key in grads:
        assert_matches(grads[key], grads_theirs[key], grads_ref[key])


def _norms_in_fp64(model: nn.Module) -> nn.Module:
    """``model`` with its transformers RMSNorms (and Cohere's LayerNorms) computing in the
    input's dtype: they compute in fp32 whatever the input (``hidden_states.to(torch.float32)``),
    so the fp64 model is not an fp64 reference until they do not."""
    for module in model.modules():
        if type(module).__name__ in ("CohereLayerNorm", "Cohere2LayerNorm"):
            module.forward = lambda x, m=module: F.layer_norm(x, m.weight.shape, m.weight, None, m.variance_epsilon)
        elif type(module).__name__ in (
            "GemmaRMSNorm",
            "Gemma2RMSNorm",
            "Gemma3RMSNorm",
            "Qwen3_5RMSNorm",
            "Qwen3NextRMSNorm",
            "VaultGemmaRMSNorm",
        ):
            module.forward = lambda x, m=module: (
                x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.eps) * (1 + m.weight)
            )
        elif type(module).__name__ in ("Qwen3_5RMSNormGated", "Qwen3NextRMSNormGated"):
            module.forward = lambda x, gate, m=module: (
                m.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon) * F.silu(gate)
            )
        elif type(module).__name__.endswith(("RMSNorm", "L2Norm")):  # Gemma 4's weight optional; Llama 4's qk norms
            eps = vars(module).get("variance_epsilon", vars(module).get("eps"))  # Gemma 4's, Llama 4's in 5.17: eps
            module.forward = lambda x, m=module, eps=eps: (
                getattr(m, "weight", 1.0) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            )
    return model


@contextlib.contextmanager
def _rotary_in_fp64(model: nn.Module):
    """Cohere's apply_rotary_pos_emb computes in fp32 whatever its input (``q.float()``): for the
    fp64 reference, its formula (interleaved pairs) in the input's dtype while the block runs."""
    module = sys.modules[type(model).__module__]
    if type(model).__name__ != "CohereForCausalLM":
        yield
        return
    theirs = module.apply_rotary_pos_emb
    form = gk_patch._RopeForm(interleaved=True)
    module.apply_rotary_pos_emb = lambda q, k, cos, sin, unsqueeze_dim=1: gk_patch._rope_math(
        q, k, cos, sin, unsqueeze_dim, form
    )
    try:
        yield
    finally:
        module.apply_rotary_pos_emb = theirs


@pytest.mark.parametrize("name", MODELS)
def test_outputs_and_gradients_match_the_unpatched_model_fp64(name):
    _assert_patched_matches_fp64(_build(name, torch.float64), _batch(name, torch.float64))


def _assert_patched_matches_fp64(original: nn.Module, batch: dict) -> gk.PatchReport:
    """``original`` (fp64) patched: the logits and gradients of the unpatched model, or as close to
    an exact reference (its norms and rotary embedding in fp64) as those. Returns patch's report."""
    model = copy.deepcopy(original)
    report = gk.patch(model)
    reference = _norms_in_fp64(copy.deepcopy(original))
    # transformers computes its losses in fp32 even for fp64 logits: a probe of the logits in fp64 instead
    weights = torch.randn_like(original(**_without_labels(batch)).logits)
    ours, theirs = (_step(m, batch, lambda out: (out * weights).sum()) for m in (model, original))
    with _rotary_in_fp64(original):
        exact = _step(reference, batch, lambda out: (out * weights).sum())
    assert_matches(ours[1], theirs[1], exact[1])
    assert ours[2].keys() == theirs[2].keys()
    for key in ours[2]:
        assert_matches(ours[2][key], theirs[2][key], exact[2][key])
    return report


@pytest.mark.parametrize("name", ["gpt2", "gemma", "phi3"])
def test_outputs_and_gradients_bf16_as_close_to_fp64_as_the_unpatched_model(name):
    original = _build(name, torch.bfloat16)
    model = copy.deepcopy(original)
    gk.patch(model)
    reference = _norms_in_fp64(copy.deepcopy(original).double())
    batch = _batch(name, torch.bfloat16)
    weights = torch.randn_like(original(**_without_labels(batch)).logits)
    ours, theirs, exact = (
        _step(m, batch, lambda out: (out * weights.to(out.dtype)).sum()) for m in (model, original, reference)
    )
    assert_matches(ours[1], theirs[1], exact[1])
    for key in ours[2]:
        assert_matches(ours[2][key], theirs[2][key], exact[2][key])


@pytest.mark.parametrize("name", ["gpt2", "vit", "gemma"])
def test_adamw_steps_track_the_unpatched_model(name):
    original = _build(name)
    model = copy.deepcopy(original)
    gk.patch(model)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (model, original)]
    batch = _batch(name)
    for _ in range(3):
        losses = []
        for m, optimizer in zip((model, original), optimizers):
            optimizer.zero_grad()
            loss = m(**batch).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # (not the parameters themselves: Adam scales a gradient that is zero but for rounding, such as
    # that of a key projection's bias, to a full step, whose sign is the rounding's)


# The norms patch returns the autocast dtype from under autocast (only its attention's or MLP's projections
# read their output), by the end of their names; none in the models not listed.
PRE_NORMS = ("input_layernorm", "post_attention_layernorm")
NORMS_FEEDING_MATMULS = {
    **{
        name: PRE_NORMS
        for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "smollm3", "glm", "glm4", "olmo")
    },
    **{name: PRE_NORMS for name in ("llama-gelu", "llama-relu")},
    "gemma2": ("input_layernorm", "pre_feedforward_layernorm"),
    **{name: ("input_layernorm", "pre_feedforward_layernorm") for name in ("gemma3", "gemma4", "gemma4_moe")},
    # its SigLIP vision tower's too (CLIP's form: Llama's, its norms layer_norm1 and layer_norm2)
    "gemma3_vl": ("input_layernorm", "pre_feedforward_layernorm", "layer_norm1", "layer_norm2"),
    "apertus": ("attention_layernorm", "feedforward_layernorm"),
    "vaultgemma": ("input_layernorm", "pre_feedforward_layernorm"),
    # the vision tower's attention reads its input through clippable linears (no nn.Linear): its MLP's norm alone
    "gemma4_vl": ("pre_feedforward_layernorm", *(f"language_model.layers.{i}.input_layernorm" for i in range(2))),
    "gpt2": ("ln_1", "ln_2"),
    "gpt_neox": PRE_NORMS,
    "stablelm": PRE_NORMS,
    **{name: ("input_layernorm",) for name in ("phi", "cohere", "cohere2")},  # one norm: to attention and MLP
}
# Blocks of one of the pre-norm forms not listed (Granite's scaled form too), by their children: at least the
# norm before an attention whose forward reads its input only by its projections and its shape (DeepSeek's
# latent attention too), and before an MLP that does, or whose code is a listed one's (the MoE models' dense
# layers, the VL models' text layers, not their experts): never another
NORMS_FEEDING_MATMULS_BY_CODE = {
    # the MoE MLP reads its input otherwise (and Granite 4's Mamba layer)
    **{name: ("input_layernorm",) for name in ("mixtral", "gpt_oss", "granitemoe", "granitemoeshared")},
    "granitemoehybrid": ("layers.1.input_layernorm",),
    "llama4": ("input_layernorm",),  # its MLP an MoE
    "nanochat": PRE_NORMS,
    **{name: ("input_layernorm", "layers.1.post_attention_layernorm") for name in ("qwen2_moe", "qwen3_moe")},
    **{name: ("input_layernorm", "layers.0.post_attention_layernorm") for name in ("deepseek_v3", "glm4_moe")},
    # the linear attention's input norm too (a Gated DeltaNet masks its padding, then projects); not Qwen3-Next's
    # MoE MLPs' norms
    "qwen3_5": PRE_NORMS,
    "qwen3_next": ("input_layernorm",),
    **{
        name: PRE_NORMS
        for name in (
            "qwen2_vl",
            "qwen2_5_vl",
            "qwen3_vl",
            "granite",
            "hunyuan_v1_dense",
            "seed_oss",
            "starcoder2",
            "helium",
        )
    },
}


def _named_by_their_end(model: nn.Module, ends: tuple[str, ...]) -> list[str]:
    ends = tuple(f".{end}" for end in ends)
    return [n for n, _ in model.named_modules() if ends and f".{n}".endswith(ends)]


def _autocast_logits_and_norm_dtypes(model: nn.Module, batch: dict, norms: list[str]):
    """The logits under CPU bf16 autocast, and the dtype each of ``norms`` returned."""
    dtypes = {}
    hooks = [
        model.get_submodule(name).register_forward_hook(
            lambda m, args, out, name=name: dtypes.update({name: out.dtype})
        )
        for name in norms
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(**_without_labels(batch)).logits
    for hook in hooks:
        hook.remove()
    return logits, dtypes


@pytest.mark.parametrize("name", CAUSAL)
def test_norms_feeding_only_matmuls_return_the_autocast_dtype_and_the_same_logits(name):
    """Their projections would have cast their fp32 output to bf16: the logits are bit for bit
    those of the same norms returning fp32."""
    model = _build(name)
    report = gk.patch(model)
    if name in NORMS_FEEDING_MATMULS_BY_CODE:
        expected = report.feeding_matmuls
        assert set(_named_by_their_end(model, NORMS_FEEDING_MATMULS_BY_CODE[name])) <= set(expected)
        assert set(expected) <= set(_named_by_their_end(model, PRE_NORMS))
    else:
        expected = _named_by_their_end(model, NORMS_FEEDING_MATMULS.get(name, ()))
        assert report.feeding_matmuls == expected
    assert not expected or f"{len(expected)} norm(s)" in str(report)
    if not expected:
        return
    batch = _batch(name)
    logits, dtypes = _autocast_logits_and_norm_dtypes(model, batch, expected)
    assert set(dtypes.values()) == {torch.bfloat16}
    for norm in expected:
        model.get_submodule(norm).feeds_matmuls = False
    logits_fp32_norms, dtypes = _autocast_logits_and_norm_dtypes(model, batch, expected)
    assert set(dtypes.values()) == {torch.float32}
    assert torch.equal(logits, logits_fp32_norms)
    gk.unpatch(model)
    assert not any("feeds_matmuls" in vars(m) for m in model.modules())


@pytest.mark.parametrize(
    "name, dtype",
    [
        *(("olmo2", torch.float32), ("gemma4", torch.float32), ("gemma4_moe", torch.float32)),
        *(("llama4", torch.float32), ("nanochat", torch.bfloat16), ("olmo", torch.bfloat16)),
    ],
)
def test_norms_rounding_back_to_their_input_dtype_return_it_under_autocast(name, dtype):
    """OLMo 2's and Gemma 4's RMSNorms, those without a weight (Llama 4's, NanoChat's) and OLMo's
    LayerNorm compute in fp32 and round back to
    their input's dtype, under autocast too (a bf16 q_norm of a bf16 projection; OLMo's final norm
    in a bf16 model, where the plain op would return fp32): ours return each the dtype theirs
    returns, but those feeding only matmuls."""
    original = _build(name, dtype)
    model = copy.deepcopy(original)
    feeding = gk.patch(model).feeding_matmuls
    norms = [n for n, m in original.named_modules() if _is_norm(m) and n not in feeding]
    batch = _batch(name)
    ours, dtypes = _autocast_logits_and_norm_dtypes(model, batch, norms)
    theirs, expected = _autocast_logits_and_norm_dtypes(original, batch, norms)
    assert torch.bfloat16 in expected.values() and dtypes == expected
    torch.testing.assert_close(ours, theirs, rtol=0.05, atol=0.05)


class _ReadsByProjections(nn.Module):
    def forward(self, hidden_states, mask=None):
        batch, time = hidden_states.shape[:-1]
        if mask is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_a(hidden_states) * mask
        hidden_states = self.k_proj(hidden_states)  # the name bound to another value: read no further
        return q + hidden_states.float()


def _with_forward(source: str) -> type:
    """A module class of this forward, its source readable by inspect (as a file's)."""
    filename = f"<forward {len(linecache.cache)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {}
    exec(compile(source, filename, "exec"), namespace)
    return type("Probe", (nn.Module,), {"forward": namespace["forward"]})


@pytest.mark.parametrize(
    "source",
    [
        "def forward(self, x):\n    return self.q_proj(x) + x",  # read otherwise
        "def forward(self, x):\n    return self.q_proj(x.to(torch.float32))",  # its dtype changed
        "def forward(self, x):\n    return self.q_proj(x, scale=2)",  # a call of more arguments
        "def forward(self, x):\n    return F.linear(x, self.weight)",  # not a child's call
        "def forward(self, x):\n    if x.dtype == torch.float32:\n        x = self.a(x)\n    return self.b(x)",
        "def forward(self, x):\n    x += 1\n    return self.q_proj(x)",
    ],
)
def test_children_reading_input_refuses_other_reads(source):
    assert gk_patch._children_reading_input(_with_forward(source)) is None
    read_by_one = "def forward(self, x):\n    return self.q_proj(x)"  # the same way of reading, accepted
    assert gk_patch._children_reading_input(_with_forward(read_by_one)) == ("q_proj",)


_MASK_PADDING = """
def mask_padding(hidden_states, attention_mask):
    if attention_mask is not None:
        dtype = hidden_states.dtype
        hidden_states = (hidden_states * attention_mask[:, :, None]).to(dtype)
    return hidden_states
"""


def test_children_reading_input_follows_it_through_a_padding_mask():
    """transformers' padding mask before a linear attention's projections (0/1 times the input, in
    its dtype) leaves the input's values: its projections read it; a mask of other values does not."""
    forward = "def forward(self, x, mask=None):\n    x = mask_padding(x, mask)\n    return self.q(x) + self.k(x)\n"
    assert gk_patch._children_reading_input(_with_forward(_MASK_PADDING + forward)) == ("k", "q")
    scaled = _MASK_PADDING.replace("[:, :, None])", "[:, :, None] * 2)")
    assert gk_patch._children_reading_input(_with_forward(scaled + forward)) is None
    assert (
        gk_patch._children_reading_input(_with_forward(_MASK_PADDING + forward.replace("(x, mask)", "(mask, x)")))
        is None
    )


@pytest.mark.parametrize("name", ["qwen3_5", "qwen3_next"])
def test_linear_attention_input_norms_feed_their_projections_on_padded_batches(name):
    """A hybrid layer's linear attention zeroes padded positions before its projections: under
    autocast, with a padded batch, the same logits whether its input norm returns bf16 or fp32."""
    model = _build(name)
    feeding = gk.patch(model).feeding_matmuls
    norms = [n for n in feeding if model.get_submodule(n.rsplit(".", 1)[0]).block_type == "linear_attention"]
    assert norms
    batch = _without_labels(_batch(name))
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["attention_mask"][0, :3] = 0  # left padding
    logits = []
    for feeds in (True, False):
        for norm in norms:
            model.get_submodule(norm).feeds_matmuls = feeds
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits.append(model(**batch).logits)
    assert torch.equal(*logits)


def test_children_reading_input_follows_the_input_to_projections():
    """The projections a forward hands its input to (branches too), its shape read besides, up
    to the statement that binds its name to another value; the instance's children must be
    linear layers without hooks, a branch's child that is None (or absent) never runs."""
    assert gk_patch._children_reading_input(_ReadsByProjections) == ("k_proj", "q_a", "q_proj")
    module = _ReadsByProjections()
    module.q_proj, module.k_proj, module.q_a = nn.Linear(4, 4), nn.Linear(4, 4), None
    assert gk_patch._matmuls_read_input(module)
    module.q_a = nn.Sequential(nn.Linear(4, 4))
    assert not gk_patch._matmuls_read_input(module)
    module.q_a = nn.Linear(4, 4)
    handle = module.k_proj.register_forward_pre_hook(lambda *args: None)
    assert not gk_patch._matmuls_read_input(module)
    handle.remove()
    assert gk_patch._matmuls_read_input(module)


# the models whose blocks patch converts to add the attention's output and normalise the sum in one op (BERT:
# each residual addition and the LayerNorm after it)
ADD_NORM_MODELS = {
    "bert": ("BertSelfOutput", "BertOutput"),
    "vit": ("ViTLayer",),
    "gemma4_vl": ("Gemma4TextDecoderLayer", "Gemma4VisionEncoderLayer"),  # the vision tower's too
    "gemma3_vl": ("Gemma3DecoderLayer", "SiglipEncoderLayer"),  # its SigLIP vision tower's too
    **{
        name: (block,)
        for name, block in (
            ("llama", "LlamaDecoderLayer"),
            ("mistral", "MistralDecoderLayer"),
            ("mixtral", "MixtralDecoderLayer"),
            ("qwen2", "Qwen2DecoderLayer"),
            ("qwen2_moe", "Qwen2MoeDecoderLayer"),
            ("qwen3", "Qwen3DecoderLayer"),
            ("qwen3_moe", "Qwen3MoeDecoderLayer"),
            ("gemma", "GemmaDecoderLayer"),
            ("gemma2", "Gemma2DecoderLayer"),
            ("gemma3", "Gemma3DecoderLayer"),
            ("phi3", "Phi3DecoderLayer"),
            ("granite", "GraniteDecoderLayer"),
            ("granitemoe", "GraniteMoeDecoderLayer"),
            ("granitemoeshared", "GraniteMoeSharedDecoderLayer"),
            ("granitemoehybrid", "GraniteMoeHybridDecoderLayer"),
            ("llama4", "Llama4TextDecoderLayer"),
            ("nanochat", "NanoChatDecoderLayer"),
            ("apertus", "ApertusDecoderLayer"),
            ("vaultgemma", "VaultGemmaDecoderLayer"),  # its Mamba layer's and its attention's
            ("smollm3", "SmolLM3DecoderLayer"),
            ("glm", "GlmDecoderLayer"),
            ("glm4", "Glm4DecoderLayer"),
            ("deepseek_v3", "DeepseekV3DecoderLayer"),
            ("glm4_moe", "Glm4MoeDecoderLayer"),
            ("gpt_oss", "GptOssDecoderLayer"),
            ("qwen2_vl", "Qwen2VLDecoderLayer"),
            ("qwen2_5_vl", "Qwen2_5_VLDecoderLayer"),
            ("qwen3_vl", "Qwen3VLTextDecoderLayer"),
            ("hunyuan_v1_dense", "HunYuanDenseV1DecoderLayer"),
            ("seed_oss", "SeedOssDecoderLayer"),
            ("starcoder2", "Starcoder2DecoderLayer"),
            ("gpt2", "GPT2Block"),
            ("gemma4", "Gemma4TextDecoderLayer"),
            ("gemma4_moe", "Gemma4TextDecoderLayer"),
            ("stablelm", "StableLmDecoderLayer"),
            ("qwen3_5", "Qwen3_5DecoderLayer"),
            ("qwen3_next", "Qwen3NextDecoderLayer"),
            ("llama-gelu", "LlamaDecoderLayer"),
            ("llama-relu", "LlamaDecoderLayer"),
            ("olmo", "OlmoDecoderLayer"),
            ("olmo2", "Olmo2DecoderLayer"),  # post-norm: each norm and the addition after it (POST_NORMS)
            ("olmo3", "Olmo3DecoderLayer"),
            ("exaone4", "Exaone4DecoderLayer"),
            ("lfm2", "Lfm2DecoderLayer"),  # its short convolution's layer and its attention's
            ("helium", "HeliumDecoderLayer"),
        )
    },
}
# the models whose blocks normalise a branch's output and add it to the residual stream in one op: those norms
POST_NORMS = {
    **dict.fromkeys(["olmo2", "olmo3", "exaone4"], ("post_attention_layernorm", "post_feedforward_layernorm")),
    **dict.fromkeys(["gemma2", "gemma3", "gemma3_vl"], ("post_feedforward_layernorm",)),
    **dict.fromkeys(["gemma4", "gemma4_moe", "gemma4_vl"], ("post_feedforward_layernorm", "post_per_layer_input_norm")),
    "glm4": ("post_mlp_layernorm",),
}


def _count_add_norms(monkeypatch) -> list:
    """The norm's class of each ``_add_then_norm`` call from now on."""
    return record_calls(monkeypatch, gk_patch, "_add_then_norm", lambda norm, *rest: type(norm))


@pytest.mark.parametrize("name", MODELS)
def test_pre_norm_blocks_add_and_normalise_in_one_op(name, monkeypatch):
    """Every block of the models read (and only theirs) converted, each calling its norm with
    the residual once a forward: our norms, which take it."""
    original = _build(name)
    model = copy.deepcopy(original)
    report = gk.patch(model)
    blocks = [n for n, m in original.named_modules() if type(m).__name__ in ADD_NORM_MODELS.get(name, ())]
    assert [n for n, _, kind in report.swapped if kind == "ResidualNorm"] == blocks
    calls = _count_add_norms(monkeypatch)
    model(**_without_labels(_batch(name)))
    post_norm_form = "post_attention_layernorm" in POST_NORMS.get(name, ())  # no residual added before a norm
    assert len(calls) == (0 if post_norm_form else len([n for n in blocks if "vision_tower" not in n]))  # text alone
    ours = (*gk_patch._RMS_NORMS, gk_patch._olmo_layer_norm_forward)
    assert all(cls.__dict__.get("forward") in ours or cls is gk.nn.LayerNorm for cls in calls)


@pytest.mark.parametrize("name", POST_NORMS)
def test_norms_after_a_branch_and_their_residual_additions_in_one_op(name, monkeypatch):
    """Each norm of a block's branch output (each ``POST_NORMS`` norm the block has, in order) and
    the residual addition after it: one ``rms_norm_add`` call, with the norm's residual."""
    model = _build(name)
    gk.patch(model)
    blocks = [m for n, m in model.named_modules() if type(m).__name__ in ADD_NORM_MODELS[name] and "vision" not in n]
    expected = [getattr(b, norm) for b in blocks for norm in POST_NORMS[name] if hasattr(b, norm)]
    norms = record_calls(monkeypatch, gk_patch, "_norm_then_add", lambda norm, *rest: norm)
    fused, rms_norm_add = [], gk_patch.rms_norm_add
    monkeypatch.setattr(gk_patch, "rms_norm_add", lambda *a, **k: fused.append(a[1]) or rms_norm_add(*a, **k))
    model(**_without_labels(_batch(name)))
    assert expected and len(norms) == len(expected) and all(a is b for a, b in zip(norms, expected))
    assert len(fused) == len(expected)


# the MoE models whose experts gate through transformers' default ``_apply_gate`` (gpt-oss has its own), and
# their activation
GATED_EXPERTS_MODELS = {
    **dict.fromkeys(["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "glm4_moe"], "silu"),
    "gemma4_moe": "gelu_tanh",
}


def _count_gatings(monkeypatch) -> list:
    """``(up, activation)`` of each ``_gated`` call from now on."""
    return record_calls(monkeypatch, gk_patch, "_gated", lambda gate, *rest: rest)


@pytest.mark.parametrize("name", GATED_EXPERTS_MODELS)
def test_moe_experts_gate_in_one_op_under_batched_mm(name, monkeypatch):
    """Under ``batched_mm`` each experts module's gating (``act_fn(gate) * up`` of the up projection's
    halves) is ours, once a forward, packed: the logits and gradients of the model unpatched, in
    fp64 (as ``test_outputs_and_gradients_match_the_unpatched_model_fp64``)."""
    original = _build(name, torch.float64)
    original.set_experts_implementation("batched_mm")
    model = copy.deepcopy(original)
    report = gk.patch(model)
    experts = [n for n, m in original.named_modules() if gk_patch._gates_by_default(type(m))]
    assert experts and [n for n, _, kind in report.swapped if kind == "GatedExperts"] == experts
    reference = _norms_in_fp64(copy.deepcopy(original))
    batch = _batch(name, torch.float64)
    weights = torch.randn_like(original(**_without_labels(batch)).logits)
    calls = _count_gatings(monkeypatch)
    ours, theirs, exact = (_step(m, batch, lambda out: (out * weights).sum()) for m in (model, original, reference))
    assert calls.count((None, GATED_EXPERTS_MODELS[name])) == len(experts)
    assert_matches(ours[1], theirs[1], exact[1])
    for key in ours[2]:
        assert_matches(ours[2][key], theirs[2][key], exact[2][key])


def test_mlps_calling_silu_themselves_gate_in_one_op(monkeypatch):
    """LFM2's MLP, ``w2(F.silu(w1(x)) * w3(x))``, has no activation module: its gating is ours, once a layer."""
    model = _build("lfm2")
    assert gk.patch(model).counts["GatedMLP"] == len(model.model.layers)
    calls = _count_gatings(monkeypatch)
    model(**_without_labels(_batch("lfm2")))
    assert [activation for _, activation in calls] == ["silu"] * len(model.model.layers)


def test_moe_experts_gate_in_one_op_under_grouped_mm():
    """transformers' default implementation (``grouped_mm``, fp32 at most): as the model unpatched."""
    original = _build("mixtral")
    original.set_experts_implementation("grouped_mm")
    model = copy.deepcopy(original)
    assert gk.patch(model).counts["GatedExperts"] == 2
    loss, logits, grads = _step(model, _batch("mixtral"))
    expected = _step(original, _batch("mixtral"))
    torch.testing.assert_close(loss, expected[0])
    torch.testing.assert_close(logits, expected[1])
    for key in grads:
        torch.testing.assert_close(grads[key], expected[2][key], rtol=1e-4, atol=1e-6)


def test_moe_experts_are_left_where_their_gating_is_not_ours_to_take():
    """The eager implementation gates inline (ours would never run: left, saying so), experts
    without a gate never call ``_apply_gate``, and one whose activation has a hook keeps it."""
    model = _build("mixtral")  # the zoo's experts are eager
    left = {n: why for n, _, why in gk.patch(model).left}
    assert "experts_implementation is 'eager'" in left["model.layers.0.mlp.experts"]
    model = _build("mixtral")
    model.set_experts_implementation("batched_mm")
    model.model.layers[0].mlp.experts.has_gate = False
    model.model.layers[1].mlp.experts.act_fn.register_forward_hook(lambda *args: None)
    report = gk.patch(model)
    left = {n: why for n, _, why in report.left}
    assert "GatedExperts" not in report.counts
    assert "have no gate (has_gate is False)" in left["model.layers.0.mlp.experts"]
    assert "act_fn has hooks" in left["model.layers.1.mlp.experts"]


def test_residual_norms_false_leaves_the_blocks(monkeypatch):
    model = _build("llama")
    report = gk.patch(model, residual_norms=False)
    assert "ResidualNorm" not in report.counts and report.counts["RMSNorm"]
    calls = _count_add_norms(monkeypatch)
    model(**_without_labels(_batch("llama")))
    assert not calls
    with pytest.raises(gk.ArgumentTypeError, match="residual_norms must be a bool"):
        gk.patch(_build("llama"), residual_norms=1)


def _hook_norms(model: nn.Module, names: list[str]) -> list:
    """A forward hook on each of ``names``, which keeps its block's addition and norm apart."""
    return [model.get_submodule(n).register_forward_hook(lambda *args: None) for n in names]


@pytest.mark.parametrize(
    "name",
    [
        *("llama", "qwen3", "gemma", "gemma2", "glm4", "phi3", "granite", "granitemoeshared", "granitemoehybrid"),
        *("llama4", "nanochat", "apertus", "vaultgemma", "gpt_oss", "gpt2", "bert", "vit"),
    ],
)
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_blocks_give_the_logits_of_the_addition_and_norm_apart(name, autocast):
    """The one op's forward is the norm of the sum PyTorch's addition rounds: the same logits bit for
    bit (fp32, and under bf16 autocast: the sum fp32, the norm's output bf16) as with each block's
    norm hooked, which keeps the addition apart; gradients within fp32's tolerance."""
    model = _build(name)
    gk.patch(model)
    batch = _batch(name)
    # the norms that take the residual (Gemma 2's post_attention_layernorm does not)
    fused = (
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        ".feedforward_layernorm",
        "ln_2",
        "output.LayerNorm",
    )
    fused += ("layernorm_after",)
    norms = [n for n, m in model.named_modules() if n.endswith(fused)]
    assert len(norms) >= len(ADD_NORM_MODELS[name]) * 2  # each block's (of 2)
    results = []
    for hooked in (False, True):
        hooks = _hook_norms(model, norms) if hooked else []
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            results.append(_step(model, batch, lambda out: out.float().sum()))
        for hook in hooks:
            hook.remove()
    (_, fused_logits, fused_grads), (_, logits, grads) = results
    assert torch.equal(fused_logits, logits)
    for key in grads:
        torch.testing.assert_close(fused_grads[key], grads[key], rtol=1e-2 if autocast else 1e-4, atol=1e-5)


def _dual_encoder(kind: str, dtype=torch.float32) -> nn.Module:
    """A tiny CLIP or SigLIP: a text and a vision tower of two layers each."""
    tower = dict(hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    model, config = {"clip": ("CLIPModel", "CLIPConfig"), "siglip": ("SiglipModel", "SiglipConfig")}[kind]
    torch.manual_seed(0)
    config = getattr(transformers, config)(
        text_config=tower | dict(vocab_size=VOCAB, max_position_embeddings=SEQ, bos_token_id=0, eos_token_id=1),
        vision_config=tower | dict(image_size=8, patch_size=4),
    )
    return getattr(transformers, model)(config).to(dtype)


def _image_text_batch(dtype=torch.float32) -> dict:
    generator = torch.Generator().manual_seed(1)
    return dict(
        input_ids=torch.randint(2, VOCAB, (BATCH, SEQ), generator=generator),
        pixel_values=torch.randn(BATCH, 3, 8, 8, generator=generator, dtype=dtype),
        return_loss=True,
    )


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_clip_and_siglip_encoder_layers_add_and_normalise_in_one_op(kind, monkeypatch):
    """CLIP's and SigLIP's encoder layers (text and vision towers; SigLIP's is the vision tower of
    PaliGemma, Gemma 3, Idefics 3) are Llama's form with their norms named ``layer_norm1`` and
    ``layer_norm2``: each converted, its residual addition and ``layer_norm2`` one op a forward; the
    contrastive loss and gradients of the unpatched model in fp64; under bf16 autocast the logits
    bit for bit those of the addition and norm apart (hooked)."""
    original = _dual_encoder(kind, torch.float64)
    model = copy.deepcopy(original)
    report = gk.patch(model)
    layers = [n for n, m in original.named_modules() if type(m).__name__.endswith("EncoderLayer")]
    assert len(layers) == 4 and [n for n, _, kind in report.swapped if kind == "ResidualNorm"] == layers

    def step(model):
        loss = model(**_image_text_batch(torch.float64)).loss
        loss.backward()
        return loss, {n: p.grad for n, p in model.named_parameters()}

    calls = _count_add_norms(monkeypatch)
    (loss, grads), (expected_loss, expected_grads) = step(model), step(original)
    assert calls == [gk.nn.LayerNorm] * 4
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-12)
    for key in expected_grads:
        torch.testing.assert_close(grads[key], expected_grads[key], rtol=1e-10, atol=1e-12)
    model = _dual_encoder(kind)
    gk.patch(model)
    norms = [f"{n}.layer_norm2" for n in layers]
    results = []
    for hooked in (False, True):
        hooks = _hook_norms(model, norms) if hooked else []
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(model(**_image_text_batch()).logits_per_image)
        for hook in hooks:
            hook.remove()
    assert torch.equal(*results)


# Decoder layers of more forms (beside layers of other kinds, left): (builder, the layers converted)
MORE_LAYER_FORMS = {
    # Llama 3.2 Vision's text model: its self-attention layers Llama's form (the attention's weights named, never
    # read), its cross-attention layers left
    "mllama": (lambda: _decoder("MllamaForCausalLM", "MllamaTextConfig", cross_attention_layers=[1])(), (0,)),
    # Jamba's attention layers: Llama's form of other names (pre_ff_layernorm, feed_forward: an MoE here); its
    # Mamba layers left
    "jamba": (lambda: FUSED_LOSS_MODELS["jamba"](), (1,)),
    "minicpm3": (lambda: FUSED_LOSS_MODELS["minicpm3"](), (0, 1)),  # Granite's, scaled by its residual_scale
    # Falcon-H1's: its Mamba layer and its attention side by side, each scaled
    "falcon_h1": (lambda: FUSED_LOSS_MODELS["falcon_h1"](), (0, 1)),
    # HyperCLOVA X's Peri-LN: each branch normalised, then scaled as Granite's
    "hyperclovax": (lambda: _decoder("HyperCLOVAXForCausalLM", "HyperCLOVAXConfig", residual_multiplier=0.5)(), (0, 1)),
}


@pytest.mark.parametrize("name", MORE_LAYER_FORMS)
def test_more_decoder_layer_forms_add_and_normalise_in_one_op(name):
    """Each converted, its residual addition and the norm after it in one op: the logits and gradients
    of the model as written (fp64)."""
    build, layers = MORE_LAYER_FORMS[name]
    torch.manual_seed(0)
    report = _assert_patched_matches_fp64(build().double(), _batch(name, torch.float64))
    assert [n for n, _, kind in report.swapped if kind == "ResidualNorm"] == [f"model.layers.{i}" for i in layers]


def _nomic_bert(dropout: float = 0.0) -> nn.Module:
    config = transformers.NomicBertConfig(**_DECODER | dict(head_dim=8, hidden_dropout_prob=dropout))
    torch.manual_seed(0)
    return transformers.NomicBertModel(config)


def test_nomic_bert_layers_add_and_normalise_in_one_op(monkeypatch):
    """NomicBERT's layers (GTE's, Jina v3's: post-norm as BERT's, a dropout on each branch): each
    residual addition and the LayerNorm after it one op, the output and gradients of the model as
    written (fp64); in training the dropouts' masks drawn as the layers as written draw them."""
    original = _nomic_bert().double()
    model = copy.deepcopy(original)
    assert gk.patch(model).counts["ResidualNorm"] == 2
    ids = _batch("nomic_bert")["input_ids"]
    calls = _count_add_norms(monkeypatch)
    outputs = [m(input_ids=ids).last_hidden_state for m in (model, original)]
    assert calls == [gk.nn.LayerNorm] * 4
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(outputs[0])
    grads = [torch.autograd.grad((out * weights).sum(), m.parameters()) for out, m in zip(outputs, (model, original))]
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    results = []
    for residual_norms, seed in ((True, 0), (False, 0), (True, 1)):
        model = _nomic_bert(dropout=0.3)
        gk.patch(model, residual_norms=residual_norms)
        torch.manual_seed(seed)
        results.append(model(input_ids=ids).last_hidden_state)
    assert torch.equal(results[0], results[1]) and not torch.equal(results[0], results[2])


class _PaddleOcrVisionLayers(nn.Module):
    """Two of PaddleOCR-VL's vision encoder layers, called as its encoder calls them."""

    def __init__(self):
        super().__init__()
        from transformers.models.paddleocr_vl import modeling_paddleocr_vl

        config = transformers.PaddleOCRVisionConfig(
            hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
        )
        config._attn_implementation = "eager"
        self.layers = nn.ModuleList(modeling_paddleocr_vl.PaddleOCRVisionEncoderLayer(config) for _ in range(2))

    def forward(self, x, cu_seqlens, position_embeddings):
        for layer in self.layers:
            x = layer(x, cu_seqlens=cu_seqlens, position_embeddings=position_embeddings)
        return x


def test_vision_layers_passing_the_attention_its_input_by_position(monkeypatch):
    """PaddleOCR-VL's (and VideoLLaMA3's) vision layers, CLIP's form but for the attention's input
    given by position: converted, one op a layer, the attention given its input by position as
    before (a hook on it sees the same call), the output and gradients of the layers as written."""
    torch.manual_seed(0)
    original = _PaddleOcrVisionLayers().double()
    model = copy.deepcopy(original)
    assert gk.patch(model).counts["ResidualNorm"] == 2
    seen = []
    model.layers[0].self_attn.register_forward_pre_hook(lambda module, args: seen.append(len(args)))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(10, HIDDEN, dtype=torch.float64, generator=generator)
    angles = torch.randn(10, HIDDEN // 2, dtype=torch.float64, generator=generator)
    inputs = (x, torch.tensor([0, 4, 10], dtype=torch.int32), (angles.cos(), angles.sin()))
    calls = _count_add_norms(monkeypatch)
    outputs = [m(*inputs) for m in (model, original)]
    assert calls == [gk.nn.LayerNorm] * 2 and seen == [1]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(outputs[0])
    grads = [torch.autograd.grad((out * weights).sum(), m.parameters()) for out, m in zip(outputs, (model, original))]
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, dropouts", [("phi3", 4), ("bert", 7), ("vit", 3), ("stablelm", 2)])
def test_fused_blocks_with_dropout_draw_the_masks_of_the_blocks_as_written(name, dropouts):
    """Residual dropouts in training (Phi-3's and ViT's on each branch, BERT's before each LayerNorm,
    StableLM's on the MLP's): the
    one op adds the branch's output after its dropout, drawn in the block's order: the same loss
    and gradients, seed for seed, as the blocks as written (``residual_norms=False``: their
    forward, our dropouts and norms); and the dropouts are in effect (another seed, another loss)."""
    original = _build(name)
    for module in original.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.3
    results = []
    for residual_norms, seed in ((True, 0), (False, 0), (True, 1)):
        model = copy.deepcopy(original)
        report = gk.patch(model, residual_norms=residual_norms)
        blocks = len(ADD_NORM_MODELS[name]) * 2 * residual_norms
        assert report.counts.get("ResidualNorm", 0) == blocks and report.counts["Dropout"] == dropouts
        model.train()
        torch.manual_seed(seed)
        results.append(_step(model, _batch(name)))
    (fused_loss, _, fused_grads), (loss, _, grads), (other_loss, _, _) = results
    assert torch.equal(fused_loss, loss) and not torch.equal(fused_loss, other_loss)
    for key in grads:
        torch.testing.assert_close(fused_grads[key], grads[key], rtol=1e-4, atol=1e-6)


def test_stablelm_with_a_parallel_residual_keeps_its_own_forward():
    """No norm follows the residual addition there: the layer is left, saying so, and the model
    computes as unpatched."""
    torch.manual_seed(0)
    original = transformers.StableLmForCausalLM(transformers.StableLmConfig(**_DECODER, use_parallel_residual=True))
    model = copy.deepcopy(original)
    left = {n: why for n, _, why in gk.patch(model).left}
    assert "no norm after the residual addition" in left["model.layers.0"]
    batch = _without_labels(_batch("stablelm"))
    torch.testing.assert_close(model(**batch).logits, original(**batch).logits)


def test_block_whose_forward_differs_is_left_with_its_reason(monkeypatch):
    model = _build("llama")
    layer_class = type(model.model.layers[0])

    def forward(self, hidden_states, **kwargs):  # one more step than the forward read
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, **kwargs)
        hidden_states = residual + 0.5 * hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states

    monkeypatch.setattr(layer_class, "forward", forward)
    expected = model(**_without_labels(_batch("llama"))).logits
    report = gk.patch(model)
    assert "ResidualNorm" not in report.counts
    left = {n: why for n, _, why in report.left}
    assert "is not the one read" in left["model.layers.0"]
    torch.testing.assert_close(model(**_without_labels(_batch("llama"))).logits, expected)


def test_forms_read_a_discarded_name_and_a_sum_of_two_names_either_way():
    """What a forward calls a value it never reads, and the order of a sum of two names, do not change
    what it computes; the order of any other operation does, and so does a name it reads."""

    def canonical(source: str) -> str:
        return ast.dump(gk_patch._parsed(source))

    assert canonical("h, weights = f(x)\nreturn h + r") == canonical("h, _ = f(x)\nreturn r + h")
    assert canonical("h, w = f(x)\nreturn h + w") != canonical("h, _ = f(x)\nreturn h + r")
    assert canonical("return h - r") != canonical("return r - h")
    assert canonical("return h + 2 * r") != canonical("return 2 * r + h")


def test_block_checks_its_attention_keywords():
    form = gk_patch._LLAMA_FORM

    def forward(self, hidden_states, attention_mask=None, position_ids=None, **kwargs):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=position_ids, **kwargs)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states

    assert "passes position_ids to self_attn as attention_mask" in gk_patch._block_call(forward, form)
    call = gk_patch._block_call(type(_build("llama").model.layers[0]).forward, form)
    named, rest = call.bind((torch.ones(1),), {"use_cache": True, "output_attentions": False})
    assert named["use_cache"] is True and named["attention_mask"] is None and rest == {"output_attentions": False}
    assert call.bind((1,) * (len(call.parameters) + 1), {}) is None
    # a parameter without a default (Qwen3-VL's position_embeddings): a call without it is the block's own
    call = gk_patch._block_call(type(_build("qwen3_vl").model.language_model.layers[0]).forward, form)
    assert call.required == {"position_embeddings"}
    assert call.attention_call((torch.ones(1),), {"attention_mask": None}) is None
    hidden, attention_kwargs, _ = call.attention_call((torch.ones(1),), {"position_embeddings": 2})
    assert attention_kwargs["position_embeddings"] == 2 and attention_kwargs["attention_mask"] is None
    hidden, attention_kwargs, _ = call.attention_call((torch.ones(1), 3), {})
    assert attention_kwargs["position_embeddings"] == 3
    named, rest = call.bind((torch.ones(1),), {"position_embeddings": 4, "output_attentions": False})
    assert named["position_embeddings"] == 4 and rest == {"output_attentions": False}


_LFM2_LIKE_FORWARD = """
def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
    residual = hidden_states
    if self.is_attention_layer:
        hidden_states, _ = self.self_attn(hidden_states=self.operator_norm(hidden_states), cache=cache, **kwargs)
    else:
        hidden_states = self.conv(hidden_states=self.operator_norm(hidden_states), state=cache, {conv_rest})
    hidden_states = hidden_states + residual
    hidden_states = hidden_states + self.feed_forward(self.ffn_norm(hidden_states))
    return hidden_states
"""


def test_block_passes_its_token_mixer_what_its_forward_does():
    """A hybrid layer's other token mixer (LFM2's convolution) gets its keywords as the forward
    passes them: parameters under any name, ``kwargs.get(key)`` (transformers 5.17's LFM2), and
    the forward's ``**kwargs`` only where it passes them."""
    hidden = torch.ones(1)
    kwargs = {"cache": 2, "seq_idx": 3, "output_attentions": False}
    for conv_rest, expected in (
        ('seq_idx=kwargs.get("seq_idx")', {"state": 2, "seq_idx": 3}),
        ("**kwargs", {"state": 2, "seq_idx": 3, "output_attentions": False}),
    ):
        layer = _with_forward(_LFM2_LIKE_FORWARD.format(conv_rest=conv_rest))
        call = gk_patch._block_call(layer.forward, gk_patch._LFM2_FORM)
        assert call.mixer_call((hidden,), kwargs) == (hidden, expected)
    layer = _with_forward(_LFM2_LIKE_FORWARD.format(conv_rest="seq_idx=kwargs.pop('seq_idx')"))
    assert "passes kwargs.pop('seq_idx') to conv as seq_idx" in gk_patch._block_call(layer.forward, gk_patch._LFM2_FORM)


@pytest.mark.parametrize("name", ["qwen3_5", "lfm2"])
def test_hybrid_layers_pass_the_linear_attention_its_arguments(name):
    """Qwen3.5's linear attention (LFM2's short convolution) gets the layer's mask and cache as its
    forward passes them: a padded batch's logits (the padding masked out of its states) and greedy
    decoding with the cache are the unpatched model's (its norms in fp64, as ours)."""
    original = _norms_in_fp64(_build(name, torch.float64).eval())
    model = _build(name, torch.float64).eval()
    assert gk.patch(model).counts["ResidualNorm"] == 2
    ids = _batch(name)["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                               original(input_ids=ids, attention_mask=mask).logits)  # fmt: skip
    generate = dict(max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(model.generate(ids, **generate), original.generate(ids, **generate))


def test_gradient_checkpointing_of_fused_blocks():
    original = _build("llama")
    model = copy.deepcopy(original)
    gk.patch(model)
    for m in (original, model):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=False))
        m.train()
    batch = _batch("llama")
    loss, _, grads = _step(model, batch)
    loss_theirs, _, grads_theirs = _step(original, batch)
    torch.testing.assert_close(loss, loss_theirs)
    for key in grads:
        torch.testing.assert_close(grads[key], grads_theirs[key], rtol=1e-4, atol=1e-6)


def test_gpt2_block_with_cross_attention_runs_its_own_forward(monkeypatch):
    config = transformers.GPT2Config(n_embd=HIDDEN, n_layer=1, n_head=2, vocab_size=VOCAB, add_cross_attention=True)
    torch.manual_seed(0)
    block = transformers.models.gpt2.modeling_gpt2.GPT2Block(config).eval()
    reference = copy.deepcopy(block)
    gk.patch(block)
    calls = _count_add_norms(monkeypatch)
    x, encoder = torch.randn(2, 5, HIDDEN), torch.randn(2, 3, HIDDEN)
    torch.testing.assert_close(block(x, encoder_hidden_states=encoder), reference(x, encoder_hidden_states=encoder))
    assert not calls
    torch.testing.assert_close(block(x), reference(x))
    assert len(calls) == 1


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2"])
def test_autocast_gradients_with_norms_feeding_matmuls_as_close_to_fp64(name):
    """The projections' gradients summed in bf16 (the norms' output dtype) rather than fp32: each
    gradient of the step under autocast no further from the fp64 model's than the fp32 norms'
    gradients are, times the low-precision factor."""
    original = _build(name)
    batch = _batch(name)
    exact = _step(_norms_in_fp64(copy.deepcopy(original).double()), batch, lambda out: out.sum())[2]
    grads = {}
    for feeds_matmuls in (True, False):
        model = copy.deepcopy(original)
        gk.patch(model, autocast_norms=feeds_matmuls)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            grads[feeds_matmuls] = _step(model, batch, lambda out: out.float().sum())[2]
    for key, reference in exact.items():
        ours, theirs = rel_err(grads[True][key], reference), rel_err(grads[False][key], reference)
        assert ours <= max(LOWP_FACTOR * theirs, 2.0**-8), (key, ours, theirs)


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_unchanged_and_unpatch_restores_bit_identical_outputs(name):
    original = _build(name).eval()
    model = copy.deepcopy(original)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    gk.patch(model, loss="fused" if name in CAUSAL else "logits")  # fused: the head and forward come back too
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[key], before[key]) for key in before)
    gk.unpatch(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]
    assert not {"forward", "_loss_function", "_gpukernels_undo"} & set(model.__dict__)
    batch = _batch(name)
    out, out_original = model(**batch), original(**batch)
    assert torch.equal(out.loss, out_original.loss) and torch.equal(out.logits, out_original.logits)


def _logits_tensors(model: nn.Module, batch: dict) -> list[tuple[int, ...]]:
    """Shapes of every tensor of (rows, vocab) or more with vocab-sized last dim made
    by a torch op during a forward and backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    rows = batch["input_ids"].numel()
    seen = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == VOCAB and t.numel() >= rows * VOCAB:
                    seen.append(tuple(t.shape))
            return out

    with Watch():
        model(**batch).loss.backward()
    return seen


# Causal LMs whose fused loss alone is checked here (their layers: MoE routers, Mamba mixers, whatever patch
# makes of them): Mixtral's forward (the router's auxiliary loss added), Granite's (the logits scaled, Granite 4's
# hybrid layers too), FalconH1's (scaled by its lm_head_multiplier), and the others read for their loss
FUSED_LOSS_MODELS = {
    "jamba": _decoder(
        "JambaForCausalLM",
        "JambaConfig",
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        num_experts=4,
        num_experts_per_tok=2,
        mamba_d_state=8,
        mamba_dt_rank=4,
        use_mamba_kernels=False,
        output_router_logits=True,
        **_EAGER_EXPERTS,
    ),
    "minimax": _decoder(
        "MiniMaxForCausalLM",
        "MiniMaxConfig",
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["linear_attention", "full_attention"],
        output_router_logits=True,
        **_EAGER_EXPERTS,
    ),
    "ernie4_5_moe": _decoder(
        "Ernie4_5_MoeForCausalLM",
        "Ernie4_5_MoeConfig",
        moe_num_experts=4,
        moe_k=2,
        moe_intermediate_size=16,
        output_router_logits=True,
        **_EAGER_EXPERTS,
    ),
    "llama4": MODELS["llama4"][0],
    "granitemoe": MODELS["granitemoe"][0],
    "granitemoeshared": MODELS["granitemoeshared"][0],
    "granitemoehybrid": MODELS["granitemoehybrid"][0],
    # Llama's form, Mixtral's auxiliary loss (OLMoE, Phi-3.5-MoE, JetMoE, Mellum, MiniMax-M2); MiniCPM3's hidden
    # states scaled before the head; Cohere 2's MoE (scaled logits)
    "olmoe": _decoder(
        "OlmoeForCausalLM",
        "OlmoeConfig",
        num_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
        **_EAGER_EXPERTS,
    ),
    "phimoe": _decoder(
        "PhimoeForCausalLM",
        "PhimoeConfig",
        num_local_experts=4,
        num_experts_per_tok=2,
        lm_head_bias=True,
        router_jitter_noise=0.0,
        **_EAGER_EXPERTS,
    ),
    "jetmoe": _decoder(
        "JetMoeForCausalLM",
        "JetMoeConfig",
        num_local_experts=4,
        num_experts_per_tok=2,
        kv_channels=8,
        output_router_logits=True,
    ),
    "mellum": _decoder(
        "MellumForCausalLM",
        "MellumConfig",
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        **_EAGER_EXPERTS,
    ),
    "minimax_m2": _decoder(
        "MiniMaxM2ForCausalLM",
        "MiniMaxM2Config",
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        **_EAGER_EXPERTS,
    ),
    "minicpm3": _decoder(
        "MiniCPM3ForCausalLM",
        "MiniCPM3Config",
        dim_model_base=64,
        q_lora_rank=8,
        kv_lora_rank=8,
        qk_nope_head_dim=4,
        qk_rope_head_dim=4,
        v_head_dim=8,
    ),
    "cohere2_moe": _decoder(
        "Cohere2MoeForCausalLM",
        "Cohere2MoeConfig",
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        logit_scale=0.5,
        **_EAGER_EXPERTS,
    ),
    # GPT-2's era, their own config names
    "falcon": _decoder("FalconForCausalLM", "FalconConfig", new_decoder_architecture=True, num_kv_heads=1),
    "bloom": _decoder("BloomForCausalLM", "BloomConfig", n_layer=2, n_head=2),
    "gptj": _decoder("GPTJForCausalLM", "GPTJConfig", n_embd=HIDDEN, n_layer=2, n_head=2, rotary_dim=4, n_positions=32),
    "gpt_neo": _decoder(
        "GPTNeoForCausalLM", "GPTNeoConfig", num_layers=2, num_heads=2, attention_types=[[["global", "local"], 1]]
    ),
    # 4 heads: transformers 5.17's CodeGen splits them in 4
    "codegen": _decoder(
        "CodeGenForCausalLM",
        "CodeGenConfig",
        n_embd=HIDDEN,
        n_layer=2,
        num_attention_heads=4,
        rotary_dim=4,
        n_positions=32,
        n_ctx=32,
    ),
    "gpt_bigcode": _decoder(
        "GPTBigCodeForCausalLM",
        "GPTBigCodeConfig",
        n_embd=HIDDEN,
        n_layer=2,
        n_head=2,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    ),
    "mpt": _decoder("MptForCausalLM", "MptConfig", d_model=HIDDEN, n_heads=2, n_layers=2, max_seq_len=32),
    "falcon_h1": _decoder(
        "FalconH1ForCausalLM",
        "FalconH1Config",
        head_dim=8,
        lm_head_multiplier=0.5,
        mamba_d_ssm=32,
        **_MAMBA,
        # its layers' scales, each a value of its own
        attention_in_multiplier=0.75,
        attention_out_multiplier=1.5,
        ssm_out_multiplier=0.5,
    ),
}


def _assert_fused_loss_matches_without_the_logits(original: nn.Module, name: str) -> None:
    model = copy.deepcopy(original)
    report = gk.patch(model, loss="fused")
    head = next(n for n, m in original.named_modules() if m is original.get_output_embeddings())
    assert ("loss_function", f"{head}+ForCausalLMLoss", "LinearCrossEntropyLoss") in report.swapped
    assert head not in {n for n, _, _ in report.left}
    batch = _batch(name)
    loss, logits, grads = _step(model, batch)
    loss_theirs, _, grads_theirs = _step(original, batch)
    loss_ref, _, grads_ref = _step(
        copy.deepcopy(original).double(), batch, lambda out: _reference_loss(name, out, batch["labels"])
    )
    assert logits is None and loss.dtype == torch.float32
    assert_matches(loss, loss_theirs, loss_ref)
    for key in grads:
        assert_matches(grads[key], grads_theirs[key], grads_ref[key])
    assert _logits_tensors(model, batch) == []
    assert _logits_tensors(original, batch)  # the watch sees the unpatched model's logits
    # without labels, the logits as before
    torch.testing.assert_close(model(**_without_labels(batch)).logits, original(**_without_labels(batch)).logits)


@pytest.mark.parametrize("name", CAUSAL)
def test_fused_loss_matches_without_the_logits(name):
    _assert_fused_loss_matches_without_the_logits(_build(name), name)


@pytest.mark.parametrize("name", ["qwen3_5", "qwen3_next"])
@pytest.mark.parametrize("dtype, autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_linear_attention_gated_norms_are_a_norm_and_a_gated_op(name, dtype, autocast, monkeypatch):
    """The Gated DeltaNet's output norm, ``rms_norm(x) * silu(gate)``: our rms_norm, then swiglu of the
    gate and the norm, the product in the dtype the model's takes it (fp32 beside an fp32 weight, the
    gate widened), rounded to x's; unpatch gives the module its own ``activation`` back."""
    original = _build(name)
    model = copy.deepcopy(original)
    report = gk.patch(model)
    norms = [n for n, m in original.named_modules() if type(m).__name__.endswith("RMSNormGated")]
    assert norms and [row for row in report.swapped if row[0] in norms] == [
        (n, type(original.get_submodule(n)).__name__, "GatedRMSNorm") for n in norms
    ]
    ours, theirs = model.get_submodule(norms[0]), original.get_submodule(norms[0])
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    ours.to(dtype), theirs.to(dtype)
    generator = torch.Generator().manual_seed(2)
    x, gate = (torch.randn(3, 5, ours.weight.shape[0], generator=generator) for _ in range(2))
    if autocast:  # as under autocast: x and the gate from bf16 projections, the weight fp32
        x, gate = x.bfloat16(), gate.bfloat16()
    else:
        x, gate = x.to(dtype), gate.to(dtype)
    calls = record_calls(monkeypatch, gk_patch, "swiglu", lambda gate, up: (gate.dtype, up.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        results = [norm(x, gate) for norm in (ours, theirs)]
    reference = _norms_in_fp64(copy.deepcopy(theirs).double())(x.double(), gate.double())
    assert calls == [(torch.float32, torch.float32) if autocast else (dtype, dtype)]
    assert results[0].dtype == results[1].dtype == x.dtype
    assert_matches(*results, reference)
    if dtype == torch.bfloat16:  # each rounding where the model's is (to bf16 before the weight, then after it)
        assert torch.equal(*results)
    gk.unpatch(model)
    assert model.get_submodule(norms[0]).activation == "silu"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert torch.equal(model.get_submodule(norms[0])(x, gate), results[1])  # their forward again


@pytest.mark.parametrize("name", ["granitemoeshared", "granitemoehybrid"])
def test_granite_shared_mlps_gate_in_one_op(name, monkeypatch):
    """Their shared MLP's input_linear holds gate, then up: our packed gated op, in float64 as theirs."""
    torch.manual_seed(0)
    original = FUSED_LOSS_MODELS[name]().double()
    model = copy.deepcopy(original)
    report = gk.patch(model)
    mlps = [n for n, m in original.named_modules() if n.endswith("shared_mlp")]
    assert len(mlps) == 2 and [row for row in report.swapped if row[0] in mlps] == [
        (n, f"{type(original.get_submodule(n)).__name__}+silu", "GatedMLP") for n in mlps
    ]
    calls = record_calls(monkeypatch, gk_patch, "swiglu", lambda gate, up: (gate.shape[-1], up))
    batch = _batch(name, torch.float64)
    # as the fp64 test: a probe of the logits, their norms (fp32 in fp64 models) in fp64 for the exact reference
    weights = torch.randn_like(original(**_without_labels(batch)).logits)
    ours, theirs = (_step(m, batch, lambda out: (out * weights).sum()) for m in (model, original))
    assert calls == [(32, None)] * 2  # packed: 2 x shared_intermediate_size, one call a layer
    with _rotary_in_fp64(original):
        exact = _step(_norms_in_fp64(copy.deepcopy(original)), batch, lambda out: (out * weights).sum())
    assert_matches(ours[1], theirs[1], exact[1])
    for key in ours[2]:
        assert_matches(ours[2][key], theirs[2][key], exact[2][key])
    gk.unpatch(model)
    assert all(type(model.get_submodule(n)) is type(original.get_submodule(n)) for n in mlps)
    assert not any("gated_activation" in vars(m) for m in model.modules())


@pytest.mark.parametrize(
    "name, build",
    [
        ("granitemoeshared", _decoder("GraniteMoeSharedForCausalLM", "GraniteMoeSharedConfig", **_GRANITE_MOE)),
        (
            "granitemoehybrid",
            _decoder(
                "GraniteMoeHybridForCausalLM",
                "GraniteMoeHybridConfig",
                **_GRANITE_MOE | dict(num_local_experts=0, shared_intermediate_size=16),
                layer_types=["mamba", "attention"],
                **_MAMBA,
            ),
        ),
    ],
)
def test_granite_moe_layers_without_their_shared_mlp_or_experts(name, build):
    """Granite MoE Shared's layers without a shared MLP (the MoE's output alone), Granite 4's without
    experts (the shared MLP's alone): converted, as the model computes."""
    torch.manual_seed(0)
    original = build().double()
    layers = original.model.layers
    assert all(layer.shared_mlp is None for layer in layers) or not any(layer.has_experts for layer in layers)
    report = _assert_patched_matches_fp64(original, _batch(name, torch.float64))
    assert report.counts["ResidualNorm"] == len(layers)


@pytest.mark.parametrize("name", FUSED_LOSS_MODELS)
def test_fused_loss_of_more_causal_lms_matches_without_the_logits(name):
    torch.manual_seed(0)
    _assert_fused_loss_matches_without_the_logits(FUSED_LOSS_MODELS[name](), name)


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("evaluation", ["eval", "no_grad", "inference_mode"])
def test_fused_loss_evaluating_returns_the_logits_and_their_loss(name, evaluation):
    """In eval mode or without gradients (an evaluation loop: metrics read the logits) the
    fused model returns the unpatched model's logits, and its loss from them; training
    again, the logits are deferred to the loss as before."""
    original = _build(name)
    model = copy.deepcopy(original)
    gk.patch(model, loss="fused")
    batch = _batch(name)
    if evaluation == "eval":
        model.eval(), original.eval()
    context = {"eval": contextlib.nullcontext, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
    with context[evaluation]():
        out, theirs = model(**batch), original(**batch)
    assert out.logits is not None
    torch.testing.assert_close(out.logits, theirs.logits)
    torch.testing.assert_close(out.loss, theirs.loss)
    model.train()
    assert model(**batch).logits is None


def test_fused_loss_caps_the_logits_in_place_of_the_forward(monkeypatch):
    """Gemma 2 soft-caps its logits in its forward: under loss="fused" the loss caps them, the
    forward (which gets the hidden states) does not, and the config keeps its cap, also
    after a forward that raised and under torch.compile."""
    original = _build("gemma2")
    model = copy.deepcopy(original)
    gk.patch(model, loss="fused")
    batch = _batch("gemma2")
    calls = []
    lce = gk_patch.linear_cross_entropy

    def recording(*args, **kwargs):
        calls.append(kwargs["softcap"])
        return lce(*args, **kwargs)

    monkeypatch.setattr(gk_patch, "linear_cross_entropy", recording)
    loss = model(**batch).loss
    with pytest.raises(IndexError):
        model(input_ids=batch["input_ids"], labels=torch.full_like(batch["labels"], VOCAB))
    monkeypatch.undo()
    assert calls == [0.5, 0.5] and model.config.final_logit_softcapping == 0.5
    assert not model.lm_head.defer_logits and model.lm_head.softcap is None
    torch.testing.assert_close(loss, original(**batch).loss)
    torch.testing.assert_close(model(**_without_labels(batch)).logits, original(**_without_labels(batch)).logits)
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(**batch).loss, loss)
    assert model.config.final_logit_softcapping == 0.5


def test_fused_loss_left_for_a_scaled_model_with_a_biased_head():
    """Granite divides its logits by logits_scaling: the hidden states divided give the same
    logits, but for a bias, which the fused loss would divide too."""
    model = _build("granite")
    model.lm_head.bias = nn.Parameter(torch.randn(VOCAB))
    report = gk.patch(model, loss="fused")
    assert (
        "loss_function",
        "ForCausalLMLoss",
        "loss='fused' would scale the output layer's bias with the hidden states, which the model does not",
    ) in report.left
    assert gk.patch(_build("granite"), loss="fused").counts["LinearCrossEntropyLoss"] == 1


class _Subclass(torch.Tensor):
    pass


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_aligned_logits_head_is_the_linear(bias, autocast):
    """The head loss="logits" gives an odd vocabulary: its matmuls on padded rows, the logits
    and every gradient those of the nn.Linear it was (fp32: to rounding; bf16 autocast: the
    same dtypes, within bf16 rounding), the logits contiguous."""
    torch.manual_seed(0)
    head = nn.Linear(HIDDEN, 37, bias=bias)
    aligned = copy.deepcopy(head)
    aligned.__class__ = gk_patch._AlignedLogitsHead
    x = torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True)
    upstream = torch.randn(BATCH, SEQ, 37)
    results = []
    for module in (head, aligned):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = module(x)
        grads = torch.autograd.grad(logits, (x, *module.parameters()), upstream.to(logits.dtype))
        results.append((logits, *grads))
    assert results[1][0].is_contiguous() and results[1][0].shape == (BATCH, SEQ, 37)
    subclassed = x.detach().as_subclass(_Subclass)  # a tensor subclass: nn.Linear's own forward
    torch.testing.assert_close(aligned(subclassed).as_subclass(torch.Tensor), head(x.detach()))
    for theirs, ours in zip(*results):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        if autocast:
            torch.testing.assert_close(ours.float(), theirs.float(), rtol=1.6e-2, atol=1e-2)
        else:
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_logits_loss_aligns_an_odd_vocabulary_head():
    """GPT-2 with an odd vocabulary: loss="logits" swaps its head for the aligned one (tied
    weight kept), the same loss and gradients as unpatched; loss="fused" and an aligned
    vocabulary leave the head alone; unpatch puts the nn.Linear back."""
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config = dict(vocab_size=97, n_embd=HIDDEN, n_layer=1, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    original = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config, **no_dropout))
    model = copy.deepcopy(original)
    report = gk.patch(model)
    assert ("lm_head", "Linear", "AlignedLogitsHead") in report.swapped
    assert type(model.lm_head) is gk_patch._AlignedLogitsHead
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 97, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    ours, theirs = model(input_ids=ids, labels=ids), original(input_ids=ids, labels=ids)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.loss, theirs.loss)
    ours.loss.backward()
    theirs.loss.backward()
    torch.testing.assert_close(model.lm_head.weight.grad, original.lm_head.weight.grad, rtol=1e-5, atol=1e-7)
    gk.unpatch(model)
    assert type(model.lm_head) is nn.Linear
    fused = copy.deepcopy(original)
    gk.patch(fused, loss="fused")
    assert type(fused.lm_head) is not gk_patch._AlignedLogitsHead
    aligned_vocab = _build("gpt2")  # VOCAB: a multiple of 16
    assert all(kind != "AlignedLogitsHead" for _, _, kind in gk.patch(aligned_vocab).swapped)


def test_logits_loss_reads_the_bf16_logits_as_they_are():
    """loss="logits" under bf16 autocast: the loss in fp32, as transformers' ForCausalLMLoss
    computes it, which copies the logits to fp32 and keeps the copy for the backward; ours
    reads and keeps the bf16 logits the model returns, and no fp32 tensor of their size."""
    original = _build("llama")
    model = copy.deepcopy(original)
    gk.patch(model)
    batch = _batch("llama")
    saved = []

    def keep(t):
        saved.append(t)
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(keep, keep):
            ours = model(**batch)
        theirs = original(**batch)
    assert ours.logits.dtype == torch.bfloat16
    assert ours.loss.dtype == theirs.loss.dtype == torch.float32
    torch.testing.assert_close(ours.loss, theirs.loss)
    logits_size = ours.logits.numel()
    assert any(t is ours.logits or t._base is ours.logits for t in saved)
    assert not any(t.dtype == torch.float32 and t.numel() == logits_size for t in saved)
    ours.loss.backward()


@pytest.mark.parametrize("loss", gk_patch.LOSS_MODES)
def test_loss_options_of_transformers_are_kept(loss):
    """num_items_in_batch (a sum over that many items), shift_labels and return_dict=False."""
    original = _build("llama")
    model = copy.deepcopy(original)
    gk.patch(model, loss=loss)
    batch = _batch("llama")
    for extra in (
        dict(num_items_in_batch=torch.tensor(9)),
        dict(num_items_in_batch=5),
        dict(shift_labels=batch["labels"].roll(1, dims=1)),
    ):
        ours, theirs = model(**batch, **extra), original(**batch, **extra)
        torch.testing.assert_close(ours.loss, theirs.loss)
    ours, theirs = model(**batch, return_dict=False), original(**batch, return_dict=False)
    torch.testing.assert_close(ours[0], theirs[0])
    assert len(ours) == len(theirs) - (loss == "fused")  # the fused loss leaves the logits out
    gk.unpatch(model)
    assert torch.equal(model(**batch).loss, original(**batch).loss)


def test_a_loss_function_set_by_the_user_is_left_and_one_set_to_transformers_comes_back():
    model = _build("llama")
    model.loss_function = custom = lambda logits, labels, vocab_size, **kwargs: logits.sum()
    report = gk.patch(model)
    assert ("loss_function", "<lambda>", "not transformers' ForCausalLMLoss") in report.left
    assert model.loss_function is custom

    model = _build("llama")
    model.loss_function = transformers.loss.loss_utils.ForCausalLMLoss
    gk.patch(model, loss="fused")
    gk.unpatch(model)
    assert model.__dict__["_loss_function"] is transformers.loss.loss_utils.ForCausalLMLoss


@pytest.mark.parametrize("first, second", [("fused", "logits"), ("logits", "fused")])
def test_patching_again_with_the_other_loss_is_an_error(first, second):
    """The loss a model was patched with stays until unpatch: asking for the other one says
    so, not a report of modules left; asking for the same one changes nothing."""
    model = _build("llama")
    gk.patch(model, loss=first)
    with pytest.raises(gk.ArgumentError, match=f"loss='{second}'.*patched with loss='{first}'"):
        gk.patch(model, loss=second)
    assert not gk.patch(model, loss=first).swapped
    gk.unpatch(model)
    assert gk.patch(model, loss=second).counts["LinearCrossEntropyLoss" if second == "fused" else "CrossEntropyLoss"]


@pytest.mark.parametrize("name, loss", [("llama", "fused"), ("gpt2", "logits"), ("hunyuan_v1_dense", "fused")])
def test_a_patched_model_pickles_whole_and_loads_in_a_new_process(name, loss):
    """torch.save / pickle of the whole patched model (its decoder layers', RMSNorms' and
    Conv1D+GELU's replacement classes are made at run time): a new process, which has made
    none of them, loads a model that is patched and computes the same loss (Hunyuan's
    classes converted by their code: the classes read are imported to match them)."""
    model = _build(name)
    gk.patch(model, loss=loss)
    batch = _batch(name)
    torch.manual_seed(0)
    expected = model(**batch).loss
    path = Path(tempfile.mkdtemp()) / "model.pkl"
    path.write_bytes(pickle.dumps((model, batch)))
    script = (
        "import pickle, sys, torch\n"
        f"model, batch = pickle.loads(open({str(path)!r}, 'rb').read())\n"
        "torch.manual_seed(0)\n"
        "print(repr(model(**batch).loss.item()), type(model.loss_function).__module__)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == [repr(expected.item()), "gpukernels.patch"]


def test_a_deepcopy_of_a_patched_model_is_patched_on_its_own():
    model = _build("llama")
    gk.patch(model, loss="fused")
    clone = copy.deepcopy(model)
    assert clone.forward.__wrapped__.__self__ is clone and clone.forward.head is clone.lm_head
    assert clone.loss_function.head is clone.lm_head
    batch = _batch("llama")
    torch.testing.assert_close(clone(**batch).loss, model(**batch).loss)
    gk.unpatch(clone)
    assert "forward" not in clone.__dict__ and type(clone.model.layers[0].mlp) is not type(model.model.layers[0].mlp)
    assert clone(**batch).logits is not None and model(**batch).logits is None


def test_compile_aot_eager_of_a_patched_model():
    torch.manual_seed(0)
    model = MODELS["llama"][0]()
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    report = gk.patch(model, loss="fused")
    assert report.counts == {"LinearCrossEntropyLoss": 1, "RoPE": 1, "GatedMLP": 1, "RMSNorm": 3, "ResidualNorm": 1}
    batch = _batch("llama")
    loss, _, grads = _step(model, batch)
    compiled = torch.compile(model, backend="aot_eager")
    model.zero_grad()
    out = compiled(**batch)
    out.loss.backward()
    assert out.logits is None
    torch.testing.assert_close(out.loss, loss)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, grads[name])


@pytest.mark.parametrize("loss", ["fused", "logits"])
def test_torch_export_of_a_patched_model(loss):
    """A model patched for training exports for inference (torch.export reads the forward's
    ``__code__``, which the fused loss's forward object gives) and its program runs our ops."""
    original = _build("llama").eval()
    model = copy.deepcopy(original)
    gk.patch(model, loss=loss)
    ids = _batch("llama")["input_ids"]
    program = torch.export.export(model, (ids,), kwargs={"use_cache": False})
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any(target.startswith("gpukernels.") for target in targets), targets
    torch.testing.assert_close(program.module()(ids, use_cache=False).logits, original(ids, use_cache=False).logits)


@pytest.mark.parametrize("name", ["llama", "qwen3", "phi", "olmo3", "gpt_neox", "glm", "cohere", "gpt_oss", "gemma4"])
def test_patched_attention_rotates_with_ours_and_others_keep_theirs(name, monkeypatch):
    """A patched model's attention calls ours for its rotary embedding, once a layer (GPT-NeoX's
    partial rotation, GLM's interleaved pairs of part of a head, Cohere's interleaved pairs and
    gpt-oss's halves of a half's cos too; Gemma 4's, of one tensor a call, twice), and gives the
    unpatched model's logits; an unpatched model of the same class (transformers' module itself
    unchanged) does not call ours."""
    calls = []
    ours = gk_patch.apply_rotary_pos_emb
    monkeypatch.setattr(
        gk_patch, "apply_rotary_pos_emb", lambda *args, **kwargs: calls.append(1) or ours(*args, **kwargs)
    )
    original = _build(name)
    module = importlib.import_module(type(original).__module__)
    theirs = module.apply_rotary_pos_emb
    model = copy.deepcopy(original)
    gk.patch(model)
    assert module.apply_rotary_pos_emb is theirs
    calls.clear()  # the probe of theirs against ours
    batch = _batch(name)
    logits = model(**batch).logits
    layers = model.config.num_hidden_layers * (2 if name == "gemma4" else 1)
    assert len(calls) == layers
    torch.testing.assert_close(logits, original(**batch).logits)
    assert len(calls) == layers
    gk.unpatch(model)
    model(**batch)
    assert len(calls) == layers


def test_cohere_qk_norms_a_weight_a_head_are_left():
    """Command R+'s q and k norms (Cohere's LayerNorm with a weight per head, normalising each
    head) are no layer norm of ours: left with the reason; its other norms are ours."""
    torch.manual_seed(0)
    original = _decoder("CohereForCausalLM", "CohereConfig", use_qk_norm=True)()
    model = copy.deepcopy(original)
    report = gk.patch(model)
    left = {n: why for n, _, why in report.left}
    assert "a weight a head" in left["model.layers.0.self_attn.q_norm"]
    assert report.counts["LayerNorm"] == 3
    batch = _batch("cohere")
    torch.testing.assert_close(model(**batch).logits, original(**batch).logits)


def test_rope_left_where_the_models_own_differs(monkeypatch):
    """An attention whose module's apply_rotary_pos_emb computes something else (here:
    halves rotated the other way) stays, with the probe's finding."""
    from transformers.models.llama import modeling_llama

    def reversed_rotation(q, k, cos, sin, unsqueeze_dim=1):
        def rotate(x):
            first, second = x.chunk(2, dim=-1)
            return torch.cat((second, -first), dim=-1)

        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", reversed_rotation)
    report = gk.patch(_build("llama"))
    assert "RoPE" not in report.counts
    left = {n: why for n, _, why in report.left}
    assert "computes none of ours" in left["model.layers.0.self_attn"]


def _interleaved_of_pairs_trig(q, k, cos, sin, unsqueeze_dim=1):
    """GLM's apply_rotary_pos_emb, written out: interleaved pairs, each pair's cos and sin from
    the first half of those handed over, the head's elements past them as they are."""
    cos, sin = (t.unsqueeze(unsqueeze_dim) for t in (cos, sin))
    cos, sin = (t[..., : t.shape[-1] // 2].repeat_interleave(2, dim=-1) for t in (cos, sin))
    rotated = cos.shape[-1]

    def embed(x):
        x_rot = x[..., :rotated]
        rotate_half = torch.stack((-x_rot[..., 1::2], x_rot[..., ::2]), dim=-1).flatten(-2)
        return torch.cat((x_rot * cos + rotate_half * sin, x[..., rotated:]), dim=-1)

    return embed(q), embed(k)


def _halves_of_full_heads(q, k, cos, sin, unsqueeze_dim=1):
    """Llama's: the halves of whole heads (a narrower cos fails to broadcast)."""
    cos, sin = (t.unsqueeze(unsqueeze_dim) for t in (cos, sin))
    return tuple(x * cos + torch.cat((-x.chunk(2, -1)[1], x.chunk(2, -1)[0]), dim=-1) * sin for x in (q, k))


def _halves_of_one_half_cos(q, k, cos, sin, unsqueeze_dim=1):
    """gpt-oss's: a head's halves, each rotated by the one cos and sin handed over."""
    cos, sin = (t.unsqueeze(unsqueeze_dim) for t in (cos, sin))

    def embed(x):
        first, second = x.chunk(2, dim=-1)
        return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)

    return embed(q), embed(k)


def test_rope_probe_finds_each_form():
    """The probe tells Llama's halves (no partial rotation: theirs fails on it), GLM's interleaved
    pairs of cos's first half with partial rotation, GPT-NeoX's halves of part of a head,
    gpt-oss's halves of a half's cos and Gemma 4's halves of one tensor a call."""
    gpt_neox = importlib.import_module("transformers.models.gpt_neox.modeling_gpt_neox").apply_rotary_pos_emb
    assert gk_patch._rope_form(_halves_of_full_heads) == gk_patch._RopeForm(False)
    assert gk_patch._rope_form(_interleaved_of_pairs_trig) == gk_patch._RopeForm(True, "first_half_twice", True)
    assert gk_patch._rope_form(gpt_neox) == gk_patch._RopeForm(False, partial=True)
    assert gk_patch._rope_form(_halves_of_one_half_cos) == gk_patch._RopeForm(False, "one_half")
    gemma4 = importlib.import_module("transformers.models.gemma4.modeling_gemma4").apply_rotary_pos_emb
    assert gk_patch._rope_form(gemma4) == gk_patch._RopeForm(False, one_tensor=True)


@pytest.mark.parametrize(
    "form",
    [
        gk_patch._RopeForm(False),
        gk_patch._RopeForm(True),
        gk_patch._RopeForm(True, "first_half_twice", partial=True),
        gk_patch._RopeForm(False, "one_half"),
    ],
    ids=str,
)
def test_rope_in_place_of_theirs_takes_only_the_calls_probed(form):
    """Ours in the form probed for (q, k, cos, sin[, unsqueeze_dim]) of shapes it takes (a cos
    narrower than a head where the probe found theirs to rotate part of one); any other call
    (other arguments, no k, an odd cos) goes to theirs as it was made."""
    theirs_calls = []

    def theirs(*args, **kwargs):
        theirs_calls.append((len(args), sorted(kwargs)))
        return "theirs"

    rope = gk_patch._rope_in_place_of(theirs, form)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 3, 8, generator=g), torch.randn(2, 2, 3, 8, generator=g)
    width = 4 if form.trig == "one_half" else 8  # the cos and sin that rotate a whole head in this form
    cos, sin = torch.randn(2, 3, width, generator=g), torch.randn(2, 3, width, generator=g)
    calls = [
        ((q, k, cos, sin), {}),
        ((q, k, cos, sin, 1), {}),
        ((q.transpose(1, 2), k.transpose(1, 2), cos, sin, 2), {}),
        ((q.transpose(1, 2), k.transpose(1, 2), cos, sin), {"unsqueeze_dim": 2}),
    ]
    partial = ((q, k, cos[..., : width // 2], sin[..., : width // 2]), {})
    for args, kwargs in calls + [partial] * form.partial:
        ours = rope(*args, **kwargs)
        expected = gk_patch._rope_math(*args[:4], args[4] if len(args) == 5 else kwargs.get("unsqueeze_dim", 1), form)
        for a, b in zip(ours, expected, strict=True):
            torch.testing.assert_close(a, b)
    assert not theirs_calls
    for args, kwargs in [
        ((q, k, cos, sin), {"position_ids": None}),
        ((q, k, cos, sin, None, 1), {}),
        ((q, None, cos, sin), {}),
        ((q, k, cos, sin), {"unsqueeze_dim": 3}),
        ((q, k, cos[..., :3], sin[..., :3]), {}),
    ] + [partial] * (not form.partial):
        assert rope(*args, **kwargs) == "theirs"
    assert theirs_calls[:4] == [(4, ["position_ids"]), (6, []), (4, []), (4, ["unsqueeze_dim"])]
    assert len(theirs_calls) == 6 - form.partial


def test_rope_in_place_of_a_one_tensor_function_takes_only_the_calls_probed():
    """Gemma 4's form: ours for (x, cos, sin[, unsqueeze_dim]) of shapes it takes, each tensor
    rotated as ours rotates q; any other call goes to theirs as it was made."""
    theirs_calls = []

    def theirs(*args, **kwargs):
        theirs_calls.append((len(args), sorted(kwargs)))
        return "theirs"

    rope = gk_patch._rope_in_place_of(theirs, gk_patch._RopeForm(False, one_tensor=True))
    g = torch.Generator().manual_seed(0)
    x, cos, sin = (
        torch.randn(2, 4, 3, 8, generator=g),
        torch.randn(2, 3, 8, generator=g),
        torch.randn(2, 3, 8, generator=g),
    )
    for args, kwargs, unsqueeze_dim in [
        ((x, cos, sin), {}, 1),
        ((x.transpose(1, 2), cos, sin, 2), {}, 2),
        ((x.transpose(1, 2), cos, sin), {"unsqueeze_dim": 2}, 2),
    ]:
        expected, _ = gk_patch._rope_math(args[0], args[0], cos, sin, unsqueeze_dim)
        torch.testing.assert_close(rope(*args, **kwargs), expected)
    assert not theirs_calls
    for args, kwargs in [
        ((x, cos, sin), {"position_ids": None}),
        ((x, cos, sin, 1, None), {}),
        ((x, x, cos, sin), {}),
        ((x, cos, sin), {"unsqueeze_dim": 3}),
        ((x, cos[..., :3], sin[..., :3]), {}),
    ]:
        assert rope(*args, **kwargs) == "theirs"
    assert theirs_calls == [(3, ["position_ids"]), (5, []), (4, []), (3, ["unsqueeze_dim"]), (3, [])]


@pytest.mark.parametrize("name", ["glm", "gpt_neox", "cohere", "gpt_oss"])
def test_rope_of_each_form_compiles_in_one_graph(name, monkeypatch):
    """The wrapper in each form (GLM's cos made from its first half, gpt-oss's from a half's, a
    partial rotation) traces whole under torch.compile: no graph break, ours traced."""
    calls = []
    ours = gk_patch.apply_rotary_pos_emb
    monkeypatch.setattr(
        gk_patch, "apply_rotary_pos_emb", lambda *args, **kwargs: calls.append(1) or ours(*args, **kwargs)
    )
    module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    rope = gk_patch._rope_in_place_of(module.apply_rotary_pos_emb, gk_patch._rope_form(module.apply_rotary_pos_emb))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 3, 8, generator=g), torch.randn(2, 2, 3, 8, generator=g)
    width = {"gpt_oss": 4, "gpt_neox": 4}.get(name, 8)  # gpt-oss's a half's; GPT-NeoX rotating half a head
    cos, sin = torch.randn(2, 3, width, generator=g), torch.randn(2, 3, width, generator=g)
    compiled = torch.compile(rope, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(q, k, cos, sin), module.apply_rotary_pos_emb(q, k, cos, sin), strict=True):
        torch.testing.assert_close(a, b)
    assert calls


def test_rope_probe_checks_theirs_without_running_ours(monkeypatch):
    """The probe compares theirs with ours' math in torch ops, so that a backend selected
    for CUDA tensors alone (GPUKERNELS_BACKEND=triton on a GPU machine, which cannot run
    the CPU probe) does not leave the attention unpatched; that math is our op's."""

    def unavailable(*args):
        raise gk.BackendError("cannot run op 'rope' on this backend for device cpu")

    gk_patch._rope_form.cache_clear()  # cached per function of theirs: checked anew here
    try:
        monkeypatch.setattr(gk_patch, "apply_rotary_pos_emb", unavailable)
        report = gk.patch(_build("llama"))
    finally:
        gk_patch._rope_form.cache_clear()
    assert report.counts["RoPE"] == 2
    g = torch.Generator().manual_seed(1)
    q, k, cos, sin = (
        torch.randn(s, generator=g, dtype=torch.float64) for s in [(2, 4, 3, 8), (2, 2, 3, 8), (2, 3, 8), (2, 3, 8)]
    )
    with gk.use_backend("numpy"):
        ours = gk.functional.apply_rotary_pos_emb(q, k, cos, sin)
    for a, b in zip(ours, gk_patch._rope_math(q, k, cos, sin), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _copied(cls: type, forward_source: str | None = None, **globals_changed) -> type:
    """``cls`` as transformers copies a class into another model's file: another class in another
    module, its forward a new function of the same code (or of ``forward_source``) reading that
    module's globals (the same objects, but ``globals_changed``)."""
    forward = cls.forward
    module_globals = {**forward.__globals__, **globals_changed}
    if forward_source is None:
        code = forward.__code__
    else:
        exec(compile(textwrap.dedent(forward_source), "<copied>", "exec"), module_globals)
        code = module_globals.pop("forward").__code__
    copy_of_forward = types.FunctionType(code, module_globals, "forward", forward.__defaults__, forward.__closure__)
    copy_of_forward.__dict__.update(forward.__dict__)  # a wrapper's __wrapped__
    return type(f"Copied{cls.__name__}", cls.__bases__, {
        **{k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")},
        "forward": copy_of_forward,
        "__module__": "transformers.models.copied.modeling_copied",
    })  # fmt: skip


_LLAMA_RMS_NORM_WITH_EPS_TWICE = """
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + 2 * self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)
"""


@pytest.mark.parametrize(
    "change, converted",
    [("none", True), ("code", False), ("globals", False)],
)
def test_classes_whose_code_is_a_read_class_s_get_its_rule(change, converted):
    """A copy of Llama's RMSNorm and MLP in another module (as transformers' modular files make
    them) is converted as Llama's; one whose forward's code differs (a constant, an operation) or
    reads another global (``torch``) is left, and so are the blocks whose norm it is."""
    model = _build("llama")
    norm_class = type(model.model.norm)
    source = _LLAMA_RMS_NORM_WITH_EPS_TWICE if change == "code" else None
    globals_changed = {"torch": types.SimpleNamespace(**vars(torch))} if change == "globals" else {}
    copied_norm = _copied(norm_class, source, **globals_changed)
    copied_mlp = _copied(type(model.model.layers[0].mlp))
    for module in model.modules():
        if type(module) is norm_class:
            module.__class__ = copied_norm
        elif type(module).__name__ == "LlamaMLP":
            module.__class__ = copied_mlp
    expected = _step(copy.deepcopy(model), _batch("llama"))
    report = gk.patch(model)
    swapped = {name: kind for name, _, kind in report.swapped}
    norms = [n for n, m in model.named_modules() if gk_patch._original_class(m) is copied_norm]
    assert len(norms) == 5 and all((swapped.get(n) == "RMSNorm") is converted for n in norms)
    assert report.counts["GatedMLP"] == 2
    blocks = ["model.layers.0", "model.layers.1"]
    assert all((swapped.get(n) == "ResidualNorm") is converted for n in blocks)
    left = {n: why for n, _, why in report.left}
    assert converted or all("is not converted to one of ours" in left[n] for n in blocks)
    loss, logits, grads = _step(model, _batch("llama"))
    torch.testing.assert_close(loss, expected[0])
    torch.testing.assert_close(logits, expected[1])
    for key in grads:
        torch.testing.assert_close(grads[key], expected[2][key], rtol=1e-4, atol=1e-6)


class _CausalLMOfItsOwn(transformers.LlamaForCausalLM):
    """A causal LM whose forward is none read (a user's, or a model's that patch does not know),
    calling transformers' loss function as causal LMs do."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids=input_ids, **kwargs).last_hidden_state)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


def test_logits_loss_of_a_causal_lm_none_read_and_fused_left():
    """loss="logits" swaps the function such a forward calls for ours, which computes the same
    from what any caller gives it; loss="fused", which changes what the forward hands the loss,
    leaves it and says so."""
    original = _build("llama")
    original.__class__ = _CausalLMOfItsOwn
    batch = _batch("llama")
    expected = _step(copy.deepcopy(original), batch)
    model = copy.deepcopy(original)
    report = gk.patch(model)
    assert ("loss_function", "ForCausalLMLoss", "CrossEntropyLoss") in report.swapped
    loss, logits, grads = _step(model, batch)
    torch.testing.assert_close(loss, expected[0])
    for key in grads:
        torch.testing.assert_close(grads[key], expected[2][key], rtol=1e-4, atol=1e-6)
    report = gk.patch(copy.deepcopy(original), loss="fused")
    left = {n: why for n, _, why in report.left}
    assert "loss='logits' swaps it" in left["loss_function"]


def test_same_code_reads_wrappers_methods_and_docstrings():
    llama = importlib.import_module("transformers.models.llama.modeling_llama")
    gemma = importlib.import_module("transformers.models.gemma.modeling_gemma")
    same_code = gk_patch._same_code
    mistral = importlib.import_module("transformers.models.mistral.modeling_mistral")
    # a causal LM's forward under transformers' decorators; Mistral's, its docstring Mistral's: the same
    assert same_code(_copied(llama.LlamaForCausalLM), llama.LlamaForCausalLM)
    assert same_code(mistral.MistralForCausalLM, llama.LlamaForCausalLM)
    # Gemma's RMSNorm's forward calls its _norm: compared too
    assert same_code(_copied(gemma.GemmaRMSNorm), gemma.GemmaRMSNorm)
    changed_norm = _copied(gemma.GemmaRMSNorm)
    changed_norm._norm = lambda self, x: x
    assert not same_code(changed_norm, gemma.GemmaRMSNorm)
    assert not same_code(gemma.GemmaRMSNorm, llama.LlamaRMSNorm)


def test_every_transformers_rule_is_checked_against_its_class():
    builders = [*(build for build, _ in MODELS.values()), *FUSED_LOSS_MODELS.values()]
    classes = {type(m) for build in builders for m in build().modules()}
    # timm's rules join once timm is imported (tests/test_patch_timm.py checks them)
    rules = {cls for cls in gk_patch._third_party_rules() if cls.__module__.startswith("transformers.")}
    assert rules and rules <= classes
    assert transformers.pytorch_utils.Conv1D in classes


class _QuickGELU(nn.Module):
    """CLIP's activation as its paper writes it, for a reference."""

    def forward(self, z):
        return z * torch.sigmoid(1.702 * z)


class _ReLUSquared(nn.Module):
    def forward(self, z):
        return F.relu(z) ** 2


@pytest.mark.parametrize(
    "name",
    [
        n
        for n in gk_patch._TRANSFORMERS_ACTIVATIONS
        if getattr(activations, n, None) and getattr(activations, n).__name__ == n
    ]
    + ["gelu_python", "gelu_python_tanh"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_transformers_activation_fuses_with_the_same_math(name, dtype):
    act = activations.ACT2FN[name] if name in activations.ACT2CLS else getattr(activations, name)()
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(6, 8), act, nn.Linear(8, 3)).to(dtype)
    model = copy.deepcopy(original)
    report = gk.patch(model)
    assert report.swapped == [("0", f"Linear+{type(act).__name__}", "LinearAct")]
    x = torch.randn(5, 6, dtype=dtype) * 3
    # the math claimed, in fp64: FastGELU's 10-digit sqrt(2/pi) shows at 1e-12
    reference = copy.deepcopy(original).double()
    reference[1] = {
        "relu": nn.ReLU(),
        "gelu": nn.GELU(),
        "gelu_tanh": nn.GELU(approximate="tanh"),
        "silu": nn.SiLU(),
        "quick_gelu": _QuickGELU(),
        "relu_squared": _ReLUSquared(),
    }[model[0].activation]
    out, out_theirs, out_exact = model(x), original(x), reference(x.double())
    assert_matches(out, out_theirs, out_exact)
    for m, y in ((model, out), (original, out_theirs), (reference, out_exact)):
        y.square().sum().backward()
    for a, b, c in zip(model.parameters(), original.parameters(), reference.parameters()):
        assert_matches(a.grad, b.grad, c.grad)


@pytest.mark.parametrize("name, math", [("LaplaceActivation", "a Laplace CDF"), ("LinearActivation", "the identity")])
def test_activation_with_other_math_is_left_with_its_reason(name, math):
    model = nn.Sequential(nn.Linear(4, 4), getattr(activations, name)())
    report = gk.patch(model)
    assert type(model[0]) is nn.Linear
    why = f"activation {name} computes {math}: none of relu/gelu/gelu_tanh/silu/quick_gelu/relu_squared"
    assert report.left == [("0", "Linear", f"followed by {name} 1: {why}"), ("1", name, why)]


def test_activation_whose_forward_was_replaced_is_checked_not_trusted():
    """A class is only a claim: a forward swapped for another (a hub kernel, a user's) is probed."""
    act = activations.NewGELUActivation()
    act.forward = lambda x: F.gelu(x) * 1.01
    model = nn.Sequential(nn.Linear(4, 4), act)
    report = gk.patch(model)
    assert type(model[0]) is nn.Linear
    assert dict((n, why) for n, _, why in report.left)["1"].startswith("its math differs from gelu_tanh (max error")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpt2_conv1d_fuses_with_its_weight_as_stored(dtype):
    conv1d = transformers.pytorch_utils.Conv1D
    torch.manual_seed(0)
    original = nn.Sequential(conv1d(8, 6), activations.NewGELUActivation()).to(dtype)
    model = copy.deepcopy(original)
    report = gk.patch(model)
    assert report.swapped == [("0", "Conv1D+NewGELUActivation", "LinearAct")]
    assert isinstance(model[0], conv1d) and model[0].weight.shape == (6, 8)
    assert list(model.state_dict()) == list(original.state_dict())
    x = torch.randn(2, 3, 6, dtype=dtype)
    out = model(x)
    assert_matches(out, original(x), copy.deepcopy(original).double()(x.double()))
    out.square().sum().backward()
    original(x).square().sum().backward()
    for a, b in zip(model.parameters(), original.parameters()):
        assert_matches(a.grad, b.grad, None if dtype == torch.float64 else b.grad.double())
    gk.unpatch(model)
    assert type(model[0]) is conv1d and type(model[1]) is activations.NewGELUActivation
    assert torch.equal(model(x), original(x))


def _table() -> str:
    """model | swapped by kind | left, with reasons (counted by class and reason)."""
    rows = ["| model | swapped by kind | left (count x class: reason) |", "|---|---|---|"]
    for name in MODELS:
        report = gk.patch(_build(name), loss="fused" if name in CAUSAL else "logits")
        swapped = ", ".join(f"{kind} {n}" for kind, n in report.counts.items())
        left = Counter((cls, re.sub(r"\.\d+\.", ".N.", why)) for _, cls, why in report.left)
        reasons = "; ".join(f"{n} x {cls}: {why}" for (cls, why), n in left.items())
        rows.append(f"| {name} | {swapped} | {reasons} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(_table())


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_lora_wrapping_fused_projections_after_patch_computes_the_unpatched_model(name):
    """The projections whose activation gk.patch fused (GPT-2's Conv1D ``c_fc``, BERT's
    intermediate Linear) wrapped afterwards as peft's LoRA wraps them (``get_peft_model`` after
    ``gk.patch``): the activation applies to the wrapper's sum, as in the unpatched model."""
    fused = {"gpt2": "mlp.c_fc", "bert": "intermediate.dense"}[name]
    original = _build(name, torch.float64)
    model = copy.deepcopy(original)
    gk.patch(model)
    for m in (original, model):
        torch.manual_seed(2)
        for block_name, block in m.named_modules():
            if block_name.endswith(fused):
                parent, _, key = block_name.rpartition(".")
                setattr(m.get_submodule(parent), key, LoRA(block))
    assert sum(type(m) is LoRA for m in model.modules()) == 2
    batch = _batch(name)
    loss, logits, grads = _step(model, batch)
    loss_theirs, logits_theirs, grads_theirs = _step(original, batch)
    torch.testing.assert_close(logits, logits_theirs)
    assert grads.keys() == grads_theirs.keys()
    for key in grads:
        torch.testing.assert_close(grads[key], grads_theirs[key])


class _SavedCopy(nn.Module):
    """peft's ``modules_to_save`` wrapper: the layer kept, a deep copy of it trained in its place."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.original_module = layer
        self.trained = copy.deepcopy(layer)

    def forward(self, x):
        return self.trained(x)


@pytest.mark.parametrize("wrap", ["saved_copy", "lora"])
def test_fused_loss_reads_the_logits_of_a_head_wrapped_after_patch(wrap):
    """``loss="fused"``, then the output layer wrapped as peft wraps it (``modules_to_save=["lm_head"]``,
    when new tokens are trained, or LoRA on it): the wrapper computes the logits, and the loss
    takes them as logits (the fusion given up), as the unpatched model with the same wrapper."""
    original = _build("llama", torch.float64)
    model = copy.deepcopy(original)
    gk.patch(model, loss="fused")
    for m in (original, model):
        torch.manual_seed(2)
        m.lm_head = _SavedCopy(m.lm_head) if wrap == "saved_copy" else LoRA(m.lm_head)
    batch = _batch("llama")
    loss, logits, grads = _step(model, batch)
    loss_theirs, logits_theirs, grads_theirs = _step(original, batch)
    # transformers' loss is fp32 (it casts the logits), ours fp32 from fp64 sums: fp32's tolerances
    torch.testing.assert_close(loss, loss_theirs)
    torch.testing.assert_close(logits, logits_theirs)
    assert grads.keys() == grads_theirs.keys()
    for key in grads:
        torch.testing.assert_close(grads[key], grads_theirs[key], rtol=1e-5, atol=1e-6)


def test_token_embeddings_resized_after_a_fused_patch():
    """``resize_token_embeddings`` after ``loss="fused"`` (new tokens for fine-tuning) puts a new
    output layer in the old one's place: the loss takes its logits, as the unpatched model's."""
    original = _build("llama", torch.float64)
    model = copy.deepcopy(original)
    gk.patch(model, loss="fused")
    for m in (original, model):
        torch.manual_seed(3)
        m.resize_token_embeddings(VOCAB + 5, mean_resizing=False)
    model.load_state_dict(original.state_dict())
    batch = _batch("llama")
    batch["labels"][1, -1] = VOCAB + 4  # a new token
    loss, logits, _ = _step(model, batch)
    loss_theirs, logits_theirs, _ = _step(original, batch)
    assert logits.shape[-1] == VOCAB + 5
    torch.testing.assert_close(loss, loss_theirs)
    torch.testing.assert_close(logits, logits_theirs)
