"""End to end: transformers loads our compressed-tensors tensors + config and computes the
same logits as the model with the dequantized weights put in by hand."""

import json

import pytest
import torch
from safetensors.torch import save_file

from tests.formats_support import fp8, int8_w8a8, w4
from quantkit.formats import FORMATS
from quantkit.quantizers.rtn import quantize_rtn

transformers = pytest.importorskip("transformers")


def _tiny_llama():
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
@pytest.mark.parametrize(
    "scheme", [w4(False, 32), w4(True, 32, bits=8), int8_w8a8("channel", "token"), fp8("channel", None)],
    ids=["w4-asym", "w8-sym", "w8a8-int8", "fp8-weight-only"],
)
def test_transformers_loads_and_decompresses(tmp_path, scheme):
    fmt = FORMATS["compressed-tensors"]()
    model = _tiny_llama()
    tensors, ref = {}, _tiny_llama()
    for name, param in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and "layers." in name and "proj" in name:
            qw = quantize_rtn(param.float(), scheme)
            tensors.update(fmt.weight_tensors(module, qw, torch.bfloat16))
            stored = fmt.weight_tensors(module, qw, torch.bfloat16)[f"{module}.weight_scale"]
            qw.scale = stored.float()
            ref.get_parameter(name).data = qw.dequantize(torch.float32).to(torch.bfloat16)
        else:
            tensors[name] = param.contiguous()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = fmt.quantization_config(scheme, ["lm_head"])
    (tmp_path / "config.json").write_text(json.dumps(config))

    qcfg = transformers.CompressedTensorsConfig(run_compressed=False)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.bfloat16, quantization_config=qcfg
    ).eval()
    quantized = [n for n in ref.state_dict() if "proj.weight" in n]
    assert len(quantized) == 7
    for name in quantized:
        got_w = loaded.get_parameter(name).data.float()
        # bf16 round trip of (q - z) * s; an unloaded or mis-packed weight is far off
        torch.testing.assert_close(got_w, ref.get_parameter(name).data.float(), rtol=0, atol=0)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = loaded(ids).logits.float()
        want = ref(ids).logits.float()
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2)
