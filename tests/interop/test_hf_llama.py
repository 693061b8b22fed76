"""Hugging Face LlamaForCausalLM <-> vlkit: logits parity, bit-exact export, generation parity, strict key checks."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from vlkit.interop.hf_llama import load_hf_llama, read_safetensors_dir, save_hf_llama
from vlkit.interop.native import ModelFormatError
from vlkit.models import create_model
from vlkit.models.generate import generate, left_pad

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}  # fmt: skip


def hf_model(tied=False, kv_heads=2, rope=None, theta=10000.0, std=0.02, **kw) -> HFLlama:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
        vocab_size=128, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": theta, **(rope or {})}, initializer_range=std,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw,
    )  # fmt: skip
    return HFLlama(cfg).eval()


def hf_dir(tmp_path, model, **save_kw):
    path = tmp_path / "hf"
    model.save_pretrained(path, **save_kw)
    return path


def logits_close(vl, hf, ids, mask=None):
    positions = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=positions).logits
        got = vl(ids, attention_mask=mask)
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "tied, kv_heads, rope, theta",
    [(False, 2, None, 10000.0), (True, 4, None, 10000.0), (False, 1, LLAMA3, 500000.0),
     (True, 2, {"rope_type": "linear", "factor": 4.0}, 10000.0)],
)  # fmt: skip
def test_import_gives_hf_logits(tmp_path, tied, kv_heads, rope, theta):
    hf = hf_model(tied, kv_heads, rope, theta)
    model = load_hf_llama(hf_dir(tmp_path, hf)).eval()
    c = model.config.llm
    assert (c.num_query_groups, c.share_embeddings_and_output_weights, c.rotary_base) == (kv_heads, tied, theta)
    assert (model.llm.lm_head.weight is model.llm.embed.weight) == tied
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    logits_close(model, hf, ids)  # 40 > original context 16: llama3 scaling matters
    mask = torch.ones_like(ids)
    mask[1, :11] = 0
    logits_close(model, hf, ids, mask)


def test_sharded_checkpoint_imports_and_dtype_is_kept(tmp_path):
    hf = hf_model().to(torch.bfloat16)
    path = hf_dir(tmp_path, hf, max_shard_size="30KB")
    assert (path / "model.safetensors.index.json").is_file()
    model = load_hf_llama(path)
    assert model.llm.embed.weight.dtype == torch.bfloat16 and model.llm.rope.inv_freq.dtype == torch.float32
    state = read_safetensors_dir(path)
    assert torch.equal(model.llm.lm_head.weight, state["lm_head.weight"])
    assert load_hf_llama(path, dtype=torch.float32).llm.embed.weight.dtype == torch.float32


@pytest.mark.parametrize("tied", [False, True])
def test_export_round_trip_is_bit_identical(tmp_path, tied):
    hf = hf_model(tied, rope=LLAMA3)
    src = hf_dir(tmp_path, hf)
    model = load_hf_llama(src)
    out = save_hf_llama(model, tmp_path / "out")
    exported, original = load_file(out / "model.safetensors"), load_file(src / "model.safetensors")
    assert exported.keys() == original.keys()
    for key, t in original.items():
        assert torch.equal(exported[key], t), key
    back = HFLlama.from_pretrained(out).eval()
    assert back.config.tie_word_embeddings == tied and back.config.num_key_value_heads == 2
    assert back.config.rope_parameters["rope_type"] == "llama3" and back.config.eos_token_id == 2
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)
    again = load_hf_llama(out)
    for (name, a), b in zip(again.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_vlkit_model_exports_in_shards_and_comes_back(tmp_path):
    torch.manual_seed(0)
    model = create_model("llama-tiny").eval()
    out = save_hf_llama(model, tmp_path / "out", max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = load_hf_llama(out).eval()
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))
    assert torch.equal(back(ids), model(ids))
    logits_close(model, HFLlama.from_pretrained(out).eval(), ids)


def test_greedy_generation_equals_hf_generate(tmp_path):
    hf = hf_model(std=0.3)  # large weights: a random model whose greedy continuation does not just repeat
    model = load_hf_llama(hf_dir(tmp_path, hf)).eval()
    ids, mask = left_pad([[1, 5, 9, 33, 17, 80, 3], [1, 44, 12], [1, 7, 100, 7, 7]], pad_token_id=0)
    for prompt, prompt_mask in ((ids[:1], None), (ids, mask)):
        ours = generate(model, prompt, attention_mask=prompt_mask, max_new_tokens=20, eos_token_ids=[])
        want = hf.generate(prompt, attention_mask=prompt_mask, max_new_tokens=20, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[:, prompt.shape[1]:]  # fmt: skip
        assert torch.equal(ours.tokens, want)
    assert len(set(ours.rows()[0])) > 5
    # With its eos: Hugging Face pads a finished row with pad_token_id, as vlkit does.
    eos = int(want[1, 4])
    ours = generate(model, ids, attention_mask=mask, max_new_tokens=20, eos_token_ids=[eos], pad_token_id=0)
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=eos,
                         pad_token_id=0)[:, ids.shape[1]:]  # fmt: skip
    assert torch.equal(ours.tokens, theirs) and ours.finish_reasons[1] == "eos"


def test_unknown_and_missing_tensors_are_named(tmp_path):
    path = hf_dir(tmp_path, hf_model())
    state = load_file(path / "model.safetensors")
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelFormatError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\].*extra.weight"):
        load_hf_llama(path)


def test_wrong_shapes_and_unsupported_configs_are_refused(tmp_path):
    path = hf_dir(tmp_path, hf_model())
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 80}))
    with pytest.raises(ModelFormatError, match=r"mlp.gate.weight is stored as \[96, 64\], the config implies \[80, "):
        load_hf_llama(path)
    for change, message in (
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "RoPE type 'yarn'"),
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "not a Hugging Face LLaMA config"),
        ({"head_dim": 32}, "head_dim=32"),
    ):
        (path / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ModelFormatError, match=message):
            load_hf_llama(path)


def test_a_directory_without_safetensors_is_refused(tmp_path):
    path = hf_dir(tmp_path, hf_model())
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="only safetensors"):
        load_hf_llama(path)
