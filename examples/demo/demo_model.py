"""The demo's model, data and fingerprints, shared by trainer.py and inference.py.

A tiny causal transformer built in code (no downloads) whose state mixes dtypes on purpose: float32
embeddings, norms and head, bfloat16 attention and MLP weights, a float16 positional table, a bool
causal-mask buffer and an int64 step counter. With a small packing buffer (see ../demo.yaml) the
sync packs the small tensors into shared buffers and sends the large ones on their own.

Both sides fingerprint what they hold the same way: `checksum` hashes every tensor's name, dtype, shape
and bytes; `probe` runs the model on a fixed input and hashes the logits. Equal fingerprints for one
version mean the inference worker holds exactly the trainer's weights and computes the same function.

Ballast (`DEMO_BALLAST_MB` in both pods' env, default 0): that many MiB of extra float32 buffers, 64 KiB
each, changed by every training step and covered by the checksum, so that a sync takes long enough for a
fault test to act in the middle of its broadcast (the bare model's sync is over in a fraction of a second).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 512
DIM = 128
SEQ = 16
LAYERS = 2
HEADS = 4
#: Elements of one ballast tensor (64 KiB of float32: two fit in one of the demo's 128 KiB packing buffers).
BALLAST_ELEMENTS = 16 * 1024


def _linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """A linear layer in its own dtype (bfloat16 for the blocks), returning float32 activations."""
    return F.linear(x.to(layer.weight.dtype), layer.weight, layer.bias).float()


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM).to(torch.bfloat16)
        self.proj = nn.Linear(DIM, DIM).to(torch.bfloat16)
        self.ln2 = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, 4 * DIM).to(torch.bfloat16)
        self.down = nn.Linear(4 * DIM, DIM).to(torch.bfloat16)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = _linear(self.ln1(x), self.qkv).view(b, t, 3, HEADS, DIM // HEADS).unbind(2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / (DIM // HEADS) ** 0.5
        scores = scores.masked_fill(~mask[:t, :t], float("-inf"))
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, t, DIM)
        x = x + _linear(attn, self.proj)
        return x + _linear(F.gelu(_linear(self.ln2(x), self.up)), self.down)


class TinyLM(nn.Module):
    def __init__(self, ballast_mb: int = 0) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.zeros(SEQ, DIM, dtype=torch.float16))
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)
        self.register_buffer("causal_mask", torch.ones(SEQ, SEQ, dtype=torch.bool).tril())
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.ballast = [f"ballast_{i}" for i in range(ballast_mb * 16)]
        for key in self.ballast:
            self.register_buffer(key, torch.randn(BALLAST_ELEMENTS))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]].float()
        for block in self.blocks:
            x = block(x, self.causal_mask)
        return self.head(self.ln_f(x))


def ballast_mb() -> int:
    """MiB of ballast both sides add to the model (DEMO_BALLAST_MB; see the module's docstring)."""
    return int(os.environ.get("DEMO_BALLAST_MB") or 0)


def build_model(seed: int, ballast: int | None = None) -> TinyLM:
    """A freshly initialised model; different seeds give different weights. `ballast`: MiB of ballast
    (default: DEMO_BALLAST_MB)."""
    torch.manual_seed(seed)
    model = TinyLM(ballast_mb() if ballast is None else ballast)
    with torch.no_grad():
        model.pos.normal_(0, 0.02)
    return model


def batch(step: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic next-token data: the token after t is (3t + 1) mod VOCAB, so the loss can fall."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    start = torch.randint(0, VOCAB, (size, 1), generator=g)
    seq = [start]
    for _ in range(SEQ):
        seq.append((seq[-1] * 3 + 1) % VOCAB)
    tokens = torch.cat(seq, dim=1)
    return tokens[:, :-1], tokens[:, 1:]


def train_step(model: TinyLM, optimizer: torch.optim.Optimizer, step: int, seed: int) -> float:
    inputs, targets = batch(step, seed)
    loss = F.cross_entropy(model(inputs).reshape(-1, VOCAB), targets.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        model.steps += 1
        for key in model.ballast:  # a new version of the ballast too: a worker holding an older one differs
            getattr(model, key).add_(1.0)
    return float(loss.detach())


def _bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().cpu().contiguous()
    return ctypes.string_at(flat.data_ptr(), flat.numel() * flat.element_size()) if flat.numel() else b""


def checksum(model: nn.Module) -> str:
    """A hash of the whole state: every tensor's name, dtype, shape and raw bytes."""
    return checksum_of(model.state_dict().items())


def checksum_of(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """The same hash over any named tensors (what a vLLM engine is sent: the parameters)."""
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda item: item[0]):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_bytes(t))
    return h.hexdigest()[:16]


PROBE = torch.arange(2 * SEQ).reshape(2, SEQ) * 37 % VOCAB


@torch.no_grad()
def probe(model: TinyLM) -> tuple[str, float]:
    """The model's logits on a fixed input: a hash of their bytes and their mean, for the log."""
    logits = model(PROBE).contiguous()
    return hashlib.sha256(_bytes(logits)).hexdigest()[:16], float(logits.mean())
