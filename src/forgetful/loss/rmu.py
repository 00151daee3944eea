"""RMU (Li et al. 2024, "The WMDP Benchmark": Representation Misdirection for Unlearning), as
open-unlearning's ``src/trainer/unlearn/rmu.py`` and ``configs/trainer/RMU.yaml`` define it.

With ``h_θ(x)`` the output of decoder layer ``L`` (the residual stream after it), ``u`` a fixed
random unit vector (uniform entries in [0, 1), normalised, drawn from a generator seeded with the
run's seed) and ``c`` the steering coefficient, for a micro-batch whose trained tokens (the
answers) are ``m_it = 1``:

* forget loss: ``D(h_θ(forget), c * u)``;
* retain loss (``retain_loss_type="EMBED_DIFF"``, the default): ``D(h_θ(retain), h_ref(retain))``,
  the reference being the model before unlearning (frozen); ``NLL`` or ``KL`` as for GradDiff;
* ``loss = gamma * forget + alpha * retain``;

where ``D(a, b) = mean_i [sum_t m_it * mean_d (a_itd - b_itd)^2 / sum_t m_it]`` (open-unlearning's
``compute_activation_loss``; a row without trained tokens counts one). Only the parameters whose
names match ``rmu_params`` (``re.fullmatch``) train; the rest are frozen. Defaults: open-unlearning's
TOFU configuration: layer 7, c = 2, alpha = gamma = 1, EMBED_DIFF, every parameter trainable (the
WMDP paper trains only the MLP output projections of layers L-2..L, e.g.
``model\\.layers\\.(5|6|7)\\.mlp\\.down_proj\\.weight`` on Llama).

The decoder layers are found generically (:func:`~forgetful.models.layers.decoder_stack`); a model
with no more than ``7`` layers gets its last one when ``rmu_layer`` is not given, and an explicit
layer it does not have is an error. The forward passes stop after layer ``L`` (the later layers
and the LM head have no part in the loss), so under DDP the trainer looks for unused parameters.

The class is registered as ``rmu`` by :mod:`.unlearning_methods` (which imports this module), so
that the registry lists every method in one order whatever is imported first.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..atomic import atomic_file
from ..errors import ForgetfulError
from ..models.layers import decoder_stack, layer_output, num_layers
from ..nll import unwrap_model
from ..nll_backends import IGNORE_INDEX
from .unlearning_registry import UnlearningMethod

#: open-unlearning's ``module_regex: model\.layers\.7``
DEFAULT_RMU_LAYER = 7
CONTROL_VECTOR_FILE = "rmu_control_vector.safetensors"


def rmu_layer(model, requested: int | None) -> int:
    """The decoder layer RMU steers: ``requested``, or :data:`DEFAULT_RMU_LAYER` clamped to the
    model's last layer."""
    n = num_layers(model)
    if requested is None:
        return min(DEFAULT_RMU_LAYER, n - 1)
    if not 0 <= requested < n:
        raise ForgetfulError(
            f"rmu_layer {requested}: the model has {n} decoder layers (0..{n - 1}); choose one of them"
        )
    return requested


def control_vector(dim: int, steering_coeff: float, seed: int) -> torch.Tensor:
    """``c * u``: ``u`` has uniform entries in [0, 1) from a generator seeded with ``seed``, normalised
    to unit length (as open-unlearning and the WMDP code draw it)."""
    u = torch.rand(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return steering_coeff * u / u.norm()


def activation_distance(h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mean_i [sum_t m_it * mean_d (h - target)^2 / max(sum_t m_it, 1)]``, in float32."""
    sq = (h.float() - target.float()).square().mean(-1)
    m = mask.to(sq.dtype)
    return ((sq * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()


def freeze_all_but(model, pattern: str, unreached: set[int]) -> list[str]:
    """Train only the parameters whose names match ``pattern`` (``re.fullmatch``) among those that
    train now (a frozen one, such as a PEFT model's base weight, stays frozen); returns their
    names. ``unreached`` holds the ids of the parameters the loss never reaches (the layers after
    the steered one, the final norm, an untied head): a pattern matching only those is an error."""
    rx = re.compile(pattern)
    named = list(model.named_parameters())
    chosen = [(name, p) for name, p in named if p.requires_grad and rx.fullmatch(name) is not None]
    if not chosen:
        names = ", ".join(n for n, _ in named[:3])
        raise ForgetfulError(
            f"rmu_params '{pattern}' matches no trainable parameter name (they look like {names}, ...)"
        )
    if all(id(p) in unreached for _, p in chosen):
        raise ForgetfulError(
            f"rmu_params '{pattern}' matches only parameters RMU's loss never reaches (after the steered layer, "
            "the final norm, an untied head): choose parameters of the embeddings or of layers up to rmu_layer"
        )
    keep = {id(p) for _, p in chosen}
    for _, p in named:
        p.requires_grad_(id(p) in keep)
    return [name for name, _ in chosen]


class RMU(UnlearningMethod):
    """Steer the forget tokens' hidden states at one layer to a fixed random direction, keep the
    retain tokens' where they were."""

    paper = "RMU (Li et al. 2024, The WMDP Benchmark: Representation Misdirection for Unlearning)"
    retain_loss_types = ("NLL", "KL", "EMBED_DIFF")
    own_options = ("steering_coeff", "rmu_layer", "rmu_params")

    def __init__(self, trainer):
        super().__init__(trainer)
        model = trainer.model
        self.layer = rmu_layer(model, self.args.rmu_layer)
        base, name = decoder_stack(model)
        # the loss reaches the input embeddings and layers 0..L only (a tied head is the embedding's weight)
        reached = {id(p) for block in getattr(base, name)[: self.layer + 1] for p in block.parameters()}
        reached |= {id(p) for p in unwrap_model(model).get_input_embeddings().parameters()}
        unreached = {id(p) for p in model.parameters()} - reached
        self.trainable = freeze_all_but(model, self.args.rmu_params, unreached)
        config = unwrap_model(model).config
        dim = getattr(config.get_text_config(), "hidden_size", None)
        if dim is None:
            raise ForgetfulError(
                f"{type(config).__name__} has no hidden_size: RMU needs the width of the hidden states; use another "
                "unlearning method for this model"
            )
        self.control = control_vector(int(dim), self.args.steering_coeff, self.args.seed)

    def hidden(self, model, part: dict) -> torch.Tensor:
        return layer_output(model, self.layer, part["input_ids"], part.get("attention_mask"))

    def forget_loss(self, model, inputs):
        forget = inputs["forget"]
        h = self.hidden(model, forget)
        if h.shape[-1] != self.control.numel():
            raise ForgetfulError(
                f"layer {self.layer} gives hidden states of width {h.shape[-1]}, not the config's hidden_size "
                f"{self.control.numel()}"
            )
        if self.control.device != h.device:
            self.control = self.control.to(h.device)  # once: the first micro-batch tells the device
        target = self.control.expand_as(h)
        return activation_distance(h, target, forget["labels"] != IGNORE_INDEX)

    def retain_loss(self, model, retain):
        if self.args.retain_loss_type != "EMBED_DIFF":
            return super().retain_loss(model, retain)
        with torch.no_grad():
            ref = self.hidden(self.trainer.ref_model, retain)
        return activation_distance(self.hidden(model, retain), ref, retain["labels"] != IGNORE_INDEX)

    def state(self) -> dict:
        return {
            "layer": self.layer,
            "trainable_parameters": len(self.trainable),
            "control_vector_seed": self.args.seed,
            "control_vector_file": CONTROL_VECTOR_FILE,
        }

    def save(self, folder) -> None:
        from safetensors.torch import save_file

        with atomic_file(Path(folder) / CONTROL_VECTOR_FILE) as tmp:
            save_file({"control_vector": self.control.contiguous()}, str(tmp))


__all__ = ["CONTROL_VECTOR_FILE", "DEFAULT_RMU_LAYER", "RMU", "activation_distance", "control_vector", "rmu_layer"]
