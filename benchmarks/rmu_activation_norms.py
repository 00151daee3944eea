"""The norm of a decoder layer's output over the TOFU forget answers, the scale RMU's steering
target is compared with (issue 31). For each layer L: the mean Euclidean norm of the residual
stream after layer L over every forget answer token (EOS included), measured by
:func:`forgetful.loss.unlearn.rmu.mean_activation_norm`, the function adaptive RMU
(``--steering_scale``) calls; its spread over the tokens; and RMU's forget loss at open-unlearning's
fixed steering coefficient 2 (the distance of those states to ``2 u``, ``u`` the seed-0 control
vector), the figure an RMU run logs at its first step.

    python benchmarks/rmu_activation_norms.py --model smollm2-135m --data tofu --layers 4,7,12 \
        --out results/tofu_real/2026-12-07_cpu/rmu_activation_norms.json

Rows are encoded as ``forgetful unlearn`` encodes them (answer-only loss masks, the model's chat
template), in float32 on the device the model loads on.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from forgetful.loss.tasks import prepare_dataset_for_training  # noqa: E402
from forgetful.loss.trainer import SelectiveLossCollator  # noqa: E402
from forgetful.loss.unlearn.rmu import activation_distance, control_vector, mean_activation_norm  # noqa: E402
from forgetful.measure import run_environment  # noqa: E402
from forgetful.models import load_model  # noqa: E402
from forgetful.models.layers import layer_output, num_layers  # noqa: E402
from forgetful.nll_backends import IGNORE_INDEX  # noqa: E402
from forgetful.reporting import write_json  # noqa: E402
from forgetful.tokens import pad_token_id  # noqa: E402


@torch.no_grad()
def token_norms_and_fixed_loss(model, rows, layer: int, pad_id: int, batch_size: int) -> tuple[np.ndarray, float]:
    """Every trained token's norm at ``layer`` (for the spread) and RMU's forget loss against
    ``2 u`` (open-unlearning's coefficient, the seed-0 vector), averaged over batches weighted by rows."""
    collate = SelectiveLossCollator(pad_id)
    model.eval()
    target = control_vector(model.config.hidden_size, 2.0, 0)
    norms, loss, n = [], 0.0, 0
    for i in range(0, len(rows), batch_size):
        part = collate([rows[j] for j in range(i, min(i + batch_size, len(rows)))])
        h = layer_output(model, layer, part["input_ids"], part["attention_mask"]).float()
        trained = part["labels"] != IGNORE_INDEX
        norms.append(h.norm(dim=-1)[trained].numpy())
        loss += activation_distance(h, target.expand_as(h), trained).item() * len(part["input_ids"])
        n += len(part["input_ids"])
    return np.concatenate(norms), loss / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model folder, Hub name or smollm2-135m")
    p.add_argument("--data", default="tofu", help="TOFU data (tofu: $FORGETFUL_DATA/tofu), unset for embedded")
    p.add_argument("--forget-split", default="forget10")
    p.add_argument("--num-authors", type=int, default=200, help="embedded data only")
    p.add_argument("--layers", default="4,7,12", help="0-based decoder layers, comma separated")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--machine", default=None, help="the machine in words, recorded in env (e.g. '2-core CPU, no GPU')")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    start = time.perf_counter()
    model, tok = load_model(a.model, dtype=torch.float32)
    layers = [int(x) for x in a.layers.split(",")]
    bad = [x for x in layers if not 0 <= x < num_layers(model)]
    if bad:
        raise SystemExit(f"layers {bad}: the model has {num_layers(model)} decoder layers (0..{num_layers(model) - 1})")
    source = None if a.data in ("", "embedded") else a.data
    rows = prepare_dataset_for_training(
        "tofu", tok, source=source, split=a.forget_split, forget_split=a.forget_split, num_authors=a.num_authors
    )
    pad = pad_token_id(tok, model)
    env = run_environment(next(model.parameters()).device)
    if a.machine:
        env["machine"] = a.machine
    results = {
        "env": env,
        "config": {
            "model": a.model,
            "data": a.data,
            "forget_split": a.forget_split,
            "rows": len(rows),
            "answer_tokens": int(sum(sum(m) for m in rows["loss_mask"])),
            "hidden_size": model.config.hidden_size,
            "num_layers": num_layers(model),
            "dtype": "float32",
        },
        "rows": [],
    }
    for layer in layers:
        mean = mean_activation_norm(model, rows, layer, pad_id=pad, batch_size=a.batch_size, progress=True)
        norms, fixed_loss = token_norms_and_fixed_loss(model, rows, layer, pad, a.batch_size)
        results["rows"].append(
            {
                "layer": layer,
                "mean_norm": mean,
                "token_norm_percentiles": {str(q): float(np.percentile(norms, q)) for q in (5, 25, 50, 75, 95)},
                "tokens": int(norms.size),
                "rmu_forget_loss_at_coeff_2": fixed_loss,
                "rms_per_unit": float(np.sqrt(np.mean(norms**2) / model.config.hidden_size)),
            }
        )
        print(f"layer {layer}: mean norm {mean:.2f}; RMU forget loss at c = 2: {fixed_loss:.2f}", flush=True)
        write_json(results, a.out)
    results["seconds"] = round(time.perf_counter() - start, 1)
    write_json(results, a.out)


if __name__ == "__main__":
    main()
