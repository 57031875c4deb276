"""GGUF files of Mixture-of-Experts models in llama.cpp's layout (Mixtral: arch "llama" with ``llama.expert_count``,
Q/K rows permuted; "qwen2moe" with the shared expert; "qwen3moe"; "olmoe"; each layer's experts stacked in
``blk.N.ffn_{gate,up,down}_exps`` [E, N, K]), written here from the tiny random HF models of test_moe_models with
``gguf.GGUFWriter`` and the ``gguf`` package's own HF -> GGUF tensor-name map: the F32 file's logits and greedy
tokens equal HF's; quantized experts (Q8_0 / Q4_0 / Q4_1, mixed within a layer) stay quantized under
``quantization="gguf"`` and give the dequantized import's logits, as do the older per-expert tensor names; 3-D
block tensors decode bit-exactly as the ``gguf`` package does; malformed MoE files are clear errors."""
from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers

gguf = pytest.importorskip("gguf")

from fastinfer import LLM  # noqa: E402
from fastinfer.models.gguf_loader import GGUFFile, hf_name  # noqa: E402
from fastinfer.models.gguf_quants import dequantize, to_quantized  # noqa: E402
from fastinfer.models.loader import describe_quantization, load_model  # noqa: E402
from fastinfer.quantization.format import QuantizedExperts  # noqa: E402
from tests.models import test_moe_models  # noqa: E402
from tests.models.test_families import BATCH  # noqa: E402
from tests.models.test_moe_models import GREEDY, _hf_greedy, _logits  # noqa: E402

moe_dir = test_moe_models.moe_dir  # its fixture: family -> (HF directory, HF model)

Q = gguf.GGMLQuantizationType
ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "qwen3_moe_i64": "qwen3moe",
        "olmoe": "olmoe"}
HF_CLASS = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
            "olmoe": "OlmoeForCausalLM"}


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter on llama-arch Q/K rows: each head's two rotate-half halves interleaved in pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_arrays(hf, arch: str) -> dict[str, np.ndarray]:
    """The HF model's tensors as llama.cpp's converter writes them: GGUF names from ``gguf``'s tensor-name map,
    experts stacked per projection, llama-arch Q/K permuted, the shared-expert gate a vector; fp32 numpy."""
    cfg = hf.config
    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(model_arch, cfg.num_hidden_layers)
    dense = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)  # mlp_only_layers' dense MLPs
    out = {}
    for name, t in hf.state_dict().items():
        parts = {name: t.float()}
        if name.endswith(".experts.gate_up_proj"):  # transformers 5 holds the experts stacked, gate rows first
            i, base = t.shape[1] // 2, name.removesuffix("gate_up_proj")
            parts = {f"{base}gate_proj.weight": t[:, :i], f"{base}up_proj.weight": t[:, i:]}
        elif name.endswith(".experts.down_proj"):
            parts = {f"{name}.weight": t}
        for n, x in parts.items():
            if arch == "llama" and n.endswith(("q_proj.weight", "k_proj.weight")):
                x = _permute(x, cfg.num_attention_heads if "q_proj" in n else cfg.num_key_value_heads)
            if n.endswith("shared_expert_gate.weight"):
                x = x.reshape(-1)
            key = names.get_name(n, try_suffixes=(".weight", ".bias")) or dense.get_name(n, (".weight", ".bias"))
            assert key is not None, n
            out[key] = x.float().contiguous().numpy()
    return out


def write_gguf(path, hf, arch: str, types=None, per_expert: bool = False, edit=None, **keys) -> str:
    """``hf`` as a GGUF file: F32 tensors except where ``types(gguf name)`` gives a quantized type; the experts
    as the older per-expert 2-D tensors ``blk.N.ffn_gate.E.weight`` when ``per_expert``; ``edit(arrays)`` may
    change the tensors and ``keys`` the architecture fields (None: leave one out) before writing."""
    cfg = hf.config
    fields = {"block_count": cfg.num_hidden_layers, "context_length": cfg.max_position_embeddings,
              "embedding_length": cfg.hidden_size, "feed_forward_length": cfg.intermediate_size,
              "attention.head_count": cfg.num_attention_heads, "attention.head_count_kv": cfg.num_key_value_heads,
              "attention.key_length": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
              "rope.freq_base": float(cfg.rope_parameters["rope_theta"]),
              "attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps), "vocab_size": cfg.vocab_size,
              "expert_count": getattr(cfg, "num_local_experts", None) or cfg.num_experts,
              "expert_used_count": cfg.num_experts_per_tok}
    if getattr(cfg, "moe_intermediate_size", None):
        fields["expert_feed_forward_length"] = cfg.moe_intermediate_size
    if getattr(cfg, "shared_expert_intermediate_size", None):
        fields["expert_shared_feed_forward_length"] = cfg.shared_expert_intermediate_size
    fields.update(keys)
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in fields.items():
        if v is not None:
            (w.add_float32 if isinstance(v, float) else w.add_uint32)(f"{arch}.{k}", v)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    arrays = _gguf_arrays(hf, arch)
    if edit is not None:
        edit(arrays)
    if per_expert:
        for name in [n for n in arrays if "_exps." in n]:
            stacked = arrays.pop(name)
            for e in range(stacked.shape[0]):
                arrays[name.replace("_exps.", f".{e}.")] = stacked[e]
    for name, x in arrays.items():
        kind = types(name) if types else None
        if kind is None:
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _reference(family: str, path: str, hf):
    """The HF model to compare with: OLMoE's without ``clip_qkv`` (llama.cpp neither stores nor applies it)."""
    if family != "olmoe":
        return hf
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, clip_qkv=None).eval()
    m.generation_config.eos_token_id, m.generation_config.pad_token_id = None, 0
    return m


@pytest.mark.parametrize("family", list(HF_CLASS))
def test_f32_gguf_moe_matches_hf(family, moe_dir, tmp_path):
    path, hf = moe_dir(family)
    hf = _reference(family, path, hf)
    g = write_gguf(tmp_path / "m.gguf", hf, ARCH[family])
    cfg = GGUFFile(g).model_config()
    assert cfg.architecture == HF_CLASS[family] == type(hf).__name__
    llm = LLM(g, tokenizer=path, dtype="float32", max_model_len=512, load_progress=False)
    assert len(llm.engine.worker.model.moe_layers()) == (1 if family == "qwen2_moe" else 2)  # its layer 1 is dense
    ids = [llm.get_tokenizer().encode(p) for p in BATCH]
    for prompt_ids in ids:
        with torch.inference_mode():
            ref = hf(torch.tensor([prompt_ids])).logits[0].float()
        ours = llm.prompt_logits({"prompt_token_ids": prompt_ids})
        assert (ours - ref).abs().max().item() <= 1e-4 * max(ref.abs().max().item(), 1.0), (family, prompt_ids)
    got = [o.outputs[0].token_ids for o in llm.generate(BATCH, GREEDY, use_tqdm=False)]
    assert got == [_hf_greedy(hf, i) for i in ids], family


# per layer: gate, up, down types (layer 0: int4 gate and up -> int4 w13, int8 w2; layer 1: Q8_0 + Q4_0 -> int8 w13)
LAYER_TYPES = {0: {"gate": Q.Q4_0, "up": Q.Q4_1, "down": Q.Q8_0}, 1: {"gate": Q.Q8_0, "up": Q.Q4_0, "down": Q.Q4_1}}


def _expert_types(name: str):
    m = re.fullmatch(r"blk\.(\d+)\.ffn_(gate|up|down)(_exps|\.\d+)\.weight", name)  # stacked or one expert's
    return None if m is None else LAYER_TYPES[int(m[1])][m[2]]


def test_quantized_gguf_experts_stay_quantized(moe_dir, tmp_path):
    """``quantization="gguf"`` keeps the file's expert bits (int4 where both halves of w13 are 4-bit, else int8,
    widened losslessly); their dequantization is the float import's weights exactly and the logits agree; the
    older per-expert tensor names load to the same model."""
    path, hf = moe_dir("qwen3_moe_i64")  # I = 64: Q4 / Q8 blocks of 32 along both projections' K
    g = write_gguf(tmp_path / "q.gguf", hf, "qwen3moe", types=_expert_types)
    q = load_model(g, "float32", tokenizer=path, quantization="gguf", progress=False).model
    d = load_model(g, "float32", tokenizer=path, progress=False).model  # the same file dequantized at load
    assert describe_quantization(q) == "int4 g32 experts x2, int8 g32 experts x2"
    assert describe_quantization(d) == ""
    for i, (qb, db) in enumerate(zip(q.moe_layers(), d.moe_layers(), strict=True)):
        assert (qb.experts.w13.quant.bits, qb.experts.w2.quant.bits) == ((4, 8) if i == 0 else (8, 4))
        for proj in ("w13", "w2"):
            assert torch.equal(getattr(qb.experts, proj).quant.dequantize(), getattr(db.experts, proj).weight)
    ids = list(range(100, 140))
    ref, got = _logits(d, ids), _logits(q, ids)
    assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    old = write_gguf(tmp_path / "per-expert.gguf", hf, "qwen3moe", types=_expert_types, per_expert=True)
    assert "blk.0.ffn_gate.7.weight" in {t.name for t in GGUFFile(old).reader.tensors}
    p = load_model(old, "float32", tokenizer=path, quantization="gguf", progress=False).model
    assert describe_quantization(p) == describe_quantization(q)
    assert torch.equal(_logits(p, ids), got)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_stacked_blocks_decode_as_gguf(kind):
    """A 3-D [E, N, K] block tensor (GGUF shape [K, N, E]): dequantized bit-exactly as ``gguf`` does, imported as
    QuantizedExperts whose every expert is the 2-D import of that expert's rows."""
    e, n, k = 3, 5, 96
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((e, n, k)) * rng.uniform(0.01, 3, (e, n, 1))).astype(np.float32)
    data = gguf.quants.quantize(w, Q[kind])
    t = SimpleNamespace(tensor_type=Q[kind], shape=[k, n, e], data=data, name="blk.0.ffn_up_exps.weight")
    ref = gguf.quants.dequantize(data, Q[kind]).astype(np.float32)
    ours = dequantize(t)
    assert tuple(ours.shape) == (e, n, k) and ours.numpy().tobytes() == ref.tobytes()
    qe = to_quantized(t)
    assert isinstance(qe, QuantizedExperts) and qe.shape == (e, n, k) and qe.bits == (4 if "4" in kind else 8)
    assert torch.equal(qe.dequantize(), torch.from_numpy(ref))
    for x in range(e):
        one = to_quantized(SimpleNamespace(tensor_type=Q[kind], shape=[k, n], data=data[x], name="one"))
        assert torch.equal(qe.expert(x).dequantize(), one.dequantize())


def test_moe_tensor_names():
    assert hf_name("blk.3.ffn_gate_inp.weight", "qwen2moe") == "model.layers.3.mlp.gate.weight"
    assert hf_name("blk.3.ffn_down_exps.weight", "llama") == "model.layers.3.mlp.experts.down_proj.weight"
    assert hf_name("blk.3.ffn_up.5.weight", "llama") == "model.layers.3.mlp.experts.5.up_proj.weight"
    assert hf_name("blk.0.ffn_gate_inp_shexp.weight", "qwen2moe") == "model.layers.0.mlp.shared_expert_gate.weight"
    assert hf_name("blk.0.attn_k_norm.weight", "qwen3moe") == "model.layers.0.self_attn.k_norm.weight"
    with pytest.raises(ValueError, match="unexpected GGUF tensor"):
        hf_name("blk.0.ffn_gate.x.weight", "llama")


def _drop_expert(layer: int, proj: str):
    def edit(arrays):
        name = f"blk.{layer}.ffn_{proj}_exps.weight"
        arrays[name] = arrays[name][:-1]  # 7 of 8 experts
    return edit


def test_malformed_moe_files_are_clear_errors(moe_dir, tmp_path):
    path, hf = moe_dir("qwen3_moe_i64")
    load = dict(dtype="float32", tokenizer=path, progress=False)
    bad = write_gguf(tmp_path / "a.gguf", hf, "qwen3moe", edit=_drop_expert(1, "up"))
    with pytest.raises(ValueError, match=r"shape mismatch for expert tensor .*checkpoint \(7, 64, 64\), model "
                                         r"expects \(8, 64, 64\)"):
        load_model(bad, **load)
    badq = write_gguf(tmp_path / "b.gguf", hf, "qwen3moe", types=_expert_types, edit=_drop_expert(0, "down"))
    with pytest.raises(ValueError, match=r"shape mismatch for stacked quantized experts .*\(7, 64, 64\)"):
        load_model(badq, quantization="gguf", **load)
    cases = [({"expert_count": None}, r"qwen3moe\.expert_count >= 1 .* got 0 and 2"),
             ({"expert_used_count": 9}, "got 8 and 9"),
             ({"expert_gating_func": 2}, "sigmoid routing"),
             ({"expert_weights_scale": 2.5}, "expert_weights_scale = 2.5")]
    for i, (keys, msg) in enumerate(cases):
        with pytest.raises(ValueError, match=msg):
            GGUFFile(write_gguf(tmp_path / f"c{i}.gguf", hf, "qwen3moe", **keys)).model_config()
