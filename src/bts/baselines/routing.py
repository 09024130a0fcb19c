"""Expert routing: a linear router picks one whole model (the seed or an expert) per sequence.

The router reads the mean of the seed's frozen input embeddings over a sequence's first t
tokens. Training target: the constituent with the lowest LM loss on the whole sequence; t is
drawn uniformly in [min_prefix, max_prefix] per batch. Evaluation is causal: the prediction at
position t comes from the model routed on the real tokens up to t (at most the first
`eval_prefix`), so after `eval_prefix` tokens each sequence stays with one model (`causal:
false` routes once on the first `eval_prefix` tokens and scores them too). Only the router
trains. See docs/baselines.md for the choices made here.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pydantic
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from bts.baselines import check_family
from bts.baselines.btm import SEED
from bts.baselines.registry import Hooks
from bts.baselines.specs import RoutingSpec  # re-exported beside the router it configures
from bts.errors import BtsError
from bts.fileio import atomic_dir
from bts.generation import special_tokens
from bts.models import (
    MANIFEST_DTYPES,
    causal_lm_loss,
    constituent_entry,
    freeze,
    load_causal_lm,
    load_constituent,
)

MANIFEST = "bts_routing.json"
WEIGHTS = "router.safetensors"
FORMAT = "bts-expert-routing"


@dataclass
class RouterOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # router logits [batch, n_models]
    targets: torch.Tensor | None = None  # lowest-loss constituent per sequence
    prefix: int | None = None


@dataclass
class RoutedOutput:
    logits: torch.Tensor  # the routed model's logits [batch, seq, vocab]
    loss: torch.Tensor | None = None
    routes: torch.Tensor | None = None  # constituent per position [b, s] (causal) or row [b]


def _mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(input_ids) if attention_mask is None else attention_mask


def draw_prefix(spec: RoutingSpec, input_ids: torch.Tensor) -> int:
    """The training prefix length for one micro-batch: uniform in [min, max], clamped to its length.

    The training loop does not pass the step to the model, so the draw is keyed by
    (spec.seed, the batch's tokens): batches are a function of the step in bts.train, so the
    draw is too, and a resumed run draws exactly what an uninterrupted one would.
    """
    digest = hashlib.blake2b(input_ids.detach().cpu().long().numpy().tobytes(), digest_size=8)
    digest.update(str(spec.seed).encode())
    t = random.Random(int.from_bytes(digest.digest(), "little")).randint(
        spec.min_prefix, spec.max_prefix
    )
    return min(t, input_ids.shape[1])


class _Routing(nn.Module):
    """Frozen constituents (seed first), the seed's embedding table and a linear router."""

    def __init__(
        self,
        spec: RoutingSpec,
        models: Mapping[str, PreTrainedModel],
        router: nn.Linear | None = None,
    ):
        super().__init__()
        names = list(models)
        if len(names) < 2 or names[0] != SEED:
            raise BtsError(
                f"routing needs the seed (named {SEED!r}, first) and experts: got {names}"
            )
        if any(not n or "." in n for n in names):
            raise BtsError(f"model names {names} are not allowed: use non-empty names without '.'")
        self.spec, self.names = spec, names
        self.models = nn.ModuleDict({n: freeze(m) for n, m in models.items()})
        self.config = models[SEED].config  # context length etc. for evaluation
        hidden = models[SEED].get_input_embeddings().embedding_dim
        self.router = router if router is not None else _zero_router(hidden, len(names))

    def train(self, mode: bool = True) -> _Routing:
        """Only the router switches modes; frozen constituents always run in eval mode."""
        self.training = mode
        self.router.train(mode)
        self.models.eval()
        return self

    def features(
        self, input_ids: torch.Tensor, mask: torch.Tensor, prefix: int, running: bool = False
    ) -> torch.Tensor:
        """RMS-normalised mean seed embedding of each row's first `prefix` real tokens [b, d];
        `running`: at every position, of those up to it [b, s, d]."""
        keep = mask.bool() & (mask.long().cumsum(-1) <= prefix)
        embeds = self.models[SEED].get_input_embeddings()(input_ids).float() * keep[..., None]
        if running:
            mean = embeds.cumsum(1) / keep.long().cumsum(1)[..., None].clamp(min=1)
        else:
            mean = embeds.sum(1) / keep.sum(1, keepdim=True).clamp(min=1)
        # A mean of many embeddings shrinks with the prefix length; normalising keeps the
        # router's input scale (hence its learning rate) independent of t and of the seed.
        return mean * torch.rsqrt(mean.pow(2).mean(-1, keepdim=True) + 1e-6)

    def router_logits(self, input_ids, mask, prefix: int) -> torch.Tensor:
        return self.router(self.features(input_ids, mask, prefix))

    def active_parameters(self) -> int:
        """One constituent runs per sequence, plus the router (the largest constituent counted)."""
        largest = max(sum(p.numel() for p in m.parameters()) for m in self.models.values())
        return largest + sum(p.numel() for p in self.router.parameters())


def _zero_router(hidden: int, n_models: int) -> nn.Linear:
    """All-zero init: every model is equally likely at step 0, and building draws no randomness."""
    router = nn.Linear(hidden, n_models)
    nn.init.zeros_(router.weight)
    nn.init.zeros_(router.bias)
    return router


class RouterTrainer(_Routing):
    """Training view: `.loss` is the router's cross-entropy against the lowest-loss model."""

    def __init__(self, spec, models, router=None):
        super().__init__(spec, models, router)
        for param in self.router.parameters():
            param.requires_grad_(True)

    @torch.no_grad()
    def targets(self, input_ids, mask, labels=None) -> torch.Tensor:
        """Index of the constituent with the lowest mean LM loss on each sequence [b]."""
        labels = input_ids if labels is None else labels
        labels = labels.masked_fill(mask == 0, -100)
        losses = torch.stack(
            [
                _sequence_loss(m(input_ids=input_ids, attention_mask=mask).logits, labels)
                for m in self.models.values()
            ],
            -1,
        )
        return losses.argmin(-1)  # ties go to the earlier model (the seed first)

    def forward(self, input_ids, labels=None, attention_mask=None, **_) -> RouterOutput:
        mask = _mask(input_ids, attention_mask)
        targets = self.targets(input_ids, mask, labels)
        prefix = draw_prefix(self.spec, input_ids)
        logits = self.router_logits(input_ids, mask, prefix)
        return RouterOutput(F.cross_entropy(logits, targets), logits, targets, prefix)

    def routed(self) -> RoutedModel:
        """The evaluation model, sharing this trainer's constituents and router."""
        return RoutedModel(self.spec, dict(self.models.items()), self.router)


def _sequence_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy per row [b] (rows without targets get 0)."""
    shifted = labels[:, 1:]
    losses = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), shifted, ignore_index=-100, reduction="none"
    )
    return losses.sum(1) / (shifted != -100).sum(1).clamp(min=1)


class RoutedModel(_Routing):
    """Evaluation view: each sequence is scored and continued by the one model its prefix picks."""

    @torch.no_grad()
    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Constituent index per sequence [b], from its first `eval_prefix` real tokens."""
        mask = _mask(input_ids, attention_mask)
        return self.router_logits(input_ids, mask, self.spec.eval_prefix).argmax(-1)

    @torch.no_grad()
    def causal_routes(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Constituent index per position [b, s], from the real tokens up to it (at most the
        first `eval_prefix`): what a router could know when predicting the next token."""
        mask = _mask(input_ids, attention_mask)
        features = self.features(input_ids, mask, self.spec.eval_prefix, running=True)
        return self.router(features).argmax(-1)

    def _groups(self, routes: torch.Tensor):
        """(model, row indices) for each constituent that some row is routed to."""
        for index, name in enumerate(self.names):
            rows = (routes == index).nonzero().squeeze(-1)
            if rows.numel():
                yield self.models[name], rows

    def forward(self, input_ids, attention_mask=None, labels=None, **_) -> RoutedOutput:
        """Each position's logits from the model routed there ([b, s] routes; with `causal`
        off one route per row, [b])."""
        mask = _mask(input_ids, attention_mask)
        if self.spec.causal:
            routes = self.causal_routes(input_ids, mask)
        else:
            routes = self.route(input_ids, mask)
        per_position = routes if routes.dim() == 2 else routes[:, None].expand(input_ids.shape)
        logits = None
        for index, name in enumerate(self.names):
            chosen = per_position == index
            rows = chosen.any(-1).nonzero().squeeze(-1)
            if not rows.numel():
                continue
            part = self.models[name](input_ids=input_ids[rows], attention_mask=mask[rows]).logits
            if logits is None:
                logits = part.new_empty(input_ids.shape + part.shape[-1:])
            logits[rows] = torch.where(chosen[rows, :, None], part, logits[rows])
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return RoutedOutput(logits=logits, loss=loss, routes=routes)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        **_: object,
    ) -> torch.Tensor:
        """Route on the prompt, then decode each group of rows with its model's own generate.

        Groups that stop early are right-padded with `pad_token_id` to the longest group.
        """
        mask = _mask(input_ids, attention_mask)
        eos, pad = special_tokens(self.config, eos_token_id, pad_token_id)
        parts = []
        for model, rows in self._groups(self.route(input_ids, mask)):
            out = model.generate(
                input_ids[rows],
                attention_mask=mask[rows],
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                eos_token_id=eos or None,
                pad_token_id=pad,
            )
            parts.append((rows, out))
        width = max(out.shape[1] for _, out in parts)
        tokens = input_ids.new_full((input_ids.shape[0], width), pad)
        for rows, out in parts:
            tokens[rows, : out.shape[1]] = out
        return tokens



# ----- building, saving and loading (all I/O lives below) -----


def build_routing(
    spec: RoutingSpec, seed_dir: Path, expert_dirs: Mapping[str, Path]
) -> RouterTrainer:
    """The router trainer over the seed (named 'seed', first) and the experts in order given."""
    check_family(Path(seed_dir), expert_dirs, "stitch")
    if SEED in expert_dirs:
        raise BtsError(f"an expert is named {SEED!r}: rename it, that name is the seed's")
    models = {SEED: load_causal_lm(seed_dir)}
    models |= {name: load_causal_lm(path) for name, path in expert_dirs.items()}
    return RouterTrainer(spec, models)


def save_routing(model: RouterTrainer | RoutedModel, out_dir: Path) -> None:
    """Write `router.safetensors` and the `bts_routing.json` manifest atomically."""
    with atomic_dir(Path(out_dir), "routing") as tmp:
        info = {
            "format": FORMAT,
            "version": 1,
            "names": model.names,
            "constituents": {
                n: constituent_entry(m, f"constituent {n!r}", tmp) for n, m in model.models.items()
            },
            "spec": model.spec.model_dump(),
        }
        weights = {k: v.detach().cpu().contiguous() for k, v in model.router.state_dict().items()}
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        (tmp / MANIFEST).write_text(json.dumps(info, indent=2) + "\n")


# What a truncated, hand-edited or foreign manifest raises while it is read.
_MALFORMED = (json.JSONDecodeError, AttributeError, KeyError, TypeError, pydantic.ValidationError)


def _read_manifest(directory: Path) -> tuple[dict, RoutingSpec]:
    path = directory / MANIFEST
    if not path.is_file():
        raise BtsError(f"{path} not found: give a directory written by save_routing")
    try:
        info = json.loads(path.read_text())
        if info.get("format") != FORMAT:
            raise BtsError(f"{path} is not a bts expert-routing manifest: save the router again")
        spec = RoutingSpec.model_validate(info["spec"])
        if list(info["constituents"]) != info["names"]:
            raise KeyError("names")
        for name, entry in info["constituents"].items():
            for key in ("path", "sha256"):
                if not isinstance(entry[key], str):
                    raise BtsError(
                        f"{path}: field 'constituents.{name}.{key}' is {entry[key]!r}, not a "
                        "string: save the router again"
                    )
            if entry.get("dtype", "float32") not in MANIFEST_DTYPES:
                raise BtsError(
                    f"{path}: field 'constituents.{name}.dtype' is {entry['dtype']!r}, not one of "
                    f"{', '.join(MANIFEST_DTYPES)}: save the router again"
                )
    except _MALFORMED as err:
        raise BtsError(f"{path} is corrupt ({type(err).__name__}): save the router again") from err
    return info, spec


def _load_verified(directory: Path, name: str, entry: dict) -> PreTrainedModel:
    return load_constituent(
        directory,
        entry,
        f"constituent {name!r}",
        "the router was trained",
        "train the router again",
    )


def _load_router(directory: Path, hidden: int, n_models: int) -> nn.Linear:
    path = directory / WEIGHTS
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise BtsError(f"cannot read {path} ({first}): the router weights are corrupt") from err
    router = _zero_router(hidden, n_models)
    try:
        router.load_state_dict(weights)
    except RuntimeError as err:
        raise BtsError(
            f"{path} does not match its manifest ({n_models} models, width {hidden}): "
            "save the router again"
        ) from err
    return router


def load_routing(path: Path) -> RoutedModel:
    """Load constituents from the manifest (verifying their hashes), then the router."""
    directory = Path(path)
    info, spec = _read_manifest(directory)
    models = {n: _load_verified(directory, n, info["constituents"][n]) for n in info["names"]}
    hidden = models[info["names"][0]].get_input_embeddings().embedding_dim
    router = _load_router(directory, hidden, len(models))
    return RoutedModel(spec, models, router)


def _router_only(model: _Routing, spec: RoutingSpec) -> None:
    """Only the router trains; the constituents are frozen."""
    model.requires_grad_(False)
    model.router.requires_grad_(True)


HOOKS = Hooks(
    build=build_routing,
    save=save_routing,
    manifest=MANIFEST,
    load=load_routing,
    trainable=_router_only,
)
