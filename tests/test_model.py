"""The Llama-family forward against transformers (logits, greedy tokens), dtypes, the built-in model, and
the loader's errors for broken checkpoints."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from batchrun.errors import UserError
from batchrun.model.config import ModelConfig
from batchrun.model.llama import LlamaModel
from batchrun.model.loader import load_model
from batchrun.model.spec import resolve_model
from checkpoints import ARCHS, WINDOW, make_checkpoint

CPU = torch.device("cpu")
PROMPT_LENS = (9, 23)
DECODE_STEPS = 6


class CachedCausalAttention:
    """Exact per-sequence causal attention in float32, keeping each sequence's K/V across steps.

    Rows of a step are grouped by sequence in the order given to `begin_step`.
    """

    def __init__(self, sm_scale: float) -> None:
        self.sm_scale = sm_scale
        self.cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.q_lens: list[int] = []

    def begin_step(self, q_lens: list[int]) -> None:
        self.q_lens = q_lens

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        outs, start = [], 0
        for seq, q_len in enumerate(self.q_lens):
            rows = slice(start, start + q_len)
            start += q_len
            past_k, past_v = self.cache.get((layer, seq), (k[:0].float(), v[:0].float()))
            seq_k, seq_v = torch.cat([past_k, k[rows].float()]), torch.cat([past_v, v[rows].float()])
            self.cache[(layer, seq)] = (seq_k, seq_v)
            outs.append(self._causal(q[rows].float(), seq_k, seq_v))
        assert start == q.shape[0]
        return torch.cat(outs)  # [N, Hq, D] float32, as the cascade backends return it

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [n, Hq, D], k/v [L, Hkv, D]; query i sees key j iff j <= L - n + i.
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * self.sm_scale
        n, kv_len = q.shape[0], k.shape[0]
        visible = torch.arange(kv_len)[None, :] <= torch.arange(n)[:, None] + (kv_len - n)
        scores = scores.masked_fill(~visible, float("-inf"))
        return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)


def random_prompts(lens: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 4096, (n,), generator=gen) for n in lens]


def prefill(model: LlamaModel, attn: CachedCausalAttention, prompts: list[torch.Tensor]) -> torch.Tensor:
    """All prompts in one flat ragged forward -> float32 logits for every row [sum(lens), V]."""
    attn.begin_step([len(p) for p in prompts])
    input_ids = torch.cat(prompts)
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    return model.compute_logits(model.forward(input_ids, positions, attn))


def greedy(model: LlamaModel, prompts: list[torch.Tensor], steps: int) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy continuation of every prompt, all sequences in each step -> (tokens, last step's logits)."""
    attn = CachedCausalAttention(model.sm_scale)
    logits = prefill(model, attn, prompts)
    last_rows = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
    next_ids = logits[last_rows].argmax(-1)
    tokens: list[list[int]] = [[] for _ in prompts]
    lens = [len(p) for p in prompts]
    for step in range(steps):
        for seq, tok in enumerate(next_ids.tolist()):
            tokens[seq].append(tok)
        if step == steps - 1:
            break
        attn.begin_step([1] * len(prompts))
        positions = torch.tensor(lens) + step
        logits = model.compute_logits(model.forward(next_ids, positions, attn))
        next_ids = logits.argmax(-1)
    return tokens, logits


def hf_model(path: object, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def hf_logits(hf: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return hf(input_ids=ids[None]).logits[0].float()


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_matches_transformers(tmp_path, arch):
    path = make_checkpoint(tmp_path, arch)
    model = load_model(resolve_model(str(path)), device=CPU)
    hf = hf_model(path)
    prompts = random_prompts(PROMPT_LENS)

    logits = prefill(model, CachedCausalAttention(model.sm_scale), prompts)
    ref = torch.cat([hf_logits(hf, p) for p in prompts])
    assert logits.dtype == torch.float32 and logits.shape == (sum(PROMPT_LENS), 4096)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))

    tokens, last_logits = greedy(model, prompts, DECODE_STEPS)
    for seq, prompt in enumerate(prompts):
        with torch.inference_mode():
            out = hf.generate(
                prompt[None],
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=DECODE_STEPS,
                do_sample=False,
                pad_token_id=1,
            )
        hf_tokens = out[0, len(prompt) :].tolist()
        assert tokens[seq][: len(hf_tokens)] == hf_tokens, (arch, seq)
        # The decode step at positions beyond the prompt (RoPE indexed by position, cached K/V) agrees too.
        full = torch.cat([prompt, torch.tensor(tokens[seq][:-1])])
        torch.testing.assert_close(last_logits[seq], hf_logits(hf, full)[-1], rtol=1e-4, atol=1e-4)
    assert len({t for seq in tokens for t in seq}) > 2, "greedy output is degenerate; raise init_std"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_transformers(tmp_path, dtype):
    path = make_checkpoint(tmp_path, "qwen2")
    model = load_model(resolve_model(str(path)), device=CPU, dtype=dtype)
    assert model.dtype == dtype and model.config.torch_dtype == dtype
    assert all(w.dtype == dtype for w in (model.weights.embed, model.weights.layers[0].qkv_proj))
    prompts = random_prompts(PROMPT_LENS)
    logits = prefill(model, CachedCausalAttention(model.sm_scale), prompts)
    hf = hf_model(path, dtype)
    ref = torch.cat([hf_logits(hf, p) for p in prompts])
    assert logits.dtype == torch.float32
    scale = ref.abs().max()
    assert (logits - ref).abs().max() < 0.03 * scale
    fp32 = prefill(load_model(resolve_model(str(path)), device=CPU), CachedCausalAttention(model.sm_scale), prompts)
    assert (logits - fp32).abs().max() < 0.05 * scale


def test_tied_embeddings_share_the_tensor(tmp_path):
    model = load_model(resolve_model(str(make_checkpoint(tmp_path, "llama-tied"))), device=CPU)
    assert model.weights.lm_head is model.weights.embed


def _weights(model: LlamaModel) -> list[torch.Tensor]:
    w = model.weights
    layer_tensors = [t for layer in w.layers for t in dataclasses.astuple(layer) if t is not None]
    return [w.embed, w.norm, w.lm_head, *layer_tensors]


def test_builtin_model_is_deterministic_and_runs():
    spec = resolve_model("builtin-tiny")
    first, second = load_model(spec, device=CPU), load_model(spec, device=CPU)
    assert all(torch.equal(a, b) for a, b in zip(_weights(first), _weights(second), strict=True))
    bf16 = load_model(spec, device=CPU, dtype=torch.bfloat16)
    assert all(torch.equal(a.to(torch.bfloat16), b) for a, b in zip(_weights(first), _weights(bf16), strict=True))
    assert first.weights.embed.std().item() == pytest.approx(0.02, rel=0.05)
    logits = prefill(first, CachedCausalAttention(first.sm_scale), random_prompts((5, 3)))
    assert logits.shape == (8, spec.config.vocab_size) and torch.isfinite(logits).all()


def test_sharded_checkpoint_loads_the_same_weights(tmp_path):
    single = load_model(resolve_model(str(make_checkpoint(tmp_path, "llama"))), device=CPU)
    sharded_path = make_checkpoint(tmp_path, "llama", name="sharded", max_shard_size="200KB")
    assert (sharded_path / "model.safetensors.index.json").is_file()
    sharded = load_model(resolve_model(str(sharded_path)), device=CPU)
    assert all(torch.equal(a, b) for a, b in zip(_weights(single), _weights(sharded), strict=True))

    shard = sorted(sharded_path.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(UserError, match=shard.name):
        load_model(resolve_model(str(sharded_path)), device=CPU)


def _edit_tensors(path, edit) -> None:
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize("name", ["model.layers.1.mlp.up_proj.weight", "lm_head.weight"])
def test_missing_tensor_is_a_user_error(tmp_path, name):
    path = make_checkpoint(tmp_path, "llama")
    _edit_tensors(path, lambda t: t.pop(name))
    with pytest.raises(UserError, match=f"tensor '{name}' is missing"):
        load_model(resolve_model(str(path)), device=CPU)


def test_wrong_shape_is_a_user_error(tmp_path):
    path = make_checkpoint(tmp_path, "qwen2")
    name = "model.layers.0.self_attn.k_proj.bias"
    _edit_tensors(path, lambda t: t.update({name: torch.zeros(3)}))
    with pytest.raises(UserError, match=rf"model.safetensors: tensor '{name}' has shape \[3\], .* \[32\]"):
        load_model(resolve_model(str(path)), device=CPU)


def test_unsupported_configs_are_user_errors(tmp_path):
    path = make_checkpoint(tmp_path, "llama")
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, "model_type": "gpt2"}))
    with pytest.raises(UserError, match="model_type 'gpt2' is not supported"):
        resolve_model(str(path))
    for name, extra, match in (("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
                               ("gemma3", {"hidden_activation": "relu"}, "hidden_activation 'relu'"),
                               ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "'yarn'")):
        path = make_checkpoint(tmp_path, name, name=f"{name}-{match[:6]}")
        raw = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**raw, **extra, "rope_parameters": None}))
        with pytest.raises(UserError, match=match):
            resolve_model(str(path))


def test_a_sliding_window_caps_the_context(tmp_path):
    """Windowed attention is not implemented: the context is capped at the window, where it computes the same."""
    short_window = make_checkpoint(tmp_path, "mistral", sliding_window=128)
    config = resolve_model(str(short_window)).config
    assert (config.sliding_window, config.max_context_len, config.max_position_embeddings) == (128, 128, 512)
    assert "sliding window" in config.context_name
    wide = resolve_model(str(make_checkpoint(tmp_path, "mistral", name="wide"))).config  # window 4096 > 512
    assert (wide.sliding_window, wide.max_context_len) == (None, 512)
    gemma = resolve_model(str(make_checkpoint(tmp_path, "gemma3"))).config
    assert gemma.max_context_len == WINDOW and gemma.variant.is_local_layer == (True, False)
    qwen3 = resolve_model(str(make_checkpoint(tmp_path, "qwen3", use_sliding_window=True, sliding_window=100,
                                              max_window_layers=1))).config
    assert qwen3.max_context_len == 100


def test_old_and_new_rope_config_layouts_agree(tmp_path):
    new = json.loads((make_checkpoint(tmp_path, "llama3-rope") / "config.json").read_text())
    assert "rope_parameters" in new or "rope_scaling" in new
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "rope_scaling")}
    rope = dict(new.get("rope_parameters") or new["rope_scaling"])
    old["rope_theta"] = rope.pop("rope_theta", new.get("rope_theta"))
    old["rope_scaling"] = rope
    parsed_new, parsed_old = ModelConfig.from_hf(new), ModelConfig.from_hf(old)
    assert parsed_new == parsed_old
    assert parsed_new.rope_theta == 500000.0 and parsed_new.rope_scaling is not None
    assert parsed_new.rope_scaling.original_max_position_embeddings == 64


def test_fingerprint_covers_the_weights_content_and_is_cached(tmp_path, monkeypatch):
    from batchrun.model import weights_cache

    path = make_checkpoint(tmp_path, "llama")
    before = resolve_model(str(path)).fingerprint
    reads = []
    monkeypatch.setattr(weights_cache, "CHUNK", 1 << 20)
    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: (reads.append(self.name), real_open(self, *a, **k))[1])
    assert resolve_model(str(path)).fingerprint == before and "model.safetensors" not in reads  # cached
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the same size: names and sizes alone would not see it
    weights.write_bytes(bytes(data))
    assert resolve_model(str(path)).fingerprint != before


def test_a_model_that_asks_to_run_its_own_code_is_refused(tmp_path):
    path = make_checkpoint(tmp_path, "llama")
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "auto_map": {"AutoTokenizer": ["x.Tok", None]}}))
    with pytest.raises(UserError, match="tokenizer_config.json asks to run the model repository's own code"):
        resolve_model(str(path))


@pytest.mark.parametrize(("change", "match"), [
    ({"num_attention_heads": 0}, "'num_attention_heads' must be a positive integer"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
    ({"num_hidden_layers": -2}, "'num_hidden_layers' must be a positive integer"),
    ({"hidden_size": "64"}, "'hidden_size' must be a positive integer"),
    ({"rms_norm_eps": 0}, "'rms_norm_eps' must be a positive number"),
    ({"eos_token_id": [1, "x"]}, "'eos_token_id' must hold token ids"),
])
def test_config_values_out_of_range_are_user_errors(tmp_path, change, match):
    path = make_checkpoint(tmp_path, "llama")
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, **change}))
    with pytest.raises(UserError, match=match):
        resolve_model(str(path))
    (path / "config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not a JSON object"):
        resolve_model(str(path))


def test_a_bad_dtype_option_is_a_usage_error():
    with pytest.raises(UserError, match="int8") as e:
        resolve_model("builtin-tiny", dtype="int8")
    assert e.value.exit_code == 2
