"""NeMo .nemo checkpoints in: every documented weights layout (per-rank model_weights.ckpt at TP 1 / 2, with
pipeline stages, a model_weights/ torch_dist checkpoint; tar or extracted directory; Megatron-core and legacy names)
gives the source model's logits exactly; refusals name the file."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch
from nemo_files import write_nemo

import vlkit
from vlkit.cli import main
from vlkit.interop.files import ModelFormatError
from vlkit.interop.native import detect_format
from vlkit.interop.nemo import llm_config_from_nemo, load_nemo, nemo_llm_config
from vlkit.models import create_model


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return create_model("llama-tiny", llm__num_layers=2).eval()


def _same_logits(a, b):
    ids = torch.randint(0, a.llm.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(a(ids), b.eval()(ids))


@pytest.mark.parametrize(
    "tp, pp, mcore, layout, extract",
    [
        (1, 1, True, "rank", False),  # model_weights.ckpt at the root
        (2, 1, True, "rank", False),  # mp_rank_00/, mp_rank_01/
        (2, 2, True, "rank", True),  # tp_rank_XX_pp_rank_YYY/, extracted directory
        (2, 1, False, "rank", False),  # legacy (mcore_gpt: False) names
        (1, 1, True, "dist", False),  # model_weights/ torch_dist checkpoint, TP 1
        (2, 1, True, "dist", True),  # ... written by a TP-2 run: the same global tensors
    ],
)
def test_layouts_give_the_source_logits(tmp_path, source, tp, pp, mcore, layout, extract):
    path = write_nemo(tmp_path / "m.nemo", source, tp=tp, pp=pp, mcore=mcore, layout=layout, extract=extract)
    assert detect_format(path)[0] == "nemo"
    model = vlkit.load_model(path)
    assert model.config.llm.num_query_groups == 2 and model.config.llm.vocab_size == 512
    _same_logits(source, model)


def test_config_alone_and_convert_cli(tmp_path, source):
    path = write_nemo(tmp_path / "m.nemo", source, tp=2)
    cfg = nemo_llm_config(path)
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads) == (2, 64, 176, 4)
    assert main(["convert", "--from", "nemo", str(path), "--out", str(tmp_path / "out")]) == 0
    _same_logits(source, vlkit.load_model(tmp_path / "out"))
    assert main(["convert", str(path), "--out", str(tmp_path / "out2")]) == 0  # recognised by content
    _same_logits(source, vlkit.load_model(tmp_path / "out2"))


class NotATensor:
    pass


def _tar(path, files: dict[str, bytes]):
    with tarfile.open(path, "w:") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_refuses_a_pickle_that_is_not_weights_only(tmp_path, capsys):
    buf = io.BytesIO()
    torch.save({"model.embedding.word_embeddings.weight": torch.ones(2, 2), "x": NotATensor()}, buf)
    path = _tar(tmp_path / "evil.nemo", {"./model_config.yaml": b"num_layers: 1\n",
                                         "./model_weights.ckpt": buf.getvalue()})  # fmt: skip
    with pytest.raises(ModelFormatError, match=r"evil\.nemo:model_weights\.ckpt: refused"):
        load_nemo(path)
    assert main(["convert", "--from", "nemo", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "evil.nemo:model_weights.ckpt: refused" in err and len(err.strip().splitlines()) == 1


def test_refuses_an_unknown_layout(tmp_path, capsys):
    path = _tar(tmp_path / "odd.nemo", {"model_config.yaml": b"num_layers: 1\n", "weights/w.bin": b"x"})
    with pytest.raises(ModelFormatError, match=r"odd\.nemo: no NeMo weights found.*weights/w\.bin"):
        load_nemo(path)
    assert main(["convert", "--from", "nemo", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "odd.nemo: no NeMo weights found" in capsys.readouterr().err


def test_refuses_unknown_tensor_names(tmp_path):
    buf = io.BytesIO()
    torch.save({"model.decoder.layers.0.self_attention.rotary.weight": torch.ones(2)}, buf)
    path = _tar(tmp_path / "odd.nemo", {"model_config.yaml": b"num_layers: 1\n", "model_weights.ckpt": buf.getvalue()})
    with pytest.raises(ModelFormatError, match=r"odd\.nemo:model_weights\.ckpt: tensors of no known"):
        load_nemo(path)


def test_config_rope_scaling_and_refusals():
    base = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 176, "num_attention_heads": 4,
            "activation": "fast-swiglu", "normalization": "rmsnorm", "position_embedding_type": "rope"}  # fmt: skip
    # LLaMA-3.1 files (NeMo's converter sets scale_positional_embedding by default): the llama3 scheme.
    cfg = llm_config_from_nemo({**base, "mcore_gpt": True, "scale_positional_embedding": True})
    assert cfg.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    assert llm_config_from_nemo({**base, "seq_len_interpolation_factor": 4}).rope_scaling["factor"] == 4.0
    assert llm_config_from_nemo({**base, "kv_channels": 16}).num_attention_heads == 4  # 16 * 4 = 64: fine
    for extra, message in [
        ({"kv_channels": 32}, "kv_channels=32"),
        ({"megatron_legacy": True}, "megatron_legacy"),
        ({"openai_gelu": True}, "openai_gelu"),
        ({"scale_positional_embedding": True, "seq_len_interpolation_factor": 2, "mcore_gpt": True}, "both|only"),
    ]:
        with pytest.raises(ModelFormatError, match=message):
            llm_config_from_nemo({**base, **extra})
