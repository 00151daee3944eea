"""RMU (Li et al. 2024, "The WMDP Benchmark": Representation Misdirection for Unlearning), as
open-unlearning's ``src/trainer/unlearn/rmu.py`` and ``configs/trainer/RMU.yaml`` define it, with
the adaptive steering coefficient of Dang et al. (2025, "On Effects of Steering Latent
Representation for Large Language Model Unlearning") as an option.

With ``h_θ(x)`` the output of decoder layer ``L`` (the residual stream after it), ``u`` a fixed
random unit vector (uniform entries in [0, 1), normalised, drawn from a generator seeded with the
run's seed) and ``c`` the steering coefficient, for a micro-batch whose trained tokens (the
answers) are ``m_it = 1``:

* forget loss: ``D(h_θ(forget), c * u)``;
* retain loss (``retain_loss_type="EMBED_DIFF"``, the default): ``D(h_θ(retain), h_ref(retain))``,
  the reference being the model before unlearning (frozen); ``NLL`` or ``KL`` as for GradDiff;
* ``loss = gamma * forget + alpha * retain``;

where ``D(a, b) = mean_i [sum_t m_it * mean_d (a_itd - b_itd)^2 / sum_t m_it]`` (open-unlearning's
``compute_activation_loss``; a row without trained tokens counts one).

``c`` is ``steering_coeff`` (open-unlearning's 2), or, when ``steering_scale`` is set (adaptive
RMU), ``steering_scale`` times the mean norm of layer ``L``'s output over the forget answers' tokens,
measured on the model before unlearning by :func:`mean_activation_norm` (one number for the run,
not one per token as Dang et al. scale it). The same function measures the norms that
``benchmarks/rmu_activation_norms.py`` reports.

Only the parameters whose names match ``rmu_params`` (``re.fullmatch``) train; the rest are
frozen. ``rmu_params="wmdp"`` (the default) is WMDP's choice: the weight of the MLP output projection of decoder
layers ``L-2..L`` (:func:`wmdp_parameters`; ``down_proj`` on Llama-style models); ``.*`` trains every
parameter (open-unlearning's TOFU configuration; with tied embeddings that includes the LM head).
Defaults otherwise open-unlearning's TOFU configuration: layer 7, alpha = gamma = 1, EMBED_DIFF.

The decoder layers are found generically (:func:`~forgetful.models.layers.decoder_stack`); a model
with no more than ``7`` layers gets its last one when ``rmu_layer`` is not given, and an explicit
layer it does not have is an error. The forward passes stop after layer ``L`` (the later layers
and the LM head have no part in the loss), so under DDP the trainer looks for unused parameters.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ...atomic import atomic_file
from ...errors import ForgetfulError
from ...models.layers import decoder_stack, layer_output, num_layers
from ...nll import unwrap_model
from ...nll_backends import IGNORE_INDEX
from ...tokens import pad_token_id
from ..trainer import SelectiveLossCollator
from .base import LOSS_OPTION_DEFAULTS, UnlearningMethod

#: open-unlearning's ``module_regex: model\.layers\.7``
DEFAULT_RMU_LAYER = 7
CONTROL_VECTOR_FILE = "rmu_control_vector.safetensors"
#: the MLP output projection of a decoder layer, by architecture: Llama, Mistral, Qwen, Gemma (down_proj);
#: GPT-2 (c_proj); GPT-NeoX, Pythia (dense_4h_to_h); OPT-style (fc2)
MLP_OUTPUT_PROJECTIONS = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc2", "fc2")


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


@torch.no_grad()
def mean_activation_norm(
    model, rows, layer: int, *, pad_id: int, batch_size: int = 16, progress: bool = False
) -> float:
    """The mean Euclidean norm of decoder layer ``layer``'s output (:func:`~forgetful.models.layers.layer_output`,
    the residual stream after it) over the trained tokens of ``rows`` (rows of ``input_ids``,
    ``attention_mask``, ``loss_mask``: for TOFU's answer-only rows, the answer tokens and EOS), in
    float32, with the model in eval mode on its own device: ``sum ||h_t|| / number of tokens``."""
    from tqdm.auto import tqdm

    collate = SelectiveLossCollator(pad_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    try:
        for i in tqdm(range(0, len(rows), batch_size), desc=f"layer {layer} norm", disable=not progress):
            part = {
                k: v.to(device) for k, v in collate([rows[j] for j in range(i, min(i + batch_size, len(rows)))]).items()
            }
            h = layer_output(model, layer, part["input_ids"], part["attention_mask"])
            trained = part["labels"] != IGNORE_INDEX
            total += h.float().norm(dim=-1)[trained].double().sum().cpu()
            count += int(trained.sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ForgetfulError("the rows have no trained token: no activation norm to measure")
    return float(total / count)


def wmdp_parameters(model, layer: int) -> str:
    """WMDP's trainable parameters for steering layer ``layer``, as a ``rmu_params`` pattern: the
    weight of the MLP output projection (:data:`MLP_OUTPUT_PROJECTIONS`) of decoder layers
    ``max(L - 2, 0)..L``."""
    base, list_name = decoder_stack(model)
    blocks = getattr(base, list_name)
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = []
    for i in range(max(layer - 2, 0), layer + 1):
        module = next((blocks[i].get_submodule(m) for m in MLP_OUTPUT_PROJECTIONS if _has(blocks[i], m)), None)
        if module is None or id(getattr(module, "weight", None)) not in names:
            raise ForgetfulError(
                f"decoder layer {i} has no MLP output projection ({', '.join(MLP_OUTPUT_PROJECTIONS)}): set rmu_params "
                "to a regular expression of the parameter names to train"
            )
        chosen.append(names[id(module.weight)])
    return "|".join(re.escape(n) for n in chosen)


def _has(module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


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

    name = "rmu"
    paper = "RMU (Li et al. 2024, The WMDP Benchmark: Representation Misdirection for Unlearning)"
    defaults = {**LOSS_OPTION_DEFAULTS, "retain_loss_type": "EMBED_DIFF"}
    retain_loss_types = ("NLL", "KL", "EMBED_DIFF")
    own_options = ("steering_coeff", "steering_scale", "rmu_layer", "rmu_params")

    @classmethod
    def options_of(cls, args) -> dict:
        """As every method's, less ``steering_coeff`` when ``steering_scale`` (adaptive) replaces it."""
        options = super().options_of(args)
        if options.get("steering_scale") is not None:
            del options["steering_coeff"]
        return options

    def __init__(self, trainer):
        super().__init__(trainer)
        model = trainer.model
        self.layer = rmu_layer(model, self.args.rmu_layer)
        base, list_name = decoder_stack(model)
        # the loss reaches the input embeddings and layers 0..L only (a tied head is the embedding's weight)
        reached = {id(p) for block in getattr(base, list_name)[: self.layer + 1] for p in block.parameters()}
        reached |= {id(p) for p in unwrap_model(model).get_input_embeddings().parameters()}
        unreached = {id(p) for p in model.parameters()} - reached
        self.params = wmdp_parameters(model, self.layer) if self.args.rmu_params == "wmdp" else self.args.rmu_params
        self.trainable = freeze_all_but(model, self.params, unreached)
        config = unwrap_model(model).config
        dim = getattr(config.get_text_config(), "hidden_size", None)
        if dim is None:
            raise ForgetfulError(
                f"{type(config).__name__} has no hidden_size: RMU needs the width of the hidden states; use another "
                "unlearning method for this model"
            )
        self.activation_norm = None
        coeff = self.args.steering_coeff
        if (
            self.args.steering_scale is not None
        ):  # adaptive: the scale times the layer's mean norm on the forget answers
            self.activation_norm = mean_activation_norm(
                model.to(self.args.device),
                trainer.forget_dataset,
                self.layer,
                pad_id=pad_token_id(trainer.processing_class, model),
                batch_size=self.args.per_device_eval_batch_size,
            )
            coeff = self.args.steering_scale * self.activation_norm
        self.steering_coeff = coeff
        self.control = control_vector(int(dim), coeff, self.args.seed)

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
        state = {
            "layer": self.layer,
            "rmu_params": self.params,
            "trainable_parameters": len(self.trainable),
            "steering_coeff": self.steering_coeff,
            "activation_norm": self.activation_norm,
            "control_vector_seed": self.args.seed,
            "control_vector_file": CONTROL_VECTOR_FILE,
        }
        return {k: v for k, v in state.items() if v is not None}

    def save(self, folder) -> None:
        from safetensors.torch import save_file

        with atomic_file(Path(folder) / CONTROL_VECTOR_FILE) as tmp:
            save_file({"control_vector": self.control.contiguous()}, str(tmp))
