"""The shipped q/k sample and the scripts behind docs/inspect.md: tokenizer, weight reader, encoder, pictures.

The model itself (83 MB) is not needed: the encoder of ``docs/make_qk_sample.py``
is checked against PyTorch's ``TransformerEncoderLayer`` (a BERT layer is a
post-norm encoder layer with exact GELU) on tiny random weights, and the
shipped sample's tokens against the script's text.
"""

from __future__ import annotations

import json
import runpy
import struct
from pathlib import Path

import numpy as np
import pytest

from npsparseattn.inspect import load_qk_sample

DOCS = Path(__file__).resolve().parent.parent / "docs"
SCRIPT = runpy.run_path(str(DOCS / "make_qk_sample.py"))


def test_wordpiece_tokenizer():
    vocab = {t: i for i, t in enumerate(["[UNK]", "un", "##aff", "##able", ",", "hello", "naive", "##s"])}
    tokens = SCRIPT["tokenize"]("Unaffable, héllo!  NAÏVEs\tunx", vocab)
    assert tokens == ["un", "##aff", "##able", ",", "hello", "[UNK]", "naive", "##s", "[UNK]"]


def test_safetensors_reader():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([[4, 5]], dtype=np.int64)
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "I64", "shape": [1, 2], "data_offsets": [24, 40]},
    }
    text = json.dumps(header).encode()
    tensors = SCRIPT["load_safetensors"](struct.pack("<Q", len(text)) + text + a.tobytes() + b.tobytes())
    assert set(tensors) == {"a", "b"}
    assert np.array_equal(tensors["a"], a) and np.array_equal(tensors["b"], b)


def _tiny_bert(rng, hidden=8, heads=2, layers=2, inner=16):
    w = {
        "embeddings.word_embeddings.weight": rng.standard_normal((10, hidden)),
        "embeddings.position_embeddings.weight": rng.standard_normal((6, hidden)),
        "embeddings.token_type_embeddings.weight": rng.standard_normal((2, hidden)),
        "embeddings.LayerNorm.weight": rng.standard_normal(hidden),
        "embeddings.LayerNorm.bias": rng.standard_normal(hidden),
    }
    shapes = {
        "attention.self.query": (hidden, hidden),
        "attention.self.key": (hidden, hidden),
        "attention.self.value": (hidden, hidden),
        "attention.output.dense": (hidden, hidden),
        "intermediate.dense": (inner, hidden),
        "output.dense": (hidden, inner),
    }
    for i in range(layers):
        for name, shape in shapes.items():
            w[f"encoder.layer.{i}.{name}.weight"] = rng.standard_normal(shape) / np.sqrt(shape[1])
            w[f"encoder.layer.{i}.{name}.bias"] = rng.standard_normal(shape[0])
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[f"encoder.layer.{i}.{name}.weight"] = rng.standard_normal(hidden)
            w[f"encoder.layer.{i}.{name}.bias"] = rng.standard_normal(hidden)
    return w


def test_encoder_matches_torch(rng):
    torch = pytest.importorskip("torch")
    w = _tiny_bert(rng)
    ids = [3, 1, 4, 1, 5]
    hidden = SCRIPT["encode"](ids, w, heads=2)
    q1, k1 = SCRIPT["encode"](ids, w, heads=2, upto=1)

    t = {name: torch.tensor(x, dtype=torch.float64) for name, x in w.items()}
    x = t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][:5]
    x = x + t["embeddings.token_type_embeddings.weight"][0]
    x = torch.nn.functional.layer_norm(x, (8,), t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], 1e-12)
    for i in range(2):
        p = f"encoder.layer.{i}."
        if i == 1:
            q = (x @ t[p + "attention.self.query.weight"].T + t[p + "attention.self.query.bias"]).reshape(5, 2, 4)
            k = (x @ t[p + "attention.self.key.weight"].T + t[p + "attention.self.key.bias"]).reshape(5, 2, 4)
            assert np.abs(q1 - q.transpose(0, 1).numpy()).max() < 1e-12
            assert np.abs(k1 - k.transpose(0, 1).numpy()).max() < 1e-12
        layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation="gelu", layer_norm_eps=1e-12)
        layer = layer.double().eval()
        names = ("query", "key", "value")
        state = {
            "self_attn.in_proj_weight": torch.cat([t[f"{p}attention.self.{n}.weight"] for n in names]),
            "self_attn.in_proj_bias": torch.cat([t[f"{p}attention.self.{n}.bias"] for n in names]),
            "self_attn.out_proj.weight": t[p + "attention.output.dense.weight"],
            "self_attn.out_proj.bias": t[p + "attention.output.dense.bias"],
            "linear1.weight": t[p + "intermediate.dense.weight"],
            "linear1.bias": t[p + "intermediate.dense.bias"],
            "linear2.weight": t[p + "output.dense.weight"],
            "linear2.bias": t[p + "output.dense.bias"],
            "norm1.weight": t[p + "attention.output.LayerNorm.weight"],
            "norm1.bias": t[p + "attention.output.LayerNorm.bias"],
            "norm2.weight": t[p + "output.LayerNorm.weight"],
            "norm2.bias": t[p + "output.LayerNorm.bias"],
        }
        layer.load_state_dict(state)
        with torch.no_grad():
            x = layer(x[:, None])[:, 0]
    assert np.abs(hidden - x.numpy()).max() < 1e-10


def test_shipped_sample_is_the_scripts_text():
    sample = load_qk_sample()
    assert sample.q.shape == sample.k.shape == (12, 512, 32) and sample.q.dtype == np.float32
    assert np.isfinite(sample.q).all() and np.isfinite(sample.k).all()
    assert sample.model == SCRIPT["MODEL"] and sample.layer == 3
    assert sample.tokens[0] == "[CLS]" and sample.tokens[-1] == "[SEP]" and len(sample.tokens) == 512
    # greedy longest-match WordPiece gives the same pieces with the vocabulary of the pieces it chose
    vocab = {t: i for i, t in enumerate(sorted(set(sample.tokens)))}
    assert SCRIPT["tokenize"](SCRIPT["TEXT"], vocab)[:510] == sample.tokens[1:-1]
    assert "[UNK]" not in sample.tokens


def test_figures_script_draws_the_committed_set(tmp_path):
    figures = runpy.run_path(str(DOCS / "make_inspect_figures.py"))
    paths = figures["main"](tmp_path, quick=True)
    committed = DOCS / "images" / "inspect"
    assert {p.name for p in paths} == {p.name for p in committed.glob("*.png")}
    assert all(p.stat().st_size < 100_000 for p in [*paths, *committed.glob("*.png")])
    assert (DOCS / "inspect.md").read_text().count("](images/inspect/") == len(paths)
