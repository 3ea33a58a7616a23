"""MoLoRA: LoRA experts per block with a top-k router (the AlphaLoRA adapter), on tiny-llama."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from steps.allocate import AllocationError, allocate
from steps.core.data import kjv_splits
from steps.core.errors import TailwiseError
from steps.core.factory import build_model, byte_tokenizer
from steps.finetune.molora import (
    LLAMA_TARGETS,
    MoLoRAConfig,
    MoLoRAError,
    MoLoRALinear,
    add_molora,
    expert_counts,
    load_molora,
    merge_molora,
    molora_layers,
    molora_state_dict,
    reset_router_stats,
    router_stats,
    save_molora,
    trainable_parameter_count,
    uniform_counts,
)
from steps.spectral import analyze

TOKENS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def tiny(seed: int = 0) -> nn.Module:
    return build_model("tiny-llama", seed=seed)


def logits(model: nn.Module, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


@torch.no_grad()
def randomise_adapters(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B (and fresh A/routers) so the adapters change the outputs."""
    generator = torch.Generator().manual_seed(seed)
    for param in molora_state_dict_params(model):
        param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def molora_state_dict_params(model: nn.Module) -> list[nn.Parameter]:
    return [
        p
        for layer in molora_layers(model).values()
        for key, p in layer.named_parameters()
        if not key.startswith("base_layer.")
    ]


# ------------------------------------------------------------------------ expert counts


@pytest.fixture(scope="module")
def alphalora_decisions() -> pa.Table:
    """AlphaLoRA's allocation (alpha_peak, the reference estimator) for tiny-llama, T = 7."""
    metrics = analyze(tiny(), estimator="alpha_peak", workers=1)
    metrics = metrics.filter(pc.is_valid(metrics["block"]))  # as the allocate step does
    return allocate(metrics, "alphalora", total=7)


def test_alphalora_table_counts_sum_to_the_budget(alphalora_decisions, tmp_path) -> None:
    path = tmp_path / "decisions.parquet"
    pq.write_table(alphalora_decisions, path)
    model = tiny()
    counts = expert_counts(model, path)
    assert sum(counts.values()) == 7
    assert set(counts) == {0, 1}
    assert counts == dict(
        zip(
            alphalora_decisions["block"].to_pylist(),
            alphalora_decisions["experts"].to_pylist(),
            strict=True,
        )
    )
    add_molora(model, path, MoLoRAConfig())
    layers = molora_layers(model)
    assert len(layers) == 2 * len(LLAMA_TARGETS)
    assert sum(layer.num_experts for layer in layers.values()) == 7 * len(LLAMA_TARGETS)
    table_top_k = dict(
        zip(
            alphalora_decisions["block"].to_pylist(),
            alphalora_decisions["top_k"].to_pylist(),
            strict=True,
        )
    )
    assert all(layer.top_k == table_top_k[layer.block] for layer in layers.values())


def test_a_table_without_block_column_is_placed_by_name(alphalora_decisions) -> None:
    table = alphalora_decisions.drop_columns(["block"])
    assert expert_counts(tiny(), table) == expert_counts(tiny(), alphalora_decisions)


def test_uniform_counts_spread_the_budget() -> None:
    assert uniform_counts(tiny(), 7) == {0: 4, 1: 3}
    assert uniform_counts(30, 150) == dict.fromkeys(range(30), 5)
    assert sum(uniform_counts(30, 97).values()) == 97


def test_int_and_mapping_counts() -> None:
    assert expert_counts(tiny(), 3) == {0: 3, 1: 3}
    assert expert_counts(tiny(), {"1": 2, 0: 5}) == {0: 5, 1: 2}


# ------------------------------------------------------------------------ structure


def test_a_block_with_more_experts_has_more_trainable_parameters() -> None:
    model = add_molora(tiny(), {0: 1, 1: 3}, MoLoRAConfig(r=4))
    per_block = {0: 0, 1: 0}
    expected = {0: 0, 1: 0}
    for layer in molora_layers(model).values():
        base = layer.base_layer
        per_block[layer.block] += sum(p.numel() for p in layer.parameters() if p.requires_grad)
        n = layer.num_experts
        router = n * base.in_features if n > 1 else 0
        expected[layer.block] += n * 4 * (base.in_features + base.out_features) + router
    assert per_block == expected
    assert per_block[1] > 3 * per_block[0]
    assert trainable_parameter_count(model) == sum(per_block.values())


def test_base_weights_are_frozen_and_outputs_unchanged_at_init() -> None:
    reference = logits(tiny())
    model = add_molora(tiny(), 4, MoLoRAConfig())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n or ".router." in n) for n in trainable)
    # B starts at zero (PEFT's init), so the adapted model computes what the base did.
    assert torch.equal(logits(model), reference)


@pytest.mark.parametrize(("experts", "top_k"), [(4, 1), (4, 2), (5, 3), (3, 3)])
def test_router_uses_exactly_top_k_experts_per_token(experts: int, top_k: int) -> None:
    torch.manual_seed(0)
    model = add_molora(tiny(), experts, MoLoRAConfig(top_k=top_k))
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 10, layer.base_layer.in_features)
    gates = layer.gates(x)
    assert gates.shape == (3, 10, experts)
    assert ((gates > 0).sum(-1) == top_k).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(3, 10))
    # The chosen experts are the ones with the largest router logits.
    chosen = gates.topk(top_k, dim=-1).indices.sort(-1).values
    best = layer.router(x).topk(top_k, dim=-1).indices.sort(-1).values
    assert torch.equal(chosen, best)
    # A forward pass routes every token of every projection to k experts.
    reset_router_stats(model)
    logits(model)
    for row in router_stats(model):
        assert row["assignments"] == TOKENS.numel() * top_k * len(LLAMA_TARGETS)
        assert sum(row["load"]) == pytest.approx(1.0)


def test_single_expert_blocks_use_top_1_without_router() -> None:
    model = add_molora(tiny(), {0: 1, 1: 4}, MoLoRAConfig(top_k=2))
    for layer in molora_layers(model).values():
        assert (layer.top_k, layer.router is None) == (
            (1, True) if layer.block == 0 else (2, False)
        )


# ------------------------------------------------------------------------- PEFT parity


def test_one_expert_top_1_matches_peft_lora() -> None:
    from peft import LoraConfig, get_peft_model

    config = MoLoRAConfig(r=8, lora_alpha=16, dropout=0.05, top_k=1)
    ours = add_molora(tiny(), 1, config)
    peft_config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=list(LLAMA_TARGETS)
    )
    theirs = get_peft_model(tiny(), peft_config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, layer in molora_layers(ours).items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            a = peft_layer.lora_A["default"].weight
            b = peft_layer.lora_B["default"].weight
            assert a.shape == layer.lora_A[0].shape and b.shape == layer.lora_B[0].shape
            assert peft_layer.scaling["default"] == layer.scaling
            b.copy_(torch.randn(b.shape, generator=generator) * 0.05)
            layer.lora_A[0].copy_(a)
            layer.lora_B[0].copy_(b)
    expected = logits(theirs)
    assert not torch.allclose(expected, logits(tiny()), atol=1e-3)  # the adapters do something
    torch.testing.assert_close(logits(ours), expected, atol=1e-6, rtol=0)
    assert trainable_parameter_count(ours) == trainable_parameter_count(theirs)


# ------------------------------------------------------------------------ save / load


def test_save_and_load_round_trip_on_a_fresh_base(tmp_path) -> None:
    model = add_molora(tiny(), {0: 2, 1: 5}, MoLoRAConfig(r=4, lora_alpha=8, top_k=2))
    randomise_adapters(model)
    path = save_molora(model, tmp_path / "adapter.safetensors")
    fresh = load_molora(tiny(), path)
    assert {n: layer.num_experts for n, layer in molora_layers(fresh).items()} == {
        n: layer.num_experts for n, layer in molora_layers(model).items()
    }
    assert fresh.molora_config == model.molora_config
    assert torch.equal(logits(fresh), logits(model))
    saved, loaded = molora_state_dict(model), molora_state_dict(fresh)
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_load_refuses_a_model_of_another_width(tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = save_molora(add_molora(tiny(), 2, MoLoRAConfig()), tmp_path / "adapter.safetensors")
    narrow = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=257,
            hidden_size=64,
            intermediate_size=172,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(MoLoRAError, match=r"does not fit the model: .*shape"):
        load_molora(narrow, path)
    assert not molora_layers(narrow)
    assert all(p.requires_grad for p in narrow.parameters())


def test_load_refuses_a_model_with_other_blocks_and_a_foreign_file(tmp_path) -> None:
    from safetensors.torch import save_file

    path = save_molora(add_molora(tiny(), {0: 1, 1: 3}), tmp_path / "adapter.safetensors")
    one_block = tiny()
    del one_block.model.layers[1]
    with pytest.raises(MoLoRAError, match=r"does not fit the model: .*block"):
        load_molora(one_block, path)
    foreign = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(MoLoRAError, match="no tailwise.molora metadata"):
        load_molora(tiny(), foreign)


# ---------------------------------------------------------------------------- merging


def test_merge_single_expert_top_1_gives_the_same_logits() -> None:
    model = add_molora(tiny(), 1, MoLoRAConfig(top_k=1))
    randomise_adapters(model)
    before = logits(model)
    merged = merge_molora(model)
    assert not molora_layers(merged)
    assert all(type(m) is not MoLoRALinear for m in merged.modules())
    torch.testing.assert_close(logits(merged), before, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(tiny()), before, atol=1e-3)


def test_merge_constant_gates_and_refuse_input_dependent_routing() -> None:
    model = add_molora(tiny(), 3, MoLoRAConfig(top_k=2))
    randomise_adapters(model)
    with pytest.raises(MoLoRAError, match="route tokens by input"):
        merge_molora(model)
    assert len(molora_layers(model)) == 2 * len(LLAMA_TARGETS)  # left as it was
    with torch.no_grad():
        for layer in molora_layers(model).values():
            layer.router.weight.zero_()  # gates no longer depend on the input
    before = logits(model)
    torch.testing.assert_close(logits(merge_molora(model)), before, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- training


def kjv_batches(seqlen: int = 64, batch: int = 8, count: int = 3) -> list[torch.Tensor]:
    text = kjv_splits()["train"].read_text(encoding="utf-8")[: seqlen * batch * count * 2]
    ids = torch.tensor(byte_tokenizer()(text)["input_ids"][: seqlen * batch * count])
    return list(ids.view(count, batch, seqlen))


def test_training_reduces_the_loss_and_changes_only_adapters() -> None:
    torch.manual_seed(0)
    model = add_molora(tiny(), {0: 3, 1: 2}, MoLoRAConfig(r=8, top_k=2))
    base_before = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    frozen_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad
    }
    adapters_before = {k: v.clone() for k, v in molora_state_dict(model).items()}
    batches = kjv_batches()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def loss_on(tokens: torch.Tensor) -> torch.Tensor:
        return model(input_ids=tokens, labels=tokens).loss

    model.eval()
    with torch.no_grad():
        start = sum(float(loss_on(b)) for b in batches) / len(batches)
    model.train()
    for _ in range(4):
        for tokens in batches:
            optimizer.zero_grad()
            loss_on(tokens).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        end = sum(float(loss_on(b)) for b in batches) / len(batches)
    assert end < start - 0.5, (start, end)

    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base_before.items())
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen_before.items())
    after = molora_state_dict(model)
    assert all(not torch.equal(after[k], v) for k, v in adapters_before.items())


# -------------------------------------------------------------------------- bad input


def test_budget_smaller_than_the_layers_is_an_error() -> None:
    with pytest.raises(MoLoRAError, match="budget 1 is smaller than the 2 layers"):
        uniform_counts(tiny(), 1)
    metrics = analyze(tiny(), estimator="alpha_peak", workers=1)
    metrics = metrics.filter(pc.is_valid(metrics["block"]))
    with pytest.raises(AllocationError, match="fewer than the 2 blocks"):
        allocate(metrics, "alphalora", total=1)
    assert issubclass(AllocationError, TailwiseError)


def test_table_naming_a_missing_block_is_an_error(alphalora_decisions, tmp_path) -> None:
    shifted = alphalora_decisions.set_column(
        alphalora_decisions.schema.get_field_index("block"),
        "block",
        pa.array([0, 5], pa.int64()),
    )
    path = tmp_path / "shifted.parquet"
    pq.write_table(shifted, path)
    with pytest.raises(MoLoRAError, match=r"names block\(s\) \[5\] but the model has blocks 0-1"):
        expert_counts(tiny(), path)
    with pytest.raises(MoLoRAError, match=r"no expert count for block\(s\) \[1\]"):
        expert_counts(tiny(), alphalora_decisions.slice(0, 1))
    with pytest.raises(MoLoRAError, match="no `experts` column"):
        expert_counts(tiny(), alphalora_decisions.drop_columns(["experts"]))
    with pytest.raises(MoLoRAError, match="does not exist"):
        expert_counts(tiny(), tmp_path / "missing.parquet")


def test_bad_counts_and_configs_are_errors() -> None:
    with pytest.raises(MoLoRAError, match="top_k=3 exceeds the 2 experts of block 0"):
        add_molora(tiny(), 2, MoLoRAConfig(top_k=3))
    with pytest.raises(MoLoRAError, match="block 1 gets 0 experts"):
        expert_counts(tiny(), {0: 2, 1: 0})
    with pytest.raises(MoLoRAError, match="r=0"):
        MoLoRAConfig(r=0)
    with pytest.raises(MoLoRAError, match="no module named 'c_attn'"):
        add_molora(tiny(), 2, MoLoRAConfig(targets=("c_attn",)))
    model = add_molora(tiny(), 2)
    with pytest.raises(MoLoRAError, match="already has MoLoRA"):
        add_molora(model, 2)
    with pytest.raises(MoLoRAError, match="has no MoLoRA adapters to merge"):
        merge_molora(tiny())
