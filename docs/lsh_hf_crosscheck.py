"""Cross-check ``npsparseattn.lsh`` against HF transformers' ``LSHSelfAttention`` (not run in CI).

Two steps, in two environments (torch and transformers are not dependencies):

    python -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install torch transformers
    /tmp/hfvenv/bin/python docs/lsh_hf_crosscheck.py hf /tmp/hf_lsh.npz        # HF side: inputs, outputs, grads
    .venv/bin/python docs/lsh_hf_crosscheck.py compare /tmp/hf_lsh.npz         # this library on the same inputs

The HF layer runs in float64 with its query/key projection set to the identity
and its value projection replaced by the given ``v``, so its inputs are ``qk``
and ``v`` themselves; the loss ``sum(out * w)`` is differentiated by torch's
autograd.  HF draws one rotation per head with ``torch.manual_seed(hash_seed)``;
the same draw is saved and passed to ``lsh_attention`` head by head.
"""

from __future__ import annotations

import sys

import numpy as np

CONFIGS = [
    dict(n_buckets=8, n_hashes=1, chunk=16, before=1, after=0, causal=False),
    dict(n_buckets=8, n_hashes=2, chunk=16, before=1, after=0, causal=True),
    dict(n_buckets=(4, 4), n_hashes=4, chunk=8, before=2, after=1, causal=False),
    dict(n_buckets=16, n_hashes=3, chunk=4, before=0, after=0, causal=True),
    dict(n_buckets=4, n_hashes=2, chunk=32, before=1, after=1, causal=True),
]
B, H, L, D = 2, 2, 128, 16


def run_hf(path: str) -> None:
    import torch
    from transformers import ReformerConfig
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention

    class Fixed(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.value = torch.nn.Parameter(value)

        def forward(self, hidden):
            return self.value

    def merge(x):
        return torch.tensor(x.transpose(0, 2, 1, 3).reshape(B, L, H * D))

    def split(t):
        return t.detach().numpy().reshape(B, L, H, D).transpose(0, 2, 1, 3)

    saved = {}
    for index, c in enumerate(CONFIGS):
        rng = np.random.default_rng(index)
        qk, v, w = (rng.standard_normal((B, H, L, D)) for _ in range(3))
        nb = c["n_buckets"]
        config = ReformerConfig(
            attention_head_size=D, num_attention_heads=H, hidden_size=H * D,
            num_buckets=list(nb) if isinstance(nb, tuple) else nb, num_hashes=c["n_hashes"],
            lsh_attn_chunk_length=c["chunk"], lsh_num_chunks_before=c["before"],
            lsh_num_chunks_after=c["after"], is_decoder=c["causal"], hash_seed=100 + index,
            lsh_attention_probs_dropout_prob=0.0, attn_layers=["lsh"], max_position_embeddings=L,
        )  # fmt: skip
        layer = LSHSelfAttention(config).double()
        layer.query_key = torch.nn.Identity()
        layer.value = Fixed(merge(v))
        hidden = merge(qk).requires_grad_(True)
        out = layer(hidden).hidden_states
        (out * merge(w)).sum().backward()
        torch.manual_seed(100 + index)
        columns = (sum(nb) if isinstance(nb, tuple) else nb) // 2
        rotations = torch.randn((H, D, c["n_hashes"], columns), dtype=torch.float64).numpy()
        arrays = dict(qk=qk, v=v, w=w, out=split(out), dqk=split(hidden.grad), dv=split(layer.value.value.grad))
        for name, value in dict(arrays, rotations=rotations).items():
            saved[f"{index}_{name}"] = value
    np.savez(path, **saved)


def compare(path: str) -> None:
    from npsparseattn.lsh import lsh_attention, lsh_attention_backward

    data = np.load(path)
    for index, c in enumerate(CONFIGS):

        def get(name, index=index):
            return data[f"{index}_{name}"]

        worst = np.zeros(3)
        for h in range(H):
            kw = dict(
                n_buckets=c["n_buckets"], n_hashes=c["n_hashes"], chunk_size=c["chunk"], chunks_before=c["before"],
                chunks_after=c["after"], causal=c["causal"], rotations=get("rotations")[h],
            )  # fmt: skip
            qk, v = get("qk")[:, h], get("v")[:, h]
            out, lse = lsh_attention(qk, v, return_lse=True, **kw)
            dqk, dv = lsh_attention_backward(get("w")[:, h], qk, v, out, lse, **kw)
            for i, (mine, theirs) in enumerate(((out, "out"), (dqk, "dqk"), (dv, "dv"))):
                expected = get(theirs)[:, h]
                worst[i] = max(worst[i], np.abs(mine - expected).max() / np.abs(expected).max())
        print(f"{c}: max rel difference out {worst[0]:.1e}, dqk {worst[1]:.1e}, dv {worst[2]:.1e}")


if __name__ == "__main__":
    {"hf": run_hf, "compare": compare}[sys.argv[1]](sys.argv[2])
