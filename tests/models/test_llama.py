"""The LLaMA decoder: presets, FLOPs, masks and positions, KV cache, tied head, checkpointing, config checks."""

from pathlib import Path

import pytest
import torch

from vlkit import load_model, save_model
from vlkit.config import ConfigError, load_config
from vlkit.models import create_model
from vlkit.parallel.checkpointing import apply_activation_checkpointing, towers
from vlkit.utils.flops import count_parameters, tower_flops


def tiny(**overrides):
    torch.manual_seed(0)
    return create_model("llama-tiny", **overrides).eval()


def ids_for(model, batch=2, length=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.llm.vocab_size, (batch, length), generator=g)


# The seeds/003 architecture table: (layers, hidden, ffn, heads, context) and LLaMA-2's exact parameter counts.
TABLE = {
    "llama2-7b": (32, 4096, 11008, 32, 4096, 6_738_415_616),
    "llama2-13b": (40, 5120, 13824, 40, 4096, 13_015_864_320),
}


@pytest.mark.parametrize("name", TABLE)
def test_presets_have_the_document_shapes_and_llama2_counts(name):
    model = create_model(name, device="meta")
    c = model.config.llm
    layers, hidden, ffn, heads, ctx, params = TABLE[name]
    assert (c.num_layers, c.hidden_size, c.ffn_size, c.num_attention_heads, c.encoder_seq_length) == (
        layers, hidden, ffn, heads, ctx)  # fmt: skip
    assert (c.vocab_size, c.layernorm_epsilon, c.rotary_base, c.bias) == (32000, 1e-5, 10000.0, False)
    assert count_parameters(model) == params


def test_tiny_preset_is_small_with_grouped_query_attention():
    model = create_model("llama-tiny", device="meta")
    assert count_parameters(model) < 200_000
    assert model.config.llm.num_query_groups == 2 and model.llm.transformer.blocks[0].attn.group_size == 2


def test_flops_count_every_matmul_and_full_attention():
    model = create_model("llama-tiny", device="meta")
    c = model.config.llm
    t, w, f, v, layers = 16, c.hidden_size, c.ffn_size, c.vocab_size, c.num_layers
    qkv_out = (c.num_attention_heads + 2 * c.num_query_groups) * c.head_dim
    per_layer = 2 * t * w * (qkv_out + w + 3 * f) + 2 * 2 * t * t * w  # projections, then QK^T and AV
    counts = tower_flops(model, text_length=t)["llm"]
    assert counts.forward == layers * per_layer + 2 * t * w * v
    assert counts.forward_backward == 3 * counts.forward


def test_inputs_embeds_equal_input_ids():
    model = tiny()
    ids = ids_for(model)
    torch.testing.assert_close(model(inputs_embeds=model.llm.embed(ids)), model(ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=model.llm.embed(ids))


def test_left_padding_gives_each_row_its_unpadded_logits():
    model = tiny()
    short = ids_for(model, batch=1, length=5, seed=2)
    long = ids_for(model, batch=1, length=9, seed=3)
    ids = torch.cat([torch.cat([torch.full((1, 4), 7), short], dim=1), long])
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        alone = model(short)
        other_pad = model(ids.masked_fill(mask == 0, 123), attention_mask=mask)
    assert torch.isfinite(out).all()  # padded queries see only themselves, never an empty (NaN) row
    torch.testing.assert_close(out[0, 4:], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], model(long)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other_pad[:, 4:], out[:, 4:], rtol=1e-5, atol=1e-5)  # pad ids are never read


def test_right_padding_needs_no_mask():
    model = tiny()
    ids = ids_for(model, batch=1, length=9)
    changed = ids.clone()
    changed[0, 6:] = 5
    with torch.no_grad():
        torch.testing.assert_close(model(changed)[:, :6], model(ids)[:, :6], rtol=0, atol=0)


@pytest.mark.parametrize("padded", [False, True])
def test_kv_cache_decoding_equals_the_full_forward(padded):
    model = tiny()
    ids = ids_for(model, batch=2, length=12)
    mask = torch.ones(2, 12, dtype=torch.long)
    if padded:
        mask[1, :3] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask if padded else None)
        cache = model.new_kv_cache(12)
        steps = [model(ids[:, :5], attention_mask=mask[:, :5] if padded else None, kv_cache=cache)]
        steps.append(model(ids[:, 5:8], attention_mask=mask[:, :8] if padded else None, kv_cache=cache))  # a chunk
        for i in range(8, 12):
            steps.append(model(ids[:, i : i + 1], attention_mask=mask[:, : i + 1] if padded else None, kv_cache=cache))
    assert cache.length == 12
    incremental = torch.cat(steps, dim=1)
    valid = mask.bool()
    torch.testing.assert_close(incremental[valid], full[valid], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot hold"):
        model(ids[:, :1], kv_cache=cache)


def test_cache_mask_must_cover_cached_and_new_positions():
    model = tiny()
    cache = model.new_kv_cache(8)
    ids = ids_for(model, batch=1, length=4)
    model(ids, kv_cache=cache)
    with pytest.raises(ValueError, match=r"\[1, 5\]"):
        model(ids[:, :1], attention_mask=torch.ones(1, 1), kv_cache=cache)


def test_logits_to_keep_returns_the_last_positions():
    model = tiny()
    ids = ids_for(model)
    torch.testing.assert_close(model(ids, logits_to_keep=1), model(ids)[:, -1:], rtol=1e-5, atol=1e-6)


def test_tied_head_shares_the_embedding_and_survives_save_and_load(tmp_path):
    model = tiny(llm__share_embeddings_and_output_weights=True)
    assert model.llm.lm_head.weight is model.llm.embed.weight
    untied = count_parameters(create_model("llama-tiny", device="meta"))
    c = model.config.llm
    assert count_parameters(model) == untied - c.vocab_size * c.hidden_size
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert loaded.llm.lm_head.weight is loaded.llm.embed.weight
    ids = ids_for(model)
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_bf16_model_keeps_float32_rope_frequencies():
    model = tiny().to(torch.bfloat16)
    rope = model.llm.rope
    assert rope.inv_freq.dtype == torch.bfloat16 and rope.frequencies().dtype == torch.float32
    torch.testing.assert_close(rope.frequencies(), tiny().llm.rope.inv_freq, rtol=0, atol=0)


def test_parallel_finds_the_decoder_and_selective_checkpointing_keeps_gradients():
    torch.manual_seed(0)
    plain = create_model("llama-tiny", llm__hidden_dropout=0.1)
    ckpt = create_model("llama-tiny", llm__hidden_dropout=0.1, llm__activations_checkpoint_granularity="selective")
    ckpt.load_state_dict(plain.state_dict())
    assert [name for name, _, _ in towers(ckpt)] == ["llm"]
    assert apply_activation_checkpointing(ckpt)
    ids = ids_for(plain, batch=2, length=8)
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(5)  # recomputation must replay the same dropout masks
        torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=0, msg=name)


def test_the_documents_flat_llm_block_loads_for_a_standalone_llama(tmp_path):
    yaml = tmp_path / "llm.yaml"
    yaml.write_text(
        "model:\n  arch: llama\n  mcore_gpt: False\n  encoder_seq_length: 4096\n  position_embedding_type: rope\n"
        "  num_layers: 40\n  hidden_size: 5120\n  ffn_hidden_size: 13824\n  num_attention_heads: 40\n"
        "  hidden_dropout: 0.0\n  attention_dropout: 0.0\n  ffn_dropout: 0.0\n  normalization: rmsnorm\n"
        "  bias: False\n  activation: 'fast-swiglu'\n"
    )
    c = load_config(yaml).model.llm
    assert (c.num_layers, c.hidden_size, c.ffn_size, c.num_attention_heads, c.activation) == (
        40, 5120, 13824, 40, "swiglu")  # fmt: skip


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.llm.rope_scaling={type: yarn, factor: 2}", "rope_scaling type 'yarn'"),
        ("model.llm.rope_scaling={rope_type: llama3, factor: 8}", "needs low_freq_factor"),
        ("model.llm.ffn_dropout=0.1", "ffn_dropout=0.1 is not implemented"),
        ("model.llm.num_query_groups=3", "not divisible by model.llm.num_query_groups=3"),
        ("model.llm.eos_token_ids=[600]", "eos_token_ids=600 is outside"),
    ],
)
def test_invalid_llm_settings_name_their_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("llama-tiny", [override])


def test_llama_arch_needs_an_llm_section():
    with pytest.raises(ConfigError, match="model.arch=llama needs a model.llm section"):
        load_config("clip-tiny", ["model.arch=llama"])


@pytest.mark.slow
def test_tensor_parallel_decoder_equals_one_process(torchrun):
    """Column/row-wise shards of the GQA blocks, per-row RoPE on local heads, and a cache shaped by local heads."""
    torchrun(Path(__file__).with_name("llama_tp_worker.py"), 2)
