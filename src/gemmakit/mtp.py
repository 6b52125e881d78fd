"""Gemma 4's multi-token-prediction (MTP) drafter, `Gemma4AssistantForCausalLM` in transformers' terms.

Why it is cheap: the assistant owns no keys or values at all. Every one of its layers is a KV-shared layer
that attends, with its own queries, over the keys/values the *target* already computed: the last
non-shared layer of each attention type (sliding / full), read straight out of the target's `KVCache`. So
drafting needs no prefill and no drafter cache, and a rejected draft leaves nothing to roll back.

One draft step, for a row whose target has fed positions 0..t and whose next token x sits at t + 1:
    input  = pre_projection([target's scaled embedding of x ; h])   (h: a backbone-wide state, see below)
    layers = the assistant's decoder layers, queries RoPE'd at position t + 1, keys = the target's
    out    = final norm -> logits (the tied head, or the ordered-embedding head below) and
             post_projection(out), the backbone-wide state handed to the next step.
For the first step h is the target's final-normed hidden state at t (what `Gemma.hidden` returns, so
`TargetState.hidden` is used as is); for later steps it is the previous step's projected state, and the
position stays t + 1 (the assistant always stands at the first unfed position; only x and h change). So k
guesses cost k small forward passes over one token each.

Visibility follows transformers exactly: a full layer sees every target key at positions <= t; a sliding
layer sees positions t - W .. t (W + 1 keys: its bidirectional window, flipped to look back, is inclusive).
The target's sliding ring keeps W + slack slots, so it holds those W + 1 positions whenever the engine's
slack exceeds the number of tokens it verifies per round minus the ones it keeps, as speculative decoding's
slack already does (slack >= k + 1 for k guesses). transformers' own generation loop reads the same keys
right after a prefill (what the parity tests compare); after a round with a rejected guess it hands its
assistant the target's keys as they stood before rollback, including the rejected guess at t + 1, where
gemmakit reads exactly the cache the target keeps (positions <= t).

Ordered embeddings (`use_ordered_embeddings`): instead of scoring the whole vocabulary, the head scores
`num_centroids` clusters, keeps the top `centroid_intermediate_top_k` and scores only their tokens
(`token_ordering` lists the tokens cluster by cluster); every other token gets a floor below all scored
logits, so the greedy choice is always a scored token. The head has no final soft-capping.

Module and parameter names are the HF checkpoint's (`pre_projection.weight`, `model.layers.0.self_attn.
q_proj.weight`, `masked_embedding.centroids.weight`, `masked_embedding.token_ordering`), so a released
assistant loads with no renames; the decoder layers are gemmakit's own (model.py) with every layer shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gemmakit.cache import KVCache, Step
from gemmakit.checkpoints.common import FLOAT_DTYPES, CheckpointError, check_bounds, place
from gemmakit.checkpoints.hf import iter_tensors, read_json, shard_files
from gemmakit.config import SLIDING, Config, ConfigError
from gemmakit.model import Gemma, TextModel, inv_frequencies, rope_tables, scaled_embedding
from gemmakit.speculative import TargetState


@dataclass
class AssistantConfig:
    """An HF `config.json` of model_type gemma4_assistant: the drafter's decoder (`text`, every layer KV-shared)
    and the assistant's own fields, under their HF names."""

    text: Config
    backbone_hidden_size: int
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    tie_word_embeddings: bool = True

    @classmethod
    def from_hf(cls, d: dict[str, Any], name: str = "assistant") -> AssistantConfig:
        if not isinstance(d, dict) or d.get("model_type") != "gemma4_assistant":
            got = d.get("model_type") if isinstance(d, dict) else type(d).__name__
            raise ConfigError(f"expected an HF config of model_type 'gemma4_assistant', got {got!r}: point "
                              "gemmakit at a Gemma 4 assistant (MTP drafter) checkpoint")
        t = d.get("text_config")
        if not isinstance(t, dict):
            raise ConfigError("a gemma4_assistant config needs a text_config dict (the drafter's decoder)")
        layers = t.get("num_hidden_layers")
        if t.get("num_kv_shared_layers") not in (None, 0, layers):
            raise ConfigError(f"every assistant layer attends with the target's keys: num_kv_shared_layers must be "
                              f"{layers} (or 0, read as all), got {t.get('num_kv_shared_layers')}")
        for key in ("hidden_size_per_layer_input", "vocab_size_per_layer_input"):
            if t.get(key):
                raise ConfigError(f"an assistant has no per-layer embeddings: {key} must be 0, got {t[key]}")
        if t.get("enable_moe_block") or t.get("use_double_wide_mlp"):
            raise ConfigError("an assistant has neither a MoE block nor a double-wide MLP")
        # Config refuses "all layers shared" (a normal model needs a producer layer); the assistant's producers
        # are the target's layers, so it is built unshared and then marked shared throughout.
        text = Config.from_hf({**t, "model_type": "gemma4_text", "num_kv_shared_layers": 0}, name=name)
        text.num_kv_shared_layers = text.num_hidden_layers
        config = cls(text=text, backbone_hidden_size=int(d.get("backbone_hidden_size", 1536)),
                     use_ordered_embeddings=bool(d.get("use_ordered_embeddings", False)),
                     num_centroids=int(d.get("num_centroids", 2048)),
                     centroid_intermediate_top_k=int(d.get("centroid_intermediate_top_k", 32)),
                     tie_word_embeddings=bool(d.get("tie_word_embeddings", t.get("tie_word_embeddings", True))))
        config.validate()
        return config

    def validate(self) -> None:
        if self.backbone_hidden_size <= 0:
            raise ConfigError(f"backbone_hidden_size must be positive, got {self.backbone_hidden_size}")
        if self.use_ordered_embeddings:
            C, V = self.num_centroids, self.text.vocab_size
            if C <= 0 or V % C:
                raise ConfigError(f"num_centroids ({C}) must divide vocab_size ({V}) for ordered embeddings")
            if not 0 < self.centroid_intermediate_top_k <= C:
                raise ConfigError(f"centroid_intermediate_top_k must be in [1, {C}], "
                                  f"got {self.centroid_intermediate_top_k}")


class MaskedEmbedder(nn.Module):
    """The ordered-embedding head: score clusters, then only the tokens of the best `top_k` clusters."""

    def __init__(self, config: AssistantConfig):
        super().__init__()
        H, V = config.text.hidden_size, config.text.vocab_size
        self.num_centroids, self.top_k = config.num_centroids, config.centroid_intermediate_top_k
        self.centroids = nn.Linear(H, self.num_centroids, bias=False)
        self.register_buffer("token_ordering", torch.zeros(V, dtype=torch.long))

    def forward(self, x: Tensor, head_weight: Tensor) -> Tensor:
        """Logits [..., V] of x [..., H]; tokens outside the chosen clusters get one less than the lowest
        scored logit. The reference takes that floor over its whole call, which is this when it drafts one
        position of one sequence (as its generation does); per position, rows do not depend on each other."""
        clusters = self.token_ordering.view(self.num_centroids, -1)  # [C, V / C] token ids, cluster by cluster
        chosen = self.centroids(x).topk(self.top_k, dim=-1).indices  # [..., top_k]
        tokens = clusters[chosen].flatten(-2)  # [..., top_k * V / C]
        scored = (head_weight[tokens] @ x[..., None]).squeeze(-1)
        floor = scored.amin(-1, keepdim=True) - 1.0
        return floor.expand(*x.shape[:-1], head_weight.shape[0]).scatter(-1, tokens, scored)


class Gemma4Assistant(nn.Module):
    """The MTP assistant: `forward` is one draft step given the target's keys/values and their visibility."""

    def __init__(self, config: AssistantConfig):
        super().__init__()
        self.config = config
        c, B = config.text, config.backbone_hidden_size
        self.model = TextModel(c)
        self.pre_projection = nn.Linear(2 * B, c.hidden_size, bias=False)
        self.post_projection = nn.Linear(c.hidden_size, B, bias=False)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.masked_embedding = MaskedEmbedder(config) if config.use_ordered_embeddings else None
        self.inv_freq = {kind: inv_frequencies(c, kind) for kind in set(c.layer_types)}

    def forward(self, inputs_embeds: Tensor, positions: Tensor, kv: dict[str, tuple[Tensor, Tensor]],
                masks: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """inputs_embeds [b, T, 2 * backbone] (target embedding of the token, then the backbone-wide state),
        positions [b, T]; kv[kind] the target's keys/values [b, n_kv, S, D] for each layer type and masks[kind]
        their visibility [b, 1, T, S]. Returns (logits [b, T, V], projected state [b, T, backbone])."""
        c = self.config.text
        x = self.pre_projection(inputs_embeds)
        ropes = {kind: rope_tables(inv, positions, x.dtype) for kind, inv in self.inv_freq.items()}
        step = Step(positions)  # the layers never store anything: every one of them is KV-shared
        for i, layer in enumerate(self.model.layers):
            kind = c.layer_types[i]
            x = layer(x, ropes[kind], masks[kind], step, i, dict(kv), None)
        x = self.model.norm(x)
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = x @ head.T if self.masked_embedding is None else self.masked_embedding(x, head)
        return logits, self.post_projection(x)


def load_assistant(path: str | Path, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> Gemma4Assistant:
    """A gemma4_assistant checkpoint directory (config.json + safetensors, HF names) as a `Gemma4Assistant`."""
    path, device = Path(path), torch.device(device)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} has no config.json; point gemmakit at a Gemma 4 assistant model directory")
    d = read_json(path / "config.json")
    text = d.get("text_config") if isinstance(d, dict) else None
    check_bounds(text if isinstance(text, dict) else {}, str(path / "config.json"))
    try:
        config = AssistantConfig.from_hf(d, name=path.resolve().name or "assistant")
    except ConfigError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from e
    with torch.device("meta"):
        model = Gemma4Assistant(config)
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    loaded: set[str] = set()
    for raw, key, tensor in iter_tensors(shard_files(path)):
        if key not in expected:
            if key == "lm_head.weight" and config.tie_word_embeddings:
                continue  # the tied head: the embedding table already is it
            raise CheckpointError(f"{path} has a tensor {raw} that a gemma4_assistant does not have; "
                                  "is the config.json for these weights?")
        shape, want = expected[key]
        if tuple(tensor.get_shape()) != shape:
            raise CheckpointError(f"{path}: {raw} has shape {list(tensor.get_shape())}, the config implies "
                                  f"{list(shape)}; the config does not match these weights")
        stored = tensor.get_dtype()
        if want == torch.long:
            if stored not in ("I64", "I32"):
                raise CheckpointError(f"{path}: {raw} must hold integer token ids, found {stored}")
            value = tensor[:].to(device=device, dtype=torch.long)
        elif stored in FLOAT_DTYPES:
            value = tensor[:].to(device=device, dtype=dtype)
        else:
            raise CheckpointError(f"{path}: {raw} is stored as {stored}; gemmakit expects a float tensor")
        place(model, key, value)
        loaded.add(key)
    missing = sorted(set(expected) - loaded)
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} tensor(s) the config needs, e.g. "
                              f"{', '.join(missing[:4])}; the checkpoint is incomplete or for another model")
    if config.use_ordered_embeddings:
        ordering = model.masked_embedding.token_ordering
        if not torch.equal(ordering.sort().values, torch.arange(len(ordering), device=device)):
            raise CheckpointError(f"{path}: masked_embedding.token_ordering is not a permutation of the vocabulary")
    return model.eval()


class MTPDrafter:
    """A `Drafter` (speculative.py) from a Gemma 4 target and its MTP assistant, batched over rows, greedy.

    It reads the target's keys/values from `TargetState.cache` and never writes them; it keeps no state of
    its own, so `rollback` and `release` have nothing to do."""

    def __init__(self, target_model: Gemma, assistant: Gemma4Assistant):
        t, a = target_model.config, assistant.config
        if not t.is_gemma4:
            raise ValueError("the MTP drafter needs a Gemma 4 target (its KV layout and embedding)")
        if a.backbone_hidden_size != t.hidden_size:
            raise ValueError(f"this assistant was trained for a target of hidden size {a.backbone_hidden_size}, "
                             f"the target has {t.hidden_size}")
        if a.text.vocab_size != t.vocab_size:
            raise ValueError(f"assistant vocabulary {a.text.vocab_size} != target vocabulary {t.vocab_size}")
        self.target, self.assistant = target_model, assistant
        self.vocab_size = t.vocab_size  # the engine checks a drafter's vocabulary against the target's
        # The target layer whose keys/values each layer type reads: the last one of that type that owns some.
        self.sources: dict[str, int] = {}
        for kind in set(a.text.layer_types):
            owners = [i for i in range(t.first_kv_shared_layer) if t.layer_types[i] == kind]
            if not owners:
                raise ValueError(f"the target has no {kind} layer with its own keys for the assistant to read")
            src, mine = owners[-1], a.text.layer_types.index(kind)
            if (t.layer_head_dim(src), t.layer_kv_heads(src)) != (a.text.layer_head_dim(mine),
                                                                  a.text.layer_kv_heads(mine)):
                raise ValueError(f"{kind}: the assistant's heads (dim, kv heads) "
                                 f"{(a.text.layer_head_dim(mine), a.text.layer_kv_heads(mine))} do not match "
                                 f"the target's {(t.layer_head_dim(src), t.layer_kv_heads(src))}")
            self.sources[kind] = src
        if a.text.sliding_window > t.sliding_window:
            raise ValueError(f"the assistant's window ({a.text.sliding_window}) is wider than what the target "
                             f"keeps ({t.sliding_window})")
        self.window = a.text.sliding_window

    def context(self, cache: KVCache, rows: list[int], last: Tensor) -> tuple[dict, dict]:
        """The target's keys/values each assistant layer type attends over, for `rows` whose last fed
        positions are `last` [b], and their masks [b, 1, 1, S] (see the module docstring for the rule)."""
        dtype = self.assistant.pre_projection.weight.dtype
        index = torch.tensor(rows, device=last.device)
        kv, masks = {}, {}
        for kind, layer in self.sources.items():
            # Full layers store position p at slot p: only the slots up to the furthest row's t can be used.
            slots = slice(None) if kind == SLIDING else slice(0, int(last.max()) + 1)
            k = cache.k[layer][index, :, slots].to(dtype)
            v = cache.v[layer][index, :, slots].to(dtype)
            pos = cache.slot_pos[kind][index, slots]
            visible = (pos >= 0) & (pos <= last[:, None])
            if kind == SLIDING:
                visible &= pos >= last[:, None] - self.window
            kv[kind], masks[kind] = (k, v), visible[:, None, None, :]
        return kv, masks

    @torch.inference_mode()
    def draft(self, sequences: list[list[int]], k: int, target: TargetState) -> tuple[Tensor, Tensor]:
        """Greedy guesses [b, k] and the assistant's logits [b, k, V] after each row's sequence."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        b = len(target.rows)
        if len(sequences) != b or len(target.positions) != b or target.hidden.shape[0] != b:
            raise ValueError(f"{b} rows, {len(sequences)} sequences, {len(target.positions)} positions and "
                             f"{target.hidden.shape[0]} hidden states: one of each per row is needed")
        for seq, t in zip(sequences, target.positions, strict=True):
            if len(seq) != t + 2:
                raise ValueError(f"a sequence of {len(seq)} tokens must follow a target that fed {len(seq) - 1} "
                                 f"of them (positions 0..{len(seq) - 2}); it fed 0..{t}")
        device = self.assistant.pre_projection.weight.device
        dtype = self.assistant.pre_projection.weight.dtype
        last = torch.tensor(target.positions, device=device)
        kv, masks = self.context(target.cache, target.rows, last)
        token = torch.tensor([[seq[-1]] for seq in sequences], device=device)
        state = target.hidden.reshape(b, 1, -1).to(device, dtype)
        position = (last + 1)[:, None]
        guesses, scores = [], []
        for _ in range(k):
            embed = scaled_embedding(self.target.model.embed_tokens, token, self.target.config.hidden_size)
            logits, state = self.assistant(torch.cat([embed.to(dtype), state], dim=-1), position, kv, masks)
            token = logits.argmax(-1)
            guesses.append(token)
            scores.append(logits)
        return torch.cat(guesses, dim=1), torch.cat(scores, dim=1)

    def propose(self, sequences: list[list[int]], k: int, target: TargetState) -> list[list[int]]:
        """k greedy guesses for each row of `target.rows` (the `Drafter` contract)."""
        return self.draft(sequences, k, target)[0].tolist()

    def rollback(self, row: int, n: int) -> None:
        """Nothing to forget: the drafter reads the target's cache, which the engine rolls back itself."""

    def release(self, row: int) -> None:
        """Nothing is kept per row."""
